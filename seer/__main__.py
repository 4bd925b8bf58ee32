"""``python -m seer``: the ``seer`` command (seer/cli.py)."""
import sys

from .cli import main

sys.exit(main())

"""List files: relative entries are joined to the list's folder exactly as pathlib does (the index's strings
must not depend on which code path joined them)."""
import itertools
import random
from pathlib import Path

import pytest

from seer.data.mapped import _joiner

TRICKY = ["a.jpg", "d/a.jpg", "./a.jpg", "d/./a.jpg", "d//a.jpg", "d/", "d/.", ".", "..", "../a.jpg", "d/../a.jpg",
          " a.jpg ", "d/ ./a.jpg", "d/. /a.jpg", ".a.jpg", "d/.hidden/a.jpg", "a.jpg/", "...", "d/..", "./", "d///a",
          "a\udcff.jpg", "x/./", ".//a"]


@pytest.mark.parametrize("base", ["/", "//", "/data", "/data/", "/data/lists", ".", "rel/dir"])
def test_joined_entries_are_pathlibs(base):
    join = _joiner(Path(base))
    rng = random.Random(0)
    fuzz = ["".join(rng.choice("a./ ") for _ in range(rng.randint(1, 8))) for _ in range(2000)]
    lines = TRICKY + ["".join(p) for p in itertools.product("a./", repeat=4)] + fuzz
    for line in lines:
        if line.startswith("/") or not line.strip():
            continue  # absolute entries are not joined, blank ones are dropped before
        assert join(line) == str(Path(base) / line), (base, line)

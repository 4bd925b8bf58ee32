"""A trained tiny run beside a folder of images, for the tests of the commands that run a backbone on images."""
from pathlib import Path

from seer.config import apply_overrides, preset
from seer.train import Trainer
from tests.images import write_good_images


def tiny_run_with_images(root: Path, good: int) -> Path:
    """``root``: a 1-step tiny run in run/ (ViT depth 2, width 64, 4 heads, patch 8, 32 px, fp32) and ``good``
    images plus 1 corrupt one (part1/broken.jpg) in images/."""
    Trainer(apply_overrides(preset("tiny"), ["train.max_steps=1", "train.threads=1"]), root / "run").fit()
    write_good_images(root / "images", good)
    (root / "images" / "part1" / "broken.jpg").write_text("not an image")
    return root

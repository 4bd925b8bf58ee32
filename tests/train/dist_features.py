"""Run under torchrun: train the tiny preset with the given overrides, then write the backbone's features of
a fixed input (computed by the parallel model itself) to OUT/features.pt from rank 0."""
import sys

import torch

from seer.config import apply_overrides, preset
from seer.train import Trainer
from seer.train.distributed import shutdown_distributed

out, overrides = sys.argv[1], sys.argv[2:]
trainer = Trainer(apply_overrides(preset("tiny"), overrides), out)
trainer.fit()
x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
trainer.backbone.eval()
with torch.no_grad():
    features = trainer.backbone(x)
if trainer.dist.is_main:
    torch.save({"x": x, "features": features}, f"{out}/features.pt")
# As the CLI does: a process group left to the interpreter's exit can abort in gloo ("terminate called without
# an active exception", seen once in CI under load), failing the torchrun job after a finished run.
shutdown_distributed()

"""seer: SEER-style SwAV pretraining of Vision Transformers, from one CPU process to 10B parameters.

Subpackages: model (ViT), parallel (tensor parallelism, FSDP2), swav (head, loss, queue), optim (LARS,
schedules), data, train (trainer, checkpoints), eval (kNN, linear probe), and the ``seer`` CLI.
"""
__version__ = "0.1.0"


def load_pretrained(path, *, device="cpu"):
    """The pretrained ViT backbone (an ``nn.Module`` in eval mode mapping normalised images (N, 3, H, W) to
    class-token features (N, D)) from a run folder, a checkpoint or a ``seer export`` .safetensors file."""
    from .pretrained import load_pretrained as _load
    return _load(path, device=device)

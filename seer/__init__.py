"""seer: SEER-style SwAV pretraining of Vision Transformers, from one CPU process to 10B parameters.

Subpackages: model (ViT), parallel (tensor parallelism, FSDP2), swav (head, loss, queue), optim (LARS,
schedules), data, train (trainer, checkpoints), eval (kNN, linear probe), and the ``seer`` CLI.
"""
__version__ = "0.1.0"

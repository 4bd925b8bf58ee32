"""Public ops: one file per op, each a torch.library.custom_op plus its validation and dispatch."""

"""Public ops: one file per op, each a torch.library.custom_op plus its validation and dispatch."""


def constant_outputs(op) -> None:
    """Declare the outputs of custom op ``op`` constants to autograd (no gradient flows back through them).

    For ops whose outputs are data, not functions to differentiate (Sinkhorn's codes, the crops), as the public
    functions already make them (sinkhorn() detaches the scores, the crop parameters are packed afresh). Without
    it, a direct call on an input that requires grad gave the outputs a grad_fn whose backward raised "no
    autograd formula was registered": torch.library.opcheck failed on such input, and so did any backward
    through a loss that used them.
    """
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*(output if isinstance(output, (tuple, list)) else (output,)))

    def backward(ctx, *grads):  # never called: no output takes part in autograd
        raise RuntimeError(f"{op._qualname}: its outputs are constants; nothing to differentiate")

    op.register_autograd(backward, setup_context=setup_context)

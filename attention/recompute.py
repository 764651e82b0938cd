"""Block-wise gradient checkpointing shared by every family (docs/DESIGN.md §5): a block runs
without keeping activations and its backward recomputes it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .host_training import training_kernels


class CheckpointedBlock(torch.autograd.Function):
    """Runs `run(*hidden) -> (*hidden_out, *features)` without a graph; recomputes it in backward.

    The AD features recorded inside the block are outputs of the function, so the loss reaches them
    through the recomputation."""

    @staticmethod
    def forward(ctx, run: Callable, *hidden: torch.Tensor):  # noqa: ANN205
        ctx.run = run
        ctx.save_for_backward(*hidden)
        with torch.no_grad():
            return run(*hidden)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # noqa: ANN205
        run, ctx.run = ctx.run, None
        hidden = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        with torch.enable_grad(), training_kernels():  # the recomputation is an AD pass too
            outputs = run(*hidden)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, *[t.grad if t.requires_grad else None for t in hidden])

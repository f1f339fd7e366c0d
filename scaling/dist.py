"""Rank, world size and gathering with gradient: the only module that imports ``torch.distributed``.

Every helper degrades to a no-op on one process (or when ``torch.distributed`` is not initialised),
so losses, the train loop and their tests run unchanged on a laptop CPU.

Gradient convention (the one the rest of ``scaling`` relies on): a loss on rank r is the mean over
its LOCAL anchors computed against the GLOBAL batch, and DDP AVERAGES parameter gradients over the
W ranks. :func:`gather_with_grad` therefore SUMS the incoming gradient over ranks in backward and
returns this rank's slice. With both conventions together the parameter gradients equal those of
one process on the concatenated batch (the classic bug — a gradient off by 1/W or by W — comes from
mixing up either half; ``tests/test_dist.py`` checks it with 2 gloo processes).
"""

from __future__ import annotations

import torch
import torch.distributed as _dist

__all__ = [
    "all_reduce_mean",
    "average_gradient",
    "gather",
    "gather_with_grad",
    "is_distributed",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return _dist.is_available() and _dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 off-cluster)."""
    return _dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group (0 off-cluster)."""
    return _dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward all_reduce(SUM) of the incoming gradient, then this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(_dist.get_world_size())]
        _dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        # Every rank's loss used every rank's rows: the gradient of this rank's rows is the sum of
        # the contributions of all ranks. (An average here would be off by 1/W under DDP averaging.)
        _dist.all_reduce(grad, op=_dist.ReduceOp.SUM)
        start = _dist.get_rank() * ctx.n
        return grad[start : start + ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of shape ``(n, ...)`` from all ranks in rank order: ``(W*n, ...)``.

    Differentiable; every rank must pass the same shape (equal per-rank batches, e.g. drop_last).
    Returns ``x`` itself on one process.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather_with_grad` but without gradient (indices, detached statistics)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_dist.get_world_size())]
    _dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor:
    """Mean of ``x`` over ranks (a new tensor; metrics and logging, no gradient)."""
    t = torch.as_tensor(x).detach().clone()
    if world_size() == 1:
        return t
    work = t if t.is_floating_point() else t.double()
    _dist.all_reduce(work, op=_dist.ReduceOp.SUM)
    return work / _dist.get_world_size()


class _AverageGradient(torch.autograd.Function):
    """Identity forward; backward averages the gradient over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        _dist.all_reduce(grad, op=_dist.ReduceOp.SUM)
        return grad / _dist.get_world_size()


def average_gradient(x: torch.Tensor) -> torch.Tensor:
    """Identity whose backward averages the gradient over ranks.

    For parameters that live in a loss module (SwAV prototypes) and may not be wrapped in DDP:
    each rank's loss is its local mean, so the average of the ranks' gradients is the gradient
    of the global mean. Averaging again (if DDP does wrap the loss) changes nothing.
    """
    if world_size() == 1:
        return x
    return _AverageGradient.apply(x)

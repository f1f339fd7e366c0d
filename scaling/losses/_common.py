"""Shared pieces of the loss family: errors, parameter checks, normalisation, view gathering and the
one logits builder every in-batch loss uses.

Conventions (DESIGN.md section 4, issue 3):

- ``z`` has shape ``(V, n, D)``: V views of this process's n samples. ``h = F.normalize(z, eps=1e-12)``.
- Gathering: ``h_global = gather_views(h)`` has shape ``(V, W*n, D)``, samples in rank order, so the
  local sample ``i`` of rank ``r`` is the global sample ``r*n + i`` (``offset = r*n``).
- Anchors are this rank's ``V*n`` embeddings, flattened view-major (row ``v*n + i``); the columns of
  the logits are the ``V*W*n`` global embeddings, flattened the same way (column ``v*W*n + g``).
- The positives of anchor (v, i) are the other views (v' != v) of its sample; its negatives are the
  ``M = V*(W*n - 1)`` embeddings of all OTHER samples, from all views (``M = 2N - 2`` for V = 2).
- Every loss returns the mean over its local anchors (and over each anchor's V-1 positives), so the
  mean of the per-rank values equals the value of one process on the concatenated batch.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from scaling import dist

INF = float("inf")

#: A loss parameter: (type, default, (low, high)) with a CLOSED valid range ``low <= value <= high``.
#: Strictly positive parameters use a small positive lower bound so that the closed check is exact.
ParamSpec = tuple[type, Any, tuple[float, float]]


class LossError(ValueError):
    """A loss was asked for with an unknown name, an unknown parameter or an out-of-range value,
    or was called with inputs of the wrong shape."""


# ---------------------------------------------------------------------------------------------
# argument checks


def check_temperature(loss: str, temperature: Any) -> float:
    """``temperature`` as a float; LossError unless it is a finite number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise LossError(f"{loss}: temperature must be a number in (0, inf), got {temperature!r}")
    t = float(temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise LossError(f"{loss}: temperature must be in (0, inf), got {temperature!r}")
    return t


def check_param(loss: str, name: str, value: Any, spec: ParamSpec) -> Any:
    """Coerce ``value`` to the parameter's type and check its closed range; LossError otherwise."""
    typ, default, (low, high) = spec
    if value is None and default is None:
        return None
    expected = f"{'an int' if typ is int else 'a float'} in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LossError(f"{loss}: parameter {name!r} must be {expected}, got {value!r}")
    if typ is int:
        if not float(value).is_integer():
            raise LossError(f"{loss}: parameter {name!r} must be {expected}, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if not (low <= value <= high):  # also rejects NaN
        raise LossError(f"{loss}: parameter {name!r} must be {expected}, got {value!r}")
    return value


def check_embeddings(loss: str, z: Any) -> tuple[int, int, int]:
    """Shape ``(V, n, D)`` of a valid input; LossError naming what is wrong otherwise."""
    if not isinstance(z, Tensor):
        raise LossError(f"{loss}: z must be a torch.Tensor of shape (V, N, D), got {type(z).__name__}")
    if z.dim() != 3:
        raise LossError(f"{loss}: z must have shape (V, N, D) (views, samples, dim), got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise LossError(f"{loss}: z must be a floating-point tensor, got {z.dtype}")
    v, n, d = z.shape
    if v < 2:
        raise LossError(f"{loss}: needs at least 2 views (V >= 2), got z of shape {tuple(z.shape)}")
    if n < 1 or d < 1 or n * dist.world_size() < 2:
        raise LossError(f"{loss}: needs at least 2 samples in the (global) batch and D >= 1, got z of shape {tuple(z.shape)}")
    return v, n, d


def check_index(loss: str, index: Any, n: int, dataset_size: int) -> Tensor:
    """A valid ``(n,)`` int64 tensor of dataset indices in ``[0, dataset_size)``."""
    if index is None:
        raise LossError(f"{loss}: needs index=<int64 tensor of shape (N,)> with the samples' dataset indices")
    if not isinstance(index, Tensor) or index.dtype != torch.int64 or tuple(index.shape) != (n,):
        got = f"{index.dtype} tensor of shape {tuple(index.shape)}" if isinstance(index, Tensor) else type(index).__name__
        raise LossError(f"{loss}: index must be an int64 tensor of shape ({n},), got {got}")
    if n and (int(index.min()) < 0 or int(index.max()) >= dataset_size):
        raise LossError(
            f"{loss}: index values must lie in [0, {dataset_size}) (dataset_size), "
            f"got [{int(index.min())}, {int(index.max())}]"
        )
    return index


# ---------------------------------------------------------------------------------------------
# tensors


def normalize(z: Tensor) -> Tensor:
    """L2-normalise along the last dim (``F.normalize``, eps 1e-12), differentiable."""
    return F.normalize(z, p=2.0, dim=-1, eps=1e-12)


def gather_views(h: Tensor) -> Tensor:
    """``(V, n, D)`` -> ``(V, W*n, D)``: all ranks' samples in rank order, with gradient."""
    if dist.world_size() == 1:
        return h
    return dist.gather_with_grad(h.transpose(0, 1).contiguous()).transpose(0, 1)


def local_offset(n: int) -> int:
    """Global index of this rank's first sample (``rank * n``)."""
    return dist.rank() * n


@functools.lru_cache(maxsize=64)
def _other_views(v: int, device: torch.device) -> Tensor:
    """``(V, V-1)`` int64: row v lists the other views in order."""
    return torch.tensor([[w for w in range(v) if w != u] for u in range(v)], device=device)


def pair_with_other_views(a: Tensor, b: Tensor, symmetric: bool = False) -> Tensor:
    """``(V, n, D) x (V, n, D) -> (V, n, V-1)``: ``a[v, i] . b[w, i]`` for every other view w != v.

    ``symmetric``: the caller guarantees ``a[v].b[w] == a[w].b[v]`` (a = b/t), so for V = 2 one
    dot product serves both views.
    """
    v = a.shape[0]
    if symmetric and v == 2:
        return (a[0] * b[1]).sum(-1)[None, :, None].expand(2, -1, 1)
    other = b[_other_views(v, a.device)]  # (V, V-1, n, D)
    return (a.unsqueeze(1) * other).sum(-1).permute(0, 2, 1)


def positive_cosines(h: Tensor) -> Tensor:
    """``(V, n, D)`` -> ``(V, n, V-1)``: cosine of every anchor with each other view of its sample."""
    return pair_with_other_views(h, h, symmetric=True)


@functools.lru_cache(maxsize=64)
def own_sample_columns(v: int, n: int, n_global: int, offset: int, device: torch.device) -> Tensor:
    """``(V*n, V)`` int64: for anchor row v*n+i, the columns of all views of its own sample (cached)."""
    sample = torch.arange(n, device=device) + offset
    cols = torch.arange(v, device=device)[None, :] * n_global + sample[:, None]  # (n, V)
    return cols.repeat(v, 1)


#: One logsumexp term over each anchor's negatives: ``(scale c, with_bias)`` for
#: ``log sum_b exp(c * s(a,b)/t + bias_ab)``; c > 0, or c == 0 with a bias (then no gradient).
Term = tuple[float, bool]
BiasFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AnchorTerms:
    """Extra logits that are fixed combinations of the logits but carry gradient to the ANCHORS
    only (their other factor is a constant, e.g. MoCHi's detached synthetic negatives):
    ``value[a, k] = sum_j coef[a, j] * logits[a, cols[a, j]]`` for the j with ``out_of[a, j] == k``.
    ``value`` is computed by the caller (it may add constants); shapes ``(A, K)`` and ``(A, J)``."""

    value: Tensor
    cols: Tensor
    coef: Tensor
    out_of: Tensor


ExtraFn = Callable[[Tensor], AnchorTerms]


class _NegativesLogSumExp(torch.autograd.Function):
    """The logits of the local anchors against the global batch and logsumexp terms over each
    anchor's negatives, from one matmul, never materialising more than needed.

    Forward: ``logits = anchors @ batch.T`` (the only unavoidable (rows x cols) allocation), own-
    sample columns masked, optional anchor-only extra logits read from it, then per term the
    exponentials ``exp(c*logits + bias - max)`` are made IN the logits (or bias) buffer when it is
    their last user. Backward: ``d logits = sum_k e_k * (g_k * c_k / sum_b e_k)``, built in place in a
    saved buffer, then the two matmuls (the extra logits' sparse gradient is added for the anchors'
    matmul only) — the same work as the bare similarity matmul's backward plus one pass per term.
    """

    @staticmethod
    def forward(ctx, anchors: Tensor, batch: Tensor, cols: Tensor, terms: tuple[Term, ...],  # type: ignore[override]
                bias_fn: BiasFn | None, extra_fn: ExtraFn | None, row_mean: bool):
        ctx.set_materialize_grads(False)
        logits = anchors @ batch.T
        # own-sample (self, positive) columns: the lowest finite value — exp() of it is 0 like -inf's,
        # but 0 * it stays 0 where -inf would give NaN (scaled by c > 1 it may round to -inf: harmless)
        logits.scatter_(1, cols, torch.finfo(logits.dtype).min)
        extra = extra_fn(logits) if extra_fn is not None else None
        bias = bias_fn(logits) if bias_fn is not None else None
        last_l = max((i for i, (c, _) in enumerate(terms) if c != 0), default=-1)
        last_b = max((i for i, (_, wb) in enumerate(terms) if wb), default=-1)
        peak_l = None
        outs, saved, meta = [], [], []
        for i, (c, with_bias) in enumerate(terms):
            reuse_l = i == last_l
            if not with_bias:  # c * logits - c * max: one fused pass
                if peak_l is None:
                    peak_l = logits.amax(dim=1, keepdim=True)
                peak = peak_l * c
                x = torch.add(-peak, logits, alpha=c, out=logits if reuse_l else None)
                if row_mean and i == 0:  # sum_b softmax_ab * x_ab needs x and exp(x) at once:
                    dots = x.new_empty(x.shape[0])  # by row blocks that stay in cache, then exp in place
                    step = max(1, (1 << 18) // max(1, x.shape[1]))
                    buf = x.new_empty(min(step, x.shape[0]), x.shape[1])
                    for start in range(0, x.shape[0], step):
                        xs = x[start : start + step]
                        es = torch.exp(xs, out=buf[: xs.shape[0]])
                        dots[start : start + step] = torch.linalg.vecdot(es, xs, dim=1)
                        xs.copy_(es)
                    e = x
                    total = e.sum(dim=1, keepdim=True)
                    mean = peak.squeeze(1) + dots / total.squeeze(1)
                    outs.append((peak + torch.log(total)).squeeze(1))
                    saved += [e, total]
                    meta.append((i, c))
                    continue
            else:
                if c == 0:
                    x = bias if i == last_b else bias.clone()
                elif reuse_l:
                    x = (logits if c == 1 else logits.mul_(c)).add_(bias)
                elif i == last_b:
                    x = bias.add_(logits, alpha=c)
                else:
                    x = torch.add(bias, logits, alpha=c)
                peak = x.amax(dim=1, keepdim=True)
                x.sub_(peak)
            e = x.exp_()
            total = e.sum(dim=1, keepdim=True)
            outs.append((peak + torch.log(total)).squeeze(1))
            if c != 0:
                saved += [e, total]
                meta.append((i, c))
        ctx.meta = meta
        ctx.n_terms = len(terms)
        ctx.used = False
        ctx.shape = logits.shape
        if extra is not None:
            saved += [extra.cols, extra.coef, extra.out_of]
            outs.append(extra.value)
        ctx.has_extra = extra is not None
        ctx.save_for_backward(anchors, batch, *saved)
        if row_mean:
            ctx.mark_non_differentiable(mean)
            outs.append(mean)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None):  # type: ignore[override]
        if ctx.used:
            raise RuntimeError("the loss's backward reuses its buffers and cannot run twice (retain_graph)")
        ctx.used = True
        anchors, batch, *saved = ctx.saved_tensors
        d_logits = None
        for k, (i, c) in enumerate(ctx.meta):
            g = grads[i]
            if g is None:
                continue
            e, total = saved[2 * k], saved[2 * k + 1]
            coef = g[:, None] * (c / total)
            d_logits = e.mul_(coef) if d_logits is None else d_logits.addcmul_(e, coef)
        g_extra = grads[ctx.n_terms] if ctx.has_extra else None
        if d_logits is None and g_extra is None:
            return None, None, None, None, None, None, None
        if d_logits is None:
            d_logits = anchors.new_zeros(ctx.shape)
        d_batch = d_logits.T @ anchors
        if g_extra is not None:  # the extra logits' gradient reaches the anchors only
            cols, coef, out_of = saved[-3:]
            d_logits.scatter_add_(1, cols, g_extra.gather(1, out_of) * coef)
        return d_logits @ batch, d_batch, None, None, None, None, None


@dataclass(frozen=True)
class Contrast:
    """What an in-batch loss needs from the similarities of its local anchors to the global batch.

    ``pos``: ``(V, n, V-1)`` positive logits ``s(a,p)/t``. ``lse``: per requested term, ``(V, n, 1)``
    ``log sum_b exp(c * s(a,b)/t + bias_ab)`` over the anchor's M negatives. ``extra``: the values
    of the ``extra_fn`` anchor-only logits ``(V*n, K)``, or None. ``mean``: ``(V, n, 1)`` the
    softmax-weighted mean ``sum_b softmax_b(s/t) * s(a,b)/t`` over the negatives (no gradient), if
    asked for. ``num_neg``: M = V*(W*n - 1).
    """

    pos: Tensor
    lse: tuple[Tensor, ...]
    extra: Tensor | None
    mean: Tensor | None
    num_neg: int
    views: int
    n: int


def contrast(
    h_local: Tensor,
    h_global: Tensor,
    temperature: float | Tensor,
    offset: int = 0,
    *,
    terms: tuple[Term, ...] = ((1.0, False),),
    bias_fn: BiasFn | None = None,
    extra_fn: ExtraFn | None = None,
    row_mean: bool = False,
) -> Contrast:
    """One matmul of the (1/t-scaled) local anchors against the global batch -> positives and
    logsumexp terms over the negatives (see :class:`Contrast`).

    Shape: h_local ``(V, n, D)``, h_global ``(V, W*n, D)``, both L2-normalised; ``offset`` is the
    global index of the first local sample; ``temperature`` a float or a per-sample ``(n,)``
    tensor. ``bias_fn`` maps the masked logits ``(V*n, V*W*n)`` (s/t, no gradient; own-sample
    columns at the lowest finite float) to a constant bias matrix (-inf there); ``extra_fn`` maps
    them to :class:`AnchorTerms`; ``row_mean`` (first term plain) adds ``mean``.
    """
    if row_mean and terms[0] != (1.0, False):
        raise ValueError("row_mean needs a plain first term (1.0, False)")
    v, n, d = h_local.shape
    n_global = h_global.shape[1]
    # fold 1/t into the anchors: a (V*n, D) pass, not (V*n)^2
    scaled = h_local / temperature[None, :, None] if isinstance(temperature, Tensor) else h_local * (1.0 / temperature)
    cols = own_sample_columns(v, n, n_global, offset, h_local.device)
    out = _NegativesLogSumExp.apply(
        scaled.reshape(v * n, d), h_global.reshape(v * n_global, d), cols, terms, bias_fn, extra_fn, row_mean
    )
    lse = tuple(x.view(v, n, 1) for x in out[: len(terms)])
    pos = pair_with_other_views(scaled, h_local, symmetric=True)  # s(a,p)/t
    extra = out[len(terms)] if extra_fn is not None else None
    mean = out[-1].view(v, n, 1) if row_mean else None
    return Contrast(pos=pos, lse=lse, extra=extra, mean=mean, num_neg=v * (n_global - 1), views=v, n=n)


def nll_pos(pos: Tensor, log_neg: Tensor) -> Tensor:
    """``-log(pos / (pos + neg))`` from logits: ``-logsigmoid(pos - log neg)`` (exact and stable)."""
    return -F.logsigmoid(pos - log_neg)

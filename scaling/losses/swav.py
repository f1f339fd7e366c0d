"""SwAV — Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments" (NeurIPS), https://arxiv.org/abs/2006.09882 (authors' code: facebookresearch/swav,
``main_swav.py``).

K learnable prototypes c_k (an ``nn.Parameter`` of this module: put ``loss.parameters()`` in the
optimizer). Before each training call the prototypes are L2-normalised in place (as the authors'
train loop does; in eval mode out of place); scores are ``s(h, c_k)`` for the normalised
embeddings h. Codes: Sinkhorn-Knopp (``epsilon``, ``sinkhorn_iterations``) on the scores of the
GLOBAL batch of a view (no gradient), rows summing to 1. Swapped prediction: ``-sum_k q_k log softmax(s(h, c)/t)_k``.

Multi-crop: with V views the first 2 are the global views — codes are computed from them — and all
V views are predictions: ``loss = mean_{c in {0,1}} mean_{v != c} CE(q_c, p_v)`` (for V = 2:
``(CE(q_0, p_1) + CE(q_1, p_0)) / 2``), each CE the mean over samples. This matches the authors'
``crops_for_assign = [0, 1]`` with ``nmb_crops = [2, V-2]``.

Not implemented: the feature queue and freezing the prototypes for the first iterations (a train
loop concern: set ``loss.prototypes.grad = None`` before the step). Sinkhorn runs the authors'
iterations on two scaling vectors and falls back to the log domain when those leave the normal
floating-point range (small epsilon; mathematically identical).

Cost: the score matmul ``(V*n, D) @ (D, K)`` and its two backward matmuls are larger than the
(V*N)^2 similarity matmul of the in-batch losses whenever K > V*W*n: at the authors' K = 3000
with N = 1024, V = 2 they alone have 1.46x the arithmetic of the similarity matmul forward +
backward (1.2-1.35x its time on 2 CPU threads), before any softmax or Sinkhorn pass over the
larger scores, so SwAV cannot meet the family's 1.5x-the-bare-matmul target at this K.
K stays at the authors' value, which their batch-256 script (``scripts/swav_200ep_bs256_pretrain.sh``)
keeps too; neither the paper nor the code gives a CIFAR or small-batch setting that differs.
``benchmarks/loss.py`` also reports SwAV against the bare score matmul forward + backward at the
same K. Beyond it: per Sinkhorn one exponential pass, 2 matrix-vector products per iteration and
the scaling of the codes; one exponential pass for the cross-entropies, whose gradient is built in
place in one pass per (code, view) pair. The exponentials are ``exp2`` of base-2 logits (several
times cheaper than ``exp`` on CPU), unshifted when a bound on s/t shows they cannot overflow, so
no pass computes row maxima at ordinary temperatures.

Distributed: the codes use the gathered scores of all ranks (as ``distributed_sinkhorn``), and the
prototypes' gradient is averaged over ranks inside the loss, so the optimizer step matches one
process on the concatenated batch whether or not the loss module is wrapped in DDP.

The prototypes' dimension is ``dim`` (``build_loss(..., dim=proj_dim)``, context every loss
accepts). None infers it from the first ``z``: the parameter is materialised in place, so an
optimizer built before the first call still holds it — but before that call it reports
``ndim == 1`` and no shape, so pass ``dim`` when parameters are grouped by shape (weight decay).
Initialisation is seeded by ``seed`` (identical on every rank).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.lazy import LazyModuleMixin

from scaling import dist
from scaling.losses._common import (
    INF,
    LossError,
    ParamSpec,
    check_embeddings,
    check_param,
    check_temperature,
    local_offset,
    normalize,
)

PARAMS: dict[str, ParamSpec] = {
    "n_prototypes": (int, 3000, (1, INF)),
    "epsilon": (float, 0.05, (1e-6, INF)),
    "sinkhorn_iterations": (int, 3, (1, INF)),
    "seed": (int, 0, (0, 2**62)),
}
#: ``dim`` is context (the projection dimension), not a hyperparameter: ``build_loss(..., dim=D)``.
DIM_SPEC: ParamSpec = (int, None, (1, INF))

#: ``exp(x) = exp2(x * log2(e))``: on CPU torch's float32 ``exp2`` is several times cheaper than its
#: ``exp`` (both about 1 ulp), and the factor folds into the shift that precedes every exponential here.
_LOG2E = 1.0 / math.log(2.0)


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float, iterations: int, rows: slice = slice(None)) -> Tensor:
    """Sinkhorn-Knopp codes of the authors' ``distributed_sinkhorn``.

    Shape: scores ``(B, K)`` of the whole (global) batch -> codes ``(B, K)`` (only the ``rows``
    slice, e.g. this rank's samples, if given); every row sums to 1 and, as the iterations
    converge, every prototype receives B/K of the mass.

    The authors' loop divides the whole matrix by its column sums, then by its row sums. Every
    iterate is ``diag(u) E diag(v)`` with ``E = exp(scores/epsilon)``, so the same iterations run
    on the two scaling vectors — a matrix-vector product each (column sums ``u^T E``, row sums
    ``E v``) instead of a reduction and a division over the matrix — and the codes are formed
    once at the end. Constant factors the next normalisation cancels are folded away (the
    initial division by the total and the shift by the max; the last ``/B`` and ``*B``). Falls
    back to the same iterations in the log domain if a scaling leaves the normal floating-point
    range (small epsilon: ``E`` under-flows).
    """
    return _sinkhorn(scores, _LOG2E / epsilon, iterations, rows)[0]


@torch.no_grad()
def _sinkhorn(scores: Tensor, scale: float, iterations: int, rows: slice = slice(None),
              peak: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """:func:`sinkhorn` of ``E = exp2(scale * (scores - peak))`` — natural-log scores with
    ``scale = log2(e) / epsilon``, or base-2 scores (scores * log2 e) with ``scale = 1 / epsilon``
    — and the codes' row sums. ``peak``: ``scores.max()`` (the default) or any upper bound of the
    scores the caller knows: a constant factor of E, which the first normalisation cancels."""
    b, k = scores.shape
    peak = scores.max() if peak is None else peak
    e = torch.add(scores.new_tensor(-scale) * peak, scores, alpha=scale).exp2_()
    u = v = mass = scores.new_ones(())  # (iterations >= 1 replaces them)
    for it in range(iterations):
        mass = e.sum(dim=0) if it == 0 else u @ e  # each prototype (a column here) gets mass 1/K ...
        v = mass.mul_(k).reciprocal_()
        mass = e @ v  # ... then each sample (a row) 1/B (the last time: 1)
        u = mass.reciprocal() if it == iterations - 1 else mass.mul_(b).reciprocal_()
    tiny = torch.finfo(e.dtype).tiny
    # normal, finite scalings keep every intermediate (E u <= 1/v, then q <= 1) in range
    if bool(((u >= tiny) & (u < INF)).all() & ((v >= tiny) & (v < INF)).all()):
        return e[rows].mul_(u[rows, None]).mul_(v), (u * mass)[rows]  # row sums: u (E v) = 1
    log_q = scores * (scale * math.log(2.0))
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(b)
    codes = torch.exp(log_q[rows] + math.log(b))
    return codes, codes.sum(dim=-1)


def _exp2_needs_no_shift(low: Tensor | float, high: Tensor | float, k: int, dtype: torch.dtype) -> bool:
    """Whether ``exp2`` of base-2 logits can skip the shift by the row maxima, given bounds
    ``low <= row max <= high``: every row's largest term stays normal and a row's sum of k terms
    stays finite (for s/t: unless t is tiny, as |s/t * log2 e| <= 1.45/t)."""
    info = torch.finfo(dtype)
    return bool(high < math.log2(info.max) - math.log2(k) - 1.0) and bool(low > math.log2(info.tiny) + 1.0)


def _cross_entropy(logits2: Tensor, codes: Sequence[Tensor], scale: float, out: Tensor, *,
                   peak2: Tensor | None = None, no_shift: bool = False,
                   row_mass: Sequence[Tensor] | None = None) -> tuple[Tensor, tuple]:
    """``sum_j sum_{i != j} CE(codes_i, softmax(logits_j)) / scale`` from one exponential pass, on
    base-2 logits ``logits2 = logits * log2(e)`` (so the exponentials are bare ``exp2``, see ``_LOG2E``).

    The value is ``sum lse_j . mass_j - sum <codes_i, logits_j>`` (``mass_j``: the row sums of
    the targets of view j, 1 per code view for Sinkhorn codes; ``row_mass``: the codes' row sums,
    if known). The exponentials ``exp(logits)`` — ``exp(logits - rowmax)`` if the unshifted ones
    could leave the normal range — are written into ``out`` (which may be ``logits2`` itself: it is
    read before). ``peak2``: the row maxima ``(V, n)`` of ``logits2``, if known; ``no_shift``: the
    caller knows the shift is not needed (a bound on the logits). Returns the value and what
    :func:`_neg_grad` needs.
    """
    v, _, k = logits2.shape
    pairs = [(i, j) for j in range(v) for i in range(len(codes)) if i != j]
    cross2 = torch.stack([torch.dot(codes[i].reshape(-1), logits2[j].reshape(-1)) for i, j in pairs]).sum()
    row_mass = [q.sum(dim=-1) for q in codes] if row_mass is None else row_mass
    mass = logits2.new_zeros(logits2.shape[:-1])
    for i, j in pairs:
        mass[j] += row_mass[i]
    if not no_shift:
        peak2 = logits2.amax(dim=-1) if peak2 is None else peak2
        no_shift = _exp2_needs_no_shift(peak2.min(), peak2.max(), k, logits2.dtype)
    if no_shift:  # exp(logits) itself: one pass fewer
        e = torch.exp2(logits2, out=out)
        lse2 = torch.log2(total := e.sum(dim=-1))
    else:
        assert peak2 is not None
        e = torch.sub(logits2, peak2[..., None], out=out).exp2_()
        lse2 = torch.log2(total := e.sum(dim=-1)).add_(peak2)
    value = (torch.dot(lse2.reshape(-1), mass.reshape(-1)) - cross2) * (math.log(2.0) / scale)
    return value, (e, mass / total, pairs)


def _neg_grad(e: Tensor, weight: Tensor, codes: Sequence[Tensor], pairs: list[tuple[int, int]]) -> Tensor:
    """``-scale`` times d value / d logits, ``sum_{i != j} codes_i - softmax_j * mass_j`` with
    ``softmax_j * mass_j = e_j * weight_j`` (``weight = mass / rowsum(e)``), built in ``e``: one pass
    per (code, view) pair. The sign is undone on small tensors downstream (the matmul outputs, or
    the upstream scalar), cheaper than a pass over this one."""
    first: dict[int, int] = {}
    for i, j in pairs:
        first.setdefault(j, i)
    for j in range(e.shape[0]):
        if j not in first:  # no targets: zero gradient
            e[j].zero_()
    for i, j in pairs:
        if first[j] == i:
            torch.addcmul(codes[i], e[j], weight[j, :, None], value=-1, out=e[j])
        else:
            e[j].add_(codes[i])
    return e


class _SwappedCrossEntropy(torch.autograd.Function):
    """:func:`swav_loss` on given logits (left untouched: the exponentials get their own buffer)."""

    @staticmethod
    def forward(ctx, logits: Tensor, scale: float, *codes: Tensor):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        logits2 = logits * _LOG2E
        value, (e, weight, ctx.pairs) = _cross_entropy(logits2, codes, scale, out=logits2)
        ctx.save_for_backward(e, weight, *codes)
        ctx.scale, ctx.used = scale, False
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor | None):  # type: ignore[override]
        n_codes = len(ctx.saved_tensors) - 2
        if grad is None:
            return (None, None) + (None,) * n_codes
        if ctx.used:
            raise RuntimeError("the loss's backward reuses its buffers and cannot run twice (retain_graph)")
        ctx.used = True
        e, weight, *codes = ctx.saved_tensors
        return (_neg_grad(e, weight, codes, ctx.pairs).mul_(-grad / ctx.scale), None) + (None,) * n_codes


CodesFn = Callable[[Tensor, Tensor | None], list[tuple[Tensor, Tensor]]]


class _SwAVHead(torch.autograd.Function):
    """The score matmul, the codes and :func:`swav_loss` in one: the ``(V, n, K)`` logits buffer
    holds the exponentials, then the negated gradient (up to the upstream scalar and the sign, which
    are applied to the small matmul outputs), which alone is kept for the two backward matmuls —
    the codes are released after the forward.

    The logits are computed in base 2 (``hs * log2 e`` against the prototypes) so that every
    exponential is a bare ``exp2`` (see ``_LOG2E``); the gradient is the one of the logits.

    Shape: hs ``(V, n, D)`` the embeddings divided by t, protos ``(K, D)``; ``codes_fn`` maps the
    base-2 logits and their row maxima ``(V, n)`` (no gradient; None when ``bound2`` made them
    unnecessary) to the C code views ``(n, K)`` with their row sums ``(n,)``. ``bound2``: a bound
    on ``|logits2|``, if known — when it shows that the exponentials cannot leave the normal range
    unshifted, no row maxima are computed.
    """

    @staticmethod
    def forward(ctx, hs: Tensor, protos: Tensor, codes_fn: CodesFn, scale: float,  # type: ignore[override]
                bound2: float | None = None):
        ctx.set_materialize_grads(False)
        logits2 = torch.matmul(hs * _LOG2E, protos.T)  # (V, n, K): s(h, c_k)/t * log2 e
        no_shift = bound2 is not None and _exp2_needs_no_shift(-bound2, bound2, protos.shape[0], logits2.dtype)
        peak2 = None if no_shift else logits2.amax(dim=-1)
        codes, row_mass = zip(*codes_fn(logits2, peak2))
        value, (e, weight, pairs) = _cross_entropy(
            logits2, codes, scale, out=logits2, peak2=peak2, no_shift=no_shift, row_mass=row_mass
        )
        if any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(hs, protos, _neg_grad(e, weight, codes, pairs))
        ctx.scale, ctx.used = scale, False
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor | None):  # type: ignore[override]
        if grad is None:
            return None, None, None, None, None
        if ctx.used:
            raise RuntimeError("the loss's backward cannot run twice (retain_graph)")
        ctx.used = True
        hs, protos, neg_d_logits = ctx.saved_tensors
        g = -grad / ctx.scale
        k, d = protos.shape
        d_hs = torch.matmul(neg_d_logits, protos).mul_(g) if ctx.needs_input_grad[0] else None
        d_protos = (neg_d_logits.reshape(-1, k).T @ hs.reshape(-1, d)).mul_(g) if ctx.needs_input_grad[1] else None
        return d_hs, d_protos, None, None, None


def swav_loss(logits: Tensor, codes: Sequence[Tensor] | Tensor) -> Tensor:
    """Swapped prediction (pure).

    Shape: logits ``(V, n, K)`` = ``s(h, c_k)/t`` of the views against the normalised prototypes;
    codes ``(C, n, K)`` (or C tensors ``(n, K)``) the Sinkhorn targets of the first C views (C = 2).
    Returns the mean over the C code views of the mean over the other V-1 views of the
    cross-entropy ``-sum_k q_k log softmax(logits)_k`` (mean over samples). The codes are
    constants (no gradient); the log-softmax is never materialised (one exponential pass, see
    :func:`_cross_entropy`). :class:`SwAVLoss` computes the same fused with its score matmul.
    """
    v, n, _ = logits.shape
    return _SwappedCrossEntropy.apply(logits, _scale(v, n, len(codes)), *[q.detach() for q in codes])


def _scale(views: int, n: int, code_views: int) -> float:
    # mean over samples, over the V-1 predicted views and over the code views
    return float(n * (views - 1) * code_views)


class SwAVLoss(LazyModuleMixin, nn.Module):
    """SwAV swapped-prediction loss with learnable prototypes.

    Args:
        temperature: softmax temperature t > 0 of the predictions (authors' default 0.1).
        n_prototypes: number K of prototypes.
        epsilon: entropic regularisation of Sinkhorn-Knopp.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        dim: embedding dimension D, or None to infer it from the first call.
        seed: seed of the prototypes' initialisation.

    Shape: ``z`` ``(V, N, D)`` -> scalar; views 0 and 1 are the global views.
    """

    needs_index = False
    prototypes: nn.Parameter

    def __init__(
        self,
        *,
        temperature: float,
        n_prototypes: int = PARAMS["n_prototypes"][1],
        epsilon: float = PARAMS["epsilon"][1],
        sinkhorn_iterations: int = PARAMS["sinkhorn_iterations"][1],
        dim: int | None = None,
        seed: int = PARAMS["seed"][1],
    ) -> None:
        with warnings.catch_warnings():  # the mixin warns that lazy modules are a new feature
            warnings.simplefilter("ignore")
            super().__init__()
        self.temperature = check_temperature("swav", temperature)
        self.n_prototypes = check_param("swav", "n_prototypes", n_prototypes, PARAMS["n_prototypes"])
        self.epsilon = check_param("swav", "epsilon", epsilon, PARAMS["epsilon"])
        self.sinkhorn_iterations = check_param(
            "swav", "sinkhorn_iterations", sinkhorn_iterations, PARAMS["sinkhorn_iterations"]
        )
        self.seed = check_param("swav", "seed", seed, PARAMS["seed"])
        dim = check_param("swav", "dim", dim, DIM_SPEC)
        self.dim = dim  # as given; None: inferred from the first z (then see prototypes.shape)
        if dim is None:
            self.prototypes = nn.UninitializedParameter()
        else:
            self.prototypes = nn.Parameter(torch.empty(self.n_prototypes, dim))
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Seeded random unit prototypes (identical on every rank)."""
        if self.has_uninitialized_params():
            return
        g = torch.Generator().manual_seed(self.seed)
        init = torch.randn(self.prototypes.shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            self.prototypes.copy_(normalize(init).to(self.prototypes.dtype))

    def initialize_parameters(self, z: Tensor, index: Tensor | None = None) -> None:  # type: ignore[override]
        if self.has_uninitialized_params():
            check_embeddings("swav", z)
            with torch.no_grad():
                self.prototypes.materialize((self.n_prototypes, z.shape[-1]))
                self.reset_parameters()

    def forward(self, z: Tensor, index: Tensor | None = None) -> Tensor:
        v, n, d = check_embeddings("swav", z)
        if d != self.prototypes.shape[1]:
            raise LossError(f"swav: z has D={d} but the prototypes have dim={self.prototypes.shape[1]}")
        h = normalize(z)
        if self.training:
            with torch.no_grad():  # the authors normalise the prototypes before every step
                self.prototypes.copy_(normalize(self.prototypes))
            protos = dist.average_gradient(self.prototypes).to(h.dtype)
        else:  # evaluation leaves the parameter alone
            protos = normalize(self.prototypes.to(h.dtype))
        rows = slice(local_offset(n), local_offset(n) + n)
        eps = self.epsilon / self.temperature
        # unit embeddings and prototypes: |s| <= 1, so |s/t * log2 e| <= bound2 (1% for rounding)
        bound2 = _LOG2E * 1.01 / self.temperature

        def codes(logits2: Tensor, peak2: Tensor | None) -> list[tuple[Tensor, Tensor]]:
            # from the global batch's base-2 scores of views 0 and 1: exp(s/epsilon) = exp2(logits2 / eps),
            # shifted by their max or, if the head computed no row maxima, by the bound
            return [
                _sinkhorn(dist.gather(logits2[c]), 1.0 / eps, self.sinkhorn_iterations, rows,
                          bound2 if peak2 is None else dist.gather(peak2[c]).max())
                for c in range(2)
            ]

        # = swav_loss(logits, codes(logits)) for logits = (h / t) @ protos.T, fused with the matmul
        return _SwAVHead.apply(h * (1.0 / self.temperature), protos, codes, _scale(v, n, 2), bound2)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, n_prototypes={self.n_prototypes}, epsilon={self.epsilon}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}, seed={self.seed}"
        )

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
same K. Beyond it: one exponential pass and 2 matrix-vector products per iteration for each
Sinkhorn, one exponential pass for the cross-entropies, whose gradient is built in place.

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
    b, k = scores.shape
    e = torch.add(-scores.max() / epsilon, scores, alpha=1.0 / epsilon).exp_()
    u: Tensor | None = None
    for it in range(iterations):
        mass = e.sum(dim=0) if u is None else u @ e  # each prototype (a column here) gets mass 1/K ...
        v = mass.mul_(k).reciprocal_()
        mass = e @ v  # ... then each sample (a row) 1/B (the last time: 1)
        u = mass.reciprocal_() if it == iterations - 1 else mass.mul_(b).reciprocal_()
    assert u is not None
    tiny = torch.finfo(e.dtype).tiny
    # normal, finite scalings keep every intermediate (E u <= 1/v, then q <= 1) in range
    if bool(((u >= tiny) & (u < INF)).all() & ((v >= tiny) & (v < INF)).all()):
        return e[rows].mul_(u[rows, None]).mul_(v)
    log_q = scores / epsilon
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(b)
    return torch.exp(log_q[rows] + math.log(b))


def _cross_entropy(logits: Tensor, codes: Sequence[Tensor], scale: float, out: Tensor) -> tuple[Tensor, tuple]:
    """``sum_j sum_{i != j} CE(codes_i, softmax(logits_j)) / scale`` from one exponential pass.

    The value is ``sum lse_j . mass_j - sum <codes_i, logits_j>`` (``mass_j``: the row sums of
    the targets of view j, 1 per code view for Sinkhorn codes); the exponentials
    ``exp(logits - rowmax)`` are written into ``out`` (which may be ``logits`` itself: it is read
    before). Returns the value and what :func:`_cross_entropy_grad` needs.
    """
    v = logits.shape[0]
    pairs = [(i, j) for j in range(v) for i in range(len(codes)) if i != j]
    cross = torch.stack([torch.dot(codes[i].reshape(-1), logits[j].reshape(-1)) for i, j in pairs]).sum()
    row_mass = [q.sum(dim=-1) for q in codes]
    mass = logits.new_zeros(logits.shape[:-1])
    for i, j in pairs:
        mass[j] += row_mass[i]
    peak = logits.amax(dim=-1, keepdim=True)
    e = torch.sub(logits, peak, out=out).exp_()
    total = e.sum(dim=-1)
    lse = torch.log(total).add_(peak.squeeze(-1))
    value = (torch.dot(lse.reshape(-1), mass.reshape(-1)) - cross) / scale
    return value, (e, total, mass, pairs)


def _cross_entropy_grad(e: Tensor, total: Tensor, mass: Tensor, codes: Sequence[Tensor],
                        pairs: list[tuple[int, int]], g: Tensor | float = 1.0) -> Tensor:
    """``g`` times d value / d logits (without the 1/scale): ``softmax_j * mass_j - sum_{i != j} codes_i``,
    built in ``e``."""
    d_logits = e.mul_((mass / total * g)[..., None])
    for i, j in pairs:
        if isinstance(g, Tensor):
            d_logits[j].addcmul_(codes[i], -g)
        else:
            d_logits[j].sub_(codes[i], alpha=g)
    return d_logits


class _SwappedCrossEntropy(torch.autograd.Function):
    """:func:`swav_loss` on given logits (left untouched: the exponentials get their own buffer)."""

    @staticmethod
    def forward(ctx, logits: Tensor, scale: float, *codes: Tensor):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        value, (e, total, mass, ctx.pairs) = _cross_entropy(logits, codes, scale, torch.empty_like(logits))
        ctx.save_for_backward(e, total, mass, *codes)
        ctx.scale, ctx.used = scale, False
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor | None):  # type: ignore[override]
        n_codes = len(ctx.saved_tensors) - 3
        if grad is None:
            return (None, None) + (None,) * n_codes
        if ctx.used:
            raise RuntimeError("the loss's backward reuses its buffers and cannot run twice (retain_graph)")
        ctx.used = True
        e, total, mass, *codes = ctx.saved_tensors
        return (_cross_entropy_grad(e, total, mass, codes, ctx.pairs, grad / ctx.scale), None) + (None,) * n_codes


CodesFn = Callable[[Tensor], list[Tensor]]


class _SwAVHead(torch.autograd.Function):
    """The score matmul, the codes and :func:`swav_loss` in one: the ``(V, n, K)`` logits buffer
    holds the exponentials, then the gradient (up to the upstream scalar, which is applied to the
    small matmul outputs), which alone is kept for the two backward matmuls — the codes are
    released after the forward.

    Shape: hs ``(V, n, D)`` the embeddings divided by t, protos ``(K, D)``; ``codes_fn`` maps the
    logits (no gradient) to the C code views ``(n, K)``.
    """

    @staticmethod
    def forward(ctx, hs: Tensor, protos: Tensor, codes_fn: CodesFn, scale: float):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        logits = torch.matmul(hs, protos.T)  # (V, n, K): s(h, c_k)/t
        codes = codes_fn(logits)
        value, (e, total, mass, pairs) = _cross_entropy(logits, codes, scale, out=logits)
        if any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(hs, protos, _cross_entropy_grad(e, total, mass, codes, pairs))
        ctx.scale, ctx.used = scale, False
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor | None):  # type: ignore[override]
        if grad is None:
            return None, None, None, None
        if ctx.used:
            raise RuntimeError("the loss's backward cannot run twice (retain_graph)")
        ctx.used = True
        hs, protos, d_logits = ctx.saved_tensors
        g = grad / ctx.scale
        k, d = protos.shape
        d_hs = torch.matmul(d_logits, protos).mul_(g) if ctx.needs_input_grad[0] else None
        d_protos = (d_logits.reshape(-1, k).T @ hs.reshape(-1, d)).mul_(g) if ctx.needs_input_grad[1] else None
        return d_hs, d_protos, None, None


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

        def codes(logits: Tensor) -> list[Tensor]:  # from the global batch's scores s = t * logits of views 0 and 1
            return [sinkhorn(dist.gather(logits[c]), eps, self.sinkhorn_iterations, rows) for c in range(2)]

        # = swav_loss(logits, codes(logits)) for logits = (h / t) @ protos.T, fused with the matmul
        return _SwAVHead.apply(h * (1.0 / self.temperature), protos, codes, _scale(v, n, 2))

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, n_prototypes={self.n_prototypes}, epsilon={self.epsilon}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}, seed={self.seed}"
        )

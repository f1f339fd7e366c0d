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
loop concern: set ``loss.prototypes.grad = None`` before the step). Sinkhorn falls back to the log
domain when the authors' exp/normalise loop would under- or overflow (mathematically identical).

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
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
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
def sinkhorn(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
    """Sinkhorn-Knopp codes of the authors' ``distributed_sinkhorn``.

    Shape: scores ``(B, K)`` of the whole (global) batch -> codes ``(B, K)``; every row sums to 1
    and, as the iterations converge, every prototype receives B/K of the mass. Runs the authors'
    exp/normalise loop and falls back to the same iterations in the log domain if that under- or
    overflows (small epsilon). Constant factors the next normalisation cancels are folded away
    (the initial division by the total and the shift by the max; the last ``/B`` and ``*B``).
    """
    b, k = scores.shape
    q = torch.add(-scores.max() / epsilon, scores, alpha=1.0 / epsilon).exp_()
    for it in range(iterations):
        cols = q.sum(dim=0, keepdim=True)  # each prototype (a column here) gets mass 1/K ...
        q /= cols * k
        rows = q.sum(dim=1, keepdim=True)  # ... then each sample (a row) 1/B (the last time: 1)
        q /= rows if it == iterations - 1 else rows * b
    # an underflowed (zero) sum anywhere turns into inf/NaN that reaches the last row sums
    if bool(torch.isfinite(rows).all()) and bool((rows > 0).all()):
        return q
    log_q = scores / epsilon
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(b)
    return torch.exp(log_q + math.log(b))


def swav_loss(logits: Tensor, codes: Sequence[Tensor] | Tensor) -> Tensor:
    """Swapped prediction (pure).

    Shape: logits ``(V, n, K)`` = ``s(h, c_k)/t`` of the views against the normalised prototypes;
    codes ``(C, n, K)`` (or C tensors ``(n, K)``) the Sinkhorn targets of the first C views (C = 2).
    Returns the mean over the C code views of the mean over the other V-1 views of the
    cross-entropy ``-sum_k q_k log softmax(logits)_k`` (mean over samples), computed as one dot
    product of the log-softmax with the summed targets of each view.
    """
    v, n, _ = logits.shape
    c = len(codes)
    with torch.no_grad():
        targets = torch.empty_like(logits)  # targets[j] = sum of the code views that predict view j
        for j in range(v):
            src = [i for i in range(c) if i != j]
            targets[j].copy_(codes[src[0]])
            for i in src[1:]:
                targets[j].add_(codes[i])
    log_p = F.log_softmax(logits, dim=-1)
    return -torch.dot(targets.reshape(-1), log_p.reshape(-1)) / (n * (v - 1) * c)


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
        logits = (h * (1.0 / self.temperature)) @ protos.T  # (V, n, K): s(h, c_k)/t
        offset = local_offset(n)
        with torch.no_grad():  # codes from the global batch's scores s = t * logits of views 0 and 1
            eps = self.epsilon / self.temperature
            codes = [
                sinkhorn(dist.gather(logits[c].detach()), eps, self.sinkhorn_iterations)[offset : offset + n]
                for c in range(2)
            ]
        return swav_loss(logits, codes)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, n_prototypes={self.n_prototypes}, epsilon={self.epsilon}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}, seed={self.seed}"
        )

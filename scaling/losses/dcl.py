"""Decoupled contrastive learning — Yeh et al. 2022, "Decoupled Contrastive Learning" (ECCV),
https://arxiv.org/abs/2110.06848. (Not the debiased loss of Chuang et al., see ``debiased.py``.)

- ``dcl``:  ``l_a = -s(a,p)/t + log sum_b neg_ab`` — the positive is removed from the denominator.
- ``dclw``: ``l_a = -w_i * s(a,p)/t + log sum_b neg_ab`` with the von Mises-Fisher weight
  ``w_i = 2 - exp(s_i/sigma) / mean_j exp(s_j/sigma)`` over the N positive pairs of the (global)
  batch; both anchors of pair i share w_i; w is detached and not clipped.

DCLW is DCL plus a weight function (composition): ``DCLLoss(temperature=t,
weight_fn=VonMisesFisherWeight(sigma))``.

V > 2: every other view of the anchor's sample is a positive; the term of each (anchor, positive)
pair is ``-w * s(a,p)/t + log sum_b neg_ab`` over the V*(N-1) other-sample embeddings, averaged over
the V-1 positives and the anchors. For dclw the weights are computed over all V*(V-1) ordered positive
pairs of every sample (for V = 2 that is each pair twice, which leaves the mean unchanged).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from scaling.losses._common import (
    INF,
    ParamSpec,
    check_embeddings,
    check_param,
    check_temperature,
    contrast,
    gather_views,
    local_offset,
    normalize,
    positive_cosines,
)

DCL_PARAMS: dict[str, ParamSpec] = {}
DCLW_PARAMS: dict[str, ParamSpec] = {"sigma": (float, 0.5, (1e-6, INF))}

#: Maps the cosines of ALL positive pairs of the global batch (any shape) to weights (same shape).
WeightFn = Callable[[Tensor], Tensor]


class VonMisesFisherWeight:
    """DCLW's weight ``w = 2 - exp(s/sigma) / mean(exp(s/sigma))`` (mean over all given pairs), detached."""

    def __init__(self, sigma: float = DCLW_PARAMS["sigma"][1]) -> None:
        self.sigma = check_param("dclw", "sigma", sigma, DCLW_PARAMS["sigma"])

    def __call__(self, pos_cos: Tensor) -> Tensor:
        x = pos_cos.detach() / self.sigma
        # numel * softmax == exp(x) / mean(exp(x)), without overflow for small sigma
        return 2.0 - x.numel() * torch.softmax(x.flatten(), dim=0).view_as(x)

    def __repr__(self) -> str:
        return f"VonMisesFisherWeight(sigma={self.sigma})"


def dcl_loss(
    h_local: Tensor, h_global: Tensor, temperature: float, offset: int = 0, pos_weight: Tensor | None = None
) -> Tensor:
    """Decoupled contrastive loss (pure; inputs already normalised).

    Shape: h_local ``(V, n, D)``, h_global ``(V, W*n, D)``, pos_weight ``(V, n, V-1)`` or None
    (weights of the positive terms, constants); returns the mean over anchors and positives.
    """
    c = contrast(h_local, h_global, temperature, offset)
    pos = c.pos if pos_weight is None else c.pos * pos_weight.detach()
    return (c.lse[0] - pos).mean()


class DCLLoss(nn.Module):
    """DCL, or DCLW when given a weight function.

    Args:
        temperature: t > 0.
        weight_fn: None for ``dcl``; ``VonMisesFisherWeight(sigma)`` for ``dclw``.

    Shape: ``z`` ``(V, N, D)`` -> scalar.
    """

    needs_index = False

    def __init__(self, *, temperature: float, weight_fn: WeightFn | None = None) -> None:
        super().__init__()
        self.name = "dcl" if weight_fn is None else "dclw"
        self.temperature = check_temperature(self.name, temperature)
        self.weight_fn = weight_fn

    def forward(self, z: Tensor, index: Tensor | None = None) -> Tensor:
        _, n, _ = check_embeddings(self.name, z)
        h = normalize(z)
        h_global = gather_views(h)
        offset = local_offset(n)
        weight = None
        if self.weight_fn is not None:
            with torch.no_grad():
                # The weights are normalised over the positive pairs of the GLOBAL batch.
                w = self.weight_fn(positive_cosines(h_global))  # (V, W*n, V-1)
                weight = w[:, offset : offset + n]
        return dcl_loss(h, h_global, self.temperature, offset, weight)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weight_fn={self.weight_fn!r}"

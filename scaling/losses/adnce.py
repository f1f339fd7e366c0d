"""Adjusted InfoNCE (ADNCE) — Wu et al. 2023, "Understanding Contrastive Learning via
Distributionally Robust Optimization" (NeurIPS), https://arxiv.org/abs/2310.11048 (follows the
authors' image code, github.com/junkangwu/ADNCE).

``l_a = -log(pos_a / (pos_a + sum_b w_ab * neg_ab))`` with the Gaussian weight on the COSINE (not s/t)
``w_ab = exp(-(s(a,b) - mu)^2 / (2 sigma^2))``, normalised by its mean over the anchor's M negatives
and detached; the positive stays unweighted in the denominator. (The Gaussian's 1/(sigma sqrt(2 pi))
factor cancels in the normalisation.) Computed as
``logsumexp(log w + s/t) - logsumexp(log w) + log M``.

V > 2: each (anchor, positive) pair with the anchor's weighted negatives over the V*(N-1)
other-sample embeddings; averaged over the V-1 positives and the anchors.
"""

from __future__ import annotations

import math

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
    nll_pos,
    normalize,
)

PARAMS: dict[str, ParamSpec] = {
    "mu": (float, 0.7, (-1.0, 1.0)),
    "sigma": (float, 0.5, (1e-6, INF)),
}


def adnce_loss(
    h_local: Tensor,
    h_global: Tensor,
    temperature: float,
    offset: int = 0,
    mu: float = 0.7,
    sigma: float = 0.5,
) -> Tensor:
    """ADNCE (pure; inputs already normalised).

    Shape: h_local ``(V, n, D)``, h_global ``(V, W*n, D)`` -> scalar.
    """
    # log w = -k2 * (s/t - mu/t)^2 with k2 = t^2 / (2 sigma^2), as s = t * logits: constants
    # (detached), -inf on the masked entries. Terms: log sum_b w_ab neg_ab and log sum_b w_ab.
    k2 = temperature**2 / (2.0 * sigma**2)

    def log_weights(logits: Tensor) -> Tensor:
        return torch.sub(logits, mu / temperature).square_().mul_(-k2)

    c = contrast(h_local, h_global, temperature, offset, terms=((1.0, True), (0.0, True)), bias_fn=log_weights)
    log_neg = c.lse[0] - (c.lse[1] - math.log(c.num_neg))
    return nll_pos(c.pos, log_neg).mean()


class ADNCELoss(nn.Module):
    """Adjusted InfoNCE (Wu et al. 2023).

    Args:
        temperature: t > 0.
        mu: centre of the Gaussian weight on the cosine, in [-1, 1].
        sigma: width of the Gaussian weight, > 0.

    Shape: ``z`` ``(V, N, D)`` -> scalar.
    """

    needs_index = False

    def __init__(self, *, temperature: float, mu: float = PARAMS["mu"][1], sigma: float = PARAMS["sigma"][1]) -> None:
        super().__init__()
        self.temperature = check_temperature("adnce", temperature)
        self.mu = check_param("adnce", "mu", mu, PARAMS["mu"])
        self.sigma = check_param("adnce", "sigma", sigma, PARAMS["sigma"])

    def forward(self, z: Tensor, index: Tensor | None = None) -> Tensor:
        _, n, _ = check_embeddings("adnce", z)
        h = normalize(z)
        return adnce_loss(h, gather_views(h), self.temperature, local_offset(n), self.mu, self.sigma)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, mu={self.mu}, sigma={self.sigma}"

"""Hard negative contrastive loss — Robinson et al. 2021, "Contrastive Learning with Hard Negative
Samples" (ICLR), https://arxiv.org/abs/2010.04592 (authors' code: github.com/joshr17/HCL).

As ``debiased`` but with the negative sum replaced by the importance-weighted one
``sum_b (imp_ab / mean_b imp_ab) * neg_ab``, ``imp_ab = exp(beta * s(a,b)/t)`` (beta scales s/t;
the mean over the anchor's M negatives). The importance weights are NOT detached, as in the authors'
code. Computed as ``logsumexp((1+beta) s/t) - logsumexp(beta s/t) + log M``, which stays finite in
float32 at beta = 6, t = 0.05 where the naive form overflows to NaN.

V > 2: as ``debiased`` — each (anchor, positive) pair with the anchor's re-weighted negatives over
the V*(N-1) other-sample embeddings; averaged over positives and anchors.
"""

from __future__ import annotations

import math

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
)
from scaling.losses.debiased import PARAMS as DEBIASED_PARAMS
from scaling.losses.debiased import debiased_nll

PARAMS: dict[str, ParamSpec] = {
    "beta": (float, 1.0, (0.0, INF)),
    "tau_plus": DEBIASED_PARAMS["tau_plus"],
}


def hcl_loss(
    h_local: Tensor,
    h_global: Tensor,
    temperature: float,
    offset: int = 0,
    beta: float = 1.0,
    tau_plus: float = 0.1,
) -> Tensor:
    """HCL (pure; inputs already normalised).

    Shape: h_local ``(V, n, D)``, h_global ``(V, W*n, D)`` -> scalar.
    """
    if beta == 0.0:  # imp == 1: the plain negative sum
        c = contrast(h_local, h_global, temperature, offset)
        log_neg = c.lse[0]
    else:
        c = contrast(h_local, h_global, temperature, offset, terms=((1.0 + beta, False), (beta, False)))
        log_neg = c.lse[0] - c.lse[1] + math.log(c.num_neg)
    return debiased_nll(c.pos, log_neg, c.num_neg, tau_plus, temperature).mean()


class HCLLoss(nn.Module):
    """Hard negative sampling loss (Robinson et al. 2021).

    Args:
        temperature: t > 0.
        beta: concentration beta >= 0 (0 gives ``debiased``).
        tau_plus: class prior tau+ in [0, 0.999].

    Shape: ``z`` ``(V, N, D)`` -> scalar.
    """

    needs_index = False

    def __init__(
        self, *, temperature: float, beta: float = PARAMS["beta"][1], tau_plus: float = PARAMS["tau_plus"][1]
    ) -> None:
        super().__init__()
        self.temperature = check_temperature("hcl", temperature)
        self.beta = check_param("hcl", "beta", beta, PARAMS["beta"])
        self.tau_plus = check_param("hcl", "tau_plus", tau_plus, PARAMS["tau_plus"])

    def forward(self, z: Tensor, index: Tensor | None = None) -> Tensor:
        _, n, _ = check_embeddings("hcl", z)
        h = normalize(z)
        return hcl_loss(h, gather_views(h), self.temperature, local_offset(n), self.beta, self.tau_plus)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, beta={self.beta}, tau_plus={self.tau_plus}"

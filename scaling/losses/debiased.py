"""Debiased contrastive loss — Chuang et al. 2020, "Debiased Contrastive Learning" (NeurIPS),
https://arxiv.org/abs/2007.00224 (authors' code: github.com/chingyaoc/DCL).

``Ng = max((sum_b neg_ab - tau_plus * M * pos_a) / (1 - tau_plus), M * e^(-1/t))`` with M = 2N-2 in
both places and the max a hard clamp (as ``torch.clamp(min=...)`` in the authors' code), then
``l_a = -log(pos_a / (pos_a + Ng))``; mean over the 2N anchors. Computed in the log domain (the
subtraction is shifted by the larger of its two terms), so it does not overflow for small t.

V > 2: each (anchor, positive) pair gets the term above with its own pos_a and the anchor's
negatives (the V*(N-1) other-sample embeddings, M = V*(N-1)); averaged over the V-1 positives and
the anchors.
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

PARAMS: dict[str, ParamSpec] = {"tau_plus": (float, 0.1, (0.0, 0.999))}


def debiased_nll(pos: Tensor, log_neg: Tensor, num_neg: int, tau_plus: float, temperature: float) -> Tensor:
    """``-log(pos / (pos + Ng))`` with Chuang et al.'s clamped estimator Ng, in the log domain.

    Shape: pos ``(V, n, V-1)`` positive logits s/t; log_neg ``(V, n, 1)`` log of the anchor's
    (possibly re-weighted, see ``hcl``) negative sum. Returns ``(V, n, V-1)``.
    """
    log_floor = math.log(num_neg) - 1.0 / temperature  # log(M * e^(-1/t))
    if tau_plus == 0.0:
        log_x = log_neg.expand_as(pos)
    else:
        shift = torch.maximum(log_neg, pos).detach()
        x = torch.exp(log_neg - shift) - (tau_plus * num_neg) * torch.exp(pos - shift)
        ok = x > 0
        safe = torch.where(ok, x, torch.ones_like(x))
        log_x = torch.where(ok, torch.log(safe) + shift - math.log1p(-tau_plus), torch.full_like(x, -INF))
    # clamp (not maximum): the gradient passes at ties, as torch.clamp in the authors' code
    log_ng = torch.clamp(log_x, min=log_floor)
    return nll_pos(pos, log_ng)


def debiased_loss(
    h_local: Tensor, h_global: Tensor, temperature: float, offset: int = 0, tau_plus: float = 0.1
) -> Tensor:
    """Debiased contrastive loss (pure; inputs already normalised).

    Shape: h_local ``(V, n, D)``, h_global ``(V, W*n, D)`` -> scalar.
    """
    c = contrast(h_local, h_global, temperature, offset)
    return debiased_nll(c.pos, c.lse[0], c.num_neg, tau_plus, temperature).mean()


class DebiasedLoss(nn.Module):
    """Debiased contrastive loss (Chuang et al. 2020).

    Args:
        temperature: t > 0.
        tau_plus: class prior tau+ in [0, 0.999] (0 gives InfoNCE up to the clamp).

    Shape: ``z`` ``(V, N, D)`` -> scalar.
    """

    needs_index = False

    def __init__(self, *, temperature: float, tau_plus: float = PARAMS["tau_plus"][1]) -> None:
        super().__init__()
        self.temperature = check_temperature("debiased", temperature)
        self.tau_plus = check_param("debiased", "tau_plus", tau_plus, PARAMS["tau_plus"])

    def forward(self, z: Tensor, index: Tensor | None = None) -> Tensor:
        _, n, _ = check_embeddings("debiased", z)
        h = normalize(z)
        return debiased_loss(h, gather_views(h), self.temperature, local_offset(n), self.tau_plus)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, tau_plus={self.tau_plus}"

"""InfoNCE / NT-Xent — Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations" (SimCLR), https://arxiv.org/abs/2002.05709.

``l_a = -log(pos_a / (pos_a + sum_b neg_ab))`` with ``pos_a = exp(s(a,p)/t)``, ``neg_ab = exp(s(a,b)/t)``
over the M = 2N-2 negatives; the value is the mean over the 2N anchors.

V > 2 (all-pairs multi-view InfoNCE): every other view of the anchor's sample is a positive, each
positive pair gets its own term against the SAME negatives (the V*(N-1) embeddings of the other
samples — the other positives are not in the denominator, unlike SupCon's L_out), and the terms are
averaged over the V-1 positives and the V*N anchors.
"""

from __future__ import annotations

from torch import Tensor, nn

from scaling.losses._common import (
    ParamSpec,
    check_embeddings,
    check_temperature,
    contrast,
    gather_views,
    local_offset,
    nll_pos,
    normalize,
)

PARAMS: dict[str, ParamSpec] = {}


def infonce_loss(h_local: Tensor, h_global: Tensor, temperature: float, offset: int = 0) -> Tensor:
    """InfoNCE of the local anchors against the global batch (pure; inputs already normalised).

    Shape: h_local ``(V, n, D)``, h_global ``(V, W*n, D)`` (``h_global = h_local`` on one process);
    returns a scalar, the mean over the V*n local anchors and their V-1 positives.
    """
    c = contrast(h_local, h_global, temperature, offset)
    return nll_pos(c.pos, c.lse[0]).mean()


class InfoNCELoss(nn.Module):
    """NT-Xent (SimCLR) with global negatives.

    Args:
        temperature: t > 0.

    Shape: ``z`` ``(V, N, D)`` raw projections of this process -> scalar.
    """

    needs_index = False

    def __init__(self, *, temperature: float) -> None:
        super().__init__()
        self.temperature = check_temperature("infonce", temperature)

    def forward(self, z: Tensor, index: Tensor | None = None) -> Tensor:
        _, n, _ = check_embeddings("infonce", z)
        h = normalize(z)
        return infonce_loss(h, gather_views(h), self.temperature, local_offset(n))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

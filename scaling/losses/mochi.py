"""MoCHi, hard negative mixing — Kalantidis et al. 2020, "Hard Negative Mixing for Contrastive
Learning" (NeurIPS), https://arxiv.org/abs/2010.01028.

InfoNCE whose negatives are augmented, per anchor q, with synthetic hard negatives made from the
anchor's ``n_hard`` hardest negatives (highest s(q, n) among its M in-batch negatives; the paper
mixes from a MoCo queue, here the negatives are the global batch):

- ``s`` mixes of two hardest negatives: ``h = normalize(alpha n_i + (1-alpha) n_j)``, alpha ~ U(0, 1),
  i, j drawn uniformly (with replacement) from the hardest;
- ``s_prime`` mixes with the anchor itself: ``h' = normalize(beta q + (1-beta) n_j)``, beta ~ U(0, 0.5).

The synthetic points are constants (no gradient flows into the negatives or the anchor copy they
were mixed from; no official code was found — this follows the paper and the ``.detach()`` of the
MoCHi-style mixing in SynCo, github.com/giakoumoglou/synco); their logits ``q.h/t`` carry gradient
through the anchor q only. ``l = -log(pos / (pos + sum_b neg_b + sum_k exp(q.h_k/t)))``; mean over
anchors. ``n_hard`` is capped at M. The synthetic logits are computed in closed form from the
similarity matrix (``q.h = (alpha q.n_i + (1-alpha) q.n_j) / ||alpha n_i + (1-alpha) n_j||``), never
materialising the (anchors x s x D) mixed vectors; their sparse gradient joins the anchors' half
of the similarity matmul's backward (no extra matmul).

Randomness: a generator seeded from ``seed`` and a step counter (a buffer, so it is part of the
state_dict) that advances on every call. The draws are made for ALL global anchors and sliced per
rank, so W processes reproduce one process on the concatenated batch exactly.

V > 2: each anchor (any view) gets its own hardest negatives (among the V*(N-1) other-sample
embeddings) and one set of synthetic negatives shared by its V-1 positive terms; averaged over
positives and anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaling.losses._common import (
    INF,
    AnchorTerms,
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
    "n_hard": (int, 128, (1, INF)),
    "s": (int, 128, (0, INF)),
    "s_prime": (int, 64, (0, INF)),
    "seed": (int, 0, (0, 2**62)),
}


def _pair_cosines(x: Tensor, a: Tensor, b: Tensor, logits: Tensor, temperature: float, n_global: int) -> Tensor:
    """``x[a] . x[b]`` for global column indices a, b of equal shape (no gradient).

    On one process the anchors ARE the global batch, so the cosines are read from the logits
    matrix (times t), except where a and b are views of the same sample — those entries were
    masked — which are computed directly. Otherwise one Gram matmul of the global batch.
    """
    if logits.shape[0] != logits.shape[1]:
        return (x @ x.T)[a, b]
    cos = torch.take(logits, a * logits.shape[1] + b) * temperature
    same = (a % n_global) == (b % n_global)
    if bool(same.any()):
        cos[same] = (x[a[same]] * x[b[same]]).sum(-1)
    return cos


def mixing_terms(
    logits: Tensor,
    x: Tensor,
    temperature: float,
    offset: int,
    views: int,
    *,
    n_hard: int,
    s: int,
    s_prime: int,
    generator: torch.Generator,
) -> tuple[AnchorTerms, Tensor]:
    """The synthetic negatives of every local anchor as anchor-only logits (no gradient here).

    Shape: logits ``(V*n, V*W*n)`` the masked s/t of the local anchors; x ``(V*W*n, D)`` the
    global unit embeddings. Returns the :class:`AnchorTerms` of the ``s + s_prime`` synthetic
    logits ``q.h/t`` (without the ``beta q.q/t`` part of the anchor mixes) and that part's
    coefficient ``beta / ||beta q + (1-beta) n||`` ``(V*n, s_prime)``.
    """
    rows, cols_total = logits.shape
    n, n_global = rows // views, cols_total // views
    k = min(n_hard, views * (n_global - 1))
    dev, dt = logits.device, logits.dtype
    # Draws for every GLOBAL anchor (same generator state on every rank), then this rank's rows.
    shape1, shape2 = (views, n_global, s), (views, n_global, s_prime)
    i1 = torch.randint(k, shape1, generator=generator, device=dev)
    i2 = torch.randint(k, shape1, generator=generator, device=dev)
    alpha = torch.rand(shape1, generator=generator, device=dev, dtype=dt)
    j = torch.randint(k, shape2, generator=generator, device=dev)
    beta = 0.5 * torch.rand(shape2, generator=generator, device=dev, dtype=dt)

    def local(t: Tensor) -> Tensor:
        return t[:, offset : offset + n].reshape(rows, t.shape[-1])

    i1, i2, alpha, j, beta = local(i1), local(i2), local(alpha), local(j), local(beta)
    hard = torch.topk(logits, k, dim=1, sorted=True).indices  # (V*n, k), hardest first; k <= M: never masked
    c1, c2, cj = hard.gather(1, i1), hard.gather(1, i2), hard.gather(1, j)
    # mixes of two hardest negatives: q.h/t = (alpha q.n1 + (1-alpha) q.n2) / (t ||alpha n1 + (1-alpha) n2||)
    cos12 = _pair_cosines(x, c1, c2, logits, temperature, n_global)
    norm1 = (alpha.square() + (1 - alpha).square() + 2 * alpha * (1 - alpha) * cos12).clamp_min(1e-24).sqrt()
    coef1, coef2 = alpha / norm1, (1 - alpha) / norm1
    # mixes of the anchor with a hardest negative: q.h'/t = (beta q.q + (1-beta) q.n) / (t ||beta q + (1-beta) n||)
    lj = logits.gather(1, cj)
    norm2 = (beta.square() + (1 - beta).square() + 2 * beta * (1 - beta) * (lj * temperature)).clamp_min(1e-24).sqrt()
    coef_q, coef_j = beta / norm2, (1 - beta) / norm2
    value = torch.cat([coef1 * logits.gather(1, c1) + coef2 * logits.gather(1, c2), coef_j * lj], dim=1)
    ar_s = torch.arange(s, device=dev)
    out_of = torch.cat([ar_s, ar_s, s + torch.arange(s_prime, device=dev)]).expand(rows, -1)
    terms = AnchorTerms(
        value=value,
        cols=torch.cat([c1, c2, cj], dim=1),
        coef=torch.cat([coef1, coef2, coef_j], dim=1),
        out_of=out_of,
    )
    return terms, coef_q


def mochi_loss(
    h_local: Tensor,
    h_global: Tensor,
    temperature: float,
    offset: int = 0,
    *,
    n_hard: int = 128,
    s: int = 128,
    s_prime: int = 64,
    generator: torch.Generator,
) -> Tensor:
    """MoCHi InfoNCE (pure; inputs already normalised).

    Shape: h_local ``(V, n, D)``, h_global ``(V, W*n, D)`` -> scalar.
    """
    v, n, d = h_local.shape
    if s + s_prime == 0:
        c = contrast(h_local, h_global, temperature, offset)
        return nll_pos(c.pos, c.lse[0]).mean()
    x = h_global.detach().reshape(-1, d)
    side: dict[str, Tensor] = {}

    def extra(logits: Tensor) -> AnchorTerms:
        terms, side["coef_q"] = mixing_terms(
            logits, x, temperature, offset, v, n_hard=n_hard, s=s, s_prime=s_prime, generator=generator
        )
        return terms

    c = contrast(h_local, h_global, temperature, offset, extra_fn=extra)
    assert c.extra is not None
    q = h_local.reshape(v * n, d)
    self_term = (q * q.detach()).sum(-1, keepdim=True) / temperature  # q . q_detached / t
    syn = c.extra + F.pad(side["coef_q"] * self_term, (s, 0))
    log_neg = torch.logaddexp(c.lse[0].view(-1), torch.logsumexp(syn, dim=1))
    return nll_pos(c.pos, log_neg.view(v, n, 1)).mean()


def _step_seed(seed: int, step: int) -> int:
    # A fixed odd multiplier spreads (seed, step) pairs; identical on every rank.
    return (seed * 0x9E3779B97F4A7C15 + step) % (2**63)


class MoCHiLoss(nn.Module):
    """InfoNCE with hard negative mixing (Kalantidis et al. 2020).

    Args:
        temperature: t > 0.
        n_hard: number N of hardest negatives to mix from (capped at the M negatives).
        s: synthetic negatives mixed from two hard negatives.
        s_prime: synthetic negatives mixed from the anchor and a hard negative.
        seed: seed of the mixing draws (with the step counter).

    Shape: ``z`` ``(V, N, D)`` -> scalar.
    """

    needs_index = False
    step: Tensor

    def __init__(
        self,
        *,
        temperature: float,
        n_hard: int = PARAMS["n_hard"][1],
        s: int = PARAMS["s"][1],
        s_prime: int = PARAMS["s_prime"][1],
        seed: int = PARAMS["seed"][1],
    ) -> None:
        super().__init__()
        self.temperature = check_temperature("mochi", temperature)
        self.n_hard = check_param("mochi", "n_hard", n_hard, PARAMS["n_hard"])
        self.s = check_param("mochi", "s", s, PARAMS["s"])
        self.s_prime = check_param("mochi", "s_prime", s_prime, PARAMS["s_prime"])
        self.seed = check_param("mochi", "seed", seed, PARAMS["seed"])
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self, z: Tensor, index: Tensor | None = None) -> Tensor:
        _, n, _ = check_embeddings("mochi", z)
        h = normalize(z)
        generator = torch.Generator(device=z.device)
        generator.manual_seed(_step_seed(self.seed, int(self.step)))
        out = mochi_loss(
            h, gather_views(h), self.temperature, local_offset(n),
            n_hard=self.n_hard, s=self.s, s_prime=self.s_prime, generator=generator,
        )
        with torch.no_grad():
            self.step += 1
        return out

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, n_hard={self.n_hard}, s={self.s}, "
            f"s_prime={self.s_prime}, seed={self.seed}"
        )

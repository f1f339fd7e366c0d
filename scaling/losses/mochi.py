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

Cost: the selection of every anchor's hardest negatives is an exact top-``n_hard`` over its row
of the logits (``torch.topk`` on the logits already computed; its values are the logits the
mixes need). That selection is MoCHi's own work, not overhead: at N = 1024, D = 128 on 2 CPU
threads it costs about as much as the whole similarity matmul forward + backward, so MoCHi at
these defaults cannot meet the family's 1.5x-the-bare-matmul target. The defaults (the hardest
1/16 of the 2N - 2 negatives, s = n_hard, s' = n_hard/2) are kept, not shrunk to pass it;
``benchmarks/loss.py`` also reports MoCHi against the bare matmul plus that top-k.
"""

from __future__ import annotations

import functools

import torch
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


@functools.lru_cache(maxsize=64)
def _slots(s: int, s_prime: int, device: torch.device) -> Tensor:
    """``(2s + 2s')`` int64: the synthetic logit each entry of :func:`mixing_terms` feeds — the two
    negatives of each of the s mixes, then the negative and the anchor of each of the s' mixes."""
    mixes, anchor_mixes = torch.arange(s, device=device), s + torch.arange(s_prime, device=device)
    return torch.cat([mixes, mixes, anchor_mixes, anchor_mixes])


@functools.lru_cache(maxsize=64)
def _anchor_columns(views: int, n: int, n_global: int, offset: int, device: torch.device) -> Tensor:
    """``(V*n, 1)`` int64: the column of each local anchor itself (row v*n+i -> v*W*n + offset + i)."""
    cols = torch.arange(views, device=device)[:, None] * n_global + offset + torch.arange(n, device=device)
    return cols.reshape(-1, 1)


def _pair_cosines(x: Tensor, a: Tensor, b: Tensor, logits: Tensor, temperature: float, views: int) -> Tensor:
    """``x[a] . x[b]`` for global column indices a, b of equal shape (no gradient).

    On one process the anchors ARE the global batch, so the cosines are read from the logits
    matrix (times t), except where a and b are views of the same sample: those entries were masked
    (they read the lowest finite float) and are looked up in the per-sample Gram of the views
    instead — element-wise, no data-dependent indexing. Otherwise one Gram matmul of the global batch.
    """
    cols = x.shape[0]
    if logits.shape[0] != cols:
        return torch.take(x @ x.T, torch.add(b, a, alpha=cols))
    n_global = cols // views
    raw = torch.take(logits, torch.add(b, a, alpha=cols))
    xv = x.view(views, n_global, -1)
    own = torch.linalg.vecdot(xv[:, None], xv[None, :], dim=-1)  # (V, V, n): x[v*n + g] . x[w*n + g]
    # own.view(V, cols)[a // n, b] is x[a] . x[b] whenever a and b are views of one sample
    fix = torch.take(own, torch.add(b, torch.div(a, n_global, rounding_mode="floor"), alpha=cols))
    masked = raw == torch.finfo(raw.dtype).min
    return torch.where(masked, fix, raw.mul_(temperature))


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
) -> AnchorTerms:
    """The synthetic negatives of every local anchor as anchor-only logits (no gradient here).

    Shape: logits ``(V*n, V*W*n)`` the masked s/t of the local anchors; x ``(V*W*n, D)`` the
    global unit embeddings. Returns the :class:`AnchorTerms` of the ``s + s_prime`` synthetic
    logits ``q.h/t``: each is a fixed combination of two logits of its anchor — two hardest
    negatives, or a hardest negative and the anchor itself (its own, masked, column: the value
    ``q.q/t`` is computed here, its gradient ``q/t`` flows through the same sparse scatter).
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
    # (V*n, k) hardest first, with their logits; k <= M: never a masked column
    top, hard = torch.topk(logits, k, dim=1, sorted=True)
    pick = torch.cat([i1, i2, j], dim=1)
    cols = torch.empty(rows, 2 * (s + s_prime), dtype=hard.dtype, device=dev)
    torch.gather(hard, 1, pick, out=cols[:, : 2 * s + s_prime])
    cols[:, 2 * s + s_prime :] = _anchor_columns(views, n, n_global, offset, dev)
    picked = top.gather(1, pick)  # the logits q.n/t of the picked negatives
    l1, l2, lj = picked[:, :s], picked[:, s : 2 * s], picked[:, 2 * s :]
    coef = torch.empty(rows, 2 * (s + s_prime), dtype=dt, device=dev)
    value = torch.empty(rows, s + s_prime, dtype=dt, device=dev)
    # mixes of two hardest negatives: q.h/t = (alpha q.n1 + (1-alpha) q.n2) / (t ||alpha n1 + (1-alpha) n2||),
    # ||.||^2 = alpha^2 + (1-alpha)^2 + 2 alpha (1-alpha) n1.n2 = 1 - 2 alpha (1-alpha) (1 - n1.n2)
    cos12 = _pair_cosines(x, cols[:, :s], cols[:, s : 2 * s], logits, temperature, views)
    not_alpha = 1 - alpha
    inv1 = (alpha * not_alpha).mul_(cos12.sub_(1)).mul_(2).add_(1).clamp_min_(1e-24).rsqrt_()
    coef1, coef2 = torch.mul(alpha, inv1, out=coef[:, :s]), torch.mul(not_alpha, inv1, out=coef[:, s : 2 * s])
    torch.mul(coef1, l1, out=value[:, :s]).addcmul_(coef2, l2)
    # mixes of the anchor with a hardest negative: q.h'/t = (beta q.q + (1-beta) q.n) / (t ||beta q + (1-beta) n||),
    # ||.||^2 = 1 - 2 beta (1-beta) (1 - q.n)
    not_beta = 1 - beta
    inv2 = (beta * not_beta).mul_(lj * temperature - 1).mul_(2).add_(1).clamp_min_(1e-24).rsqrt_()
    coef_j = torch.mul(not_beta, inv2, out=coef[:, 2 * s : 2 * s + s_prime])
    coef_q = torch.mul(beta, inv2, out=coef[:, 2 * s + s_prime :])
    q = x.view(views, n_global, -1)[:, offset : offset + n].reshape(rows, -1)
    self_logit = torch.linalg.vecdot(q, q, dim=-1).div_(temperature)[:, None]  # q.q/t
    torch.mul(coef_j, lj, out=value[:, s:]).addcmul_(coef_q, self_logit)
    out_of = _slots(s, s_prime, dev).expand(rows, -1)
    return AnchorTerms(value=value, cols=cols, coef=coef, out_of=out_of)


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

    def extra(logits: Tensor) -> AnchorTerms:
        return mixing_terms(logits, x, temperature, offset, v, n_hard=n_hard, s=s, s_prime=s_prime, generator=generator)

    c = contrast(h_local, h_global, temperature, offset, extra_fn=extra)
    assert c.extra is not None
    log_neg = torch.logaddexp(c.lse[0].view(-1), torch.logsumexp(c.extra, dim=1))
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

"""iSogCLR — Qiu et al. 2023, "Not All Semantics are Created Equal: Contrastive Self-supervised
Learning with Automatic Temperature Individualization" (ICML), https://arxiv.org/abs/2305.11965
(authors' code: github.com/zhqiu/contrastive-learning-iSogCLR, ``unimodal_exps/losses.py``,
``SogCLR_DRO_Loss``).

Every training sample i has its own temperature tau_i, learned with the paper's moving-average
estimator of the KL-DRO objective ``tau_i * (log E_b exp(s(a,b)/tau_i) + rho)``. Per call, for the
anchors of sample i (``index`` gives the samples' dataset indices; t_i = the current tau_i):

- ``g_a = mean_b exp(s(a,b)/tau_i)`` over the anchor's M negatives;
  ``u_a = (1-gamma) u_i + gamma g_a`` (``u_a = g_a`` the first time sample i is seen; the authors
  use ``epoch == 0``); then ``u_i <- mean over the sample's views of u_a``;
- the value (a surrogate whose gradient is the paper's stochastic gradient; detached weights
  ``p_ab = exp(s(a,b)/tau_i) / u_a``):
  ``l_a = sum_b p_ab s(a,b) / M - s(a,p)``, mean over the anchors (the authors SUM the two views'
  terms, i.e. their value is 2x this one for V = 2; the contract takes the mean over anchors);
- ``grad_tau_i = clip(mean over views of [log u_a + rho - sum_b p_ab s(a,b)/tau_i / M], +-grad_clip)``,
  ``m_i <- (1-beta_u) m_i + beta_u grad_tau_i``, ``tau_i <- clamp(tau_i - eta m_i, tau_min, tau_max)``.

On the first visit ``grad_tau_i = rho - KL(p_a || uniform)``: a sample whose negatives are all alike
(near-uniform p) has its temperature lowered, one with a few dominant hard negatives (KL > rho)
has it raised.

State (registered buffers, so ``state_dict()`` carries it into checkpoints): ``tau`` (tau_i),
``log_u`` (log u_i, -inf = never seen; kept in the log domain so that small temperatures cannot
overflow), ``tau_grad_avg`` (m_i); float64 (computation runs in the input dtype). The state is updated only in training mode; under several
processes the updates of all ranks are gathered so every rank holds the same state. ``eta`` is
constant (the authors' ``eta_sched='const'``; their default is a cosine decay of eta over epochs).
Indices within one global batch must be distinct. ``temperature`` is tau_init.

V > 2: each anchor (any view) has the V*(N-1) other-sample embeddings as negatives and is averaged
over its V-1 positives in ``s(a,p)``; u_i and grad_tau_i are means over the sample's V views.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scaling import dist
from scaling.losses._common import (
    INF,
    LossError,
    ParamSpec,
    check_embeddings,
    check_index,
    check_param,
    check_temperature,
    contrast,
    gather_views,
    local_offset,
    normalize,
    positive_cosines,
)

PARAMS: dict[str, ParamSpec] = {
    "gamma": (float, 0.8, (0.0, 1.0)),
    "rho": (float, 6.0, (0.0, INF)),
    "beta_u": (float, 0.9, (0.0, 1.0)),
    "eta": (float, 1e-3, (0.0, INF)),
    "tau_min": (float, 0.05, (1e-6, INF)),
    "tau_max": (float, 1.0, (1e-6, INF)),
    "grad_clip": (float, 3.0, (0.0, INF)),
}


def isogclr_step(
    h_local: Tensor,
    h_global: Tensor,
    offset: int,
    tau: Tensor,
    log_u: Tensor,
    tau_grad_avg: Tensor,
    *,
    gamma: float,
    rho: float,
    beta_u: float,
    eta: float,
    tau_min: float,
    tau_max: float,
    grad_clip: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One iSogCLR step (pure): the value and the samples' new state.

    Shape: h_local ``(V, n, D)``, h_global ``(V, W*n, D)`` (normalised); tau, log_u, tau_grad_avg
    ``(n,)`` the local samples' current state (log_u = -inf: never seen). Returns
    ``(value, new_tau, new_log_u, new_tau_grad_avg)``; the state tensors are detached.
    """
    v, n, _ = h_local.shape
    # One matmul of the anchors scaled by 1/tau_i against the global batch: lse_a = log sum_b
    # exp(s(a,b)/tau_i) over the negatives, with gradient, and mean_a = sum_b softmax_b * s(a,b)/tau_i.
    c = contrast(h_local, h_global, tau, offset, row_mean=True)
    assert c.mean is not None
    lse, num_neg = c.lse[0].squeeze(-1), c.num_neg  # (V, n)
    with torch.no_grad():
        log_g = lse - math.log(num_neg)  # log of g_a = mean_b exp(s(a,b)/tau_i)
        log_keep = math.log1p(-gamma) if gamma < 1.0 else -INF
        log_new = math.log(gamma) if gamma > 0.0 else -INF
        ema = torch.logaddexp(log_u[None, :] + log_keep, log_g + log_new)
        seen = torch.isfinite(log_u)[None, :].expand(v, n)
        log_u_view = torch.where(seen, ema, log_g)  # (V, n): the authors' s1, s2
        # p_ab = exp(s(a,b)/tau_i) / u_a = r_a * softmax_b, so sum_b p_ab s(a,b)/tau_i = r_a * mean_a
        r = torch.exp(lse - log_u_view)
        weighted_value = r * c.mean.squeeze(-1) / num_neg  # sum_b p_ab s(a,b)/tau_i / M
    # The surrogate sum_b p_ab s(a,b) / M with p detached: its gradient is sum_b p_ab grad s(a,b) / M,
    # i.e. r_a * tau_i / M times the gradient of lse_a (which is softmax_b * grad s(a,b)/tau_i).
    weighted = (r * (lse - lse.detach())) / num_neg + weighted_value
    value = (weighted * tau[None, :] - positive_cosines(h_local).mean(dim=-1)).mean()
    with torch.no_grad():
        grad_tau = (log_u_view + rho - weighted_value).mean(dim=0).clamp(-grad_clip, grad_clip)
        new_log_u = torch.logsumexp(log_u_view, dim=0) - math.log(v)
        new_avg = (1.0 - beta_u) * tau_grad_avg + beta_u * grad_tau
        new_tau = (tau - eta * new_avg).clamp(tau_min, tau_max)
    return value, new_tau, new_log_u, new_avg


class ISogCLRLoss(nn.Module):
    """iSogCLR: individualised, learned per-sample temperatures (Qiu et al. 2023).

    Args:
        temperature: tau_init, in [tau_min, tau_max].
        dataset_size: number of training samples (size of the per-sample state).
        gamma: moving-average weight of the new estimate g in u.
        rho: KL-DRO radius.
        beta_u: moving-average weight of the new tau gradient.
        eta: step size of the temperatures.
        tau_min, tau_max: bounds of the temperatures.
        grad_clip: clip of the tau gradient.

    Shape: ``z`` ``(V, N, D)``, ``index`` int64 ``(N,)`` -> scalar.
    """

    needs_index = True
    tau: Tensor
    log_u: Tensor
    tau_grad_avg: Tensor

    def __init__(
        self,
        *,
        temperature: float,
        dataset_size: int | None = None,
        gamma: float = PARAMS["gamma"][1],
        rho: float = PARAMS["rho"][1],
        beta_u: float = PARAMS["beta_u"][1],
        eta: float = PARAMS["eta"][1],
        tau_min: float = PARAMS["tau_min"][1],
        tau_max: float = PARAMS["tau_max"][1],
        grad_clip: float = PARAMS["grad_clip"][1],
    ) -> None:
        super().__init__()
        t = check_temperature("isogclr", temperature)
        if dataset_size is None:
            raise LossError("isogclr: needs dataset_size=<number of training samples> (its per-sample state)")
        self.dataset_size = check_param("isogclr", "dataset_size", dataset_size, (int, 1, (1, INF)))
        self.gamma = check_param("isogclr", "gamma", gamma, PARAMS["gamma"])
        self.rho = check_param("isogclr", "rho", rho, PARAMS["rho"])
        self.beta_u = check_param("isogclr", "beta_u", beta_u, PARAMS["beta_u"])
        self.eta = check_param("isogclr", "eta", eta, PARAMS["eta"])
        self.tau_min = check_param("isogclr", "tau_min", tau_min, PARAMS["tau_min"])
        self.tau_max = check_param("isogclr", "tau_max", tau_max, PARAMS["tau_max"])
        self.grad_clip = check_param("isogclr", "grad_clip", grad_clip, PARAMS["grad_clip"])
        if not self.tau_min <= t <= self.tau_max:
            raise LossError(
                f"isogclr: temperature (tau_init) must be in [tau_min, tau_max] = [{self.tau_min}, {self.tau_max}], got {t}"
            )
        self.temperature = t
        # float64: moving averages over many epochs, and tau_init exact (24 bytes per sample)
        self.register_buffer("tau", torch.full((self.dataset_size,), t, dtype=torch.float64))
        self.register_buffer("log_u", torch.full((self.dataset_size,), -INF, dtype=torch.float64))
        self.register_buffer("tau_grad_avg", torch.zeros(self.dataset_size, dtype=torch.float64))

    def forward(self, z: Tensor, index: Tensor | None = None) -> Tensor:
        v, n, _ = check_embeddings("isogclr", z)
        index = check_index("isogclr", index, n, self.dataset_size)
        index = index.to(self.tau.device)
        h = normalize(z)
        value, new_tau, new_log_u, new_avg = isogclr_step(
            h,
            gather_views(h),
            local_offset(n),
            self.tau[index].to(h.dtype),
            self.log_u[index].to(h.dtype),
            self.tau_grad_avg[index].to(h.dtype),
            gamma=self.gamma, rho=self.rho, beta_u=self.beta_u, eta=self.eta,
            tau_min=self.tau_min, tau_max=self.tau_max, grad_clip=self.grad_clip,
        )
        if self.training:
            with torch.no_grad():
                idx = dist.gather(index)
                self.tau[idx] = dist.gather(new_tau).to(self.tau.dtype)
                self.log_u[idx] = dist.gather(new_log_u).to(self.log_u.dtype)
                self.tau_grad_avg[idx] = dist.gather(new_avg).to(self.tau_grad_avg.dtype)
        return value

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, dataset_size={self.dataset_size}, gamma={self.gamma}, rho={self.rho}, "
            f"beta_u={self.beta_u}, eta={self.eta}, tau_min={self.tau_min}, tau_max={self.tau_max}, "
            f"grad_clip={self.grad_clip}"
        )

"""The stochastic/stateful losses (mochi, swav, isogclr) against slow references of the authors'
algorithms (float64, values and gradients), plus seeded determinism, checkpoint round trips and
one paper-specific property each."""

from __future__ import annotations

import math

import pytest
import torch

from scaling.losses import LossError, build_loss, infonce_loss, mochi_loss, sinkhorn, swav_loss
from scaling.losses import swav as swav_module
from scaling.losses._common import normalize

TEMPERATURES = (0.05, 0.1, 0.5, 1.0)


def make_z(v: int, n: int, d: int, *, seed: int = 0, dtype: torch.dtype = torch.float64, noise: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = x[None] + noise * torch.randn(v, n, d, generator=g, dtype=torch.float64)
    z = z * (0.5 + torch.rand(v, n, 1, generator=g, dtype=torch.float64) * 3)
    return z.to(dtype)


def unit(z: torch.Tensor) -> torch.Tensor:
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def grad_of(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves))


# ---------------------------------------------------------------------------------------------
# MoCHi


def mochi_reference(z: torch.Tensor, t: float, n_hard: int, s: int, s_prime: int, seed: int) -> torch.Tensor:
    """Loop over anchors; the synthetic negatives built as explicit normalised vectors (detached),
    from the draws of the documented protocol (i1, i2, alpha, j, beta for all anchors, in order)."""
    v_, n, d = z.shape
    h = unit(z)
    flat = h.reshape(v_ * n, d)
    m = v_ * (n - 1)
    k = min(n_hard, m)
    g = torch.Generator().manual_seed(seed)
    i1 = torch.randint(k, (v_, n, s), generator=g)
    i2 = torch.randint(k, (v_, n, s), generator=g)
    alpha = torch.rand((v_, n, s), generator=g, dtype=torch.float64)
    j = torch.randint(k, (v_, n, s_prime), generator=g)
    beta = 0.5 * torch.rand((v_, n, s_prime), generator=g, dtype=torch.float64)
    terms = []
    for v in range(v_):
        for i in range(n):
            a = h[v, i]
            cols = torch.tensor([w * n + jj for w in range(v_) for jj in range(n) if jj != i])
            s_neg = flat[cols] @ a
            hard = cols[torch.argsort(s_neg.detach(), descending=True)[:k]]
            syn = []
            for q in range(s):
                mix = alpha[v, i, q] * flat[hard[i1[v, i, q]]] + (1 - alpha[v, i, q]) * flat[hard[i2[v, i, q]]]
                syn.append(a @ (mix / mix.norm()).detach() / t)
            for q in range(s_prime):
                mix = beta[v, i, q] * a + (1 - beta[v, i, q]) * flat[hard[j[v, i, q]]]
                syn.append(a @ (mix / mix.norm()).detach() / t)
            denominator = torch.exp(s_neg / t).sum() + (torch.exp(torch.stack(syn)).sum() if syn else 0.0)
            for w in range(v_):
                if w != v:
                    pos = torch.exp(a @ h[w, i] / t)
                    terms.append(-torch.log(pos / (pos + denominator)))
    return torch.stack(terms).mean()


MOCHI_SETTINGS = [(4, 4, 2), (16, 8, 4), (1000, 6, 3), (5, 0, 3), (5, 3, 0)]


@pytest.mark.parametrize("t", TEMPERATURES)
@pytest.mark.parametrize("n", (4, 32))
@pytest.mark.parametrize(("n_hard", "s", "s_prime"), MOCHI_SETTINGS)
def test_mochi_matches_loop_reference(n_hard: int, s: int, s_prime: int, n: int, t: float) -> None:
    z = make_z(2, n, 6, seed=n)

    def impl(x: torch.Tensor) -> torch.Tensor:
        h = normalize(x)
        g = torch.Generator().manual_seed(123)
        return mochi_loss(h, h, t, 0, n_hard=n_hard, s=s, s_prime=s_prime, generator=g)

    got = grad_of(impl, z)
    ref = grad_of(lambda x: mochi_reference(x, t, n_hard, s, s_prime, 123), z)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("v", "n"), [(3, 8), (2, 256)])
def test_mochi_multiview_and_n256(v: int, n: int) -> None:
    z = make_z(v, n, 16, seed=v)

    def impl(x: torch.Tensor) -> torch.Tensor:
        h = normalize(x)
        return mochi_loss(h, h, 0.1, 0, n_hard=8, s=4, s_prime=2, generator=torch.Generator().manual_seed(5))

    got = grad_of(impl, z)
    ref = grad_of(lambda x: mochi_reference(x, 0.1, 8, 4, 2, 5), z)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_mochi_without_synthetics_is_infonce_and_synthetics_make_it_harder() -> None:
    z = make_z(2, 16, 8)
    h = normalize(z)
    plain = mochi_loss(h, h, 0.2, n_hard=8, s=0, s_prime=0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, infonce_loss(h, h, 0.2), rtol=1e-12, atol=0)
    mixed = mochi_loss(h, h, 0.2, n_hard=8, s=16, s_prime=8, generator=torch.Generator().manual_seed(0))
    assert mixed > plain


def test_mochi_seeded_determinism_and_checkpoint() -> None:
    z = make_z(2, 16, 8)
    a, b = build_loss("mochi", temperature=0.2, seed=3), build_loss("mochi", temperature=0.2, seed=3)
    seq_a = [a(z).item() for _ in range(3)]
    seq_b = [b(z).item() for _ in range(3)]
    assert seq_a == seq_b
    assert len(set(seq_a)) == 3  # the step counter advances the draws
    other = build_loss("mochi", temperature=0.2, seed=4)
    assert other(z).item() != seq_a[0]
    assert int(a.step) == 3
    c = build_loss("mochi", temperature=0.2, seed=3)
    c.load_state_dict(a.state_dict())
    assert c(z).item() == a(z).item()


def authors_sinkhorn(out: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    q = torch.exp(out / epsilon).t()
    b, k = q.shape[1], q.shape[0]
    q = q / torch.sum(q)
    for _ in range(iterations):
        q = q / torch.sum(q, dim=1, keepdim=True)
        q = q / k
        q = q / torch.sum(q, dim=0, keepdim=True)
        q = q / b
    return (q * b).t()


def swav_reference(z: torch.Tensor, protos: torch.Tensor, t: float, eps: float, iters: int) -> torch.Tensor:
    """main_swav.py: crops_for_assign = [0, 1], every other crop predicted, softmax / log."""
    v_, n, _ = z.shape
    out = unit(z) @ protos.t()
    loss = 0.0
    for crop_id in (0, 1):
        with torch.no_grad():
            q = authors_sinkhorn(out[crop_id].detach(), eps, iters)
        subloss = 0.0
        for v in range(v_):
            if v != crop_id:
                p = torch.softmax(out[v] / t, dim=1)
                subloss = subloss - torch.mean(torch.sum(q * torch.log(p), dim=1))
        loss = loss + subloss / (v_ - 1)
    return loss / 2


@pytest.mark.parametrize("t", TEMPERATURES)
@pytest.mark.parametrize(("v", "n", "k", "eps", "iters"), [(2, 4, 5, 0.05, 3), (2, 32, 30, 0.05, 3), (4, 16, 10, 0.5, 1), (3, 32, 7, 0.1, 10)])
def test_swav_matches_authors_code(v: int, n: int, k: int, eps: float, iters: int, t: float) -> None:
    z = make_z(v, n, 8, seed=n + k)
    loss = build_loss("swav", temperature=t, n_prototypes=k, epsilon=eps, sinkhorn_iterations=iters, dim=8).double()
    with torch.no_grad():  # start from non-unit prototypes: the loss normalises them in place first
        loss.prototypes.mul_(torch.linspace(0.5, 2.0, k, dtype=torch.float64)[:, None])
    p0 = unit(loss.prototypes.detach().clone())
    zz = z.clone().requires_grad_(True)
    value = loss(zz)
    value.backward()
    torch.testing.assert_close(loss.prototypes.detach(), p0, rtol=1e-12, atol=1e-14)
    ref_value, ref_gz, ref_gp = grad_of(lambda a, b: swav_reference(a, b, t, eps, iters), z, p0)
    torch.testing.assert_close(value.detach(), ref_value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(zz.grad, ref_gz, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss.prototypes.grad, ref_gp, rtol=1e-9, atol=1e-12)


def test_swav_at_a_tiny_temperature_shifts_its_exponentials() -> None:
    """At t = 1e-3 the float64 exponentials of s/t could overflow unshifted: the loss takes the
    shifted path (row maxima) and still matches the authors' form."""
    z = make_z(3, 16, 8, seed=9)
    loss = build_loss("swav", temperature=1e-3, n_prototypes=10, dim=8).double()
    p0 = unit(loss.prototypes.detach().clone())
    zz = z.clone().requires_grad_(True)
    value = loss(zz)
    value.backward()

    def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """swav_reference with log_softmax: log(softmax) underflows to -inf at this temperature."""
        out = unit(a) @ b.t()
        codes = [authors_sinkhorn(out[c].detach(), 0.05, 3) for c in (0, 1)]
        log_p = torch.log_softmax(out / 1e-3, dim=-1)
        return torch.stack([
            torch.stack([-(codes[c] * log_p[w]).sum(-1).mean() for w in range(3) if w != c]).mean() for c in (0, 1)
        ]).mean()

    ref_value, ref_gz, ref_gp = grad_of(reference, z, p0)
    torch.testing.assert_close(value.detach(), ref_value, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(zz.grad, ref_gz, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(loss.prototypes.grad, ref_gp, rtol=1e-7, atol=1e-9)


def test_swav_n256() -> None:
    z = make_z(2, 256, 16, seed=1)
    loss = build_loss("swav", temperature=0.1, n_prototypes=64, dim=16).double()
    p0 = unit(loss.prototypes.detach().clone())  # float32 unit vectors are not unit in float64
    zz = z.clone().requires_grad_(True)
    value = loss(zz)
    value.backward()
    ref_value, ref_gz, _ = grad_of(lambda a, b: swav_reference(a, b, 0.1, 0.05, 3), z, p0)
    torch.testing.assert_close(value.detach(), ref_value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(zz.grad, ref_gz, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("v", (2, 4))
def test_swav_loss_on_given_logits_matches_log_softmax_form(v: int) -> None:
    """The pure swapped prediction (the module fuses it with its score matmul), for any targets —
    also rows that do not sum to 1 — and without touching its inputs."""
    g = torch.Generator().manual_seed(v)
    logits = 5 * torch.randn(v, 16, 10, generator=g, dtype=torch.float64)
    codes = torch.rand(2, 16, 10, generator=g, dtype=torch.float64)
    kept = logits.clone()

    def reference(x: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(x, dim=-1)
        per_code = [[-(codes[c] * log_p[w]).sum(-1).mean() for w in range(v) if w != c] for c in range(2)]
        return torch.stack([torch.stack(terms).mean() for terms in per_code]).mean()

    got = grad_of(lambda x: swav_loss(x, codes), logits)
    for a, b in zip(got, grad_of(reference, logits)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.equal(logits, kept)


def test_swav_loss_with_one_code_view() -> None:
    """With targets for view 0 only, view 0 is predicted by nobody: its gradient is zero."""
    g = torch.Generator().manual_seed(7)
    logits = 5 * torch.randn(3, 8, 6, generator=g, dtype=torch.float64)
    codes = torch.rand(1, 8, 6, generator=g, dtype=torch.float64)

    def reference(x: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(x, dim=-1)
        return torch.stack([-(codes[0] * log_p[w]).sum(-1).mean() for w in (1, 2)]).mean()

    value, grad = grad_of(lambda x: swav_loss(x, codes), logits)
    ref_value, ref_grad = grad_of(reference, logits)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert torch.equal(grad[0], torch.zeros_like(grad[0]))


def test_swav_loss_shifts_only_logits_that_could_overflow() -> None:
    """Moderate logits are exponentiated as they are; huge ones (float32 exp overflows past 88)
    are shifted by their row maxima first — both give the log-softmax form."""
    g = torch.Generator().manual_seed(11)
    codes = torch.rand(2, 8, 6, generator=g)
    for size in (5.0, 300.0):
        logits = size * torch.randn(2, 8, 6, generator=g)

        def reference(x: torch.Tensor) -> torch.Tensor:
            log_p = torch.log_softmax(x.double(), dim=-1)
            return torch.stack([-(codes[c].double() * log_p[1 - c]).sum(-1).mean() for c in (0, 1)]).mean()

        value, grad = grad_of(lambda x: swav_loss(x, codes), logits)
        ref_value, ref_grad = grad_of(reference, logits)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
        torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-5 * size)
        torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=1e-4, atol=1e-6)


def test_sinkhorn_of_base2_scores_with_a_known_peak_and_row_sums() -> None:
    """The loss's variant: scores * log2 e with scale 1/epsilon, the max given, row sums returned."""
    g = torch.Generator().manual_seed(3)
    embeddings = unit(torch.randn(48, 8, generator=g, dtype=torch.float64))
    scores = embeddings @ unit(torch.randn(20, 8, generator=g, dtype=torch.float64)).T
    base2 = scores / math.log(2.0)
    codes, row_sums = swav_module._sinkhorn(base2, 1 / 0.05, 3, slice(8, 24), base2.max())
    torch.testing.assert_close(codes, sinkhorn(scores, 0.05, 3)[8:24], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(row_sums, codes.sum(dim=1), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("b", "k", "eps"), [(64, 8, 0.05), (32, 100, 0.1), (256, 16, 0.02)])
def test_sinkhorn_codes_have_uniform_marginals(b: int, k: int, eps: float) -> None:
    g = torch.Generator().manual_seed(b)
    scores = unit(torch.randn(b, 16, generator=g, dtype=torch.float64)) @ unit(torch.randn(k, 16, generator=g, dtype=torch.float64)).T
    codes = sinkhorn(scores, eps, 3)
    torch.testing.assert_close(codes.sum(1), torch.ones(b, dtype=torch.float64), rtol=1e-12, atol=1e-12)  # an assignment
    torch.testing.assert_close(codes, authors_sinkhorn(scores, eps, 3), rtol=1e-9, atol=1e-12)
    converged = sinkhorn(scores, eps, 500)
    torch.testing.assert_close(converged.sum(0), torch.full((k,), b / k, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(converged.sum(1), torch.ones(b, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(sinkhorn(scores.float(), 1e-3, 3)).all()  # the naive exp(s/eps) overflows here


def test_swav_seeded_prototypes_lazy_dim_and_checkpoint() -> None:
    z = make_z(2, 16, 8, dtype=torch.float32)
    a = build_loss("swav", temperature=0.1, n_prototypes=12, seed=1)
    assert a.has_uninitialized_params()
    opt = torch.optim.SGD(a.parameters(), lr=1.0)  # built before the first call, as the train loop does
    value = a(z)
    assert a.prototypes.shape == (12, 8)
    b = build_loss("swav", temperature=0.1, n_prototypes=12, seed=1, dim=8)
    assert b(z).item() == value.item()
    assert torch.equal(a.prototypes.detach(), b.prototypes.detach())
    c = build_loss("swav", temperature=0.1, n_prototypes=12, seed=2, dim=8)
    assert not torch.equal(a.prototypes.detach(), c.prototypes.detach())
    before = a.prototypes.detach().clone()
    value.backward()
    opt.step()
    assert not torch.equal(a.prototypes.detach(), before)
    d = build_loss("swav", temperature=0.1, n_prototypes=12, seed=9)
    d.load_state_dict(a.state_dict())
    assert torch.equal(d.prototypes.detach(), a.prototypes.detach())
    assert d(z).item() == a(z).item()
    with pytest.raises(LossError, match="dim"):
        b(make_z(2, 16, 5, dtype=torch.float32))
    b.eval()
    with torch.no_grad():
        b.prototypes.mul_(2.0)
    kept = b.prototypes.detach().clone()
    b(z)
    assert torch.equal(b.prototypes.detach(), kept)  # eval mode leaves the parameters alone


# ---------------------------------------------------------------------------------------------
# iSogCLR


class AuthorsISogCLR:
    """``SogCLR_DRO_Loss`` of the authors' unimodal code, on CPU, state in float64."""

    def __init__(self, n: int, bsz: int, *, gamma: float, tau_init: float, tau_min: float, tau_max: float,
                 rho: float, eta: float, beta_u: float, grad_clip: float = 3.0) -> None:
        self.gamma, self.rho, self.eta, self.beta_u, self.grad_clip = gamma, rho, eta, beta_u, grad_clip
        self.tau_min, self.tau_max = tau_min, tau_max
        self.s = torch.zeros(n, dtype=torch.float64)
        self.tau = torch.ones(n, dtype=torch.float64) * tau_init
        self.u = torch.zeros(n, dtype=torch.float64)
        self.mask_neg = (1.0 - torch.eye(bsz, dtype=torch.float64)).repeat(2, 2)
        self.num_neg = 2 * bsz - 2

    def forward(self, index: torch.Tensor, features: torch.Tensor, epoch: int) -> torch.Tensor:
        contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
        bsz = contrast_feature.shape[0] // 2
        sim = torch.einsum("i d, j d -> i j", contrast_feature, contrast_feature)
        pos_sim = torch.cat([torch.diagonal(sim, offset=bsz), torch.diagonal(sim, offset=-bsz)])[:, None]
        tau = self.tau[index].repeat(2)
        sim_d_temps = (sim / tau[:, None]).clone().detach_()
        exp_sim_d_temps = torch.exp(sim_d_temps) * self.mask_neg
        g = torch.sum(exp_sim_d_temps, dim=1, keepdim=True) / self.num_neg
        if epoch == 0:
            s1, s2 = g.squeeze()[:bsz], g.squeeze()[bsz:]
        else:
            s1 = (1.0 - self.gamma) * self.s[index] + self.gamma * g.squeeze()[:bsz]
            s2 = (1.0 - self.gamma) * self.s[index] + self.gamma * g.squeeze()[bsz:]
        self.s[index] = (s1 + s2) / 2.0
        weights_1 = exp_sim_d_temps[:bsz, :] / s1[:, None]
        loss_1 = torch.sum(weights_1 * sim[:bsz, :], dim=1, keepdim=True) / self.num_neg - pos_sim[:bsz, :]
        weights_2 = exp_sim_d_temps[bsz:, :] / s2[:, None]
        loss_2 = torch.sum(weights_2 * sim[bsz:, :], dim=1, keepdim=True) / self.num_neg - pos_sim[bsz:, :]
        loss = loss_1 + loss_2
        grad_tau_1 = torch.log(s1) + self.rho - torch.sum(weights_1 * sim_d_temps[:bsz, :], dim=1) / self.num_neg
        grad_tau_2 = torch.log(s2) + self.rho - torch.sum(weights_2 * sim_d_temps[bsz:, :], dim=1) / self.num_neg
        grad_tau = ((grad_tau_1 + grad_tau_2) / 2.0).clamp_(min=-self.grad_clip, max=self.grad_clip)
        self.u[index] = (1.0 - self.beta_u) * self.u[index] + self.beta_u * grad_tau.detach()
        self.tau[index] = (self.tau[index] - self.eta * self.u[index]).clamp_(min=self.tau_min, max=self.tau_max)
        return loss.mean()


ISOG = dict(gamma=0.8, rho=2.0, eta=0.05, beta_u=0.9, tau_min=0.05, tau_max=1.0)


@pytest.mark.parametrize("t", TEMPERATURES)
@pytest.mark.parametrize("n", (4, 32))
def test_isogclr_matches_authors_code(n: int, t: float) -> None:
    size = 3 * n
    ours = build_loss("isogclr", temperature=t, dataset_size=size, **ISOG).double()
    theirs = AuthorsISogCLR(size, n, tau_init=t, **ISOG)
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(n))
    batches = [(perm[:n], 0), (perm[n : 2 * n], 0), (perm[:n], 1), (perm[:n], 2)]  # (indices, authors' epoch)
    for step, (idx, epoch) in enumerate(batches):
        z = make_z(2, n, 8, seed=step)
        value, gz = grad_of(lambda x: ours(x, index=idx), z)
        ref_value, ref_gz = grad_of(lambda x: 0.5 * theirs.forward(idx, unit(x).transpose(0, 1), epoch), z)
        torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gz, ref_gz, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours.tau, theirs.tau, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.tau_grad_avg, theirs.u, rtol=1e-10, atol=1e-12)
        seen = theirs.s > 0
        torch.testing.assert_close(ours.log_u[seen].exp(), theirs.s[seen], rtol=1e-10, atol=0)
        assert torch.isneginf(ours.log_u[~seen]).all()


def isogclr_reference(z: torch.Tensor, idx: torch.Tensor, state: dict, *, gamma: float, rho: float, eta: float,
                      beta_u: float, tau_min: float, tau_max: float, grad_clip: float = 3.0) -> torch.Tensor:
    """Loop form of the documented V-view generalisation; updates ``state`` (tau, u, m) in place."""
    v_, n, d = z.shape
    h = unit(z)
    flat = h.reshape(v_ * n, d)
    m_neg = v_ * (n - 1)
    terms, new = [], {}
    for i in range(n):
        k = int(idx[i])
        tau = state["tau"][k].item()
        cols = torch.tensor([w * n + j for w in range(v_) for j in range(n) if j != i])
        us, grads = [], []
        for v in range(v_):
            a = h[v, i]
            s_neg = flat[cols] @ a
            g = torch.exp(s_neg.detach() / tau).mean()
            u = g if state["u"][k] == 0 else (1 - gamma) * state["u"][k] + gamma * g
            p = torch.exp(s_neg.detach() / tau) / u
            pos = torch.stack([a @ h[w, i] for w in range(v_) if w != v]).mean()
            terms.append((p * s_neg).sum() / m_neg - pos)
            us.append(u)
            grads.append(torch.log(u) + rho - (p * s_neg.detach() / tau).sum() / m_neg)
        grad = torch.clamp(torch.stack(grads).mean(), -grad_clip, grad_clip)
        m = (1 - beta_u) * state["m"][k] + beta_u * grad
        new[k] = (torch.stack(us).mean(), m, min(max(tau - eta * m.item(), tau_min), tau_max))
    for k, (u, m, tau) in new.items():
        state["u"][k], state["m"][k], state["tau"][k] = u, m, tau
    return torch.stack(terms).mean()


def test_isogclr_multiview_matches_loop_reference() -> None:
    size, n = 20, 6
    ours = build_loss("isogclr", temperature=0.3, dataset_size=size, **ISOG).double()
    state = {"tau": torch.full((size,), 0.3, dtype=torch.float64), "u": torch.zeros(size, dtype=torch.float64),
             "m": torch.zeros(size, dtype=torch.float64)}
    for step, idx in enumerate([torch.arange(6), torch.arange(3, 9), torch.arange(6)]):
        z = make_z(3, n, 5, seed=step)
        got = grad_of(lambda x: ours(x, index=idx), z)
        ref = grad_of(lambda x: isogclr_reference(x, idx, state, **ISOG), z)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours.tau, state["tau"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.tau_grad_avg, state["m"], rtol=1e-10, atol=1e-12)


def test_isogclr_n256() -> None:
    n = 256
    ours = build_loss("isogclr", temperature=0.1, dataset_size=n, **ISOG).double()
    theirs = AuthorsISogCLR(n, n, tau_init=0.1, **ISOG)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    z = make_z(2, n, 32, seed=4)
    got = grad_of(lambda x: ours(x, index=idx), z)
    ref = grad_of(lambda x: 0.5 * theirs.forward(idx, unit(x).transpose(0, 1), 0), z)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.tau, theirs.tau, rtol=1e-10, atol=1e-12)


def test_isogclr_temperatures_move_as_the_paper_prescribes() -> None:
    """First visit: grad_tau_i = rho - KL(softmax over negatives || uniform), averaged over views.
    Samples with a dominant hard negative (KL > rho) get a larger temperature; samples whose
    negatives are all alike get a smaller one — each by exactly eta * beta_u * clip(grad)."""
    n, d, tau0, rho = 16, 16, 0.2, 1.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[1] = x[0] + 0.05 * torch.randn(d, generator=g, dtype=torch.float64)  # 0 and 1: each other's hard negative
    z = torch.stack([x + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2)])
    params = dict(ISOG, rho=rho, eta=0.1, grad_clip=100.0)
    loss = build_loss("isogclr", temperature=tau0, dataset_size=n, **params).double()
    loss(z, index=torch.arange(n))
    h = unit(z).reshape(2 * n, d)
    expected = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        grads = []
        for v in range(2):
            a = h[v * n + i]
            cols = [w * n + j for w in range(2) for j in range(n) if j != i]
            pi = torch.softmax(h[cols] @ a / tau0, dim=0)
            kl = (pi * torch.log(pi * len(cols))).sum()
            grads.append(rho - kl)
        expected[i] = tau0 - 0.1 * 0.9 * torch.stack(grads).mean()
    torch.testing.assert_close(loss.tau, expected.clamp(0.05, 1.0), rtol=1e-10, atol=1e-12)
    assert loss.tau[0] > tau0 and loss.tau[1] > tau0  # concentrated negatives: temperature up
    assert (loss.tau[2:] < tau0).all()  # spread-out negatives: temperature down


def test_isogclr_state_checkpoint_eval_and_determinism() -> None:
    z = make_z(2, 8, 8)
    idx = torch.arange(8) + 4
    a = build_loss("isogclr", temperature=0.2, dataset_size=16, **ISOG)
    b = build_loss("isogclr", temperature=0.2, dataset_size=16, **ISOG)
    assert [a(z, index=idx).item() for _ in range(3)] == [b(z, index=idx).item() for _ in range(3)]
    assert set(a.state_dict()) == {"tau", "log_u", "tau_grad_avg"}
    assert not torch.equal(a.tau[idx], torch.full((8,), 0.2, dtype=torch.float64))
    assert torch.equal(a.tau[:4], torch.full((4,), 0.2, dtype=torch.float64)) and torch.isneginf(a.log_u[:4]).all()
    c = build_loss("isogclr", temperature=0.2, dataset_size=16, **ISOG)
    c.load_state_dict(a.state_dict())
    assert c(z, index=idx).item() == a(z, index=idx).item()
    assert torch.equal(c.tau, a.tau)
    a.eval()
    kept = {k: t.clone() for k, t in a.state_dict().items()}
    a(z, index=idx)
    assert all(torch.equal(kept[k], t) for k, t in a.state_dict().items())
    with pytest.raises(LossError, match="tau_min"):
        build_loss("isogclr", temperature=0.01, dataset_size=16)
    with pytest.raises(LossError, match="int64"):
        a(z, index=idx.int())

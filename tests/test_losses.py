"""The closed-form losses against slow loop references (float64, values and gradients w.r.t. z),
the authors' vectorised V = 2 forms, invariances, SGD descent, stability, and one conformance
class run against every loss of the family."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaling.losses import LOSS_NAMES, LOSS_PARAMS, LossError, build_loss

CLOSED_FORM = ("infonce", "dcl", "dclw", "debiased", "hcl", "adnce")
TEMPERATURES = (0.05, 0.1, 0.5, 1.0)
SETTINGS: dict[str, list[dict[str, float]]] = {
    "infonce": [{}],
    "dcl": [{}],
    "dclw": [{"sigma": 0.5}, {"sigma": 0.1}, {"sigma": 2.0}],
    "debiased": [{"tau_plus": 0.1}, {"tau_plus": 0.0}, {"tau_plus": 0.5}],
    "hcl": [{"beta": 1.0, "tau_plus": 0.1}, {"beta": 0.5, "tau_plus": 0.0}, {"beta": 3.0, "tau_plus": 0.3}],
    "adnce": [{"mu": 0.7, "sigma": 0.5}, {"mu": 0.0, "sigma": 1.0}, {"mu": -0.5, "sigma": 0.2}],
}


def make_z(v: int, n: int, d: int, *, seed: int = 0, dtype: torch.dtype = torch.float64, noise: float = 0.7) -> torch.Tensor:
    """Correlated views (x + noise) with varying norms, so positives are closer than negatives."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = x[None] + noise * torch.randn(v, n, d, generator=g, dtype=torch.float64)
    z = z * (0.5 + torch.rand(v, n, 1, generator=g, dtype=torch.float64) * 3)
    return z.to(dtype)


# ---------------------------------------------------------------------------------------------
# slow references


def unit(z: torch.Tensor) -> torch.Tensor:
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def reference(name: str, z: torch.Tensor, t: float, **p: float) -> torch.Tensor:
    """Loop over anchors and positives, written from the definitions in issue 3 (and their
    documented V > 2 generalisation: every other view of the sample is a positive, the negatives
    are all embeddings of the other samples, the terms averaged over positives and anchors)."""
    v_, n, d = z.shape
    h = unit(z)
    flat = h.reshape(v_ * n, d)
    neg_idx = [torch.tensor([w * n + j for w in range(v_) for j in range(n) if j != i]) for i in range(n)]
    m = v_ * (n - 1)
    if name == "dclw":
        cos = {(i, a, b): (h[a, i] @ h[b, i]).detach() for i in range(n) for a in range(v_) for b in range(v_) if a != b}
        e = {k: math.exp(c.item() / p["sigma"]) for k, c in cos.items()}
        mean_e = sum(e.values()) / len(e)
        weight = {k: 2.0 - e[k] / mean_e for k in e}
    terms = []
    for v in range(v_):
        for i in range(n):
            a = h[v, i]
            s_neg = flat[neg_idx[i]] @ a
            neg = torch.exp(s_neg / t)
            for w in range(v_):
                if w == v:
                    continue
                s_pos = a @ h[w, i]
                pos = torch.exp(s_pos / t)
                if name == "infonce":
                    l = -torch.log(pos / (pos + neg.sum()))
                elif name == "dcl":
                    l = -s_pos / t + torch.log(neg.sum())
                elif name == "dclw":
                    l = -weight[(i, v, w)] * s_pos / t + torch.log(neg.sum())
                elif name in ("debiased", "hcl"):
                    if name == "hcl":
                        imp = torch.exp(p["beta"] * s_neg / t)
                        neg_sum = (imp * neg).sum() / imp.mean()
                    else:
                        neg_sum = neg.sum()
                    ng = (neg_sum - p["tau_plus"] * m * pos) / (1 - p["tau_plus"])
                    ng = torch.clamp(ng, min=m * math.exp(-1 / t))
                    l = -torch.log(pos / (pos + ng))
                elif name == "adnce":
                    wgt = torch.exp(-((s_neg - p["mu"]) ** 2) / (2 * p["sigma"] ** 2))
                    wgt = (wgt / wgt.mean()).detach()
                    l = -torch.log(pos / (pos + (wgt * neg).sum()))
                else:
                    raise AssertionError(name)
                terms.append(l)
    return torch.stack(terms).mean()


def negative_mask(batch_size: int) -> torch.Tensor:
    mask = torch.ones((batch_size, 2 * batch_size), dtype=torch.bool)
    for i in range(batch_size):
        mask[i, i] = False
        mask[i, i + batch_size] = False
    return torch.cat((mask, mask), 0)


def authors_v2(name: str, z: torch.Tensor, t: float, **p: float) -> torch.Tensor:
    """The authors' two-view code (Chuang et al. / Robinson et al. / Wu et al.; lightly's DCL(W),
    halved because lightly sums the two directions), on 2N anchors."""
    out_1, out_2 = unit(z[0]), unit(z[1])
    b = out_1.shape[0]
    if name in ("dcl", "dclw"):
        def one_direction(o0: torch.Tensor, o1: torch.Tensor) -> torch.Tensor:
            sim_00 = o0 @ o0.T / t
            sim_01 = o0 @ o1.T / t
            diag = torch.eye(b, dtype=torch.bool)
            positive = -torch.diag(sim_01)
            if name == "dclw":
                w = 2 - b * F.softmax((o0 * o1).sum(dim=1) / p["sigma"], dim=0)
                positive = positive * w.detach()
            negative = torch.logsumexp(torch.cat([sim_01.masked_fill(diag, -math.inf), sim_00.masked_fill(diag, -math.inf)], 1), 1)
            return (positive + negative).mean()

        return (one_direction(out_1, out_2) + one_direction(out_2, out_1)) / 2
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(out @ out.t() / t)
    neg = neg.masked_select(negative_mask(b)).view(2 * b, -1)
    pos = torch.exp((out_1 * out_2).sum(-1) / t)
    pos = torch.cat([pos, pos], dim=0)
    m = 2 * b - 2
    if name == "infonce":
        ng = neg.sum(-1)
    elif name == "debiased":
        ng = (-p["tau_plus"] * m * pos + neg.sum(dim=-1)) / (1 - p["tau_plus"])
        ng = torch.clamp(ng, min=m * math.e ** (-1 / t))
    elif name == "hcl":
        imp = (p["beta"] * neg.log()).exp()
        reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
        ng = (-p["tau_plus"] * m * pos + reweight_neg) / (1 - p["tau_plus"])
        ng = torch.clamp(ng, min=m * math.e ** (-1 / t))
    elif name == "adnce":
        sigma, mu = p["sigma"], p["mu"]
        weight = 1.0 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-((neg.log() * t - mu) ** 2) / (2 * sigma**2))
        weight = weight / weight.mean(dim=-1, keepdim=True)
        ng = torch.sum(neg * weight.detach(), dim=1)
    else:
        raise AssertionError(name)
    return (-torch.log(pos / (pos + ng))).mean()


def value_and_grad(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_(True)
    out = fn(z)
    (grad,) = torch.autograd.grad(out, z)
    return out.detach(), grad


def assert_matches(name: str, z: torch.Tensor, t: float, p: dict, ref_fn=reference, rtol: float = 1e-9) -> None:
    loss = build_loss(name, temperature=t, **p)
    val, grad = value_and_grad(loss, z)
    ref_val, ref_grad = value_and_grad(lambda x: ref_fn(name, x, t, **p), z)
    torch.testing.assert_close(val, ref_val, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=1e-12 * max(1.0, ref_grad.abs().max().item()))


# ---------------------------------------------------------------------------------------------
# references


CASES = [(name, p) for name in CLOSED_FORM for p in SETTINGS[name]]


@pytest.mark.parametrize("t", TEMPERATURES)
@pytest.mark.parametrize(("n", "d"), [(4, 5), (32, 16)])
@pytest.mark.parametrize(("name", "p"), CASES, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for n, p in CASES])
def test_matches_loop_reference(name: str, p: dict, n: int, d: int, t: float) -> None:
    assert_matches(name, make_z(2, n, d, seed=n + d), t, p)


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_matches_loop_reference_n256(name: str) -> None:
    p = SETTINGS[name][0]
    assert_matches(name, make_z(2, 256, 32, seed=7), 0.1, p)


@pytest.mark.parametrize("t", (0.1, 0.5))
@pytest.mark.parametrize(("name", "p"), CASES, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for n, p in CASES])
def test_v2_matches_authors_code(name: str, p: dict, t: float) -> None:
    """V = 2: the implementation equals the authors' vectorised code, and so does the general
    loop reference — the V > 2 generalisation reduces to the two-view definition."""
    z = make_z(2, 16, 8, seed=3)
    assert_matches(name, z, t, p, ref_fn=authors_v2)
    torch.testing.assert_close(reference(name, z, t, **p), authors_v2(name, z, t, **p), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("v", (3, 4))
@pytest.mark.parametrize(("name", "p"), CASES, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for n, p in CASES])
def test_multiview_matches_loop_reference(name: str, p: dict, v: int) -> None:
    assert_matches(name, make_z(v, 8, 6, seed=v), 0.2, p)


def test_debiased_clamp_branch_is_exercised() -> None:
    """tau_plus large and positives close: some anchors hit the hard clamp; values and grads still match."""
    z = make_z(2, 8, 4, seed=1, noise=0.05)
    h = unit(z)
    t, tau = 0.5, 0.9
    pos = torch.exp((h[0] * h[1]).sum(-1) / t)
    s = h.reshape(-1, 4) @ h.reshape(-1, 4).T
    neg = torch.exp(s / t).masked_select(negative_mask(8)).view(16, -1).sum(-1)
    assert ((neg - tau * 14 * torch.cat([pos, pos])) < 14 * math.exp(-1 / t)).any()
    for name, p in (("debiased", {"tau_plus": tau}), ("hcl", {"beta": 1.0, "tau_plus": tau})):
        assert_matches(name, z, t, p)


# ---------------------------------------------------------------------------------------------
# invariances, descent, stability


INVARIANT = [(name, SETTINGS[name][0]) for name in CLOSED_FORM]


@pytest.mark.parametrize(("name", "p"), INVARIANT, ids=CLOSED_FORM)
def test_invariances(name: str, p: dict) -> None:
    loss = build_loss(name, temperature=0.2, **p)
    z = make_z(2, 16, 8, seed=11)
    base = loss(z)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(16, generator=g)
    torch.testing.assert_close(loss(z[:, perm]), base, rtol=1e-10, atol=0)  # same permutation in both views
    torch.testing.assert_close(loss(z * 3.7), base, rtol=1e-10, atol=0)  # global rescaling
    scale = 0.1 + 5 * torch.rand(2, 16, 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(loss(z * scale), base, rtol=1e-10, atol=0)  # per-embedding rescaling
    torch.testing.assert_close(loss(z.flip(0)), base, rtol=1e-10, atol=0)  # swapped views
    z3 = make_z(3, 8, 8, seed=12)  # V = 3: invariant to any permutation of the views
    torch.testing.assert_close(loss(z3[[2, 0, 1]]), loss(z3), rtol=1e-10, atol=0)


def linear_views(n: int = 32, d_in: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    return torch.stack([x + 0.3 * torch.randn(n, d_in, generator=g) for _ in range(2)])


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_decreases_under_sgd(name: str) -> None:
    torch.manual_seed(0)
    enc = nn.Linear(16, 8)
    loss = build_loss(name, temperature=0.5, dataset_size=32, **({"n_prototypes": 16} if name == "swav" else {}))
    params = list(enc.parameters()) + list(loss.parameters())
    if name == "swav":
        loss(enc(linear_views()))  # materialise the lazily shaped prototypes (also works after the optimizer)
        params = list(enc.parameters()) + list(loss.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    views, idx = linear_views(), torch.arange(32)
    values = []
    for _ in range(8):
        value = loss(enc(views), index=idx)
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(value.item())
    assert values[-1] < values[0] - 1e-3, values


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_stable_in_float32_at_small_temperature(name: str) -> None:
    """The naive form of hcl gives NaN in float32 at beta = 6, t = 0.05; the log-domain forms do not."""
    extra = {"hcl": {"beta": 6.0}, "swav": {"n_prototypes": 32}, "isogclr": {"tau_min": 0.01}}.get(name, {})
    for t in (0.05, 0.01):
        loss = build_loss(name, temperature=t, dataset_size=64, **extra)
        z = make_z(2, 64, 16, seed=5, dtype=torch.float32, noise=0.1).requires_grad_(True)
        value = loss(z, index=torch.arange(64))
        value.backward()
        assert value.dtype == torch.float32
        assert torch.isfinite(value), (name, t)
        assert torch.isfinite(z.grad).all(), (name, t)


def test_hcl_naive_form_overflows_in_float32() -> None:
    """The reason for the log-domain form: the authors' expression is NaN here."""
    z = make_z(2, 64, 16, seed=5, dtype=torch.float32, noise=0.1)
    assert not torch.isfinite(authors_v2("hcl", z, 0.05, beta=6.0, tau_plus=0.1))
    assert torch.isfinite(build_loss("hcl", temperature=0.05, beta=6.0)(z))


# ---------------------------------------------------------------------------------------------
# conformance: one class, every loss


def _index(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64)


@pytest.mark.parametrize("name", LOSS_NAMES)
class TestConformance:
    def make(self, name: str, **params: object) -> nn.Module:
        extra = {"n_prototypes": 16} if name == "swav" else {}
        return build_loss(name, temperature=0.3, dataset_size=64, **{**extra, **params})

    def test_unknown_parameter_lists_valid_ones(self, name: str) -> None:
        with pytest.raises(LossError) as err:
            build_loss(name, temperature=0.3, dataset_size=64, bogus=1.0)
        assert "bogus" in str(err.value)
        for p in LOSS_PARAMS[name]:
            assert p in str(err.value)

    @pytest.mark.parametrize("t", (0.0, -0.1, float("nan"), float("inf")))
    def test_bad_temperature(self, name: str, t: float) -> None:
        with pytest.raises(LossError, match="temperature"):
            build_loss(name, temperature=t, dataset_size=64)

    def test_out_of_range_parameters_name_range_and_value(self, name: str) -> None:
        for p, (typ, _default, (low, high)) in LOSS_PARAMS[name].items():
            for bad in ([low - 1] if low != -math.inf else []) + ([high + 1] if high != math.inf else []):
                bad = typ(bad)
                with pytest.raises(LossError) as err:
                    build_loss(name, temperature=0.3, dataset_size=64, **{p: bad})
                msg = str(err.value)
                assert p in msg and str(bad) in msg and str(low) in msg, msg
            with pytest.raises(LossError, match=p):
                build_loss(name, temperature=0.3, dataset_size=64, **{p: "x"})
            if typ is int:
                with pytest.raises(LossError, match=p):
                    build_loss(name, temperature=0.3, dataset_size=64, **{p: low + 0.5})

    def test_param_table_is_the_constructors_defaults(self, name: str) -> None:
        loss = build_loss(name, temperature=0.3, dataset_size=64)
        for p, (typ, default, _rng) in LOSS_PARAMS[name].items():
            assert default is None or isinstance(default, typ), (p, default)
            holder = loss.weight_fn if name == "dclw" else loss
            assert getattr(holder, p) == default, p
        sig = inspect.signature(type(loss).__init__)
        for p in LOSS_PARAMS[name]:
            if p in sig.parameters:
                assert sig.parameters[p].default == LOSS_PARAMS[name][p][1]
        assert isinstance(type(loss).needs_index, bool)
        assert type(loss).needs_index == (name == "isogclr")

    def test_unknown_name(self, name: str) -> None:
        with pytest.raises(LossError) as err:
            build_loss(name + "x", temperature=0.3)
        assert all(n in str(err.value) for n in LOSS_NAMES)

    def test_bad_shapes(self, name: str) -> None:
        loss = self.make(name)
        for bad in (torch.randn(8, 16), torch.randn(1, 8, 16), torch.randn(2, 1, 16), torch.randint(0, 3, (2, 8, 16))):
            with pytest.raises(LossError):
                loss(bad, index=_index(bad.shape[1] if bad.dim() == 3 else 8))

    @pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
    @pytest.mark.parametrize("v", (2, 3))
    def test_scalar_finite_gradients_dtype(self, name: str, dtype: torch.dtype, v: int) -> None:
        loss = self.make(name)
        z = make_z(v, 12, 8, dtype=dtype).requires_grad_(True)
        value = loss(z, index=_index(12))
        assert value.shape == () and value.dtype == dtype and torch.isfinite(value)
        value.backward()
        assert z.grad is not None and z.grad.dtype == dtype
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
        for p in loss.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()

    def test_index_is_accepted_and_checked(self, name: str) -> None:
        loss = self.make(name)
        z = make_z(2, 8, 4)
        loss(z, index=_index(8))
        if type(loss).needs_index:
            with pytest.raises(LossError, match="index"):
                loss(z)
            with pytest.raises(LossError, match="index"):
                loss(z, index=_index(8) + 60)
        else:
            loss(z)

    def test_state_dict_round_trip(self, name: str) -> None:
        a = self.make(name)
        z = make_z(2, 8, 8)
        a(z, index=_index(8))
        b = self.make(name)
        b.load_state_dict(a.state_dict())
        assert a.state_dict().keys() == b.state_dict().keys()
        for k, t in a.state_dict().items():
            assert torch.equal(t, b.state_dict()[k]), k
        torch.testing.assert_close(a(z, index=_index(8)), b(z, index=_index(8)), rtol=0, atol=0)

    def test_dataset_size_context(self, name: str) -> None:
        if name == "isogclr":
            with pytest.raises(LossError, match="dataset_size"):
                build_loss(name, temperature=0.3)
        else:
            build_loss(name, temperature=0.3)
        with pytest.raises(LossError, match="dataset_size"):
            build_loss(name, temperature=0.3, dataset_size=0)

    def test_dim_context(self, name: str) -> None:
        """Every loss accepts the embedding dimension (swav shapes its prototypes with it)."""
        loss = build_loss(name, temperature=0.3, dataset_size=64, dim=8)
        assert not any(isinstance(p, nn.UninitializedParameter) for p in loss.parameters())
        value = loss(make_z(2, 8, 8), index=_index(8))
        assert torch.isfinite(value)
        with pytest.raises(LossError, match="dim"):
            build_loss(name, temperature=0.3, dataset_size=64, dim=0)

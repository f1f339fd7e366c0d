"""Unit tests for scaling.evaluate: kNN against scikit-learn, probe sanity, metric identities."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

from scaling.evaluate import (
    alignment,
    effective_rank,
    extract_features,
    knn_top1,
    linear_probe,
    uniformity,
)
from scaling.models import build_encoder


def _blobs(
    n: int, dim: int, n_classes: int, *, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around centres of norm ~5 * sqrt(dim); split one draw into train and test."""
    gen = torch.Generator().manual_seed(seed)
    centers = 5.0 * torch.randn(n_classes, dim, generator=gen)
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    return centers[labels] + spread * torch.randn(n, dim, generator=gen), labels


# ---------------------------------------------------------------- kNN


@pytest.mark.parametrize(("k", "dim", "n_classes"), [(1, 8, 3), (5, 16, 4), (20, 32, 10)])
def test_knn_uniform_matches_sklearn(k: int, dim: int, n_classes: int) -> None:
    gen = torch.Generator().manual_seed(k)
    train = torch.randn(300, dim, generator=gen)
    train_y = torch.randint(0, n_classes, (300,), generator=gen)
    query = torch.randn(200, dim, generator=gen)
    query_y = torch.randint(0, n_classes, (200,), generator=gen)
    ours = knn_top1(train, train_y, query, query_y, k=k, weighting="uniform", chunk=64)

    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="uniform", algorithm="brute")
    clf.fit(train.numpy(), train_y.numpy())
    ref = float((clf.predict(query.numpy()) == query_y.numpy()).mean())
    assert ours == pytest.approx(ref, abs=1e-12)


def test_knn_chunking_does_not_change_result() -> None:
    x, y = _blobs(550, 16, 5, spread=6.0, seed=1)
    train, train_y, query, query_y = x[:400], y[:400], x[400:], y[400:]
    results = {knn_top1(train, train_y, query, query_y, chunk=c) for c in (1, 7, 150, 4096)}
    assert len(results) == 1


def test_knn_temperature_weighting_against_loop() -> None:
    x, y = _blobs(260, 8, 4, spread=8.0, seed=3)
    train, train_y, query, query_y = x[:200], y[:200], x[200:], y[200:]
    k, t = 7, 0.07
    tn = train / train.norm(dim=1, keepdim=True)
    correct = 0
    for q, y in zip(query, query_y):
        sims = tn @ (q / q.norm())
        top = sims.argsort(descending=True)[:k]
        votes = [0.0] * 4
        for i in top.tolist():
            votes[int(train_y[i])] += math.exp(float(sims[i]) / t)
        correct += int(max(range(4), key=lambda c: votes[c]) == int(y))
    assert knn_top1(train, train_y, query, query_y, k=k, temperature=t) == pytest.approx(correct / 60)


@pytest.mark.parametrize("weighting", ["temperature", "uniform"])
def test_knn_perfect_on_separable_clusters(weighting: str) -> None:
    # Ten clusters around orthogonal directions: cosine similarity separates them perfectly.
    gen = torch.Generator().manual_seed(0)
    train_y = torch.arange(10).repeat(30)
    query_y = torch.arange(10).repeat(5)
    train = torch.eye(10)[train_y] * 3 + 0.05 * torch.randn(300, 10, generator=gen)
    query = torch.eye(10)[query_y] * 3 + 0.05 * torch.randn(50, 10, generator=gen)
    assert knn_top1(train, train_y, query, query_y, k=20, weighting=weighting) == 1.0


def test_knn_small_temperature_is_finite_and_k_clamped() -> None:
    train, train_y = _blobs(30, 4, 3, spread=1.0, seed=5)
    acc = knn_top1(train, train_y, train, train_y, k=1000, temperature=1e-4, num_classes=5)
    assert 0.0 <= acc <= 1.0
    assert knn_top1(train, train_y, train, train_y, k=1) == 1.0  # each point is its own neighbour


def test_knn_rejects_bad_arguments() -> None:
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match="weighting"):
        knn_top1(x, y, x, y, weighting="distance")
    with pytest.raises(ValueError, match="k must"):
        knn_top1(x, y, x, y, k=0)
    with pytest.raises(ValueError, match="integer"):
        knn_top1(x, y.float(), x, y)
    with pytest.raises(ValueError, match="num_classes"):
        knn_top1(x, y + 3, x, y, num_classes=2)
    with pytest.raises(ValueError, match="dims"):
        knn_top1(x, y, torch.randn(10, 5), y)


# ---------------------------------------------------------------- linear probe


def test_linear_probe_separable_blobs_fast() -> None:
    x, y = _blobs(6000, 128, 10, spread=2.0, seed=6)  # one draw: train and test share the centres
    threads = torch.get_num_threads()
    start = time.perf_counter()
    acc = linear_probe(x[:5000], y[:5000], x[5000:], y[5000:])
    elapsed = time.perf_counter() - start
    assert acc > 0.95
    assert elapsed < 5.0  # about 0.1 s here; the bound leaves room for a busy shared machine
    assert torch.get_num_threads() == threads  # the probe's one-thread section is undone


def test_linear_probe_overlapping_blobs_beats_chance_not_perfect() -> None:
    gen = torch.Generator().manual_seed(8)
    centers = 0.15 * torch.randn(4, 32, generator=gen)
    y = torch.randint(0, 4, (2000,), generator=gen)
    x = centers[y] + torch.randn(2000, 32, generator=gen)
    acc = linear_probe(x[:1500], y[:1500], x[1500:], y[1500:])
    assert 0.3 < acc < 0.95


def test_linear_probe_random_labels_near_chance() -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2000, 64, generator=gen)
    y = torch.randint(0, 10, (2000,), generator=gen)
    acc = linear_probe(x[:1500], y[:1500], x[1500:], y[1500:])
    # chance is 0.1; 500 test points give a standard error of about 0.013
    assert abs(acc - 0.1) < 0.06


def test_linear_probe_deterministic_and_scale_invariant() -> None:
    x, y = _blobs(800, 16, 3, spread=6.0, seed=10)
    train, train_y, test, test_y = x[:600], y[:600], x[600:], y[600:]
    a = linear_probe(train, train_y, test, test_y, seed=1)
    assert a == linear_probe(train, train_y, test, test_y, seed=1)
    # standardisation makes the probe blind to a per-feature affine rescaling
    scale = torch.linspace(0.01, 100.0, 16)
    b = linear_probe(train * scale + 3, train_y, test * scale + 3, test_y, seed=1)
    assert abs(a - b) <= 0.01


# ---------------------------------------------------------------- alignment / uniformity


def test_alignment_identical_and_opposite() -> None:
    z = torch.randn(64, 16)
    assert alignment(z, z) == pytest.approx(0.0, abs=1e-6)
    assert alignment(z, 3.0 * z) == pytest.approx(0.0, abs=1e-6)  # scale-free: normalised inside
    assert alignment(z, -z) == pytest.approx(4.0, abs=1e-5)  # ||2u||^2
    assert alignment(z, -z, alpha=1) == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(ValueError):
        alignment(z, z[:10])


def test_alignment_against_formula() -> None:
    gen = torch.Generator().manual_seed(12)
    z1, z2 = torch.randn(50, 8, generator=gen), torch.randn(50, 8, generator=gen)
    a = z1 / z1.norm(dim=1, keepdim=True)
    b = z2 / z2.norm(dim=1, keepdim=True)
    expected = sum(float((a[i] - b[i]).norm()) ** 2 for i in range(50)) / 50
    assert alignment(z1, z2) == pytest.approx(expected, rel=1e-5)


def test_uniformity_bounds() -> None:
    t = 2.0
    # all points identical -> every distance 0 -> log E exp(0) = 0, the upper bound
    assert uniformity(torch.ones(10, 4), t=t) == pytest.approx(0.0, abs=1e-6)
    # two antipodal points: ||z1 - z2||^2 = 4 -> -4t
    assert uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), t=t) == pytest.approx(-4 * t, abs=1e-5)
    # regular simplex of N points: every squared distance is 2N/(N-1), the Jensen lower bound
    n = 8
    simplex = torch.eye(n) - 1.0 / n
    assert uniformity(simplex, t=t) == pytest.approx(-2 * t * n / (n - 1), abs=1e-5)
    # random sets land inside [-2tN/(N-1), 0] and a spread set is more uniform than a clustered one
    gen = torch.Generator().manual_seed(13)
    spread = torch.randn(200, 32, generator=gen)
    clustered = torch.ones(200, 32) + 0.1 * torch.randn(200, 32, generator=gen)
    for z in (spread, clustered):
        assert -2 * t * 200 / 199 - 1e-6 <= uniformity(z, t=t) <= 0.0
    assert uniformity(spread, t=t) < uniformity(clustered, t=t)


def test_uniformity_against_pair_loop() -> None:
    gen = torch.Generator().manual_seed(14)
    z = torch.randn(20, 5, generator=gen)
    u = z / z.norm(dim=1, keepdim=True)
    terms = [math.exp(-3.0 * float((u[i] - u[j]).pow(2).sum())) for i in range(20) for j in range(i + 1, 20)]
    assert uniformity(z, t=3.0) == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-5)


# ---------------------------------------------------------------- effective rank


def test_effective_rank_orthonormal_and_rank_one() -> None:
    d = 12
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(15)))
    assert effective_rank(q) == pytest.approx(d, rel=1e-9)
    assert effective_rank(torch.eye(32)[:d]) == pytest.approx(d, rel=1e-9)  # d orthonormal rows in R^32
    rank1 = torch.randn(50, 1) @ torch.randn(1, 20)
    assert effective_rank(rank1) == pytest.approx(1.0, abs=1e-9)
    rank1_f64 = torch.randn(50, 1, dtype=torch.float64) @ torch.randn(1, 20, dtype=torch.float64)
    assert effective_rank(rank1_f64) == pytest.approx(1.0, abs=1e-9)


def test_effective_rank_between_one_and_min_dim() -> None:
    z = torch.randn(100, 16) * torch.logspace(0, -3, 16)  # decaying spectrum
    r = effective_rank(z)
    assert 1.0 < r < 16.0
    with pytest.raises(ValueError, match="all-zero"):
        effective_rank(torch.zeros(5, 3))


# ---------------------------------------------------------------- extract_features


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


@pytest.mark.parametrize("batch_size", [7, 512])
def test_extract_features_matches_eval_forward(batch_size: int) -> None:
    torch.manual_seed(16)
    enc = build_encoder("small_cnn", width=4)
    images = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)
    enc.train()
    enc(_to_float(images))  # move BN running stats away from their init
    feats = extract_features(enc, images, transform=_to_float, batch_size=batch_size)
    assert feats.shape == (20, enc.out_dim) and feats.dtype == torch.float32
    assert not feats.requires_grad
    assert enc.training and all(m.training for m in enc.modules())
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, enc(_to_float(images)))


def test_extract_features_restores_mixed_modes_even_on_error() -> None:
    enc = build_encoder("small_cnn", width=4)
    enc.train()
    frozen_bn = next(m for m in enc.modules() if isinstance(m, nn.BatchNorm2d))
    frozen_bn.eval()  # a deliberately frozen BN must stay frozen
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    extract_features(enc, images, transform=_to_float)
    assert enc.training and not frozen_bn.training

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        extract_features(enc, images, transform=broken)
    assert enc.training and not frozen_bn.training


def test_end_to_end_knn_on_extracted_features() -> None:
    # Not a quality claim: the pipeline extract -> kNN runs and returns a probability.
    enc = build_encoder("small_cnn", width=4)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    labels = torch.from_numpy(np.arange(40) % 4)
    feats = extract_features(enc, images, transform=_to_float)
    assert 0.0 <= knn_top1(feats[:30], labels[:30], feats[30:], labels[30:], k=5) <= 1.0

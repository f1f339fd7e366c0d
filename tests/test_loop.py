"""The pure-PyTorch train loop: schedules, derived values, metrics, checkpoints, non-finite loss."""

from __future__ import annotations

import math

import pytest
import torch

from scaling.data import load_dataset
from scaling.loop import (
    NonFiniteLossError,
    derived_params,
    lr_at,
    per_worker_batch,
    raw_pixel_knn,
    scaled_lr,
    steps_per_epoch,
    train,
)
from scaling.spec import TrialConfig


def tiny(**train_over: object) -> TrialConfig:
    return TrialConfig.model_validate({
        "data": {"name": "shapes", "size": 600, "image_size": 16},
        "model": {"encoder": "small_cnn", "width": 8, "proj_hidden": 32, "proj_dim": 16},
        "train": {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 0.002, "warmup_epochs": 1,
                  "max_steps_per_epoch": 3, **train_over},
        "eval": {"knn_k": 5},
    })


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    cfg = tiny()
    return load_dataset("shapes", size=600, image_size=16, seed=cfg.data.seed)


def test_schedule_and_scaling_rules() -> None:
    assert scaled_lr(0.3, 512, base_batch_size=256) == pytest.approx(0.6)
    assert scaled_lr(0.3, 1024, base_batch_size=256, rule="sqrt") == pytest.approx(0.6)
    assert scaled_lr(0.3, 1024, rule="none") == 0.3
    lrs = [lr_at(s, total_steps=100, warmup_steps=10, peak_lr=1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decays monotonically
    assert lrs[-1] < 0.01
    assert per_worker_batch(256, 4) == 64
    with pytest.raises(ValueError, match="split evenly"):
        per_worker_batch(250, 4)
    with pytest.raises(ValueError, match="larger than the training split"):
        steps_per_epoch(100, 128)


def test_train_reports_every_epoch_and_resumes_identically(data) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny()
    states: list[dict] = []
    history = train(cfg, data=data, on_epoch=lambda m, ts: states.append(ts.state_dict()))
    assert [m.epoch for m in history] == [1, 2]
    for m in history:
        assert math.isfinite(m.train_loss) and 0.0 <= m.knn_top1 <= 1.0 and m.knn_top1_test is not None
        assert m.samples_seen == m.epoch * 3 * 64 and m.throughput > 0
        assert 1.0 <= m.effective_rank <= 16.0 and m.uniformity <= 0.0
    # resuming from the epoch-1 checkpoint reproduces epoch 2 exactly (model, optimizer, RNG)
    resumed = train(cfg, data=data, state=states[0])
    assert [m.epoch for m in resumed] == [2]
    assert resumed[0].train_loss == pytest.approx(history[1].train_loss, rel=1e-6)
    assert resumed[0].knn_top1 == pytest.approx(history[1].knn_top1)
    again = train(cfg, data=data)
    assert [m.train_loss for m in again] == [m.train_loss for m in history]  # deterministic under the seed


def test_checkpoint_is_weights_only_loadable(tmp_path, data) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny(epochs=1)
    states: list[dict] = []
    train(cfg, data=data, on_epoch=lambda m, ts: states.append(ts.state_dict()))
    torch.save(states[0], tmp_path / "s.pt")
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    assert back["epoch"] == 1 and back["history"][0]["epoch"] == 1


def test_non_finite_loss_names_epoch_and_step(data) -> None:  # type: ignore[no-untyped-def]
    # The losses are numerically stable (t = 1e-4 with a huge lr stays finite), so the fault is injected.
    cfg = tiny(temperature=1e-4, lr=100.0, optimizer="sgd", warmup_epochs=0, epochs=3, fault_nan_at_step=5)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 2 step 2"):
        train(cfg, data=data)


def test_derived_params_and_raw_baseline(data) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny(batch_size=128)
    d = derived_params(cfg, num_train=len(data.train), world_size=2, flops_per_image=123)
    assert d["per_worker_batch"] == 64 and d["scaled_lr"] == pytest.approx(0.001)
    assert d["flops_per_image"] == 123 and d["steps_per_epoch"] == 3
    assert 0.0 < raw_pixel_knn(data, k=5) < 0.6


def test_failure_reason_skips_ray_wrappers() -> None:
    from scaling.study import failure_reason

    tb = ("Traceback (most recent call last):\n  File x\nscaling.loop.NonFiniteLossError: non-finite loss at epoch 2 step 1\n"
          "\nThe above exception was the direct cause of:\nray.train.v2.api.exceptions.WorkerGroupError: 1 worker failed")
    assert failure_reason(tb) == "NonFiniteLossError: non-finite loss at epoch 2 step 1"
    assert failure_reason("") == "unknown error"

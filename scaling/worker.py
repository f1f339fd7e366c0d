"""The Ray Train per-worker function: wraps ``loop.train``, reports metrics and checkpoints.

Each worker trains its slice of every global batch (``scaling.loop``); every worker calls
``ray.train.report`` once per epoch (Ray requires it), rank 0 attaches the checkpoint (model,
optimizer, loss state such as iSogCLR temperatures, RNG). On a restart the latest checkpoint is
loaded with ``torch.load(weights_only=True)`` and training continues after its epoch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from scaling import dist
from scaling.loop import EpochMetrics, NonFiniteLossError, TrainState, derived_params, flops_per_image, load_data, train
from scaling.spec import TrialConfig

CHECKPOINT_FILE = "state.pt"


def load_checkpoint_state(checkpoint: ray.train.Checkpoint | None) -> dict[str, Any] | None:
    """The TrainState dict inside a Ray checkpoint (tensors only: safe ``weights_only`` load)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def train_fn(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``: ``config = {"trial": TrialConfig JSON}``."""
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfg = TrialConfig.model_validate(config["trial"])
    device = ray.train.torch.get_device()
    data = load_data(cfg)
    state = load_checkpoint_state(ray.train.get_checkpoint())
    derived = derived_params(cfg, num_train=len(data.train), world_size=dist.world_size(),
                             flops_per_image=flops_per_image(cfg))
    first = {"done": False}

    def on_epoch(metrics: EpochMetrics, ts: TrainState) -> None:
        report: dict[str, Any] = {**metrics.as_dict(), "target_epochs": cfg.train.epochs}
        if not first["done"]:
            report.update({f"derived.{k}": v for k, v in derived.items()})
            first["done"] = True
        if dist.rank() != 0:
            ray.train.report(report, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(ts.state_dict(), Path(tmp) / CHECKPOINT_FILE)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    if state is not None and state["epoch"] >= cfg.train.epochs and state["history"]:
        # Finished before the driver could record it (e.g. the study was killed): report the final
        # epoch again so Tune and the searcher get the trial's result; the tracker skips known epochs.
        ray.train.report({**state["history"][-1], "target_epochs": cfg.train.epochs}, checkpoint=None)
        return
    prepare = ray.train.torch.prepare_model if dist.world_size() > 1 else None
    try:
        train(cfg, data=data, device=device, state=state, on_epoch=on_epoch, prepare_model=prepare)
    except NonFiniteLossError as exc:
        # Ray ships a worker's exception to the driver by pickling it; NonFiniteLossError's
        # (epoch, step, value) constructor does not survive that (the reason arrived as a TypeError
        # from unpickling), so the driver gets its base class with the same message.
        raise FloatingPointError(str(exc)) from exc

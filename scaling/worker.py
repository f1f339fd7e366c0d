"""The Ray Train per-worker function: wraps ``loop.train``, reports metrics and checkpoints.

Each worker trains its slice of every global batch (``scaling.loop``); every worker calls
``ray.train.report`` once per epoch (Ray requires it), rank 0 attaches the checkpoint (model,
optimizer, loss state such as iSogCLR temperatures, RNG). On a restart the latest checkpoint is
loaded with ``torch.load(weights_only=True)`` and training continues after its epoch.

Imports of torch and the training code live inside the functions: the trial driver imports this
module for ``train_fn`` (its Ray Train controller ships it to the workers) and needs none of them.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray.train

if TYPE_CHECKING:
    from scaling.loop import EpochMetrics, TrainState
    from scaling.spec import TrialConfig

CHECKPOINT_FILE = "state.pt"


def trial_config(config: dict[str, Any]) -> TrialConfig:
    """A trial's config from ``train_fn``'s: the full ``trial`` JSON, or the study's ``base`` plus the
    sampled flat ``params`` (and a ``repeat`` index that offsets the seed)."""
    from scaling.spec import TrialConfig

    if "trial" in config:
        return TrialConfig.model_validate(config["trial"])
    cfg = TrialConfig.model_validate(config["base"]).with_params(config.get("params", {}))
    repeat = int(config.get("repeat", 0) or 0)
    return cfg.with_params({"seed": cfg.train.seed + repeat}) if repeat else cfg


def load_checkpoint_state(checkpoint: ray.train.Checkpoint | None) -> dict[str, Any] | None:
    """The TrainState dict inside a Ray checkpoint (tensors only: safe ``weights_only`` load)."""
    if checkpoint is None:
        return None
    import torch

    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def train_fn(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``; ``config``: see ``trial_config``, plus ``threads`` and
    ``replay_history`` (a resumed trial reports its checkpoint's epochs again)."""
    import ray.train.torch
    import torch

    from scaling import dist
    from scaling.failures import TrialOutOfMemoryError, is_out_of_memory
    from scaling.loop import NonFiniteLossError, derived_params, flops_per_image, load_data, train

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfg = trial_config(config)
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

    if state is not None and state["history"] and config.get("replay_history"):
        # A resumed study: Ray Train may have checkpointed epochs the killed driver never recorded
        # (and Tune starts the trial's result file afresh). Report the checkpoint's history again;
        # the tracker and the TrialTable keep one record per epoch.
        for i, past in enumerate(state["history"]):
            extra = {f"derived.{k}": v for k, v in derived.items()} if i == 0 else {}
            ray.train.report({**past, **extra, "target_epochs": cfg.train.epochs, "replayed": True}, checkpoint=None)
        first["done"] = True
        if state["epoch"] >= cfg.train.epochs:
            return
    elif state is not None and state["epoch"] >= cfg.train.epochs and state["history"]:
        # Finished before the driver could record it (e.g. the study was killed): report the final
        # epoch again so Tune and the searcher get the trial's result; the tracker skips known epochs.
        ray.train.report({**state["history"][-1], "target_epochs": cfg.train.epochs}, checkpoint=None)
        return
    prepare = ray.train.torch.prepare_model if dist.world_size() > 1 else None
    where = _Progress(done_epochs=state["epoch"] if state is not None else 0)
    try:
        train(cfg, data=data, device=device, state=state, on_epoch=where.wrap(on_epoch), on_step=where.on_step,
              prepare_model=prepare)
    except NonFiniteLossError:
        raise  # picklable with its fields; not retried (scaling.failures)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        # Not retried either; `from None` lets the failed step's tensors go with its frames.
        raise TrialOutOfMemoryError(where.describe(), _first_line(exc)) from None


# ---------------------------------------------------------------------------------------------
# error handling


class _Progress:
    """Where training is (epoch, step, or the evaluation after an epoch), for failures that do not say."""

    def __init__(self, done_epochs: int) -> None:
        self.done, self.epoch, self.step, self.steps = done_epochs, done_epochs + 1, 0, 0

    def on_step(self, epoch: int, step: int, steps: int) -> None:
        self.epoch, self.step, self.steps = epoch, step, steps

    def wrap(self, on_epoch: Any) -> Any:
        def tracked(metrics: EpochMetrics, ts: TrainState) -> None:
            self.done = metrics.epoch
            on_epoch(metrics, ts)
        return tracked

    def describe(self) -> str:
        if self.steps and self.step == self.steps:  # the epoch's last step is done
            if self.done < self.epoch:
                return f"in the evaluation after epoch {self.epoch}"
            return f"at epoch {self.epoch + 1} step 1"
        return f"at epoch {self.epoch} step {self.step + 1}"


def _first_line(exc: BaseException) -> str:
    """torch's allocator message without its C++ location prefix ("[enforce fail at alloc_cpu.cpp:127] err == 0.")."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^\[enforce fail at [^\]]*\]\s*[^.]*\.\s*", "", text)[:500]

"""Layer 2 of a study: the Tune trainable that drives one trial's ``TorchTrainer``.

Apart from ``scaling.study`` and light on imports on purpose. Tune reuses a trial-driver actor from
one trial to the next (``reuse_actors``), but every trial's ``fit()`` starts a fresh Ray Train
controller, which unpickles ``NodeReportCallback`` and so imports this module: whatever is imported
at the top of this module is paid on every trial's critical path. MLflow, Optuna, pyarrow, rich and
the training code (``scaling.study``'s imports, about 1-2 s per process) are not needed here. The
sampled config is merged into the spec's base by the worker (``scaling.worker.trial_config``).

A reused driver must end the run of a trial that Tune stopped (ASHA) before the next one starts:
``_abort_when_stopped`` watches the Tune session's stop event and aborts the run's controller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback


def trial_driver(config: dict[str, Any], *, base: dict[str, Any], names: Sequence[str], workers: int,
                 cpus_per_worker: float, gpus_per_worker: float, train_storage: str, failures: int) -> None:
    """Tune trainable: one TorchTrainer for one sampled config; rank 0's reports flow to Tune."""
    import ray
    import ray.train
    import ray.tune
    from ray.train._internal.session import get_session

    from scaling.failures import TrialTrainer  # a TorchTrainer that does not retry NaN / out of memory
    from scaling.worker import train_fn

    trial_name = ray.tune.get_context().get_trial_name()
    node_id = ray.get_runtime_context().get_node_id()
    loop_config = {
        "base": base, "params": {k: v for k, v in config.items() if k in names},
        "repeat": int(config.get("__trial_index__", 0) or 0), "threads": max(1, int(cpus_per_worker)),
        # this trial ran in an earlier session (a resumed study): replay its checkpoint's epochs
        "replay_history": (Path(train_storage) / trial_name).is_dir(),
    }
    trainer = TrialTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=gpus_per_worker > 0,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
        ),
        run_config=ray.train.RunConfig(
            name=trial_name, storage_path=train_storage, callbacks=[NodeReportCallback(node_id)],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=failures),
        ),
    )
    # Tune reuses this actor for the next trial (``reuse_actors``): a trial it stops (ASHA) must end
    # its run, or its controller and workers would train on beside the next trial.
    stopped, done = get_session().stop_event, threading.Event()
    threading.Thread(target=_abort_when_stopped, args=(trainer, stopped, done), daemon=True).start()
    try:
        trainer.fit()
    except Exception:
        if stopped.is_set():
            return  # stopped by Tune: the run was aborted on purpose
        raise
    finally:
        done.set()
    _drain_train_reports()


def _abort_when_stopped(trainer: Any, stopped: threading.Event, done: threading.Event) -> None:
    """Abort ``trainer``'s run once Tune stops the trial (its session's stop event), unless it ended."""
    while not (stopped.wait(timeout=0.2) or done.is_set()):
        pass
    while not (done.is_set() or trainer.started):  # stopped while fit() was still creating the run
        time.sleep(0.05)
    if not done.is_set():
        trainer.abort()


class NodeReportCallback(TuneReportCallback):
    """Forwards rank 0's reports to Tune; the first carries ``derived.node_id`` (the trial driver's Ray node)."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self._node_id, self._sent = node_id, False

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not self._sent and metrics:
            metrics = [{**metrics[0], "derived.node_id": self._node_id}, *metrics[1:]]
            self._sent = True
        super().after_report(run_context, metrics, checkpoint)


def _drain_train_reports(timeout_s: float = 120.0) -> None:
    """Wait until Tune has taken every report Ray Train relayed to this trial.

    Works around a race in Ray 2.60's Train-inside-Tune bridge: when the trainable returns while a
    report still sits in the inter-actor queue, Tune's final "function returned" result fills the
    one-slot result queue first and relaying the pending report then blocks forever (seen under
    load: the trial stays RUNNING with its driver parked in ``Queue.put``).
    """
    from ray.train._internal.session import get_session

    session = get_session()
    queue = getattr(session, "_inter_actor_queue", None)
    if session is None or queue is None:
        return
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline and quiet < 3:
        idle = queue.empty() and session.result_queue.empty()
        quiet = quiet + 1 if idle else 0
        time.sleep(0.1)

"""Layer 2 of a study: the Tune trainable that drives one trial's Ray Train run.

Apart from ``scaling.study`` and light on imports on purpose: MLflow, Optuna, pyarrow and rich
(``scaling.study``'s imports, about 1-2 s per process) are not needed in a trial driver. Tune reuses
a trial-driver actor from one trial to the next (``reuse_actors``), and each trial's Ray Train
controller runs inside it (``TrialTrainer``), so what a trial driver imports is paid once per
concurrent trial slot, not once per trial. The sampled config is merged into the spec's base by the
worker (``scaling.worker.trial_config``).

A reused driver must end the run of a trial that Tune stopped (ASHA) before the next one starts.
Tune ends a stopped trial at its next report (``ray.tune.report`` raises ``SystemExit`` in the
trainable's thread, where the controller reports), and ``TrialTrainer`` then aborts the run; a trial
stopped between reports (while its workers start, say) is aborted by ``_abort_when_stopped``, which
watches the Tune session's stop event.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
from ray.train._internal.session import get_session
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2.api.callback import UserCallback
from ray.train.v2.torch.torch_trainer import TorchTrainer

from scaling.failures import NoRetryOnDeterministicFailure


def trial_driver(config: dict[str, Any], *, base: dict[str, Any], names: Sequence[str], workers: int,
                 cpus_per_worker: float, gpus_per_worker: float, train_storage: str, failures: int) -> None:
    """Tune trainable: one TorchTrainer for one sampled config; rank 0's reports flow to Tune."""
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


def _abort_when_stopped(trainer: Any, stopped: threading.Event, done: threading.Event) -> None:
    """Abort ``trainer``'s run once Tune stops the trial (its session's stop event), unless it ended."""
    while not (stopped.wait(timeout=0.2) or done.is_set()):
        pass
    while not (done.is_set() or trainer.started):  # stopped while fit() was still creating the run
        time.sleep(0.05)
    if not done.is_set():
        trainer.abort()


class TrialAbortedError(RuntimeError):
    """A trial's run ended by ``TrialTrainer.abort`` (Tune stopped the trial)."""


class TrialTrainer(TorchTrainer):
    """A ``TorchTrainer`` for one trial: its Ray Train controller runs in this process, deterministic
    failures are not retried (``NoRetryOnDeterministicFailure``), and ``abort()`` works from another thread.

    Ray's own ``fit`` starts the controller as a fresh actor: a new process that imports torch (to
    unpickle ``TorchConfig``) and Ray Train's controller modules before it starts any worker -- about
    2.5-3.4 s of every trial's start-up. A trial driver is a Ray actor already, reused from trial to
    trial (Tune ``reuse_actors``) with all of that imported, so the controller runs here, on its own
    event loop in ``fit``'s thread. It stays the same ``TrainController`` class: it creates and
    watches the worker group, applies the failure policy and runs the callbacks; its placement-group
    cleaner watches this actor instead, one for all the trials it drives (``_DriverPlacementGroupCleaner``).
    Ray 2.60 has no public hook for any of this: ``_initialize_and_run_controller`` is where ``fit``
    hands its arguments to the controller and ``_create_default_callbacks`` makes the cleaner's
    callback. Check both on any Ray upgrade.
    """

    _run: asyncio.Task | None = None  # the controller's run, once ``fit`` has created it

    def _create_default_callbacks(self) -> list[Any]:
        return [_DriverPlacementGroupCleaner() if isinstance(c, PlacementGroupCleanerCallback) else c
                for c in super()._create_default_callbacks()]

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
        if ray.get_runtime_context().get_actor_id() is None:  # its placement-group cleaner watches an actor
            raise RuntimeError("TrialTrainer runs its Ray Train controller inside the calling Ray actor (a Tune "
                               "trial driver); outside an actor use ray.train.torch.TorchTrainer")
        controller_init_kwargs["failure_policy"] = NoRetryOnDeterministicFailure(self.run_config.failure_config)
        loop = asyncio.new_event_loop()
        try:
            controller = TrainController(**controller_init_kwargs)
            self._loop = loop
            self._run = loop.create_task(controller.run())  # last: ``started`` tells abort() it can cancel
            try:
                loop.run_until_complete(self._run)
            except asyncio.CancelledError:
                _abort_in_place(controller)
                raise TrialAbortedError("the trial was stopped and its run aborted") from None
            except BaseException:  # also SystemExit: ray.tune.report ends a trial Tune stopped that way
                _abort_in_place(controller)
                raise
            return controller.get_result()
        finally:
            loop.close()

    @property
    def started(self) -> bool:
        """Whether ``fit`` has created the run's controller (only then is there a run to abort)."""
        return self._run is not None

    def abort(self) -> None:
        """End the run from another thread: ``fit`` stops its workers and raises ``TrialAbortedError``."""
        if self._run is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._run.cancel)
        except RuntimeError:
            pass  # the loop is closed: the run has ended already


class _DriverPlacementGroupCleaner(PlacementGroupCleanerCallback):
    """Ray Train's placement-group cleaner, one per trial driver instead of one per run.

    The cleaner is a detached actor that removes the run's placement group if the controller's actor
    dies without removing it (Ray does not: a placement group outlives the actor that created it).
    Here that actor is the trial driver, which runs one trial after another, so one cleaner watches
    it for all of them: each run registers its placement group with it and leaves it running at the
    end (a removed group is skipped). A cleaner per run costs a process start beside the run's worker
    start-up and up to 1 s of its 1-s poll when it is stopped at the end of the run.
    """

    _shared: tuple[Any, str] | None = None  # this process's cleaner: (actor handle, watched actor id)

    def after_controller_start(self, train_run_context: Any) -> None:
        cls = _DriverPlacementGroupCleaner
        if cls._shared is None:
            super().after_controller_start(train_run_context)
            if self._cleaner is not None:
                cls._shared = (self._cleaner, self._controller_actor_id)
        else:
            self._cleaner, self._controller_actor_id = cls._shared

    def _stop_cleaner(self) -> None:
        self._cleaner = None  # it keeps watching this trial driver for the runs to come


def _abort_in_place(controller: Any) -> None:
    """Ray 2.60's ``TrainController.abort()`` without its ``exit_actor()``, which would end this actor:
    the callbacks' abort hooks, then the worker group's abort (its workers and placement group)."""
    controller._controller_callback_manager.invoke_best_effort("before_controller_abort")
    if controller.get_worker_group() is not None:
        controller.get_worker_group().abort()


class NodeReportCallback(UserCallback):
    """Reports rank 0's metrics to Tune; the first report carries ``derived.node_id`` (the trial
    driver's Ray node).

    Ray's callback runs in a controller actor of its own and relays each report through a queue
    actor that the Tune session polls: one more process per trial, and a race when the trainable
    returns while a report is still in the queue (the trial hangs RUNNING). The controller runs in
    the trial driver here (``TrialTrainer``), on the thread that runs the trainable, so it reports
    to Tune directly, as any Tune function does.
    """

    def __init__(self, node_id: str) -> None:
        self._node_id, self._sent = node_id, False

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        result = dict(metrics[0])
        if not self._sent:
            result["derived.node_id"] = self._node_id
            self._sent = True
        ray.tune.report(result)

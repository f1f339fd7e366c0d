"""Which trial failures are worth a retry.

Ray Train restarts a trial's worker group from its last checkpoint after any worker error
(``FailureConfig(max_failures=N)``). That is right for a crashed or killed worker, a lost node or a
broken collective: the next attempt will likely get through. It is wrong for failures the trial's
own configuration causes -- a loss that goes non-finite, a model or batch that does not fit in
memory: restarted from the same checkpoint they fail again at the same step, costing N more worker
starts and delaying the reason. ``TrialTrainer`` is a ``TorchTrainer`` whose failure policy raises
at once when a worker failed that way (``is_deterministic``); everything else is retried as before.

This module imports neither torch nor the training code: Ray Train's controller actor unpickles the
policy at the start of every trial, so whatever this module imports is on each trial's critical path.
"""

from __future__ import annotations

import re
from typing import Any

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2.torch.torch_trainer import TorchTrainer

__all__ = ["NoRetryOnDeterministicFailure", "TrialOutOfMemoryError", "TrialTrainer", "is_deterministic",
           "is_out_of_memory"]

# torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes")
# and CUDA's ("CUDA out of memory. Tried to allocate ...", torch.OutOfMemoryError) say it like this.
_ALLOCATOR = re.compile(r"can't allocate memory|out of memory", re.I)
# Ray's memory monitor kills the worker; its death message is all the controller gets.
_RAY_OOM = re.compile(r"memory pressure|running low on memory", re.I)


class TrialOutOfMemoryError(MemoryError):
    """A trial ran out of memory; the message says where (epoch and step, when known) and what failed."""

    retryable = False  # the same config from the same checkpoint asks for the same memory

    def __init__(self, where: str, detail: str) -> None:
        self.where, self.detail = where, detail
        super().__init__(f"out of memory {where}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:  # Ray ships worker exceptions to the driver by pickling them
        return (type(self), (self.where, self.detail))


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's allocators refusing memory (CPU RuntimeError, ``torch.OutOfMemoryError``), a Python
    ``MemoryError``, Ray's ``OutOfMemoryError`` (memory monitor)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and bool(_ALLOCATOR.search(str(exc)))


def is_deterministic(exc: BaseException) -> bool:
    """Whether a worker failure would happen again on a retry from the last checkpoint.

    Errors that say so themselves (``retryable = False``: ``NonFiniteLossError``,
    ``TrialOutOfMemoryError``), running out of memory, and a worker killed by Ray's memory monitor.
    A worker killed by a signal (the kernel's OOM killer included, which looks like any SIGKILL) or a
    lost node is retried.
    """
    if getattr(type(exc), "retryable", True) is False or is_out_of_memory(exc):
        return True
    inner = getattr(exc, "health_check_failure", None)  # a dead worker: the actor's death message
    return bool(_RAY_OOM.search(f"{exc} {inner or ''}"))


class NoRetryOnDeterministicFailure(DefaultFailurePolicy):
    """Ray Train's default failure policy, except that a deterministic worker failure is raised at once."""

    def _is_retryable_error(self, training_failed_error: Any) -> bool:
        failures = getattr(training_failed_error, "worker_failures", None) or {}
        if any(is_deterministic(e) for e in failures.values()):
            return False
        return super()._is_retryable_error(training_failed_error)


class TrialTrainer(TorchTrainer):
    """A ``TorchTrainer`` for one trial: no retry of deterministic failures
    (``NoRetryOnDeterministicFailure``), and ``abort()`` from another thread.

    Ray 2.60 has no public hook for either. ``fit`` hands the failure policy to the controller actor
    in ``_initialize_and_run_controller``; this override is Ray's own (2.60) with the policy replaced
    and the controller's handle kept, so that a stopped trial can end its run (``abort``) while
    ``fit`` blocks in another thread.
    """

    _controller: Any = None

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
        import ray
        from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
        from ray.train.v2._internal.constants import (DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
                                                      get_env_vars_to_propagate)
        from ray.train.v2._internal.execution.controller import TrainController

        controller_init_kwargs["failure_policy"] = NoRetryOnDeterministicFailure(self.run_config.failure_config)
        env_vars = get_env_vars_to_propagate()
        env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
        controller_cls = ray.remote(  # on the driver's node, like Ray's own
            num_cpus=0, label_selector={ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},
            runtime_env={"env_vars": env_vars},
        )(TrainController)
        self._controller = controller_cls.remote(**controller_init_kwargs)
        ray.get(self._controller.run.remote())
        return ray.get(self._controller.get_result.remote())

    @property
    def started(self) -> bool:
        """Whether ``fit`` has created the run's controller (only then is there a run to abort)."""
        return self._controller is not None

    def abort(self, timeout_s: float = 30.0) -> None:
        """End the run: the controller stops its workers and exits; ``fit`` then raises in its thread.
        Killed outright if it does not exit within ``timeout_s``."""
        import ray

        if self._controller is None:
            return
        try:
            ray.get(self._controller.abort.remote(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.kill(self._controller)
        except ray.exceptions.RayError:
            pass  # the controller exits inside abort(): its call ends with the actor's death

"""Which trial failures are worth a retry.

Ray Train restarts a trial's worker group from its last checkpoint after any worker error
(``FailureConfig(max_failures=N)``). That is right for a crashed or killed worker, a lost node or a
broken collective: the next attempt will likely get through. It is wrong for failures the trial's
own configuration causes -- a loss that goes non-finite, a model or batch that does not fit in
memory: restarted from the same checkpoint they fail again at the same step, costing N more worker
starts and delaying the reason. ``NoRetryOnDeterministicFailure`` -- the failure policy of every
trial's Ray Train run (``scaling.trial.TrialTrainer``) -- raises at once when a worker failed that
way (``is_deterministic``); everything else is retried as before.

This module imports neither torch nor the training code (it is imported by trial drivers).
"""

from __future__ import annotations

import re
from typing import Any

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy

__all__ = ["NoRetryOnDeterministicFailure", "TrialOutOfMemoryError", "is_deterministic", "is_out_of_memory"]

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

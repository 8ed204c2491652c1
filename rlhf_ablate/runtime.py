"""Process-level settings that make a trial reproducible and stoppable: seeds, the torch thread count, memory
release between trials, a stage's retry with a smaller micro-batch after an out-of-memory error
(:func:`adapt_micro_batch`), and SLURM's time-limit warning.

**Threads.** torch's CPU kernels split reductions (matmul, sums) by thread, so the same trial rounds differently
with 1 and 2 threads, and PPO amplifies the difference into a different run (docs/stack.md, "Determinism"). A
trial therefore computes with the thread count of its sweep (``resources.cpu``, the CPUs Ray reserves for it and
``--cpus-per-task`` of a SLURM task), set by :func:`set_threads` wherever it runs, never with whatever
``OMP_NUM_THREADS`` or the machine's core count happens to be.

torch is imported inside the functions, so importing this module (for :class:`TimeLimitReached`) stays cheap.
"""

from __future__ import annotations

import contextlib
import gc
import random
import signal
import threading
from typing import Callable, Iterator, Optional, TypeVar

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def set_threads(n: int) -> None:
    """Compute with ``n`` torch threads from now on (the trial's ``resources.cpu``; see the module docstring)."""
    import torch

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"thread count must be an integer >= 1, got {n!r}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """``n`` torch threads inside the block, the caller's count restored after (used to build the built-in models
    the same way in any process)."""
    import torch

    before = torch.get_num_threads()
    set_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def release_memory() -> None:
    """Free what a finished trial left behind in a process that runs the next one (a warm Ray worker): Python
    garbage first (models, optimizers, adapters referenced from cycles), then the CUDA caching allocator's blocks,
    so the next trial, or another process on the same GPU, gets the memory back."""
    gc.collect()
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class StageHooks:
    """Points a training stage announces, for an observer of the process (the memory probe, rlhf_ablate/run/probe.py):
    ``model_ready(*models)`` once its models are loaded and prepared, ``trained()`` when training has ended and before
    anything is saved. The default does nothing. An observer may raise from ``trained`` to end the stage there."""

    def model_ready(self, *models) -> None:  # noqa: D102 - see the class docstring
        pass

    def trained(self) -> None:  # noqa: D102
        pass


_hooks = StageHooks()


def stage_hooks() -> StageHooks:
    """The observer the stages report to (a no-op unless :func:`observe_stages` installed one)."""
    return _hooks


@contextlib.contextmanager
def observe_stages(hooks: StageHooks) -> Iterator[StageHooks]:
    """Install ``hooks`` as the stages' observer inside the block."""
    global _hooks
    before, _hooks = _hooks, hooks
    try:
        yield hooks
    finally:
        _hooks = before


class TimeLimitReached(Exception):
    """SLURM's warning signal arrived: the job's time limit is near. Raised in the trial's main thread, recorded as a
    failed trial (reason "time limit"); a later run resumes it from the stage cache."""


TIME_LIMIT_SIGNAL = signal.SIGUSR1  # what `#SBATCH --signal=B:USR1@<seconds>` sends (rlhf_ablate/launch/slurm.py)


def install_time_limit_handler() -> bool:
    """Turn SLURM's warning signal into :class:`TimeLimitReached`, raised once in the main thread. Returns False
    where a handler cannot be installed (not the main thread, e.g. a Ray worker's trial thread)."""
    if threading.current_thread() is not threading.main_thread():
        return False

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        signal.signal(signum, signal.SIG_IGN)  # once: the failure is being recorded, a second signal must not
        raise TimeLimitReached(                # interrupt that
            f"time limit: SLURM sent {signal.Signals(signum).name}, its warning before the job's time limit "
            f"(#SBATCH --signal), so the trial stopped here. Finished stages are in the stage cache; submit the "
            f"sweep again (or raise slurm.time) to resume it.")

    signal.signal(TIME_LIMIT_SIGNAL, handler)
    return True


# ---------------------------------------------------------------------------------------------------------
# Out of memory: halve the micro-batch and retry (every stage goes through adapt_micro_batch)
# ---------------------------------------------------------------------------------------------------------

class MicroBatchOutOfMemory(Exception):
    """A stage ran out of memory at a micro-batch of 1: nothing smaller to try. rlhf_ablate/run/trial.py turns it
    into a TrialFailed that names the stage, its memory estimate and the measured peak."""

    def __init__(self, stage: str, peak: str, cause: str):
        self.stage, self.peak, self.cause = stage, peak, cause
        super().__init__(f"{stage}: out of memory at a micro-batch of 1 (measured peak {peak}): {cause}"[:600])


_retries: list[list[dict]] = []                 # the open recorders (recording_retries), innermost last
_on_retry: list[Callable[[dict], None]] = []


@contextlib.contextmanager
def recording_retries(on_retry: Optional[Callable[[dict], None]] = None) -> Iterator[list[dict]]:
    """Collect the micro-batch retries of the stage run inside the block (``{"stage", "from", "to"}`` each), and
    call ``on_retry`` with each as it happens (the trial's progress line)."""
    rec: list[dict] = []
    _retries.append(rec)
    if on_retry is not None:
        _on_retry.append(on_retry)
    try:
        yield rec
    finally:
        _retries.remove(rec)
        if on_retry is not None:
            _on_retry.remove(on_retry)


def smaller_micro(micro: int, total: Optional[int] = None) -> int:
    """The next micro-batch after an out-of-memory at ``micro``: half of it, rounded down to a divisor of ``total``
    (the batch the micro-batches accumulate to) when given, so that ``micro * accumulation == total`` still holds."""
    half = max(1, micro // 2)
    if total is None:
        return half
    return next(d for d in range(half, 0, -1) if total % d == 0)


def measured_peak() -> str:
    """The peak the allocator measured in this process, for an error message."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"{torch.cuda.max_memory_allocated() / 1024 ** 3:.2f} GiB allocated by torch"
    return "not measured on cpu"


def adapt_micro_batch(stage: str, micro: int, attempt: Callable[[int], T], *, total: Optional[int] = None,
                      phase: str = "") -> T:
    """``attempt(micro)``; on ``torch.OutOfMemoryError`` free memory (:func:`release_memory`), record the retry and
    run ``attempt`` again with :func:`smaller_micro`, down to 1. The caller keeps the effective batch by accumulating
    over the smaller micro-batches. At a micro-batch of 1 the error becomes :class:`MicroBatchOutOfMemory`."""
    import torch

    while True:
        try:
            return attempt(micro)
        except torch.OutOfMemoryError as e:
            if micro <= 1:
                where = f"{stage} ({phase})" if phase else stage
                raise MicroBatchOutOfMemory(where, measured_peak(), str(e).splitlines()[0] if str(e) else "") from e
            new = smaller_micro(micro, total)
        # outside the except block: the traceback (and the tensors its frames hold) is gone before memory is freed
        release_memory()
        event = {"stage": stage, **({"phase": phase} if phase else {}), "from": micro, "to": new}
        for rec in _retries:
            rec.append(event)
        for cb in list(_on_retry):
            cb(event)
        micro = new

"""Lost work and stalls: how often a unit is retried, how long a stage may make no progress, and the counts of both.

On a cluster, workers are OOM-killed, actors die and preemptible nodes vanish. The stages retry the work such a
fault loses themselves (Ray's own task retries and lineage reconstruction are off: they cannot be counted, and a
lost object whose producer cannot be placed again waits forever), a bounded number of times; a unit that fails on
every attempt becomes a failed row with its reason. Every wait of a stage goes through a `ProgressWatchdog`, so a
stage that makes no progress for `stall_timeout` seconds fails with one line saying what it waited for.

The policy is set once per process by the job (`configure_faults`), like the Ray connection it goes with; the
stages read it with `fault_policy()`, so it decides how work runs without being part of any stage's options.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 3
DEFAULT_STALL_TIMEOUT = 900.0
PAUSE_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class FaultPolicy:
    """How a stage treats lost work: `max_retries` more attempts of a unit whose worker, actor or node was lost,
    at most `stall_timeout` seconds without progress, and an optional `pause_file` that holds work while it exists."""

    max_retries: int = DEFAULT_MAX_RETRIES
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    pause_file: str | None = None

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be positive, got {self.stall_timeout}")

    def paused(self) -> bool:
        return self.pause_file is not None and Path(self.pause_file).exists()


_policy = FaultPolicy()


def configure_faults(policy: FaultPolicy) -> None:
    """Set the policy every later stage of this process uses."""
    global _policy
    _policy = policy


def fault_policy() -> FaultPolicy:
    return _policy


def hold_while_paused(pause_file: str | None) -> None:
    """In a worker, before a unit's work: wait while the pause file exists (nothing is lost, nothing starts)."""
    if pause_file is None:
        return
    while Path(pause_file).exists():
        time.sleep(PAUSE_POLL_SECONDS)


# ---- what a fault is, and counting them ---------------------------------------------------------------------------

TASK_RETRY = "task_retries"
ACTOR_RESTART = "actor_restarts"
LOST_OBJECT = "lost_objects_recovered"


def is_lost_work(exc: BaseException) -> bool:
    """True when `exc` says the work was lost (a dead worker, actor or node, a lost object), not that it failed.

    Our workers turn their own exceptions into error rows, so what reaches the driver as a Ray error other than a
    task's own exception (`RayTaskError`) is lost work, safe to retry because every output is written atomically.
    """
    import ray.exceptions as rex

    if isinstance(exc, rex.RayActorError) and getattr(exc, "actor_init_failed", False):
        return False  # the actor's constructor raised (e.g. weights that cannot load): it would fail again
    if isinstance(exc, rex.RayTaskError):  # the task's own exception, unless it wraps a lost argument
        cause = getattr(exc, "cause", None)
        return isinstance(cause, rex.RayError) and cause is not exc and is_lost_work(cause)
    return isinstance(exc, rex.RayError)


def is_lost_object(exc: BaseException) -> bool:
    import ray.exceptions as rex

    return isinstance(exc, rex.ObjectLostError) or isinstance(getattr(exc, "cause", None), rex.ObjectLostError)


def is_lost_actor(exc: BaseException) -> bool:
    import ray.exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError))


def error_text(exc: BaseException) -> str:
    """One line for an error that reached the driver: a task's own exception unwrapped from Ray's `RayTaskError`
    (whose first line is only where it ran), else the Ray error's type and first line."""
    import ray.exceptions as rex

    cause = getattr(exc, "cause", None) if isinstance(exc, rex.RayTaskError) else None
    shown = cause if isinstance(cause, BaseException) else exc
    message = next((line.strip() for line in str(shown).splitlines() if line.strip()), "")
    return f"{type(shown).__name__}: {message}"


@dataclass
class FaultCounts:
    """What a stage recovered from: retried tasks, restarted actors, recomputed lost objects, and their causes.

    `task_retries`: units (or batches of units) submitted again after their worker or node was lost;
    `actor_restarts`: encoder actors replaced after they died; `lost_objects_recovered`: units recomputed because
    an intermediate result (e.g. prepared patches) was lost with its node; `causes`: the Ray error types seen.
    """

    counts: Counter[str] = field(default_factory=Counter)
    causes: Counter[str] = field(default_factory=Counter)

    def record(self, kind: str, exc: BaseException | None = None) -> None:
        self.counts[kind] += 1
        if exc is not None:
            self.causes[type(exc).__name__] += 1

    def add(self, other: FaultCounts) -> None:
        self.counts.update(other.counts)
        self.causes.update(other.causes)

    def as_dict(self) -> dict[str, Any]:
        return {
            TASK_RETRY: self.counts[TASK_RETRY],
            ACTOR_RESTART: self.counts[ACTOR_RESTART],
            LOST_OBJECT: self.counts[LOST_OBJECT],
            "causes": dict(sorted(self.causes.items())),
        }


# ---- no wait without a bound --------------------------------------------------------------------------------------


class StalledError(RuntimeError):
    """A stage made no progress for the policy's stall timeout."""


def cluster_state() -> str:
    """Free and total CPUs and GPUs, and live nodes: what a stalled stage's waiting work could be placed on."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    parts = [
        f"{free.get(name, 0):g} of {total[name]:g} {name} free" for name in ("CPU", "GPU") if total.get(name, 0) > 0
    ]
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    return f"cluster: {', '.join(parts) or 'no CPU'}, {alive} node{'s' if alive != 1 else ''} alive"


def describe_resources(resources: dict[str, Any]) -> str:
    """{"num_cpus": 1, "num_gpus": 0, "memory": ...} -> "CPU 1": what one task or actor reserves."""
    names = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory bytes"}
    return ", ".join(f"{names.get(k, k)} {v:g}" for k, v in resources.items() if v) or "nothing"


class ProgressWatchdog:
    """Bounds a stage's waits: `wait` returns the next finished reference, or raises `StalledError` once nothing
    finished for `stall_timeout` seconds (time paused by the pause file does not count).

    It only needs object references, so any loop that waits on Ray (tasks, actor calls, a pool) can use it.
    """

    def __init__(self, stage: str, policy: FaultPolicy | None = None, poll_seconds: float = 1.0) -> None:
        self.stage = stage
        self.policy = policy or fault_policy()
        self.poll_seconds = poll_seconds
        self.last_progress = time.monotonic()
        self._paused_logged = False

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def wait(self, refs: Sequence[Any], waiting_for: Callable[[], str]) -> list[Any]:
        """The references among `refs` that are ready (at least one), waiting no longer than the bound allows."""
        import ray

        while True:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=self.poll_seconds)
            if ready:
                self.progressed()
                return ready
            if self.policy.paused():
                if not self._paused_logged:
                    log.info("%s paused: %s exists; remove it to resume", self.stage, self.policy.pause_file)
                    self._paused_logged = True
                self.progressed()
                continue
            self._paused_logged = False
            stalled = time.monotonic() - self.last_progress
            if stalled >= self.policy.stall_timeout:
                raise StalledError(
                    f"{self.stage} made no progress for {stalled:.0f} s (--stall-timeout {self.policy.stall_timeout:g})"
                    f": waiting for {waiting_for()}; {cluster_state()}; rerun the same command to resume (finished "
                    "units are kept)"
                )

    def get(self, refs: Sequence[Any], waiting_for: Callable[[], str]) -> list[Any]:
        """`ray.get` of every reference, each wait bounded like `wait`."""
        import ray

        pending = list(refs)
        while pending:
            for ref in self.wait(pending, waiting_for):
                pending.remove(ref)
        return ray.get(list(refs))

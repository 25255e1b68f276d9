"""Resumable fan-out of work units over Ray: the only place the stages talk to Ray's task API.

A unit (a chapter, a shard, ...) has a deterministic key and a worker that writes its own outputs atomically,
then its completion marker. The distributor skips units already marked done (the markers are read by Ray
tasks of `CHECK_CHUNK` units, not by the driver, from `CHECK_IN_TASKS_FROM` units on), runs the rest as Ray tasks in
batches with a bounded number in flight, shows a progress bar, submits a batch again when its worker or node was
lost (up to the fault policy's `max_retries` times, counted in the summary), turns a batch lost on every attempt
into error rows instead of a dead job, and fails with one line when nothing finishes for the policy's
`stall_timeout` (see `pipelines.runtime.faults`).
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from pipelines.core.schemas import STATUS_ERROR, STATUS_OK
from pipelines.runtime.faults import (
    LOST_OBJECT,
    TASK_RETRY,
    FaultCounts,
    ProgressWatchdog,
    cluster_state,
    describe_resources,
    error_text,
    fault_policy,
    hold_while_paused,
    is_lost_object,
    is_lost_work,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    key: str  # deterministic, unique within a stage; names the unit's outputs
    payload: Any = None  # picklable arguments for the worker


@dataclass
class RunReport:
    """What one stage run did: per-unit results of new work, the keys it skipped as already done, and the lost
    work it retried."""

    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    skipped_records: dict[str, dict[str, Any]] = field(default_factory=dict)  # what `is_done` returned, if a dict
    seconds: float = 0.0
    faults: FaultCounts = field(default_factory=FaultCounts)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r.get("status") == STATUS_ERROR]

    def summary(self) -> dict[str, Any]:
        return {
            "units_run": len(self.results),
            "units_skipped": len(self.skipped),
            "units_failed": len(self.failed),
            "seconds": round(self.seconds, 3),
            "failures": [{"key": r["key"], "error": r.get("error")} for r in self.failed],
            "faults": self.faults.as_dict(),
        }


def run_unit_safely(worker: Callable[[Unit], dict[str, Any]], unit: Unit) -> dict[str, Any]:
    """Run one unit; an exception becomes an error result naming the unit, never a crash of the batch."""
    try:
        result = dict(worker(unit) or {})
        result.setdefault("status", STATUS_OK)
    except Exception as exc:  # noqa: BLE001 - a unit's failure is data, not a crash
        result = {
            "status": STATUS_ERROR,
            "error": f"unit {unit.key}: {type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=8),
        }
    result["key"] = unit.key
    return result


def _run_batch(
    worker: Callable[[Unit], dict[str, Any]], units: list[Unit], pause_file: str | None = None
) -> list[dict[str, Any]]:
    results = []
    for unit in units:
        hold_while_paused(pause_file)
        results.append(run_unit_safely(worker, unit))
    return results


def batched(items: Sequence[Any], size: int) -> list[list[Any]]:
    size = max(1, int(size))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


CHECK_CHUNK = 256  # units whose markers one check task reads
CHECK_IN_TASKS_FROM = 64  # fewer units are checked by the driver: cheaper than starting a task


def _apply(fn: Callable[[Any], Any], unit: Unit) -> dict[str, Any]:
    return {"value": fn(unit.payload)}


def map_in_tasks(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    desc: str,
    chunk: int = CHECK_CHUNK,
    local: bool = False,
    in_tasks_from: int = CHECK_IN_TASKS_FROM,
) -> list[Any]:
    """`fn` over `items` (results in item order), as Ray tasks of `chunk` items: the cheap per-unit reads (markers,
    file stats) a driver must not do one after another. In this process when `local` or for fewer than
    `in_tasks_from` items. An item whose call raised gets None (a check that fails means "not done")."""
    if local or len(items) < in_tasks_from:
        values = []
        for item in items:
            try:
                values.append(fn(item))
            except Exception:  # noqa: BLE001 - an unreadable marker is a unit to redo, not a crash
                values.append(None)
        return values
    units = [Unit(key=str(i), payload=item) for i, item in enumerate(items)]
    bar = tqdm(total=len(units), desc=desc, unit="unit", dynamic_ncols=True, mininterval=1.0, disable=True)
    results = _run_on_ray(
        functools.partial(_apply, fn),
        batched(units, chunk),
        bar,
        desc,
        {"num_cpus": 1.0, "num_gpus": 0.0},
        None,
        fault_policy().max_retries,
        FaultCounts(),
    )
    values: list[Any] = [None] * len(units)
    for result in results:
        if result.get("status") != STATUS_ERROR:
            values[int(result["key"])] = result.get("value")
    return values


def run_units(
    units: Sequence[Unit],
    worker: Callable[[Unit], dict[str, Any]],
    *,
    is_done: Callable[[Unit], bool],
    desc: str,
    units_per_task: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    memory: int | None = None,
    max_in_flight: int | None = None,
    max_retries: int | None = None,
    local: bool = False,
    vouched: dict[str, dict[str, Any]] | None = None,
) -> RunReport:
    """Run `worker` on every unit not yet done, as Ray tasks of `units_per_task` units.

    `is_done(unit)` runs in check tasks (`map_in_tasks`), so it must be picklable and read only its own unit's
    files; a dict it returns counts as done and is kept in `report.skipped_records` (a marker's counts, say).
    Units in `vouched` (key -> record, from the stage's ledger: `pipelines.core.ledger`) are done without a check.

    `max_retries` (default: the fault policy's) bounds how often a batch lost with its worker or node is submitted
    again. `local=True` runs in this process (no Ray): used by tests of a worker and by tiny runs. Results come
    back in unit order whatever the completion order, so summaries are deterministic.
    """
    started = time.perf_counter()
    report = RunReport()
    todo: list[Unit] = []
    vouched = vouched or {}
    report.skipped_records.update({u.key: vouched[u.key] for u in units if u.key in vouched})
    report.skipped.extend(u.key for u in units if u.key in vouched)
    to_check = [unit for unit in units if unit.key not in vouched]
    for unit, done in zip(to_check, map_in_tasks(is_done, to_check, desc=f"{desc} (check)", local=local), strict=True):
        if not done:
            todo.append(unit)
            continue
        report.skipped.append(unit.key)
        if isinstance(done, dict):
            report.skipped_records[unit.key] = done
    order = {unit.key: i for i, unit in enumerate(todo)}
    bar = tqdm(total=len(todo), desc=desc, unit="unit", dynamic_ncols=True, mininterval=1.0)
    if local:
        for unit in todo:
            report.results.append(run_unit_safely(worker, unit))
            bar.update(1)
    else:
        retries = fault_policy().max_retries if max_retries is None else max_retries
        resources = {"num_cpus": num_cpus, "num_gpus": num_gpus, **({"memory": memory} if memory else {})}
        report.results = _run_on_ray(
            worker, batched(todo, units_per_task), bar, desc, resources, max_in_flight, retries, report.faults
        )
    bar.close()
    report.results.sort(key=lambda r: order[r["key"]])
    report.seconds = time.perf_counter() - started
    return report


def _run_on_ray(
    worker: Callable[[Unit], dict[str, Any]],
    batches: list[list[Unit]],
    bar: tqdm,
    desc: str,
    resources: dict[str, Any],
    max_in_flight: int | None,
    max_retries: int,
    faults: FaultCounts,
) -> list[dict[str, Any]]:
    import ray

    policy = fault_policy()
    # Ray's own retries are off: this loop retries lost batches itself, so it can count them and bound the wait.
    remote_batch = ray.remote(_run_batch).options(**resources, max_retries=0)
    worker_ref = ray.put(worker)
    limit = max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1) / max(resources["num_cpus"], 0.01)))
    watchdog = ProgressWatchdog(desc, policy)
    pending: dict[Any, tuple[int, list[Unit]]] = {}
    attempts: dict[int, int] = {}
    results: list[dict[str, Any]] = []
    queue = deque(enumerate(batches))

    def waiting_for() -> str:
        needs = describe_resources(resources)
        return f"{len(pending)} task(s) of {desc} (each needs {needs}), {len(queue)} not yet submitted"

    try:
        while queue or pending:
            while queue and len(pending) < limit:
                index, batch = queue.popleft()
                pending[remote_batch.remote(worker_ref, batch, policy.pause_file)] = (index, batch)
            for ref in watchdog.wait(list(pending), waiting_for):
                index, batch = pending.pop(ref)
                try:
                    batch_results = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - lost (OOM kill, lost node): retried, then fails its units
                    attempts[index] = attempts.get(index, 1) + 1
                    if is_lost_work(exc) and attempts[index] <= max_retries + 1:
                        faults.record(LOST_OBJECT if is_lost_object(exc) else TASK_RETRY, exc)
                        log.warning(
                            "%s: task of %s lost (%s); attempt %d of %d; %s",
                            desc,
                            ", ".join(u.key for u in batch),
                            type(exc).__name__,
                            attempts[index],
                            max_retries + 1,
                            cluster_state(),
                        )
                        queue.appendleft((index, batch))
                        continue
                    batch_results = [_crashed(unit, exc, attempts[index] - 1) for unit in batch]
                results.extend(batch_results)
                bar.update(len(batch))
    finally:
        for ref in pending:  # a stalled or interrupted stage leaves no task queued behind it
            ray.cancel(ref, force=True)
    return results


def _crashed(unit: Unit, exc: BaseException, attempts: int) -> dict[str, Any]:
    """The error row of a unit whose task was lost on every attempt (or failed outside the worker)."""
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    error = f"task crashed on {tries}: {error_text(exc)}"
    return {"key": unit.key, "status": STATUS_ERROR, "error": error}

"""Resumable fan-out of work units over Ray: the only place the stages talk to Ray's task API.

A unit (a chapter, a shard, ...) has a deterministic key and a worker that writes its own outputs atomically,
then its completion marker. The distributor skips units already marked done, runs the rest as Ray tasks in
batches with a bounded number in flight, shows a progress bar, and turns a crashed task into error rows
instead of a dead job.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from pipelines.core.schemas import STATUS_ERROR, STATUS_OK


@dataclass(frozen=True)
class Unit:
    key: str  # deterministic, unique within a stage; names the unit's outputs
    payload: Any = None  # picklable arguments for the worker


@dataclass
class RunReport:
    """What one stage run did: per-unit results of new work, and the keys it skipped as already done."""

    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

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


def _run_batch(worker: Callable[[Unit], dict[str, Any]], units: list[Unit]) -> list[dict[str, Any]]:
    return [run_unit_safely(worker, unit) for unit in units]


def batched(items: Sequence[Any], size: int) -> list[list[Any]]:
    size = max(1, int(size))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


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
    max_retries: int = 2,
    local: bool = False,
) -> RunReport:
    """Run `worker` on every unit not yet done, as Ray tasks of `units_per_task` units.

    `local=True` runs in this process (no Ray): used by tests of a worker and by tiny runs. Results come back in
    unit order whatever the completion order, so summaries are deterministic.
    """
    started = time.perf_counter()
    report = RunReport()
    todo: list[Unit] = []
    for unit in units:
        (report.skipped.append(unit.key) if is_done(unit) else todo.append(unit))
    order = {unit.key: i for i, unit in enumerate(todo)}
    bar = tqdm(total=len(todo), desc=desc, unit="unit", dynamic_ncols=True, mininterval=1.0)
    if local:
        for unit in todo:
            report.results.append(run_unit_safely(worker, unit))
            bar.update(1)
    else:
        report.results = _run_on_ray(
            worker, batched(todo, units_per_task), bar, num_cpus, num_gpus, memory, max_in_flight, max_retries
        )
    bar.close()
    report.results.sort(key=lambda r: order[r["key"]])
    report.seconds = time.perf_counter() - started
    return report


def _run_on_ray(
    worker: Callable[[Unit], dict[str, Any]],
    batches: list[list[Unit]],
    bar: tqdm,
    num_cpus: float,
    num_gpus: float,
    memory: int | None,
    max_in_flight: int | None,
    max_retries: int,
) -> list[dict[str, Any]]:
    import ray

    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_retries": max_retries}
    if memory:
        options["memory"] = memory
    remote_batch = ray.remote(_run_batch).options(**options)
    worker_ref = ray.put(worker)
    limit = max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1) / max(num_cpus, 0.01)))
    pending: dict[Any, list[Unit]] = {}
    results: list[dict[str, Any]] = []
    queue = list(batches)
    while queue or pending:
        while queue and len(pending) < limit:
            batch = queue.pop(0)
            pending[remote_batch.remote(worker_ref, batch)] = batch
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            batch = pending.pop(ref)
            try:
                batch_results = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a crashed task (OOM kill, lost node) fails its units only
                batch_results = [
                    {"key": u.key, "status": STATUS_ERROR, "error": f"task crashed: {type(exc).__name__}: {exc}"}
                    for u in batch
                ]
            results.extend(batch_results)
            bar.update(len(batch))
    return results

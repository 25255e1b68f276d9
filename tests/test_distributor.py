"""The resumable fan-out every stage uses: skipping done units, containing failures, deterministic order."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.core.schemas import STATUS_ERROR, STATUS_OK
from pipelines.core.storage import is_done, read_marker, write_marker
from pipelines.runtime.distributor import CHECK_IN_TASKS_FROM, Unit, run_units
from pipelines.runtime.faults import FaultPolicy, StalledError, configure_faults


def _square_worker(unit: Unit) -> dict:
    out_dir, value = unit.payload
    if value == 3:
        raise ValueError("three is broken")
    if value == 5:
        os._exit(1)  # a worker process dying (OOM kill, segfault) must not kill the job
    write_marker(Path(out_dir) / unit.key, {"square": value * value})
    return {"square": value * value}


def _units(tmp_path: Path, values: list[int]) -> list[Unit]:
    return [Unit(key=f"u{v:02d}", payload=(str(tmp_path), v)) for v in values]


def _done(tmp_path: Path):
    return lambda unit: is_done(tmp_path / unit.key)


def test_local_run_contains_a_failing_unit(tmp_path: Path) -> None:
    report = run_units(_units(tmp_path, [1, 2, 3, 4]), _square_worker, is_done=_done(tmp_path), desc="t", local=True)
    assert [r["key"] for r in report.results] == ["u01", "u02", "u03", "u04"]
    assert [r["status"] for r in report.results] == [STATUS_OK, STATUS_OK, STATUS_ERROR, STATUS_OK]
    failure = report.failed[0]
    assert "u03" in failure["error"] and "three is broken" in failure["error"]
    assert report.summary()["units_failed"] == 1


def test_rerun_skips_done_units(tmp_path: Path) -> None:
    units = _units(tmp_path, [1, 2, 4])
    first = run_units(units, _square_worker, is_done=_done(tmp_path), desc="t", local=True)
    assert len(first.results) == 3 and not first.skipped
    second = run_units(units, _square_worker, is_done=_done(tmp_path), desc="t", local=True)
    assert second.results == [] and second.skipped == ["u01", "u02", "u04"]


@pytest.mark.usefixtures("ray_local")
def test_ray_run_retries_a_crashed_worker_then_fails_only_its_unit(tmp_path: Path) -> None:
    units = _units(tmp_path, [1, 2, 3, 4, 5, 6])
    report = run_units(units, _square_worker, is_done=_done(tmp_path), desc="t", units_per_task=1, max_retries=1)
    by_key = {r["key"]: r for r in report.results}
    assert [r["key"] for r in report.results] == [u.key for u in units]
    assert by_key["u02"]["square"] == 4 and by_key["u06"]["square"] == 36
    assert by_key["u03"]["status"] == STATUS_ERROR and "three is broken" in by_key["u03"]["error"]  # not retried
    assert by_key["u05"]["status"] == STATUS_ERROR
    assert by_key["u05"]["error"].startswith("task crashed on 2 attempts: WorkerCrashedError")
    assert not is_done(tmp_path / "u05") and is_done(tmp_path / "u06")
    faults = report.summary()["faults"]
    assert faults == {
        "task_retries": 1,
        "actor_restarts": 0,
        "lost_objects_recovered": 0,
        "causes": {"WorkerCrashedError": 1},
    }


def _marker_in_task(out_dir: str, unit: Unit) -> dict | None:
    """A check that reads the unit's marker and says which process read it."""
    return {**read_marker(Path(out_dir) / unit.key), "pid": os.getpid()} if is_done(Path(out_dir) / unit.key) else None


@pytest.mark.usefixtures("ray_local")
def test_markers_are_read_by_check_tasks_not_the_driver(tmp_path: Path) -> None:
    units = _units(tmp_path, list(range(10, 10 + CHECK_IN_TASKS_FROM + 6)))
    for unit in units[:-2]:
        write_marker(tmp_path / unit.key, {"square": unit.payload[1] ** 2})
    check = functools.partial(_marker_in_task, str(tmp_path))
    report = run_units(units, _square_worker, is_done=check, desc="t", units_per_task=4)
    assert report.skipped == [u.key for u in units[:-2]] and [r["key"] for r in report.results] == [
        u.key for u in units[-2:]
    ]
    assert report.skipped_records["u12"]["square"] == 144
    assert os.getpid() not in {record["pid"] for record in report.skipped_records.values()}


@pytest.fixture
def stall_after_two_seconds() -> Iterator[None]:
    configure_faults(FaultPolicy(stall_timeout=2))
    yield
    configure_faults(FaultPolicy())


@pytest.mark.usefixtures("ray_local", "stall_after_two_seconds")
def test_a_stage_that_cannot_progress_fails_in_one_line_naming_what_it_waits_for(tmp_path: Path) -> None:
    """A task no node can place (a GPU on a CPU-only Ray) would wait forever; the watchdog ends the wait."""
    with pytest.raises(StalledError) as stalled:
        run_units(_units(tmp_path, [1]), _square_worker, is_done=_done(tmp_path), desc="gpu work", num_gpus=1)
    message = str(stalled.value)
    assert "\n" not in message and message.startswith("gpu work made no progress for ")
    assert "waiting for 1 task(s) of gpu work (each needs CPU 1, GPU 1), 0 not yet submitted" in message
    assert "cluster: " in message and "rerun the same command to resume" in message
    assert not is_done(tmp_path / "u01")

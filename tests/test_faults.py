"""Faults inside a running data job, on a real multi-node Ray (`ray.cluster_utils.Cluster`): a SIGKILLed task
worker, a SIGKILLed encoder actor and a node removed while it embeds are retried (or fail in one line within the
stall bound, never hang); a stage with a permanently failing unit keeps everything downstream from being marked
complete.

Kills land during work because the job runs with `--pause-file`: its units wait while the file exists, the test
finds the waiting worker's pid through Ray's state API, kills it, then removes the file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.pipeline import main as pipeline_main
from pipelines.core.cli import run_job
from pipelines.core.layout import DataLayout
from pipelines.core.storage import read_json
from pipelines.ingest.stage import run_ingest
from pipelines.retrieval.stage import run_retrieval
from pipelines.screentone.stage import ScreentoneOptions, run_screentone

REPO = Path(__file__).resolve().parent.parent
SIZE = ["--size", "128x192"]
HANG_GUARD = 300  # seconds: a job still running after this is a hang, the failure these tests exist to catch


@pytest.fixture(scope="module")
def ingested(tiny_corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "ingested"
    run_ingest(tiny_corpus.root, out, local=True, verbose=False)
    return out


@pytest.fixture(scope="module")
def cluster() -> Iterator:
    """A head that runs no work (it hosts the state API) and two worker nodes of one CPU each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": 0},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _state_api(cluster) -> str:
    return "http://" + cluster.head_node.address_info["webui_url"]


def _start_job(module: str, data: Path, cluster, pause: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", module, "--data", str(data), *SIZE, "--ray-address", cluster.address]
    argv += ["--pause-file", str(pause), *extra]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _running_task(cluster, name: str, job: subprocess.Popen):
    """The first task called `name` that is running (waiting on the pause file), from Ray's state API."""
    from ray.util.state import list_tasks

    while job.poll() is None:
        try:
            running = list_tasks(address=_state_api(cluster), filters=[("name", "=", name), ("state", "=", "RUNNING")])
        except Exception:  # noqa: BLE001 - the state API answers once the job's tasks are reported
            running = []
        alive = [task for task in running if task.worker_pid and _pid_alive(task.worker_pid)]
        if alive:  # a task killed by an earlier test may still be listed as running for a while
            return alive[0]
        time.sleep(0.5)
    raise AssertionError(f"the job ended before a {name} task ran: {job.communicate()[1][-3000:]}")


def _finish(job: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = job.communicate(timeout=HANG_GUARD)
    return job.returncode, stdout, stderr


def _files(root: Path, under: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / under).rglob("*")) if p.is_file()}


def _retrieval_outputs(root: Path) -> dict[str, bytes]:
    return {**_files(root, "retrieval"), **_files(root, "pools.parquet"), **_files(root, "retrievals.parquet")}


@pytest.fixture(scope="module")
def clean_retrieval(ingested: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = shutil.copytree(ingested, tmp_path_factory.mktemp("clean") / "out")
    run_retrieval(out, encoder="weightfree", width=128, height=192, local=True)
    return _retrieval_outputs(out)


def test_a_killed_task_worker_is_retried_to_identical_output(ingested: Path, cluster, tmp_path: Path) -> None:
    clean = shutil.copytree(ingested, tmp_path / "clean")
    run_screentone(str(clean), ScreentoneOptions(width=128, height=192), local=True)
    out, pause = shutil.copytree(ingested, tmp_path / "out"), tmp_path / "pause"
    pause.touch()
    job = _start_job("jobs.screentone", out, cluster, pause)
    task = _running_task(cluster, "_run_batch", job)
    os.kill(task.worker_pid, signal.SIGKILL)
    pause.unlink()
    status, _, stderr = _finish(job)
    assert status == 0, stderr[-3000:]
    summary = read_json(DataLayout.at(out).summary("screentone"))
    assert summary["distributor"]["units_failed"] == 0
    assert summary["distributor"]["faults"]["task_retries"] == 1
    assert "complete after recovering from lost work: 1 task retry" in stderr.strip().splitlines()[-1]
    assert _files(out, "screentone") == _files(clean, "screentone")


def test_a_killed_encoder_actor_is_replaced_and_its_chapters_retried(
    ingested: Path, cluster, clean_retrieval: dict[str, bytes], tmp_path: Path
) -> None:
    out, pause = shutil.copytree(ingested, tmp_path / "out"), tmp_path / "pause"
    pause.touch()
    job = _start_job("jobs.retrieval", out, cluster, pause, "--encoder", "weightfree")
    task = _running_task(cluster, "EncoderWorker.embed_and_write", job)
    os.kill(task.worker_pid, signal.SIGKILL)
    pause.unlink()
    status, _, stderr = _finish(job)
    assert status == 0, stderr[-3000:]
    summary = read_json(DataLayout.at(out).summary("retrieval"))
    assert summary["complete"] is True and not summary["failures"]
    faults = summary["embeddings"]["faults"]
    assert faults["actor_restarts"] == 1 and faults["task_retries"] >= 1  # the call in flight was retried
    assert summary["embeddings"]["chapters_embedded"] == 2
    assert _retrieval_outputs(out) == clean_retrieval


def test_a_node_lost_while_embedding_finishes_or_fails_in_one_line(
    ingested: Path, cluster, clean_retrieval: dict[str, bytes], tmp_path: Path
) -> None:
    """The node holding the encoder actor goes away mid-call. The survivor has one CPU, which the new actor and
    the chapters' new preparation both need: the job either gets through or, stalled, fails in one line naming
    what it waits for; it never hangs (runs last: it removes a node of the module's cluster)."""
    out, pause = shutil.copytree(ingested, tmp_path / "out"), tmp_path / "pause"
    pause.touch()
    job = _start_job("jobs.retrieval", out, cluster, pause, "--encoder", "weightfree", "--stall-timeout", "30")
    task = _running_task(cluster, "EncoderWorker.embed_and_write", job)
    node = next(n for n in cluster.worker_nodes if n.node_id == task.node_id)
    cluster.remove_node(node)
    pause.unlink()
    status, _, stderr = _finish(job)
    last = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    if status == 0:
        summary = read_json(DataLayout.at(out).summary("retrieval"))
        assert summary["complete"] is True and summary["embeddings"]["faults"]["actor_restarts"] >= 1
        assert _retrieval_outputs(out) == clean_retrieval
    else:
        assert status == 1, stderr[-3000:]
        assert last.startswith("python -m jobs.retrieval: error: "), last
        assert "rerun the same command" in last and ("made no progress" in last or "failed" in last), last


def test_a_permanently_failing_unit_blocks_complete_downstream(tiny_corpus, tmp_path: Path, capsys) -> None:
    from conftest import PIPELINE_ARGS

    out = tmp_path / "out"
    run_ingest(tiny_corpus.root, out, local=True, verbose=False)
    layout = DataLayout.at(out)
    broken = sorted(layout.root.glob("pagestore/*.parquet"))[0]
    good_bytes = broken.read_bytes()
    broken.write_bytes(b"not parquet")  # every attempt at this chapter fails, in retrieval and in screentone
    argv = ["--input", str(tiny_corpus.root), "--output", str(out), *PIPELINE_ARGS]
    assert run_job(pipeline_main, argv, prog="python -m jobs.pipeline") == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m jobs.pipeline: error: 2 units failed: ")
    assert broken.stem in last and "shards not run (needs complete retrieval and screentone outputs)" in last
    assert last.endswith("rerun the same command to retry them (finished units are kept)")
    record = read_json(out / "pipeline.summary.json")
    assert record["complete"] is False and record["blocked"] == {
        "shards": "needs complete retrieval and screentone outputs"
    }
    assert not layout.summary("shards").exists() and not layout.shards_manifest.exists()
    assert read_json(layout.summary("retrieval"))["complete"] is False

    broken.write_bytes(good_bytes)  # the cause fixed, the same command retries what failed and completes
    assert run_job(pipeline_main, argv, prog="python -m jobs.pipeline") == 0
    assert read_json(out / "pipeline.summary.json")["complete"] is True
    assert read_json(layout.shards_manifest)["splits"]["train"]["nsamples"] > 0

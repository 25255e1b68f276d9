"""The data engineer's path: a Ray head started with `ray start --head`, the job sent with `ray job submit`.

The head runs on free loopback ports with its own temp dir and auth token, in its own process group. It is
stopped by signalling the `ray start --block` process this test started (which shuts its children down), never
with `ray stop`, which would kill every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.ingest.stage import run_ingest

VENV_BIN = Path(sys.executable).parent


@dataclass
class RayHead:
    dashboard_url: str
    env: dict[str, str]
    log: Path


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_range(size: int, avoid: set[int]) -> int:
    """First port of `size` consecutive free ports (worker ports must be a range)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 40000 - size)
        if all(p not in avoid and _port_is_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no range of {size} free ports found")


def _wait_for_dashboard(url: str, token: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
            urllib.request.urlopen(request, timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the Ray dashboard at {url} did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to our `ray start --block` (it stops what it started), then SIGKILL whatever is left of its group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # the group of the head started here (start_new_session)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[RayHead]:
    # Unix socket paths under the temp dir are limited to ~107 bytes: keep it short, not under pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))
    (gcs, dashboard, client, node_manager, object_manager, agent_listen, agent_grpc, env_agent, metrics) = _free_ports(
        9
    )
    workers = _free_port_range(40, {gcs, dashboard, client, node_manager, object_manager, agent_listen, agent_grpc})
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` must be the venv's
        RAY_AUTH_MODE="token",  # the CLI and the cluster share this token, not the user's ~/.ray one
        RAY_AUTH_TOKEN=token,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # single-node mode: every address is 127.0.0.1
        RAY_USAGE_STATS_ENABLED="0",
    )
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(client), "--node-manager-port", str(node_manager),
        "--object-manager-port", str(object_manager), "--dashboard-agent-listen-port", str(agent_listen),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(env_agent),
        "--metrics-export-port", str(metrics), "--min-worker-port", str(workers),
        "--max-worker-port", str(workers + 39), "--num-cpus", "2", "--object-store-memory", str(200 * 1024**2),
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
    ]  # fmt: skip
    log = tmp_path / "ray_head.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard}"
        _wait_for_dashboard(url, token, process, log, timeout=120)
        yield RayHead(url, env, log)
    finally:
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "ingest.summary.json"
    }


def test_ingest_through_ray_job_submit(ray_head: RayHead, tiny_corpus, repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "job_out"
    command = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", str(repo_root),
        "--", "python", "-m", "jobs.ingest", "--input", str(tiny_corpus.root), "--output", str(out),
        "--chapters-per-task", "2",
    ]  # fmt: skip
    result = subprocess.run(command, env=ray_head.env, capture_output=True, text=True, timeout=300)
    logs = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}\nhead log:\n{ray_head.log.read_text()[-2000:]}"
    assert result.returncode == 0, logs
    assert "succeeded" in result.stdout + result.stderr, logs
    assert f"ingest: {len(tiny_corpus.chapters)} chapters: 2 kept" in result.stdout, logs

    summary = json.loads((out / "ingest.summary.json").read_text())
    assert summary["run"]["mode"] == "ray" and summary["run"]["chapters_failed"] == 0
    assert pq.read_table(out / "pages.parquet").num_rows == tiny_corpus.n_files
    kept = {c["source"] for c in pq.read_table(out / "chapters.parquet").to_pylist() if c["kept"]}
    assert kept == set(tiny_corpus.chapter_sources(min_color_pages=21))

    local_out = tmp_path / "local_out"  # the cluster run and an in-process run write the same bytes
    run_ingest(tiny_corpus.root, local_out, local=True, verbose=False)
    assert _hashes(out) == _hashes(local_out)

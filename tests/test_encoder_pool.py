"""The encoder pool on a real multi-node Ray (`ray.cluster_utils.Cluster`, three CPU nodes): without GPUs the
weight-free encoder runs in actors on every node; a pool of MIN:MAX grows past MIN while chapters wait, never past MAX;
and the embeddings are byte-identical to a one-worker run either way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.core.storage import read_json
from pipelines.ingest.stage import run_ingest
from pipelines.retrieval.stage import EncoderOptions, pool_bounds, run_retrieval

REPO = Path(__file__).resolve().parent.parent
NODES = 3


@pytest.fixture(scope="module")
def ingested(tiny_corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five kept chapters: the tiny corpus' two colour chapters and three copies of one under other names."""
    corpus = shutil.copytree(tiny_corpus.root, tmp_path_factory.mktemp("pool") / "corpus")
    for name in ("ch010", "ch011", "ch012"):
        shutil.copytree(corpus / "s1" / "ch001", corpus / "s1" / name)
    out = tmp_path_factory.mktemp("pool") / "ingested"
    summary = run_ingest(corpus, out, local=True, verbose=False)
    assert summary["chapters"]["kept"] == 5
    return out


@pytest.fixture(scope="module")
def cluster() -> Iterator:
    """A head that runs no work and three worker nodes of two CPUs each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(NODES):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _embeddings(root: Path) -> dict[str, bytes]:
    folder = root / "retrieval" / "embeddings"
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_worker(ingested: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], dict]:
    """The embeddings of an in-process run with one encoder worker, and its summary."""
    single = shutil.copytree(ingested, tmp_path_factory.mktemp("pool") / "single")
    summary = run_retrieval(single, encoder="weightfree", width=128, height=192, local=True)
    assert len(summary["embeddings"]["encoder_workers"]) == 1
    return _embeddings(single), summary


def _retrieval_argv(data: Path, cluster, actors: str) -> list[str]:
    argv = [sys.executable, "-m", "jobs.retrieval", "--data", str(data), "--size", "128x192"]
    argv += ["--encoder", "weightfree", "--encoder-actors", actors, "--batch-size", "16"]
    return argv + ["--encoder-threads", "1", "--ray-address", cluster.address]


def test_the_encoder_runs_on_every_node_with_the_embeddings_of_one_worker(
    ingested: Path, cluster, one_worker: tuple[dict[str, bytes], dict], tmp_path: Path
) -> None:
    pooled = shutil.copytree(ingested, tmp_path / "pooled")
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    argv = _retrieval_argv(pooled, cluster, f"{NODES}")
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_json(pooled / "retrieval.summary.json")
    workers = summary["embeddings"]["encoder_workers"]
    worker_nodes = {node.node_id for node in cluster.list_all_nodes()} - {cluster.head_node.node_id}
    assert len(workers) == NODES and {w["node_id"] for w in workers if w["chapters"] > 0} == worker_nodes
    assert sum(w["chapters"] for w in workers) == summary["embeddings"]["chapters_embedded"] == 5
    assert all(w["threads"] == 1 and w["batch_size"] == 16 and w["device"] == "cpu" for w in workers)

    embeddings, one = one_worker
    assert _embeddings(pooled) == embeddings
    assert summary["frames_ok"] == one["frames_ok"] == 5 * 24


def test_the_pool_grows_past_its_minimum_while_chapters_wait_and_stops_at_its_maximum(
    ingested: Path, cluster, one_worker: tuple[dict[str, bytes], dict], tmp_path: Path
) -> None:
    """`--encoder-actors 1:2` on six CPUs. The pause file holds every actor before its first chapter, so the five
    prepared chapters certainly wait: the pool must grow to two actors (each logs "loaded") and stop there, though
    CPUs for more are free; the file is removed once two have loaded (or after 120 s, so a pool that never grows
    fails the test instead of hanging it)."""
    grown = shutil.copytree(ingested, tmp_path / "grown")
    pause = tmp_path / "pause"
    pause.touch()
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    argv = [*_retrieval_argv(grown, cluster, "1:2"), "--pause-file", str(pause)]
    safety = threading.Timer(120, lambda: pause.unlink(missing_ok=True))
    safety.start()
    loaded_while_paused = 0
    with subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as job:
        tail = []
        for line in job.stderr:
            tail = [*tail[-40:], line]
            if "encoder weightfree" in line and " loaded: " in line and pause.exists():
                loaded_while_paused += 1
                if loaded_while_paused == 2:
                    pause.unlink()
        returncode = job.wait(timeout=300)
    safety.cancel()
    assert returncode == 0, "".join(tail)
    assert loaded_while_paused == 2  # grown while its chapters waited, not after the safety timer
    summary = read_json(grown / "retrieval.summary.json")
    workers = summary["embeddings"]["encoder_workers"]
    assert len(workers) == 2 and all(w["chapters"] > 0 for w in workers)
    assert sum(w["chapters"] for w in workers) == summary["embeddings"]["chapters_embedded"] == 5
    assert _embeddings(grown) == one_worker[0]


def test_pool_bounds_follow_gpus_cpus_and_threads() -> None:
    assert pool_bounds(EncoderOptions(), gpus=4, cpus=64, threads=1) == (4, 4)  # one actor per GPU
    assert pool_bounds(EncoderOptions(), gpus=0, cpus=256, threads=4) == (1, 64)  # every node's CPUs
    assert pool_bounds(EncoderOptions(), gpus=0, cpus=2, threads=4) == (1, 1)
    assert pool_bounds(EncoderOptions(actors=(2, 8)), gpus=0, cpus=256, threads=4) == (2, 8)

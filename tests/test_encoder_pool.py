"""The encoder pool on a real multi-node Ray (`ray.cluster_utils.Cluster`, three CPU nodes): without GPUs the
weight-free encoder runs in actors on every node, and the embeddings are byte-identical to a one-worker run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def test_the_encoder_runs_on_every_node_with_the_embeddings_of_one_worker(
    ingested: Path, cluster, tmp_path: Path
) -> None:
    pooled = shutil.copytree(ingested, tmp_path / "pooled")
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "jobs.retrieval", "--data", str(pooled), "--size", "128x192"]
    argv += ["--encoder", "weightfree", "--encoder-actors", f"{NODES}", "--batch-size", "16"]
    argv += ["--encoder-threads", "1", "--ray-address", cluster.address]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_json(pooled / "retrieval.summary.json")
    workers = summary["embeddings"]["encoder_workers"]
    worker_nodes = {node.node_id for node in cluster.list_all_nodes()} - {cluster.head_node.node_id}
    assert len(workers) == NODES and {w["node_id"] for w in workers if w["chapters"] > 0} == worker_nodes
    assert sum(w["chapters"] for w in workers) == summary["embeddings"]["chapters_embedded"] == 5
    assert all(w["threads"] == 1 and w["batch_size"] == 16 and w["device"] == "cpu" for w in workers)

    single = shutil.copytree(ingested, tmp_path / "single")
    one = run_retrieval(single, encoder="weightfree", width=128, height=192, local=True)
    assert len(one["embeddings"]["encoder_workers"]) == 1
    assert _embeddings(pooled) == _embeddings(single)
    assert summary["frames_ok"] == one["frames_ok"] == 5 * 24


def test_pool_bounds_follow_gpus_cpus_and_threads() -> None:
    assert pool_bounds(EncoderOptions(), gpus=4, cpus=64, threads=1) == (4, 4)  # one actor per GPU
    assert pool_bounds(EncoderOptions(), gpus=0, cpus=256, threads=4) == (1, 64)  # every node's CPUs
    assert pool_bounds(EncoderOptions(), gpus=0, cpus=2, threads=4) == (1, 1)
    assert pool_bounds(EncoderOptions(actors=(2, 8)), gpus=0, cpus=256, threads=4) == (2, 8)

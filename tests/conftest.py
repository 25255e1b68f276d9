"""Shared fixtures: a real local Ray for the session, the generated sample corpus, the repository root, a one-thread
torch cap."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def frugal_threads() -> Iterator[None]:
    """One torch thread for the test (the machine's cores are shared), the previous count restored after; opt in
    per module with ``pytestmark = pytest.mark.usefixtures("frugal_threads")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real Ray started in-process with 2 CPUs, shared by the whole session.

    Workers get the repository and tests/ on PYTHONPATH, so functions defined in test modules can run as tasks.
    """
    import ray

    started_here = False
    if not ray.is_initialized():
        python_path = os.pathsep.join(
            p for p in (str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p
        )
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}},
        )
        started_here = True
    yield
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory):
    """The `tiny` preset of the sample corpus (seed 0), generated once: a CorpusInfo (root, labels_path, ...)."""
    from pipelines.sample_corpus.generate import generate_corpus

    return generate_corpus(tmp_path_factory.mktemp("corpus") / "tiny", preset="tiny", seed=0)


PIPELINE_ARGS = [
    "--sample-preset", "tiny", "--size", "128x192", "--encoder", "weightfree", "--local",
    "--bench-chapters", "1", "--bench-refs", "8", "--bench-bw", "8", "--bench-max-series-fraction", "0.5",
    "--max-samples", "6",
]  # fmt: skip


@pytest.fixture(scope="session")
def pipeline_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`jobs.pipeline` run once on the tiny sample corpus at 128x192: the data root with shards
    (train: 24 samples in 4 shards of 6, enough for 2 ranks x 2 workers) and a benchmark of 1 chapter.

    Shared by the training, colorize and evaluate tests; treat it as read-only (copy what a test modifies).
    """
    from jobs.pipeline import main as pipeline_main

    root = tmp_path_factory.mktemp("pipeline")
    pipeline_main(["--generate-sample", str(root / "corpus"), "--output", str(root / "data"), *PIPELINE_ARGS])
    return root / "data"


def write_upstream_ledgers(data: Path) -> None:
    """The ingest and retrieval ledgers of a data folder, made from the chapter markers those stages write (both
    hold the chapter's table `parts`), as the stages' own ledgers record them."""
    from pipelines.core.layout import DataLayout
    from pipelines.core.ledger import LedgerEntry, chapter_key, write_ledger
    from pipelines.core.storage import MARKER_SUFFIX, read_json

    layout = DataLayout.at(data)
    for name, folder in (("ingest", layout.ingest_markers), ("retrieval", layout.search_markers)):
        markers = {p.name.removesuffix(MARKER_SUFFIX): read_json(p) for p in sorted(folder.glob(f"*{MARKER_SUFFIX}"))}
        entries = {c: LedgerEntry(chapter_key(m["parts"]), m) for c, m in markers.items()}
        write_ledger(layout.ledger(name), entries, {})

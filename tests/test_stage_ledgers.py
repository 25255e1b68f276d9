"""Chapter ledgers of the retrieval and screentone stages: a rerun checks only the chapters the ledgers cannot vouch
for, and says the same as a rerun that checks every marker."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from pipelines.core.layout import DataLayout
from pipelines.core.ledger import LedgerEntry, read_ledger, write_ledger
from pipelines.core.pagestore import kept_chapter_ids
from pipelines.core.storage import atomic_write_json, read_json
from pipelines.ingest.stage import run_ingest
from pipelines.retrieval.stage import run_retrieval
from pipelines.screentone.stage import ScreentoneOptions, run_screentone

SIZE = {"width": 128, "height": 192}
TIMING = ("seconds", "frames_per_second", "distributor", "chapters_vouched")  # how a run went, not what it made


def _ingest(corpus: Path, out: Path) -> None:
    run_ingest(corpus, out, local=True, verbose=False)


def _stages(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    retrieval = run_retrieval(out, encoder="weightfree", local=True, **SIZE)
    screentone = run_screentone(str(out), ScreentoneOptions(**SIZE), local=True)
    return retrieval, screentone


def _content(summary: Any) -> Any:
    """A summary without its timings and ledger counts."""
    if isinstance(summary, dict):
        return {k: _content(v) for k, v in summary.items() if k not in TIMING}
    return summary


def _ledgers(out: Path) -> dict[str, dict[str, LedgerEntry]]:
    return {p.stem: read_ledger(p) for p in sorted((out / "ledgers").glob("*.parquet")) if p.stem != "ingest"}


@pytest.fixture(scope="module")
def one_chapter_added(tiny_corpus, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """Both stages run over the corpus less one kept chapter, then again with it: (data folder, retrieval and
    screentone summaries of the second run)."""
    root = tmp_path_factory.mktemp("ledgers")
    corpus = root / "corpus"
    shutil.copytree(tiny_corpus.root, corpus)
    shutil.move(corpus / "s2" / "ch001.cbz", root / "held_back.cbz")
    out = root / "out"
    _ingest(corpus, out)
    first_retrieval, first_screentone = _stages(out)
    assert first_retrieval["search"]["chapters_vouched"] == first_screentone["chapters_vouched"] == 0
    shutil.move(root / "held_back.cbz", corpus / "s2" / "ch001.cbz")
    _ingest(corpus, out)
    return out, *_stages(out)


def test_an_added_chapter_is_the_only_one_checked(one_chapter_added: tuple[Path, dict, dict]) -> None:
    out, retrieval, screentone = one_chapter_added
    embeddings, search = retrieval["embeddings"], retrieval["search"]
    assert retrieval["chapters"] == screentone["chapters"] == 2 and retrieval["complete"] and screentone["complete"]
    assert embeddings["chapters_vouched"] == 1 and embeddings["chapters_embedded"] == 1
    assert embeddings["pages_embedded"] == embeddings["pages_reused"] == 24
    assert search["chapters_vouched"] == search["chapters_reused"] == 1 and search["chapters_searched"] == 1
    assert screentone["chapters_vouched"] == screentone["chapters_reused"] == 1
    assert screentone["chapters_rendered"] == 1
    assert retrieval["frames_ok"] == 48 and retrieval["pool_refs_per_frame"] == {"min": 20, "max": 20}
    ledgers = _ledgers(out)
    assert len(ledgers) == 3 and all(len(entries) == 2 for entries in ledgers.values())


def test_without_ledgers_every_marker_is_checked_and_the_summaries_agree(
    one_chapter_added: tuple[Path, dict, dict], tmp_path: Path
) -> None:
    source = one_chapter_added[0]
    vouched_out, checked_out = (shutil.copytree(source, tmp_path / name) for name in ("vouched", "checked"))
    for ledger in (checked_out / "ledgers").glob("*.parquet"):
        if ledger.stem != "ingest":
            ledger.unlink()
    for marker in DataLayout.at(checked_out).search_markers.glob("*.done.json"):  # as written before pool bounds
        atomic_write_json(marker, {k: v for k, v in read_json(marker).items() if k != "pool_refs"})
    vouched_retrieval, vouched_screentone = _stages(vouched_out)
    checked_retrieval, checked_screentone = _stages(checked_out)
    assert vouched_retrieval["embeddings"]["chapters_vouched"] == vouched_retrieval["search"]["chapters_vouched"] == 2
    assert vouched_screentone["chapters_vouched"] == 2
    assert checked_retrieval["embeddings"]["chapters_vouched"] == checked_retrieval["search"]["chapters_vouched"] == 0
    assert checked_screentone["chapters_vouched"] == 0 and checked_screentone["chapters_reused"] == 2
    assert (
        checked_retrieval["search"]["chapters_reused"] == 2 and checked_retrieval["embeddings"]["encoder_images"] == 0
    )
    assert _content(vouched_retrieval) == _content(checked_retrieval)
    assert _content(vouched_screentone) == _content(checked_screentone)
    assert vouched_retrieval["tables"] == one_chapter_added[1]["tables"]
    assert _ledgers(checked_out) == _ledgers(vouched_out) == _ledgers(source)  # records from checks = from tasks


def test_a_chapter_ingested_anew_is_checked_again(one_chapter_added: tuple[Path, dict, dict], tmp_path: Path) -> None:
    out = shutil.copytree(one_chapter_added[0], tmp_path / "out")
    layout = DataLayout.at(out)
    ingest = read_ledger(layout.ledger("ingest"))
    chapter = kept_chapter_ids(layout)[0]
    record = {**ingest[chapter].record, "parts": {**ingest[chapter].record["parts"], "pages": "0" * 64}}
    write_ledger(layout.ledger("ingest"), {**ingest, chapter: LedgerEntry(ingest[chapter].key, record)}, ingest)
    retrieval, screentone = _stages(out)
    embeddings, search = retrieval["embeddings"], retrieval["search"]
    assert embeddings["chapters_vouched"] == 1 and embeddings["chapters_up_to_date"] == 2
    assert search["chapters_vouched"] == 2  # same embeddings: the search ledger still vouches for both
    assert screentone["chapters_vouched"] == 1 and screentone["chapters_reused"] == 2
    assert retrieval["tables"] == one_chapter_added[1]["tables"] and retrieval["frames_ok"] == 48
    assert read_ledger(layout.ledger("retrieval")) == read_ledger(one_chapter_added[0] / "ledgers/retrieval.parquet")
    assert run_screentone(str(out), ScreentoneOptions(**SIZE), local=True)["chapters_vouched"] == 2  # new key kept


def test_after_a_run_that_did_not_finish_every_marker_is_checked(
    one_chapter_added: tuple[Path, dict, dict], tmp_path: Path
) -> None:
    out = shutil.copytree(one_chapter_added[0], tmp_path / "out")
    layout, screentone_folder = DataLayout.at(out), out / one_chapter_added[2]["folder"]
    chapter = kept_chapter_ids(layout)[0]
    # killed while redoing a chapter both ledgers vouch for: its marker and part gone, no summary
    for path in (layout.search_markers / f"{chapter}.done.json", layout.retrievals / f"{chapter}.parquet"):
        path.unlink()
    for path in (screentone_folder / f"{chapter}.parquet.done.json", screentone_folder / f"{chapter}.parquet"):
        path.unlink()
    (screentone_folder / f"{chapter}.parquet.tmp-1-deadbeef").write_bytes(b"junk")
    for stage in ("retrieval", "screentone"):
        layout.summary(stage).unlink()
    retrieval, screentone = _stages(out)
    assert retrieval["search"]["chapters_vouched"] == 0 and retrieval["search"]["chapters_searched"] == 1
    assert screentone["chapters_vouched"] == 0 and screentone["chapters_rendered"] == 1
    assert retrieval["tables"] == one_chapter_added[1]["tables"]
    assert not list(screentone_folder.glob("*.tmp-*"))

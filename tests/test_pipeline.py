"""The whole-pipeline job: every stage in order, skipped when current, redone when the input grows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jobs.pipeline import main as pipeline_main
from pipelines.core.layout import DataLayout
from pipelines.core.schemas import SPLITS
from pipelines.core.storage import read_json, read_parquet
from pipelines.shards.splits import split_of

ARGS = [
    "--sample-preset", "tiny", "--size", "128x192", "--encoder", "weightfree", "--local",
    "--bench-chapters", "1", "--bench-refs", "8", "--bench-bw", "8", "--bench-max-series-fraction", "0.5",
]  # fmt: skip


def _stage_flags(record: dict) -> dict[str, bool]:
    return {stage: entry["skipped"] for stage, entry in record["stages"].items()}


def test_pipeline_runs_skips_and_follows_new_chapters(tmp_path: Path) -> None:
    corpus, data, report = tmp_path / "corpus", tmp_path / "data", tmp_path / "report"
    argv = ["--generate-sample", str(corpus), "--output", str(data), "--report", str(report), *ARGS]
    first = pipeline_main(argv)
    assert _stage_flags(first) == {"ingest": False, "retrieval": False, "screentone": False, "shards": False}
    layout = DataLayout.at(data)
    for stage in ("ingest", "retrieval", "screentone", "shards"):
        assert layout.summary(stage).exists(), stage
    manifest = read_json(layout.shards_manifest)
    train_samples = manifest["splits"]["train"]["nsamples"]
    assert train_samples > 0
    assert len(list((report / "retrieval").glob("*.png"))) == 3
    assert (report / "screentone_blends.png").exists()
    assert len(list((report / "samples").glob("sample_*.png"))) == 2
    report_json = json.loads((report / "report.json").read_text())
    distinct = report_json["distinct_ref_pages_per_frame"]
    assert report_json["retrieval_cap"] == {"max_per_page": None}  # the paper's independent top-3
    assert 1 <= distinct["min"] <= distinct["median"] <= distinct["max"] <= 12 and distinct["frames"] > 0
    pool = report_json["pool_refs_per_frame"]
    assert 1 <= pool["min"] <= pool["max"] and distinct["max"] <= pool["max"]  # retrievals come from the pool
    hit_rate = report_json["retrieval_character_hit_rate"]
    assert hit_rate["query_patches"] > 0
    assert hit_rate["top1_rate"] > hit_rate["chance_rate"]  # retrieval beats a patch drawn at random from the pool
    assert hit_rate["top1_main_character_rate"] > hit_rate["main_character_chance_rate"]

    second = pipeline_main(argv)
    assert set(_stage_flags(second).values()) == {True}

    # A new colour chapter of a training series: ingestion runs again, and so does everything after it (the
    # benchmark is frozen, so a chapter of a held-out series would add no training sample).
    splits = split_of(read_parquet(layout.splits, SPLITS))
    series = next(s for s, split in sorted(splits.items()) if split == "train")
    color_chapter = next(p for p in sorted((corpus / series).iterdir()) if p.name.startswith("ch001"))
    copy = corpus / series / color_chapter.name.replace("ch001", "ch900")
    shutil.copytree(color_chapter, copy) if color_chapter.is_dir() else shutil.copy2(color_chapter, copy)
    third = pipeline_main([*argv, "--flush"])  # 24 new frames are less than a shard: written now on request
    assert set(_stage_flags(third).values()) == {False}
    assert (
        third["stages"]["ingest"]["summary"]["chapters"]["kept"]
        == first["stages"]["ingest"]["summary"]["chapters"]["kept"] + 1
    )
    assert read_json(layout.shards_manifest)["splits"]["train"]["nsamples"] > train_samples


def test_the_retrieval_cap_reaches_the_retrieval_stage_only_when_set() -> None:
    from jobs.pipeline import parse_args
    from pipelines.retrieval.stage import RetrievalOptions
    from pipelines.runner import PipelineOptions

    assert "max_per_page" not in PipelineOptions().stage_settings("retrieval")  # uncapped settings hash as before
    args = parse_args(["--input", "in", "--output", "out", "--max-per-page", "3"])
    assert args.max_per_page == 3
    capped = PipelineOptions(retrieval=RetrievalOptions(max_per_page=args.max_per_page))
    assert capped.stage_settings("retrieval")["max_per_page"] == 3
    assert capped.stage_options("retrieval").max_per_page == 3

"""The ColorFlow-Bench-shaped benchmark: chapter and page choice, folder contents, idempotence and resumption."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fsync_spy import check_markers_follow_their_data, record_fsyncs
from PIL import Image
from shard_inputs import build_corpus

from pipelines.core.benchmark_format import BENCHMARK_FORMAT_VERSION, read_benchmark, read_chapter_index
from pipelines.core.layout import DataLayout
from pipelines.core.pagestore import read_chapter_pages
from pipelines.core.storage import TMP_TAG, marker_path
from pipelines.shards.benchmark import (
    BenchmarkConfig,
    eligible_chapters,
    eligible_per_series,
    read_frames,
    select_benchmark,
    write_benchmark,
)
from screentone.lines import extract_lines
from screentone.shading import shade_lines

CONFIG = BenchmarkConfig(chapters=3, refs=3, bw=4, width=96, height=144, seed=1)
BENCH_SERIES = ["s0", "s1"]


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "out"
    build_corpus(root, series=3, chapters_per_series=2, pages_per_chapter=8, render=None)
    return root


def _eligible(root: Path, config: BenchmarkConfig) -> dict:
    frames, _ = read_frames(DataLayout.at(root))
    return eligible_chapters(frames, config)


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _open(path: Path) -> Image.Image:
    image = Image.open(io.BytesIO(path.read_bytes()))
    image.load()
    return image


def test_chapters_and_pages_are_a_seeded_choice_among_eligible_benchmark_chapters(corpus_root: Path) -> None:
    eligible = _eligible(corpus_root, CONFIG)
    assert len(eligible) == 6 and eligible_per_series(eligible) == {"s0": 2, "s1": 2, "s2": 2}
    plan = select_benchmark(eligible, BENCH_SERIES, CONFIG)
    assert len(plan.chapters) == 3 and plan.eligible == 4 and not plan.notes
    assert {c.series for c in plan.chapters} <= set(BENCH_SERIES)
    for chapter in plan.chapters:
        refs, bw = {p for p, _ in chapter.refs}, {p for p, _ in chapter.bw}
        assert len(refs) == 3 and len(bw) == 4 and not refs & bw
        assert refs | bw <= {p for p, _ in eligible[chapter.chapter_id]["pages"]}
        assert [i for _, i in chapter.bw] == sorted(i for _, i in chapter.bw)
    assert select_benchmark(eligible, BENCH_SERIES, CONFIG).chapters == plan.chapters
    other = select_benchmark(eligible, BENCH_SERIES, BenchmarkConfig(**{**CONFIG.__dict__, "seed": 2}))
    assert [c.page_ids for c in other.chapters] != [c.page_ids for c in plan.chapters]


def test_too_few_pages_or_chapters_are_reported_not_hidden(corpus_root: Path) -> None:
    assert _eligible(corpus_root, BenchmarkConfig(refs=5, bw=4)) == {}  # 9 pages needed, chapters have 8
    eligible = _eligible(corpus_root, CONFIG)
    short = select_benchmark(eligible, BENCH_SERIES, BenchmarkConfig(**{**CONFIG.__dict__, "chapters": 10}))
    assert len(short.chapters) == 4 and short.notes and "shortfall: 4 of 10" in short.notes[0]


def test_folder_holds_refs_bw_styles_and_ground_truth(corpus_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "out"
    shutil.copytree(corpus_root, root)
    layout = DataLayout.at(root)
    plan = select_benchmark(_eligible(root, CONFIG), BENCH_SERIES, CONFIG)
    summary = write_benchmark(root, plan, code_version={"version": "test"}, local=True)
    assert summary["complete"] and summary["chapters"] == 3 and summary["bw_pages"] == 12
    top = read_benchmark(layout.benchmark)
    assert top["format_version"] == BENCHMARK_FORMAT_VERSION == 2 and top["size"] == [96, 144]
    assert top["renderer_id"].startswith("halftone-") and top["code_version"] == {"version": "test"}
    # the B&W folders are named for their renderer: this benchmark's screentone is halftone, never "screenstyle"
    assert top["styles"] == {
        "grey": {"folder": "bw_grey", "renderer_id": "grey"},
        "halftone": {"folder": "bw_halftone", "renderer_id": top["renderer_id"]},
        "sketch": {"folder": "bw_sketch", "renderer_id": "xdog"},  # the line art of the greyscale input
        "shading": {"folder": "bw_shading", "renderer_id": "xdog"},
    }
    assert top["line_extractor_id"] == "xdog"
    assert [c["chapter_id"] for c in top["chapters"]] == [c.chapter_id for c in plan.chapters]
    for chapter in plan.chapters:
        folder = layout.benchmark / chapter.chapter_id
        index = read_chapter_index(layout.benchmark, chapter.chapter_id)
        assert index["size"] == [96, 144] and index["series"] == chapter.series and index["styles"] == top["styles"]
        assert sorted(p.name for p in folder.iterdir()) == [
            "bw_grey", "bw_halftone", "bw_shading", "bw_sketch", "gt", "index.json", "refs"
        ]  # fmt: skip
        stored = read_chapter_pages(layout, chapter.chapter_id)
        for ref in index["refs"]:
            assert (folder / ref["file"]).read_bytes() == stored[ref["page_id"]]  # references as stored
        assert [b["page_id"] for b in index["bw"]] == [p for p, _ in chapter.bw]
        for page in index["bw"]:
            page_id = page["page_id"]
            assert page["gt"] == f"gt/{page_id}.jpg"
            assert page["inputs"] == {
                style: f"bw_{style}/{page_id}.png" for style in ("grey", "halftone", "sketch", "shading")
            }
            styles = ("grey", "halftone", "sketch", "shading")
            gt, grey, tone, sketch, shading = (
                _open(folder / f) for f in (page["gt"], *map(page["inputs"].get, styles))
            )
            assert (gt.format, gt.mode, gt.size) == ("JPEG", "RGB", (96, 144))
            assert (grey.format, grey.mode, grey.size) == ("PNG", "L", (96, 144))
            assert (tone.format, tone.mode, tone.size) == ("PNG", "L", (96, 144))
            grey_px, tone_px = np.asarray(grey, np.int16), np.asarray(tone, np.int16)
            assert np.abs(np.asarray(gt.convert("L"), np.int16) - grey_px).mean() < 3  # aligned pixel for pixel
            assert np.isin(tone_px, (0, 255)).mean() > 0.95 and np.abs(tone_px - grey_px).mean() > 10
            # line art of the greyscale input at the benchmark size, as colorize's line-art styles make it
            lines = extract_lines(np.asarray(grey))
            assert np.array_equal(np.asarray(sketch), lines) and sketch.size == shading.size == (96, 144)
            assert np.array_equal(np.asarray(shading), shade_lines(lines, np.asarray(grey)))
        assert len(list((folder / "bw_halftone").iterdir())) == 4 and len(list((folder / "refs").iterdir())) == 3


def test_readers_refuse_another_format_version_in_one_clear_error(corpus_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "out"
    shutil.copytree(corpus_root, root)
    layout = DataLayout.at(root)
    plan = select_benchmark(
        _eligible(root, CONFIG), BENCH_SERIES, BenchmarkConfig(**{**CONFIG.__dict__, "chapters": 1})
    )
    write_benchmark(root, plan, local=True)
    chapter_id = plan.chapters[0].chapter_id
    for path in (layout.benchmark / "benchmark.json", layout.benchmark / chapter_id / "index.json"):
        document = json.loads(path.read_text())
        path.write_text(json.dumps({**document, "format_version": 1}))
    with pytest.raises(ValueError, match=r"benchmark.json: benchmark format_version 1, this code reads version 2"):
        read_benchmark(layout.benchmark)
    with pytest.raises(ValueError, match=r"index.json: benchmark format_version 1"):
        read_chapter_index(layout.benchmark, chapter_id)
    with pytest.raises(FileNotFoundError, match="no index.json for chapter 'nope'"):
        read_chapter_index(layout.benchmark, "nope")
    with pytest.raises(FileNotFoundError, match="no benchmark.json"):
        read_benchmark(tmp_path)


def test_rerun_is_idempotent_and_resumes_a_lost_chapter(corpus_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "out"
    shutil.copytree(corpus_root, root)
    layout = DataLayout.at(root)
    plan = select_benchmark(_eligible(root, CONFIG), BENCH_SERIES, CONFIG)
    write_benchmark(root, plan, local=True)
    before = _files(layout.benchmark)
    assert write_benchmark(root, plan, local=True)["skipped"]
    # a run killed after one chapter's folder was swapped in but before its marker and benchmark.json
    victim = plan.chapters[1].chapter_id
    marker_path(layout.benchmark / victim).unlink()
    (layout.benchmark / "benchmark.json").unlink()
    (layout.benchmark / victim / "gt" / "partial.jpg").write_bytes(b"half")
    (layout.benchmark / f"{victim}{TMP_TAG}dead").mkdir()
    again = write_benchmark(root, plan, local=True)
    assert again["units_run"] == 1 and again["units_skipped"] == 2 and again["complete"]
    assert _files(layout.benchmark) == before


def test_a_new_configuration_replaces_the_old_benchmark(corpus_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "out"
    shutil.copytree(corpus_root, root)
    layout = DataLayout.at(root)
    write_benchmark(root, select_benchmark(_eligible(root, CONFIG), BENCH_SERIES, CONFIG), local=True)
    smaller = BenchmarkConfig(**{**CONFIG.__dict__, "chapters": 1, "seed": 5})
    plan = select_benchmark(_eligible(root, smaller), BENCH_SERIES, smaller)
    write_benchmark(root, plan, local=True)
    folders = sorted(p.name for p in layout.benchmark.iterdir() if p.is_dir())
    assert folders == [plan.chapters[0].chapter_id]
    top = json.loads((layout.benchmark / "benchmark.json").read_text())
    assert len(top["chapters"]) == 1 and top["config"]["seed"] == 5


def test_chapter_files_and_the_benchmark_folder_are_fsynced_before_markers(corpus_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "out"
    shutil.copytree(corpus_root, root)
    plan = select_benchmark(_eligible(root, CONFIG), BENCH_SERIES, CONFIG)
    with record_fsyncs() as events:
        write_benchmark(root, plan, local=True)
    bench = DataLayout.at(root).benchmark.resolve()
    assert check_markers_follow_their_data(events, bench, expect=3) == 3
    assert events[-2:] == [str(bench / "benchmark.json"), str(bench)]  # the top file last, then its folder

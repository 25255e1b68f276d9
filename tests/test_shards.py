"""WebDataset shards: byte-deterministic tars, three readers, resumability under SIGKILL, error rows."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fsync_spy import check_markers_follow_their_data, record_fsyncs
from shard_inputs import build_corpus

from pipelines.core.layout import DataLayout
from pipelines.core.sample_inputs import build_training_inputs, decode_sample
from pipelines.core.samples import FIELDS, SAMPLE_FORMAT_VERSION, SampleFormatError
from pipelines.core.storage import TMP_TAG
from pipelines.shards.stage import ShardOptions, run_shards
from pipelines.shards.writer import (
    PlanMismatchError,
    code_version,
    shard_code_files,
    write_tar,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = (128, 192)
OPTIONS = ShardOptions(
    size=SIZE,
    shard_size=400_000,  # about 3 samples of ~140 kB per tar
    estimate_frames=4,
    val_fraction=0.3,
    bench_chapters=2,
    bench_refs=3,
    bench_bw=3,
    bench_max_series_fraction=0.5,
    seed=7,
)
CLI = [
    "--size", "128x192", "--shard-size", "400000", "--estimate-frames", "4", "--val-fraction", "0.3",
    "--bench-chapters", "2", "--bench-refs", "3", "--bench-bw", "3", "--bench-max-series-fraction", "0.5",
    "--seed", "7",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Upstream outputs only (no shard-stage output): tests copy it before running the stage."""
    root = tmp_path_factory.mktemp("shards") / "inputs"
    build_corpus(root, series=5, chapters_per_series=2, pages_per_chapter=8, render=SIZE)
    return root


SHARD_STAGE_FSYNCS: list[str] = []  # os.fsync order during the `sharded` run (local: every write in this process)


@pytest.fixture(scope="module")
def sharded(corpus_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sharded") / "out"
    shutil.copytree(corpus_root, out)
    with record_fsyncs() as events:
        summary = run_shards(out, OPTIONS, local=True)
    SHARD_STAGE_FSYNCS[:] = events
    return out, summary


def _tars(out: Path, split: str) -> list[Path]:
    return sorted(DataLayout.at(out).shards(split).glob("*.tar"))


def _fingerprints(out: Path) -> dict[str, str]:
    """sha256 of every shard-stage output file except the run summary (which holds timings)."""
    produced = [out / "shards", out / "benchmark", out / "splits.parquet", out / "duplicates.parquet"]
    files = [p for top in produced for p in ([top] if top.is_file() else sorted(top.rglob("*"))) if p.is_file()]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---- tar writing ------------------------------------------------------------------------------------------------


def test_tar_is_byte_deterministic_with_contiguous_members_and_exact_offsets(tmp_path: Path) -> None:
    fields = ("a.png", "b.json")
    samples = [{"__key__": f"k{i}", "a.png": bytes([i]) * (100 + 700 * i), "b.json": b"{}"} for i in range(4)]
    first = write_tar(tmp_path / "one.tar", samples, fields)
    second = write_tar(tmp_path / "two.tar", samples, fields)
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    assert first.sha256 == second.sha256 == hashlib.sha256((tmp_path / "one.tar").read_bytes()).hexdigest()
    with tarfile.open(tmp_path / "one.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"k{i}.{f}" for i in range(4) for f in fields]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
    data = (tmp_path / "one.tar").read_bytes()
    for entry in first.entries:
        header = data[entry["offset"] : entry["offset"] + 100].rstrip(b"\0").decode()
        assert header == f"{entry['key']}.a.png"
        assert entry["offset"] + entry["nbytes"] <= len(data)
    assert [e["position"] for e in first.entries] == [0, 1, 2, 3]
    assert not list(tmp_path.glob(f"*{TMP_TAG}*"))
    # the same bytes tarfile itself writes for these headers
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(samples[int(member.name[1])][member.name.split(".", 1)[1]]))
    assert reference.getvalue() == data


def test_tar_refuses_keys_with_dots_and_samples_missing_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contains '.'"):
        write_tar(tmp_path / "x.tar", [{"__key__": "a.b", "a.png": b"1"}], ("a.png",))
    with pytest.raises(ValueError, match="lacks fields"):
        write_tar(tmp_path / "x.tar", [{"__key__": "a"}], ("a.png",))
    assert not (tmp_path / "x.tar").exists() and not list(tmp_path.glob(f"*{TMP_TAG}*"))


# ---- the stage's outputs ------------------------------------------------------------------------------------------


def test_manifest_index_and_markers_describe_every_shard(sharded: tuple[Path, dict]) -> None:
    out, summary = sharded
    assert summary["complete"] and (out / "shards.summary.json").exists()
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["code_version"]["package"] == "colorflow-data"
    assert manifest["sample"]["width"] == 128 and manifest["shard"]["shard_size"] == 400_000
    assert manifest["fields"] == list(FIELDS)
    assert manifest["sample"]["sample_format_version"] == SAMPLE_FORMAT_VERSION == 3
    for split in ("train", "val"):
        split_manifest = json.loads((out / "shards" / split / "manifest.json").read_text())
        assert split_manifest["sample_format_version"] == SAMPLE_FORMAT_VERSION
        tars = _tars(out, split)
        assert [s["name"] for s in split_manifest["shards"]] == [t.name for t in tars]
        assert tars[0].name == f"{split}-g0000-000000.tar" and len(tars) >= 2
        for shard, tar in zip(split_manifest["shards"], tars, strict=True):
            assert shard["bytes"] == tar.stat().st_size
            assert shard["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest()
            index = pq.read_table(tar.with_name(shard["index"])).to_pylist()
            assert len(index) == shard["nsamples"] and 1 <= shard["nsamples"] <= 3
            data = tar.read_bytes()
            for row in index:
                assert data[row["offset"] : row["offset"] + 100].rstrip(b"\0").decode() == f"{row['key']}.color.jpg"
        assert split_manifest["nsamples"] == summary["frames_per_split"][split]
    wids_index = json.loads((out / "shards" / "train" / "index.wids.json").read_text())
    assert wids_index["wids_version"] == 1
    assert sum(s["nsamples"] for s in wids_index["shardlist"]) == manifest["splits"]["train"]["nsamples"]


def test_tars_and_indexes_are_fsynced_before_their_markers(sharded: tuple[Path, dict]) -> None:
    out, _ = sharded
    layout = DataLayout.at(out)
    markers = sum(
        check_markers_follow_their_data(SHARD_STAGE_FSYNCS, layout.shards(split), expect=1)
        for split in ("train", "val")
    )
    assert markers == len(_tars(out, "train")) + len(_tars(out, "val"))
    manifest = str(layout.shards_manifest.resolve())
    assert SHARD_STAGE_FSYNCS.index(manifest) > max(
        SHARD_STAGE_FSYNCS.index(str(tar.resolve())) for tar in _tars(out, "train")
    )


def test_no_series_appears_in_two_splits(sharded: tuple[Path, dict]) -> None:
    out, _ = sharded
    splits = pq.read_table(out / "splits.parquet").to_pylist()
    assert len({r["series"] for r in splits}) == len(splits)
    series_of_split = {r["series"]: r["split"] for r in splits}
    seen: dict[str, set[str]] = {}
    for split in ("train", "val"):
        for tar in _tars(out, split):
            for row in pq.read_table(tar.with_name(tar.name.replace(".tar", ".index.parquet"))).to_pylist():
                seen.setdefault(row["series"], set()).add(split)
                assert series_of_split[row["series"]] == split
    bench = json.loads((out / "benchmark" / "benchmark.json").read_text())
    for chapter in bench["chapters"]:
        assert series_of_split[chapter["series"]] == "bench" and chapter["series"] not in seen
    assert all(len(splits_seen) == 1 for splits_seen in seen.values())
    assert {"train", "val", "bench"} == set(series_of_split.values())


def test_webdataset_reads_the_shards_and_a_composite_is_rebuilt(sharded: tuple[Path, dict]) -> None:
    import webdataset as wds

    out, summary = sharded
    urls = [str(t) for t in _tars(out, "train")]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == summary["frames_per_split"]["train"]
    assert all(set(s) >= set(FIELDS) for s in samples)
    assert len({s["__key__"] for s in samples}) == len(samples)
    inputs = build_training_inputs(samples[0], 0.5)
    assert inputs.c_bw.size == (256, 384) and inputs.mask.shape == (384, 256)
    assert inputs.mask.sum() == 3 * 128 * 192
    centre = np.asarray(inputs.c_color)[96:288, 64:192]
    assert np.array_equal(centre, np.asarray(inputs.color))


def test_wids_reads_the_shards_through_the_index(sharded: tuple[Path, dict], tmp_path: Path) -> None:
    import wids

    out, summary = sharded
    index_path = str(out / "shards" / "val" / "index.wids.json")
    dataset = wids.ShardListDataset(index_path, cache_dir=str(tmp_path), transformations=[])
    assert len(dataset) == summary["frames_per_split"]["val"]
    keys = []
    for i in (0, len(dataset) - 1, len(dataset) // 2):
        sample = dataset[i]
        decoded = decode_sample(sample)
        assert decoded.meta["frame_id"] == sample["__key__"]
        keys.append(sample["__key__"])
    index = pq.read_table(out / "shards" / "val" / "val-g0000-000000.index.parquet").column("key").to_pylist()
    assert keys[0] == index[0]
    dataset.close()


def test_hugging_face_datasets_reads_the_shards(sharded: tuple[Path, dict], tmp_path: Path) -> None:
    import datasets

    out, summary = sharded
    files = [str(t) for t in _tars(out, "train")]
    dataset = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path))
    assert dataset.num_rows == summary["frames_per_split"]["train"]
    row = dataset[0]
    decoded = decode_sample(row)
    assert decoded.ring.size == (256, 384) and decoded.meta["key"] == row["__key__"]
    rebuilt = build_training_inputs(row, "grey")
    assert np.asarray(rebuilt.frame_only)[:96].max() == 0


def test_rerun_skips_and_a_changed_plan_needs_rebuild(sharded: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = sharded
    work = tmp_path / "out"
    shutil.copytree(out, work)
    before = _fingerprints(work)
    assert run_shards(work, OPTIONS, local=True)["skipped"]
    (work / "shards.summary.json").unlink()  # force the stage to run: every unit is skipped
    again = run_shards(work, OPTIONS, local=True)
    assert again["splits"]["train"]["units_run"] == 0 and again["splits"]["train"]["units_skipped"] >= 2
    assert _fingerprints(work) == before
    bigger = ShardOptions(**{**OPTIONS.__dict__, "max_samples": 1})
    with pytest.raises(PlanMismatchError, match="--rebuild"):
        run_shards(work, bigger, local=True)
    rebuilt = run_shards(work, bigger, local=True, rebuild=True)
    assert rebuilt["splits"]["train"]["nshards"] == rebuilt["frames_per_split"]["train"]


def test_shards_of_another_sample_format_are_refused_by_the_writer_and_the_readers(
    sharded: tuple[Path, dict], tmp_path: Path
) -> None:
    from training.data import check_variant, resolve_shard_source

    out, _ = sharded
    work = tmp_path / "out"
    shutil.copytree(out, work)
    plan = work / "shards" / "train" / "plan.json"
    # this code (format 3) never appends to a dataset of format 1 (lanczos rings) or 2 (no line art) ...
    for version in (1, 2):
        plan.write_text(json.dumps({**json.loads(plan.read_text()), "sample_format_version": version}))
        (work / "shards.summary.json").unlink(missing_ok=True)
        with pytest.raises(SampleFormatError, match=f"sample format version {version}; .* --rebuild"):
            run_shards(work, OPTIONS, local=True)
    # ... and format-2 code never appends to this one: its writer takes version 2 only, and the dataset says 3
    assert json.loads((out / "shards" / "train" / "plan.json").read_text())["sample_format_version"] == 3
    manifest = work / "shards" / "val" / "manifest.json"
    source = resolve_shard_source(manifest, "val")
    assert source.nsamples > 0 and source.sample_format_version == 3  # format 3: read, line art included
    check_variant(source, "sketch")
    for version, readable in ((1, True), (2, True), (99, False)):  # 1 and 2: the tone members, no line art
        for path in manifest.parent.glob("manifest*.json"):  # the split manifest and its generations' snapshots
            spec = json.loads(path.read_text())
            generations = [{**g, "sample_format_version": version} for g in spec.get("generations", [])]
            path.write_text(json.dumps({**spec, "sample_format_version": version, "generations": generations}))
        if readable:
            source = resolve_shard_source(manifest, "val")
            assert source.nsamples > 0
            check_variant(source, "grey")
            with pytest.raises(SampleFormatError, match=f"version {version}, without line art; .* --rebuild"):
                check_variant(source, "shading")
        else:
            with pytest.raises(SampleFormatError, match="sample format version 99; this code reads versions 1, 2, 3"):
                resolve_shard_source(manifest, "val")


def test_a_frame_without_screentone_becomes_an_error_row(corpus_root: Path, tmp_path: Path) -> None:
    work = tmp_path / "out"
    shutil.copytree(corpus_root, work)
    layout = DataLayout.at(work)
    pages = pq.read_table(layout.pages).to_pylist()
    folder = next(layout.root.glob("screentone/*/128x192"))
    train_series = {"s1", "s2", "s3", "s4"}
    victim = next(p for p in pages if p["series"] in train_series)
    (folder / f"{victim['chapter_id']}.parquet").unlink()
    options = ShardOptions(**{**OPTIONS.__dict__, "bench_series": ("s0",), "val_fraction": 0.0})
    summary = run_shards(work, options, local=True)
    chapter_frames = [p["page_id"] for p in pages if p["chapter_id"] == victim["chapter_id"]]
    errors = pq.read_table(layout.shards("train") / "errors.parquet").to_pylist()
    assert sorted(e["frame_id"] for e in errors) == sorted(chapter_frames)
    assert all("no 'train' screentone" in e["error"] and e["split"] == "train" for e in errors)
    assert summary["complete"]
    assert summary["splits"]["train"]["nsamples"] == summary["frames_per_split"]["train"] - len(chapter_frames)


def test_killed_runs_end_with_the_shards_of_an_uninterrupted_run(sharded: tuple[Path, dict], corpus_root: Path,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    reference_out, _ = sharded
    reference = _fingerprints(reference_out)
    work = tmp_path / "out"
    shutil.copytree(corpus_root, work)
    command = [sys.executable, "-m", "jobs.shards", "--data", str(work), "--local", *CLI]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kill_seed = int(os.environ.get("KILL_TEST_SEED", int.from_bytes(os.urandom(4), "big")))
    print(f"kill schedule seed {kill_seed} (rerun with KILL_TEST_SEED={kill_seed} to reproduce)")
    rng = random.Random(kill_seed)
    train = DataLayout.at(work).shards("train")
    total = len(list((reference_out / "shards" / "train").glob("*.tar")))

    def done(folder: Path = train, pattern: str = "*.tar.done.json") -> int:
        return len(list(folder.glob(pattern))) if folder.exists() else 0

    def bench_done() -> int:
        return done(work / "benchmark", "*.done.json")

    kills = []
    # kill 1 at a random early moment (imports, splits, leakage), kill 2 once the benchmark has begun, kills 3
    # and 4 after a random number of train shards newly completed by that run (so they interrupt shard writing)
    for kind in ("delay", "bench", "markers", "markers"):
        at_start = done()
        if kind == "delay":
            value = rng.uniform(0.2, 1.5)
        else:
            value = 1 if kind == "bench" else at_start + rng.randint(1, max(1, (total - at_start) // 2))
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        while process.poll() is None and time.monotonic() - started < 120:
            elapsed = time.monotonic() - started
            if {"delay": elapsed >= value, "bench": bench_done() >= value, "markers": done() >= value}[kind]:
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills.append((kind, round(value, 2), at_start, done(), process.returncode))
        # whatever the moment, a tar under its final name is complete: it equals the uninterrupted run's
        for tar in sorted((work / "shards").rglob("*.tar")):
            assert reference[str(tar.relative_to(work))] == hashlib.sha256(tar.read_bytes()).hexdigest(), kills
    assert all(code == -signal.SIGKILL for *_, code in kills), kills  # every run was killed, none had finished
    assert all(start < after < total for kind, _, start, after, _ in kills if kind == "markers"), kills
    final = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert _fingerprints(work) == reference
    assert not list(work.rglob(f"*{TMP_TAG}*"))


@pytest.mark.usefixtures("ray_local")
def test_ray_workers_write_the_same_shards_as_a_local_run(sharded: tuple[Path, dict], corpus_root: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    reference_out, _ = sharded
    work = tmp_path / "out"
    shutil.copytree(corpus_root, work)
    summary = run_shards(work, OPTIONS, local=False)
    assert summary["complete"] and summary["splits"]["train"]["units_run"] == summary["splits"]["train"]["nshards"]
    assert _fingerprints(work) == _fingerprints(reference_out)


def test_end_to_end_on_the_generated_corpus_with_the_real_upstream_stages(tmp_path: Path) -> None:
    """Ingest, retrieval (weight-free encoder) and screentone (halftone) as users run them, then this stage.

    The "small" corpus (at half scale) has three series, and s3 reposts a page of s1: with s3 held out for the
    benchmark, the leakage check must find exactly that pair and keep the repost's twin out of training.
    """
    import webdataset as wds

    from pipelines.ingest.stage import run_ingest
    from pipelines.retrieval.stage import run_retrieval
    from pipelines.sample_corpus.generate import generate_corpus
    from pipelines.sample_corpus.labels import default_labels_path, read_labels
    from pipelines.screentone.stage import ScreentoneOptions, run_screentone

    corpus, out = tmp_path / "corpus", tmp_path / "out"
    generate_corpus(corpus, preset="small", scale=0.5)
    run_ingest(corpus, out, local=True, verbose=False)
    retrieval = run_retrieval(out, encoder="weightfree", width=128, height=192, local=True)
    screentone = run_screentone(str(out), ScreentoneOptions(width=128, height=192), local=True)
    options = ShardOptions(
        size=SIZE, shard_size=1_000_000, bench_series=("s3",), bench_chapters=1, bench_refs=10, bench_bw=12, seed=0
    )
    summary = run_shards(out, options, local=True)
    assert summary["complete"] and summary["encoder_id"] == retrieval["encoder"]["encoder_id"]
    assert summary["renderer_id"] == screentone["renderer_id"]

    layout = DataLayout.at(out)
    split = {r["series"]: r["split"] for r in pq.read_table(layout.splits).to_pylist()}
    assert split["s3"] == "bench" and sorted(split.values()) == ["bench", "train", "val"]
    pages = {r["source"]: r for r in pq.read_table(layout.pages).to_pylist()}
    bench = json.loads((layout.benchmark / "benchmark.json").read_text())
    bench_index = json.loads((layout.benchmark / bench["chapters"][0]["index"]).read_text())
    bench_pages = {p["page_id"] for p in bench_index["refs"] + bench_index["bw"]}
    s3_frames = {p["page_id"] for p in pages.values() if p["series"] == "s3" and p["stored"]}
    assert bench_pages == s3_frames  # every colour page of s3's kept chapter (22 of them)

    def held_out(page: dict) -> bool:
        return page["page_id"] in bench_pages or split[page["series"]] == "val"

    expected = set()
    for label in read_labels(default_labels_path(corpus)):
        twin = pages.get(label["duplicate_of"] or "")
        page = pages[label["source"]]
        if twin is None or not (page["stored"] and twin["stored"]):
            continue
        for a, b in ((page, twin), (twin, page)):
            if held_out(a) and split[b["series"]] == "train":
                expected.add((a["page_id"], b["page_id"]))
    assert expected, "the corpus must hold a held-out page reposted in training for this test to mean anything"
    duplicates = pq.read_table(layout.duplicates).to_pylist()
    assert {(d["page_id"], d["train_page_id"]) for d in duplicates if d["duplicate"]} == expected

    trained = {s["__key__"]: s for s in wds.WebDataset([str(t) for t in _tars(out, "train")], shardshuffle=False)}
    assert trained and not {b for _, b in expected} & set(trained)
    retrievals = pq.read_table(layout.retrievals).to_pylist()
    key, sample = sorted(trained.items())[0]
    decoded = decode_sample(sample)
    rows = sorted((r["query_patch"], r["rank"], r["ref_page_id"]) for r in retrievals if r["frame_id"] == key)
    assert [(r["query_patch"], r["rank"], r["ref_page_id"]) for r in decoded.meta["retrievals"]] == rows
    assert decoded.meta["encoder_fingerprint"] == retrieval["encoder"]["fingerprint"]
    inputs = build_training_inputs(decoded, 0.33)
    assert inputs.c_bw.size == (256, 384) and inputs.hr_bw.size == (192, 288)
    assert summary["splits"]["train"]["nsamples"] == len(trained)


def test_job_arguments_parse_sizes_and_byte_counts() -> None:
    from jobs.shards import parse_args, parse_bytes

    assert parse_bytes("1GB") == 10**9 and parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("1.5MB") == 1_500_000 and parse_bytes("400000") == 400_000
    for bad in ("lots", "0", "5XB"):
        with pytest.raises(argparse.ArgumentTypeError, match="byte count|positive"):
            parse_bytes(bad)
    args = parse_args(["--data", "OUT", "--shard-size", "2GB", "--bench-series", "a", "b", "--size", "640x640"])
    assert args.shard_size == 2 * 10**9 and args.bench_series == ["a", "b"] and args.size == (640, 640)
    assert args.max_samples is None and not args.local and args.val_fraction == 0.05


def test_code_version_covers_only_the_code_that_produces_shard_bytes(tmp_path: Path) -> None:
    for package in ("pipelines", "screentone", "model", "training", "inference", "evaluation", "jobs"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    scope = {p.relative_to(tmp_path).as_posix() for p in shard_code_files(tmp_path)}
    assert {
        "pipelines/shards/stage.py",
        "pipelines/shards/writer.py",
        "pipelines/core/samples.py",
        "pipelines/core/geometry.py",
        "screentone/halftone.py",
    } <= scope
    # of model/, only the line extractor network the benchmark's line art runs (with --line-extractor-weights)
    line_extractor = {"model/__init__.py", "model/line_extractor.py", "model/state_keys.py"}
    assert "pipelines/core/page_styles.py" in scope and line_extractor <= scope
    outer = ("model", "training", "inference", "evaluation", "jobs")
    assert not {p for p in scope - line_extractor if p.split("/")[0] in outer}
    outside = {
        "pipelines/report.py",
        "pipelines/runner.py",
        "pipelines/core/sample_inputs.py",  # how training reads a sample back
        "pipelines/ingest/stage.py",  # other stages' drivers
        "pipelines/retrieval/stage.py",
        "pipelines/screentone/stage.py",
        "pipelines/runtime/ray.py",  # where code runs, not what it writes
        "pipelines/runtime/distributor.py",
    }
    assert not scope & outside
    before = code_version(tmp_path)
    (tmp_path / "model" / "new_model.py").write_text("VALUE = 1\n")
    (tmp_path / "training" / "__init__.py").write_text("# edited\n")
    (tmp_path / "jobs" / "shards.py").write_text((tmp_path / "jobs" / "shards.py").read_text() + "\n# edited\n")
    for name in sorted(outside):  # e.g. a log message edited in the ingest driver
        (tmp_path / name).write_text((tmp_path / name).read_text() + "\n# edited\n")
    assert code_version(tmp_path) == before  # finished shards stay valid
    samples = tmp_path / "pipelines" / "core" / "samples.py"
    samples.write_text(samples.read_text() + "\n# edited\n")
    assert code_version(tmp_path)["source_sha256"] != before["source_sha256"]

"""The retrieval cache job end to end on the ingested sample corpus: Ray, both encoders, reuse, inspection."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_encoders import make_tiny_open_clip

from jobs import inspect_retrieval
from jobs import retrieval as retrieval_job
from pipelines.core.contact_sheets import QUERY_COLORS
from pipelines.core.embeddings import EmbeddingStore
from pipelines.core.layout import DataLayout
from pipelines.core.pagestore import encode_page, read_chapter_pages
from pipelines.core.patches import fitted_page
from pipelines.core.schemas import PAGE_STORE, STATUS_ERROR, STATUS_EXCLUDED, STATUS_OK
from pipelines.core.search import RefKeys, brute_force_topk
from pipelines.core.storage import read_json, stable_hash, write_parquet
from pipelines.ingest.stage import run_ingest
from pipelines.retrieval.stage import inflight_limit, run_retrieval
from pipelines.shards.leakage import LeakageConfig, find_duplicates
from pipelines.shards.leakage_vectors import PageRef

SIZE = {"width": 128, "height": 192}  # small frames keep the tests fast; the geometry is the paper's
FRAMES = 48  # colour pages stored by ingestion for the tiny corpus (two kept chapters of 24)


def _ingest(corpus: Path, out: Path) -> Path:
    run_ingest(corpus, out, local=True, verbose=False)
    return out


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, tiny_corpus) -> Path:
    out = _ingest(tiny_corpus.root, tmp_path_factory.mktemp("ingested") / "out")
    pages = pq.read_table(out / "pages.parquet")
    stored = pages.filter(pc.equal(pages["stored"], True))
    per_chapter = sorted(stored.group_by("chapter_id").aggregate([("page_id", "count")]).column(1).to_pylist())
    assert per_chapter == [24, 24], f"the tiny corpus should give two kept chapters of 24 frames, got {per_chapter}"
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def weightfree_run(ingested: Path, tmp_path_factory: pytest.TempPathFactory, ray_local) -> tuple[Path, dict]:
    out = _copy(ingested, tmp_path_factory.mktemp("weightfree") / "out")
    return out, run_retrieval(out, encoder="weightfree", **SIZE)


def _tables(out: Path) -> tuple[pa.Table, pa.Table]:
    return pq.read_table(out / "pools.parquet"), pq.read_table(out / "retrievals.parquet")


def test_weightfree_job_end_to_end(weightfree_run: tuple[Path, dict]) -> None:
    out, summary = weightfree_run
    embeddings = summary["embeddings"]
    assert summary["chapters"] == 2 and not summary["failures"] and summary["complete"] is True
    assert embeddings["chapters_embedded"] == 2 and embeddings["pages_embedded"] == FRAMES
    assert embeddings["encoder_images"] == 9 * FRAMES  # each page embedded once: 4 query + 5 reference patches
    assert summary["frames"] == summary["frames_ok"] == FRAMES and summary["frames_short"] == 0
    assert summary["retrieval_rows"] == 12 * FRAMES
    pools, retrievals = _tables(out)
    pool_of = {row["frame_id"]: row for row in pools.to_pylist()}
    assert len(pool_of) == FRAMES
    for pool in pool_of.values():
        assert pool["status"] == STATUS_OK and len(pool["ref_page_ids"]) == 20 and pool["n_candidates"] == 23
        assert pool["frame_id"] not in pool["ref_page_ids"]
    by_query: dict[tuple[str, int], list[dict]] = {}
    for row in retrievals.to_pylist():
        pool = pool_of[row["frame_id"]]
        assert row["ref_page_id"] in pool["ref_page_ids"] and row["chapter_id"] == pool["chapter_id"]
        assert 0 <= row["ref_patch"] <= 4 and -1.0 <= row["score"] <= 1.0 + 1e-3
        by_query.setdefault((row["frame_id"], row["query_patch"]), []).append(row)
    assert len(by_query) == 4 * FRAMES
    for rows in by_query.values():
        assert [r["rank"] for r in rows] == [0, 1, 2]
        assert rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"]

    # the stored product: fp16, unit norm, 9 rows per page, the fingerprint beside it
    store = EmbeddingStore(out / summary["outputs"]["embeddings"])
    assert read_json(store.folder / "encoder.json")["fingerprint"] == summary["encoder"]["fingerprint"]
    chapter_ids = sorted({p["chapter_id"] for p in pool_of.values()})
    for chapter_id in chapter_ids:
        chapter = store.load(chapter_id)
        assert chapter.vectors.dtype == np.float16 and chapter.vectors.shape[0] == 9 * 24
        np.testing.assert_allclose(np.linalg.norm(chapter.vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)
        # FAISS picked what a brute force over the pool picks, from the same stored vectors
        rows = chapter.page_rows()
        pages = sorted(rows)
        keys = RefKeys(np.repeat(np.array(pages), 5), np.tile(np.arange(5), len(pages)))
        refs = np.asarray(chapter.vectors[np.concatenate([rows[p][4:] for p in pages])])
        for frame_id in pages:
            allowed = np.concatenate([np.arange(5) + 5 * pages.index(p) for p in pool_of[frame_id]["ref_page_ids"]])
            top, scores = brute_force_topk(chapter.vectors[rows[frame_id][:4]], refs, allowed, keys.tie_rank, 3)
            for q in range(4):
                got = by_query[(frame_id, q)]
                assert [(r["ref_page_id"], r["ref_patch"]) for r in got] == [
                    (str(keys.page_ids[i]), int(keys.patches[i])) for i in top[q]
                ]
                np.testing.assert_allclose([r["score"] for r in got], scores[q], atol=1e-6)


def test_rerun_new_k_new_seed_and_rebuild(weightfree_run: tuple[Path, dict], tmp_path: Path) -> None:
    source, first = weightfree_run
    out = _copy(source, tmp_path / "out")
    pools, retrievals = _tables(out)

    again = run_retrieval(out, encoder="weightfree", **SIZE)
    assert again["embeddings"]["encoder_images"] == 0 and again["embeddings"]["chapters_up_to_date"] == 2
    assert again["embeddings"]["pages_reused"] == FRAMES
    assert again["search"] == {**again["search"], "chapters_searched": 0, "chapters_reused": 2}
    assert _tables(out)[0].equals(pools) and _tables(out)[1].equals(retrievals)

    fewer = run_retrieval(out, encoder="weightfree", k_per_patch=2, **SIZE)
    assert fewer["embeddings"]["encoder_images"] == 0 and fewer["search"]["chapters_searched"] == 2
    assert fewer["run_id"] != first["run_id"] and fewer["retrieval_rows"] == 8 * FRAMES
    top3 = {(r["frame_id"], r["query_patch"], r["rank"]): r["ref_page_id"] for r in retrievals.to_pylist()}
    for row in _tables(out)[1].to_pylist():  # the top 2 are the first two of the top 3
        assert top3[(row["frame_id"], row["query_patch"], row["rank"])] == row["ref_page_id"]

    reseeded = run_retrieval(out, encoder="weightfree", seed=1, **SIZE)
    assert reseeded["embeddings"]["encoder_images"] == 0
    assert _tables(out)[0].column("ref_page_ids").to_pylist() != pools.column("ref_page_ids").to_pylist()

    rebuilt = run_retrieval(out, encoder="weightfree", rebuild=True, **SIZE)
    assert rebuilt["embeddings"]["encoder_images"] == 9 * FRAMES and rebuilt["search"]["chapters_searched"] == 2
    assert _tables(out)[0].equals(pools) and _tables(out)[1].equals(retrievals)  # deterministic


def test_adding_a_chapter_embeds_only_its_pages(tiny_corpus, tmp_path: Path, ray_local) -> None:
    corpus = _copy(tiny_corpus.root, tmp_path / "corpus")
    held_back = tmp_path / "s2_ch001.cbz"
    shutil.move(corpus / "s2" / "ch001.cbz", held_back)
    out = _ingest(corpus, tmp_path / "out")
    first = run_retrieval(out, encoder="weightfree", **SIZE)
    assert first["frames"] == 24 and first["embeddings"]["encoder_images"] == 9 * 24

    shutil.move(held_back, corpus / "s2" / "ch001.cbz")
    _ingest(corpus, out)
    second = run_retrieval(out, encoder="weightfree", **SIZE)
    assert second["frames"] == FRAMES
    assert second["embeddings"]["pages_embedded"] == 24 and second["embeddings"]["encoder_images"] == 9 * 24
    assert second["embeddings"]["pages_reused"] == 24
    assert second["search"]["chapters_searched"] == 1 and second["search"]["chapters_reused"] == 1


def test_tiny_open_clip_runs_through_the_ray_job(weightfree_run: tuple[Path, dict], tmp_path: Path) -> None:
    source, weightfree = weightfree_run
    out = _copy(source, tmp_path / "out")
    old_folder = out / weightfree["outputs"]["embeddings"]
    old_bytes = {p.name: p.read_bytes() for p in old_folder.glob("*.npy")}
    config, checkpoint = make_tiny_open_clip(tmp_path / "model")
    spec = f"open_clip:{config}:{checkpoint}"
    summary = run_retrieval(out, encoder=spec, batch_size=16, **SIZE)
    assert summary["embeddings"]["encoder_images"] == 9 * FRAMES and summary["embeddings"]["encoder_batches"] > 2
    assert summary["frames_ok"] == FRAMES and summary["retrieval_rows"] == 12 * FRAMES
    new_folder = out / summary["outputs"]["embeddings"]
    assert new_folder != old_folder and new_folder.parent == old_folder.parent  # beside, never over
    assert {p.name: p.read_bytes() for p in old_folder.glob("*.npy")} == old_bytes

    # the whole-page vector of a page is open_clip's own embedding of the fitted colour page
    import open_clip
    import torch

    layout = DataLayout.at(out)
    chapter_id = pq.read_table(out / "pools.parquet").column("chapter_id")[0].as_py()
    chapter = EmbeddingStore(new_folder).load(chapter_id)
    page_id = sorted(chapter.page_rows())[0]
    page = Image.open(io.BytesIO(read_chapter_pages(layout, chapter_id)[page_id]))
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-vit-test", pretrained=str(checkpoint))
    with torch.no_grad():
        expected = model.encode_image(preprocess(fitted_page(page, **SIZE))[None], normalize=True)[0].numpy()
    stored = chapter.vectors[chapter.page_rows()[page_id][8]].astype(np.float32)
    np.testing.assert_allclose(stored, expected, atol=3e-3)


def test_changed_broken_and_missing_inputs(weightfree_run: tuple[Path, dict], tmp_path: Path, ray_local) -> None:
    source, first = weightfree_run
    out = _copy(source, tmp_path / "out")
    layout = DataLayout.at(out)
    chapter_a, chapter_b = sorted(pq.read_table(out / "pools.parquet").column("chapter_id").unique().to_pylist())
    before = EmbeddingStore(out / first["outputs"]["embeddings"]).load(chapter_a)
    before_rows = before.page_rows()
    before_vectors = {p: np.asarray(before.vectors[r]) for p, r in before_rows.items()}

    table = pq.read_table(layout.pagestore_chapter(chapter_a)).to_pylist()
    changed, broken, removed = table[0]["page_id"], table[1]["page_id"], table[2]["page_id"]
    flipped = Image.open(io.BytesIO(table[0]["image"])).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    table[0]["image"] = encode_page(flipped)
    table[1]["image"] = b"\xff\xd8 not a jpeg any more"
    write_parquet(pa.Table.from_pylist(table[:2] + table[3:], schema=PAGE_STORE), layout.pagestore_chapter(chapter_a))
    layout.pagestore_chapter(chapter_b).unlink()  # a chapter whose page store vanished
    shutil.rmtree(layout.ledger("ingest").parent)  # files edited by hand: the ledgers go, as the docs say

    summary = run_retrieval(out, encoder="weightfree", **SIZE)
    embeddings = summary["embeddings"]
    assert embeddings["pages_embedded"] == 1 and embeddings["encoder_images"] == 9
    assert embeddings["pages_reused"] == 21 and embeddings["pages_failed"] == 1
    assert summary["failures"][0]["chapter_id"] == chapter_b and "page store file" in summary["failures"][0]["error"]
    assert summary["complete"] is False  # so the whole-pipeline job runs the stage again
    after = EmbeddingStore(out / first["outputs"]["embeddings"]).load(chapter_a)
    after_rows = after.page_rows()
    assert removed not in after_rows and broken not in after_rows
    assert not np.array_equal(np.asarray(after.vectors[after_rows[changed]]), before_vectors[changed])
    for page_id in set(after_rows) - {changed}:
        np.testing.assert_array_equal(np.asarray(after.vectors[after_rows[page_id]]), before_vectors[page_id])

    pools, retrievals = _tables(out)
    status = {r["frame_id"]: r for r in pools.to_pylist()}
    assert status[broken]["status"] == STATUS_ERROR and "cannot decode" in status[broken]["error"]
    assert removed not in status
    b_rows = [r for r in status.values() if r["chapter_id"] == chapter_b]
    assert len(b_rows) == 24 and all(r["status"] == STATUS_ERROR and "chapter failed" in r["error"] for r in b_rows)
    referenced = set(retrievals.column("ref_page_id").to_pylist())
    assert not referenced & {broken, removed} and set(retrievals.column("chapter_id").to_pylist()) == {chapter_a}
    assert summary["frames"] == 23 + 24 and summary["frames_error"] == 1 + 24


def _leakage_check(out: Path, encoder_id: str, killed: str) -> dict:
    """The leakage check with the killed chapter's frames held out against the other chapter's frames."""
    pools = pq.read_table(out / "pools.parquet").to_pylist()
    refs = [
        PageRef(p["frame_id"], "s", p["chapter_id"], "val" if p["chapter_id"] == killed else "train") for p in pools
    ]
    held, train = [r for r in refs if r.split == "val"], [r for r in refs if r.split == "train"]
    return find_duplicates(DataLayout.at(out), encoder_id, held, train, LeakageConfig(confirm=False))[1]


def test_a_killed_run_resumes_to_identical_output(weightfree_run: tuple[Path, dict], tmp_path: Path) -> None:
    source, first = weightfree_run
    out = _copy(source, tmp_path / "out")
    pools, retrievals = _tables(out)
    store = EmbeddingStore(out / first["outputs"]["embeddings"])
    chapter_id = sorted(p.stem for p in store.folder.glob("*.npy"))[0]
    # killed while rewriting a chapter: marker gone, new vectors (a page fewer) beside the old ids file, a
    # temporary file left behind, and killed again after its search marker went, before its retrievals part was
    # rewritten
    rows = store.state(chapter_id)["rows"]
    store.marker(chapter_id).unlink()
    np.save(store.vectors_path(chapter_id), np.zeros((rows - 9, first["encoder"]["fingerprint"]["dim"]), np.float16))
    (store.folder / f"{chapter_id}.npy.tmp-1-deadbeef").write_bytes(b"junk")
    (out / "retrieval" / "search" / f"{chapter_id}.done.json").unlink()
    (out / "retrievals.parquet" / f"{chapter_id}.parquet").unlink()
    (out / "retrieval.summary.json").unlink()

    # the leakage check on that state reads nothing of the killed chapter and says so
    leakage = _leakage_check(out, first["encoder"]["encoder_id"], chapter_id)
    assert leakage["chapters_skipped"] == 1 and leakage["chapters_skipped_examples"][0]["chapter_id"] == chapter_id
    assert leakage["unchecked"] == leakage["held_out_pages"] == 24
    assert leakage["train_pages_indexed"] == leakage["train_pages"] == 24

    summary = run_retrieval(out, encoder="weightfree", local=True, **SIZE)
    assert summary["embeddings"]["chapters_embedded"] == 1 and summary["embeddings"]["chapters_up_to_date"] == 1
    assert summary["search"]["chapters_searched"] == 1 and summary["complete"] is True
    assert _tables(out)[0].equals(pools) and _tables(out)[1].equals(retrievals)
    assert not list(store.folder.glob("*.tmp-*"))
    leakage = _leakage_check(out, first["encoder"]["encoder_id"], chapter_id)
    assert leakage["chapters_skipped"] == 0 and leakage["unchecked"] == 0


def test_a_run_that_dies_leaves_no_stale_summary(weightfree_run: tuple[Path, dict], tmp_path: Path) -> None:
    source, first = weightfree_run
    out = _copy(source, tmp_path / "out")
    record = out / first["outputs"]["embeddings"] / "encoder.json"
    record.write_text(record.read_text().replace('"weightfree"', '"another-encoder"'))
    with pytest.raises(RuntimeError, match="refusing to mix vectors"):
        run_retrieval(out, encoder="weightfree", local=True, **SIZE)
    # the run got past its start, so the old summary no longer vouches for pools.parquet + retrievals.parquet
    assert not (out / "retrieval.summary.json").exists()


def test_prepared_chapters_in_flight_are_bounded_by_actors_and_bytes() -> None:
    budget = 2 << 30
    assert inflight_limit(n_actors=1, cpus=64, chapter_bytes=0, budget=budget) == 4  # size unknown yet
    open_clip_chapter = 200 * 9 * 224 * 224 * 3  # ~270 MB
    assert inflight_limit(n_actors=1, cpus=64, chapter_bytes=open_clip_chapter, budget=budget) == 7
    assert inflight_limit(n_actors=4, cpus=64, chapter_bytes=open_clip_chapter, budget=budget) == 10
    weightfree_chapter = 200 * 9 * 128 * 128  # ~29 MB: the CPUs are the bound
    assert inflight_limit(n_actors=1, cpus=64, chapter_bytes=weightfree_chapter, budget=budget) == 66
    assert inflight_limit(n_actors=1, cpus=2, chapter_bytes=weightfree_chapter, budget=budget) == 4


def test_pools_smaller_than_min_refs_exclude_their_frames(weightfree_run: tuple[Path, dict], tmp_path: Path) -> None:
    out = _copy(weightfree_run[0], tmp_path / "out")
    summary = run_retrieval(out, encoder="weightfree", refs=30, min_refs=24, local=True, **SIZE)
    assert summary["embeddings"]["encoder_images"] == 0
    assert summary["frames_excluded"] == FRAMES and summary["retrieval_rows"] == 0
    pools = pq.read_table(out / "pools.parquet").to_pylist()
    assert all(p["status"] == STATUS_EXCLUDED and "only 23 usable" in p["error"] for p in pools)
    with pytest.raises(ValueError, match="k_per_patch"):
        run_retrieval(out, encoder="weightfree", refs=2, min_refs=1, k_per_patch=6, local=True, **SIZE)
    with pytest.raises(FileNotFoundError, match="ingestion"):
        run_retrieval(tmp_path / "empty", encoder="weightfree", local=True)


def test_contact_sheets(weightfree_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = weightfree_run
    frame_id = pq.read_table(out / "retrievals.parquet").column("frame_id")[0].as_py()
    target = tmp_path / "sheet.png"
    assert inspect_retrieval.main(["--data", str(out), "--frame", frame_id, "--out", str(target)]) == [str(target)]
    sheet = Image.open(target).convert("RGB")
    assert sheet.width > sheet.height > 400
    colors = {tuple(c) for c in np.asarray(sheet).reshape(-1, 3)[::7]}
    assert all(color in colors for color in QUERY_COLORS)  # the four query boxes are drawn
    written = inspect_retrieval.main(["--data", str(out), "--random", "2", "--seed", "3", "--out-dir", str(tmp_path)])
    assert len(written) == 2 and all(Path(p).stat().st_size > 10_000 for p in written)
    with pytest.raises(KeyError, match="'not-a-frame' is not a frame of this retrieval run"):
        inspect_retrieval.main(["--data", str(out), "--frame", "not-a-frame", "--out", str(target)])


def test_retrieval_job_command_line_reports_the_character_hit_rate(weightfree_run: tuple[Path, dict], tiny_corpus):
    out, _ = weightfree_run
    summary = retrieval_job.main(
        [
            "--data",
            str(out),
            "--encoder",
            "weightfree",
            "--size",
            "128x192",
            "--eval-labels",
            str(tiny_corpus.labels_path),
        ]
    )
    hits = summary["character_hit_rate"]
    assert summary["embeddings"]["encoder_images"] == 0
    assert hits["query_patches"] + hits["skipped_patches_without_characters"] == 4 * FRAMES
    assert (
        hits["top1_rate"] > hits["chance_rate"]
        and hits["top1_main_character_rate"] > hits["main_character_chance_rate"]
    )


GPU_CLUSTER_SCRIPT = """
import json, os, sys
import ray
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "OMP_NUM_THREADS": "1"}})
from pipelines.retrieval.stage import run_retrieval
summary = run_retrieval(sys.argv[1], encoder=sys.argv[2], width=128, height=192)
print("SUMMARY " + json.dumps({"resources": ray.cluster_resources(), **summary}))
"""


def test_gpu_actor_path_schedules_one_gpu_per_actor_and_falls_back_to_cpu(ingested: Path, tmp_path: Path) -> None:
    """A separate local Ray declaring one GPU: the actor reserves it, batches by the GPU default (64), and, with
    no CUDA device behind the declared GPU, runs the encoder on CPU in float32, giving open_clip's own vectors."""
    import os
    import subprocess
    import sys

    config, checkpoint = make_tiny_open_clip(tmp_path / "model")
    spec = f"open_clip:{config}:{checkpoint}"
    gpu_out = _copy(ingested, tmp_path / "gpu")
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)]), "RAY_ADDRESS": ""}
    done = subprocess.run(
        [sys.executable, "-c", GPU_CLUSTER_SCRIPT, str(gpu_out), spec],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("SUMMARY "))[8:])
    assert summary["resources"]["GPU"] == 1.0
    embeddings = summary["embeddings"]
    (worker,) = embeddings["encoder_workers"]
    assert {k: worker[k] for k in ("device", "dtype", "batch_size", "gpu_ids", "threads", "chapters")} == {
        "device": "cpu",
        "dtype": "float32",
        "batch_size": 64,
        "gpu_ids": ["0"],
        "threads": 1,
        "chapters": 2,
    }
    assert embeddings["encoder_images"] == 9 * FRAMES and embeddings["encoder_batches"] == 2 * -(-9 * 24 // 64)
    assert summary["frames_ok"] == FRAMES and summary["retrieval_rows"] == 12 * FRAMES

    # the vectors are open_clip's own: the whole-page vector of a page, embedded on the CPU fallback
    import open_clip
    import torch

    chapter_id = pq.read_table(gpu_out / "pools.parquet").column("chapter_id")[0].as_py()
    chapter = EmbeddingStore(gpu_out / summary["outputs"]["embeddings"]).load(chapter_id)
    page_id = sorted(chapter.page_rows())[0]
    page = Image.open(io.BytesIO(read_chapter_pages(DataLayout.at(gpu_out), chapter_id)[page_id]))
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-vit-test", pretrained=str(checkpoint))
    with torch.no_grad():
        expected = model.encode_image(preprocess(fitted_page(page, **SIZE))[None], normalize=True)[0].numpy()
    np.testing.assert_allclose(chapter.vectors[chapter.page_rows()[page_id][8]].astype(np.float32), expected, atol=3e-3)


def test_a_cpu_cluster_runs_float32_actors_with_batches_of_32(weightfree_run: tuple[Path, dict]) -> None:
    """The session's Ray has 2 CPUs and no GPU: a pool of 1 to 2 one-thread actors embeds the 2 chapters."""
    _, summary = weightfree_run
    workers = summary["embeddings"]["encoder_workers"]
    assert 1 <= len(workers) <= 2 and sum(w["chapters"] for w in workers) == 2
    for worker in workers:
        assert {k: worker[k] for k in ("device", "dtype", "batch_size", "gpu_ids", "threads")} == {
            "device": "cpu",
            "dtype": "float32",
            "batch_size": 32,
            "gpu_ids": [],
            "threads": 1,
        }


def test_encoder_dtype_is_fp16_on_cuda_and_float32_elsewhere(tmp_path: Path) -> None:
    import torch

    from pipelines.core.encoders import encoder_dtype, load_encoder, resolve_encoder

    assert encoder_dtype("cuda") == encoder_dtype(torch.device("cuda", 0)) == torch.float16
    assert encoder_dtype("cpu") == torch.float32
    config, checkpoint = make_tiny_open_clip(tmp_path)
    encoder = load_encoder(resolve_encoder(f"open_clip:{config}:{checkpoint}"), "cpu")
    assert encoder.dtype == torch.float32
    assert {p.dtype for p in encoder.visual.parameters()} == {torch.float32}


def _distinct_pages_per_frame(retrievals: pa.Table) -> dict[str, int]:
    pages: dict[str, set[str]] = {}
    for row in retrievals.select(["frame_id", "ref_page_id"]).to_pylist():
        pages.setdefault(row["frame_id"], set()).add(row["ref_page_id"])
    return {frame: len(p) for frame, p in pages.items()}


def test_diversity_cap_re_searches_and_the_summary_reports_distinct_pages(
    weightfree_run: tuple[Path, dict], tmp_path: Path
) -> None:
    source, first = weightfree_run
    counts = sorted(_distinct_pages_per_frame(_tables(source)[1]).values())
    distinct = first["distinct_ref_pages_per_frame"]
    assert distinct["frames"] == FRAMES and (distinct["min"], distinct["max"]) == (counts[0], counts[-1])
    assert distinct["median"] == (counts[FRAMES // 2 - 1] + counts[FRAMES // 2]) / 2
    assert sum(distinct["histogram"].values()) == FRAMES
    assert first["params"]["max_per_page"] is None  # off by default, and off leaves run ids as they were:
    params = first["params"]
    old_key = {k: params[k] for k in ("refs", "min_refs", "k_per_patch", "seed", "rule")}
    old_key.update(encoder_id=first["encoder"]["encoder_id"], search_version=1)
    assert first["run_id"] == stable_hash(old_key, 12)

    out = _copy(source, tmp_path / "out")
    capped = run_retrieval(out, encoder="weightfree", max_per_page=2, local=True, **SIZE)
    assert capped["embeddings"]["encoder_images"] == 0 and capped["search"]["chapters_searched"] == 2
    assert capped["run_id"] != first["run_id"] and capped["retrieval_rows"] == 12 * FRAMES
    per_frame: dict[str, dict[str, int]] = {}
    for row in _tables(out)[1].to_pylist():
        pages = per_frame.setdefault(row["frame_id"], {})
        pages[row["ref_page_id"]] = pages.get(row["ref_page_id"], 0) + 1
    assert max(max(pages.values()) for pages in per_frame.values()) <= 2
    assert capped["distinct_ref_pages_per_frame"]["min"] >= 6  # 12 patches, at most 2 per page
    with pytest.raises(ValueError, match="max_per_page=1 cannot fill a frame"):
        run_retrieval(out, encoder="weightfree", refs=4, min_refs=4, max_per_page=1, local=True, **SIZE)


def test_random_references_draw_seeded_patches_from_each_frames_pool(
    weightfree_run: tuple[Path, dict], tmp_path: Path
) -> None:
    """`--random-references` ("without RAP", our reading): each frame's 12 patches drawn without replacement from its
    own pool, the same for the same seed, scores 0, in a run of its own that the summary the shard stage reads
    records (shards built from it are planned apart from the searched ones)."""
    source, searched = weightfree_run
    out = _copy(source, tmp_path / "out")
    argv = ["--data", str(out), "--encoder", "weightfree", "--size", "128x192", "--local", "--random-references"]
    drawn = retrieval_job.main(argv)
    assert drawn["embeddings"]["encoder_images"] == 0 and drawn["search"]["chapters_searched"] == 2
    assert drawn["run_id"] != searched["run_id"] and drawn["retrieval_rows"] == 12 * FRAMES
    assert drawn["params"]["random_references"] is True and "random_references" not in searched["params"]
    assert read_json(out / "retrieval.summary.json")["params"]["random_references"] is True  # what shards record
    assert read_json(out / "retrieval" / "runs" / drawn["run_id"] / "run.json")["random_references"] is True
    pools, retrievals = _tables(out)
    assert pools.equals(_tables(source)[0])  # the seed fixes the pools; only the patches are drawn instead
    pool_of = {row["frame_id"]: row["ref_page_ids"] for row in pools.to_pylist()}
    picked: dict[str, set[tuple[str, int]]] = {}
    for row in retrievals.to_pylist():
        assert row["ref_page_id"] in pool_of[row["frame_id"]] and 0 <= row["ref_patch"] <= 4 and row["score"] == 0
        picked.setdefault(row["frame_id"], set()).add((row["ref_page_id"], row["ref_patch"]))
    assert len(picked) == FRAMES and all(len(patches) == 12 for patches in picked.values())  # no patch twice
    assert not retrievals.equals(_tables(source)[1])

    again = _copy(source, tmp_path / "again")
    assert (
        run_retrieval(again, encoder="weightfree", random_references=True, local=True, **SIZE)["run_id"]
        == (drawn["run_id"])
    )
    assert _tables(again)[1].equals(retrievals)  # same seed, same draw
    reseeded = run_retrieval(again, encoder="weightfree", random_references=True, seed=1, local=True, **SIZE)
    assert reseeded["run_id"] not in (drawn["run_id"], searched["run_id"])
    redrawn = {(r["frame_id"], r["query_patch"], r["rank"]): r["ref_page_id"] for r in _tables(again)[1].to_pylist()}
    assert redrawn != {(r["frame_id"], r["query_patch"], r["rank"]): r["ref_page_id"] for r in retrievals.to_pylist()}

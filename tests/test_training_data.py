"""The ICP and GSRP data streams on the shards `jobs.pipeline` writes (4 shards of 6 samples at 128x192)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipelines.core.geometry import CompositeLayout
from pipelines.core.sample_inputs import build_training_inputs, decode_sample
from pipelines.core.samples import FIELD_RING, FIELDS
from pipelines.shards.writer import write_tar
from screentone.augment import sample_alpha
from training.data import (
    GSRPDataConfig,
    ICPDataConfig,
    build_gsrp_dataset,
    build_icp_dataset,
    crop_window,
    epoch_order,
    gsrp_window,
    icp_canvases,
    resolve_shard_source,
    resolve_train_shards,
)

torch.set_num_threads(1)
SIZE = (128, 192)


def _raw_samples(url: str) -> list[dict]:
    from wids.wids import IndexedTarSamples

    shard = IndexedTarSamples(path=url)
    try:
        return [
            {k: (v.getvalue() if hasattr(v, "getvalue") else v) for k, v in shard[i].items()} for i in range(len(shard))
        ]
    finally:
        shard.close()


def _take(dataset, n: int, batch_size: int = 1, num_workers: int = 0) -> list[dict]:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    out: list[dict] = []
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            out.append({"key": key, "position": int(batch["position"][i]), "bad_skipped": int(batch["bad_skipped"][i])})
        if len(out) >= n:
            return out[:n]
    raise AssertionError("stream ended")


@pytest.fixture(scope="module")
def train_dir(pipeline_data: Path) -> Path:
    return pipeline_data / "shards" / "train"


def test_every_way_of_naming_the_train_split_resolves_to_the_same_shards(pipeline_data: Path, train_dir: Path) -> None:
    expected = [str(train_dir / f"train-g0000-00000{i}.tar") for i in range(4)]
    assert resolve_train_shards(pipeline_data) == expected
    assert resolve_train_shards(pipeline_data / "shards" / "manifest.json") == expected
    assert resolve_train_shards(train_dir / "manifest.json") == expected
    assert resolve_train_shards(train_dir / "index.wids.json") == expected
    assert resolve_train_shards(str(train_dir / "train-g0000-00000{0..3}.tar")) == expected
    assert (
        resolve_train_shards(
            [str(train_dir / "train-g0000-000000.tar"), str(train_dir / "train-g0000-00000{1..3}.tar")]
        )
        == expected
    )
    source = resolve_shard_source(pipeline_data)
    # the current generation's immutable manifest names the dataset (a resumed run keeps reading it)
    assert source.lengths == (6, 6, 6, 6) and source.manifest == str(train_dir / "manifest.g0000.json")
    assert source.sha256 == hashlib.sha256((train_dir / "manifest.g0000.json").read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError, match="no shards manifest"):
        resolve_train_shards(pipeline_data / "benchmark")
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_train_shards(str(train_dir / "train-g0000-00000{7..8}.tar"))


def test_ranks_and_workers_read_disjoint_samples_in_a_seeded_order(pipeline_data: Path) -> None:
    config = ICPDataConfig(batch_size=2)
    per_rank = {
        rank: _take(build_icp_dataset(pipeline_data, config, seed=3, rank=rank, world_size=2), 12, 2, num_workers=2)
        for rank in range(2)
    }
    keys = [s["key"] for rank in range(2) for s in per_rank[rank]]
    assert len(keys) == 24 and len(set(keys)) == 24  # one epoch: every sample once, on exactly one rank
    assert {s["position"] % 2 for s in per_rank[1]} == {1}
    # a rank's batches do not depend on its number of workers, and the order is a pure function of the seed
    single = _take(build_icp_dataset(pipeline_data, config, seed=3, rank=1, world_size=2), 12, 2, num_workers=0)
    assert single == per_rank[1]
    other_seed = _take(build_icp_dataset(pipeline_data, config, seed=4, rank=1, world_size=2), 12, 2)
    assert [s["key"] for s in other_seed] != [s["key"] for s in single]


def test_chapters_are_mixed_and_each_epoch_is_a_new_permutation(pipeline_data: Path, train_dir: Path) -> None:
    source = resolve_shard_source(pipeline_data)
    names = [Path(u).name for u in source.urls]
    first, second = (epoch_order(names, source.lengths, 0, e, 16) for e in (0, 1))
    assert sorted(map(tuple, first)) == [(s, i) for s in range(4) for i in range(6)]
    assert not np.array_equal(first, second)
    # frames of a chapter sit together in a shard (this split is one chapter): mixing shards mixes chapters
    shard_of = {raw["__key__"]: n for n, url in enumerate(source.urls) for raw in _raw_samples(url)}
    head = _take(build_icp_dataset(source, ICPDataConfig(), seed=0, rank=0, world_size=1), 6)
    assert len({shard_of[s["key"]] for s in head}) >= 2
    assert len({s["key"] for s in head}) == 6
    # shuffle_shards=1 keeps a shard's samples together: the first six come from one shard
    together = epoch_order(names, source.lengths, 0, 0, 1)
    assert len(set(together[:6, 0].tolist())) == 1


def test_a_stream_resumed_at_a_sample_count_continues_exactly(pipeline_data: Path) -> None:
    config = ICPDataConfig(batch_size=2)
    full = _take(build_icp_dataset(pipeline_data, config, seed=1, rank=0, world_size=2), 20, 2, num_workers=2)
    resumed = _take(
        build_icp_dataset(pipeline_data, config, seed=1, rank=0, world_size=2, start_sample=6), 14, 2, num_workers=2
    )
    assert resumed == full[6:]
    assert [s["position"] for s in full] == [2 * q for q in range(20)]  # crosses into epoch 1 at q = 12
    with pytest.raises(ValueError, match="multiple of batch size 2"):
        build_icp_dataset(pipeline_data, config, seed=1, rank=0, world_size=2, start_sample=3)


def test_the_trainer_composite_equals_build_training_inputs(train_dir: Path) -> None:
    raw = _raw_samples(str(train_dir / "train-g0000-000001.tar"))[2]
    decoded = decode_sample({k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"})
    for variant, seed, epoch in (("screenstyle", 5, 2), ("grey", 0, 0), ("tone", 0, 0), (0.25, 0, 0)):
        config = ICPDataConfig(variant=variant)
        mine = icp_canvases(raw, config, seed=seed, epoch=epoch)
        reference = build_training_inputs(decoded, variant, seed=seed, epoch=epoch)
        assert mine.alpha == reference.alpha
        for name in ("c_bw", "refs_only", "frame_only"):
            assert np.array_equal(np.asarray(getattr(mine.composite, name)), np.asarray(getattr(reference, name)))
        assert np.array_equal(np.asarray(mine.c_color), np.asarray(reference.c_color))
        assert np.array_equal(mine.composite.mask, reference.mask)
    assert icp_canvases(raw, ICPDataConfig(), seed=5, epoch=2).alpha == sample_alpha(5, 2, decoded.key)


@pytest.mark.parametrize("config", [ICPDataConfig(), ICPDataConfig(crop_scale=(1.0, 2.0), crop_aspect=(0.6, 1.6))])
def test_every_crop_contains_the_whole_frame(config: ICPDataConfig) -> None:
    layout = CompositeLayout(*SIZE)
    frame_left, frame_top, frame_right, frame_bottom = layout.centre_box
    boxes = {
        crop_window(layout, config, seed, epoch, f"key{i}")
        for seed in range(3)
        for epoch in range(3)
        for i in range(60)
    }
    assert len(boxes) > 100  # random, not one fixed box
    for left, top, right, bottom in boxes:
        assert 0 <= left <= frame_left and 0 <= top <= frame_top
        assert frame_right <= right <= 2 * SIZE[0] and frame_bottom <= bottom <= 2 * SIZE[1]
        assert right - left >= SIZE[0] and bottom - top >= SIZE[1]
    widths = [(box[2] - box[0]) / SIZE[0] for box in boxes]
    assert min(widths) < config.crop_scale[0] + 0.15 and max(widths) > config.crop_scale[1] - 0.15


def test_icp_sample_tensors_crop_resize_and_latent_mask(pipeline_data: Path) -> None:
    config = ICPDataConfig(resolution=(64, 96), latent_factor=8)
    sample = next(iter(build_icp_dataset(pipeline_data, config, seed=0, rank=0, world_size=1)))
    for name in ("c_color", "refs_only", "frame_only"):
        assert sample[name].shape == (3, 96, 64) and sample[name].dtype == torch.float32
        assert float(sample[name].min()) >= -1.0 and float(sample[name].max()) <= 1.0
    mask = sample["mask"]
    assert mask.shape == (1, 12, 8) and set(mask.unique().tolist()) <= {0.0, 1.0}
    left, top, right, bottom = sample["crop"].tolist()
    layout = CompositeLayout(*SIZE)
    # nearest-neighbour: each latent cell takes the canvas mask at its source pixel
    ys = top + (np.arange(12) * (bottom - top) / 12).astype(int)
    xs = left + (np.arange(8) * (right - left) / 8).astype(int)
    assert np.array_equal(mask[0].numpy(), layout.mask()[np.ix_(ys, xs)])
    assert float(mask.min()) == 0.0  # the frame is always in the window


def test_gsrp_stream_crops_the_same_window_of_both_frames(pipeline_data: Path, train_dir: Path) -> None:
    raws = {r["__key__"]: r for url in resolve_train_shards(pipeline_data) for r in _raw_samples(url)}
    hires = tuple(json.loads(next(iter(raws.values()))[".json"])["hires_size"])
    for crop in ((64, 96), (512, 512)):
        config = GSRPDataConfig(crop_size=crop)
        dataset = build_gsrp_dataset(pipeline_data, config, seed=2, rank=0, world_size=1)
        for sample, _ in zip(dataset, range(3), strict=False):
            raw = raws[sample["key"]]
            reference = build_training_inputs(
                decode_sample({k: v for k, v in raw.items() if k.startswith(".") or k == "__key__"}), seed=2, epoch=0
            )
            box = tuple(sample["crop"].tolist())
            assert box == gsrp_window(hires, crop, 2, 0, sample["key"])
            assert (box[2] - box[0], box[3] - box[1]) == (min(crop[0], hires[0]), min(crop[1], hires[1]))
            assert sample["alpha"] == reference.alpha == sample_alpha(2, 0, sample["key"])
            expected_bw = np.asarray(reference.hr_bw.crop(box), dtype=np.float32) / 127.5 - 1
            expected_color = np.asarray(reference.hr_color.crop(box), dtype=np.float32) / 127.5 - 1
            assert np.allclose(sample["hr_bw"].permute(1, 2, 0).numpy(), expected_bw, atol=1e-6)
            assert np.allclose(sample["hr_color"].permute(1, 2, 0).numpy(), expected_color, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 8"):
        GSRPDataConfig(crop_size=(100, 100))


def test_a_bad_sample_is_logged_counted_and_replaced_without_shifting_batches(
    pipeline_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    urls = resolve_train_shards(pipeline_data)
    raws = _raw_samples(urls[0])
    broken_key = raws[3]["__key__"]
    samples = [{"__key__": r["__key__"], **{f: r["." + f] for f in FIELDS}} for r in raws]
    samples[3][FIELD_RING] = b"not a jpeg"
    write_tar(tmp_path / "broken-000000.tar", samples)
    shutil.copy(urls[1], tmp_path / "train-000001.tar")
    data = [str(tmp_path / "broken-000000.tar"), str(tmp_path / "train-000001.tar")]
    with caplog.at_level(logging.WARNING, logger="training.data"):
        stream = _take(build_icp_dataset(data, ICPDataConfig(batch_size=3), seed=0, rank=0, world_size=1), 12, 3)
    assert [s["position"] for s in stream] == list(range(12))  # every position still fills its slot
    assert broken_key not in {s["key"] for s in stream}
    assert sum(s["bad_skipped"] for s in stream) == 1
    assert len({s["key"] for s in stream}) == 11  # the substitute is the next good sample, read once more
    assert any("bad sample skipped" in r.getMessage() and "broken-000000.tar" in r.getMessage() for r in caplog.records)


def test_each_stream_reads_only_its_own_members(pipeline_data: Path, tmp_path: Path) -> None:
    raws = _raw_samples(resolve_train_shards(pipeline_data)[0])
    samples = [{"__key__": r["__key__"], **{f: r["." + f] for f in FIELDS}} for r in raws]
    for sample in samples:
        sample["hr_color.jpg"] = b"broken GSRP member"
    write_tar(tmp_path / "train-000000.tar", samples)
    data = str(tmp_path / "train-000000.tar")
    icp = _take(build_icp_dataset(data, ICPDataConfig(), seed=0, rank=0, world_size=1), 6)
    assert sum(s["bad_skipped"] for s in icp) == 0  # ICP never decodes hr_color.jpg
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        _take(build_gsrp_dataset(data, GSRPDataConfig(), seed=0, rank=0, world_size=1), 1)

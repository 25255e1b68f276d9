"""`--fit-resample`: the data pipeline's page fit as an option. The default (Lanczos) records nothing new, so datasets
built before the option stay current; bicubic (the released app's fit) reaches the retrieval patches, the screentone
renders and the frames, and the shard stage refuses tone rendered from the other fit."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import PIPELINE_ARGS
from PIL import Image

from jobs.pipeline import main as pipeline_main
from jobs.shards import main as shards_main
from pipelines.core.encoders import resolve_encoder
from pipelines.core.errors import PreconditionError
from pipelines.core.geometry import RESAMPLE_BICUBIC, RESAMPLE_LANCZOS, fit_box, fit_image
from pipelines.core.layout import DataLayout
from pipelines.core.pagestore import decode_page, read_chapter_pages
from pipelines.core.patches import patch_geometry
from pipelines.core.samples import SampleConfig
from pipelines.core.schemas import SCREENTONE
from pipelines.core.storage import read_json, read_parquet
from pipelines.runner import STAGES, PipelineOptions
from pipelines.screentone.stage import ScreentoneOptions, frame_seed, recorded_options
from pipelines.shards.stage import ShardOptions
from screentone.render import renderer_for


def test_the_default_fit_records_nothing_new() -> None:
    assert "fit_resample" not in patch_geometry(512, 800)
    assert "fit_resample" not in ShardOptions().recorded()
    assert "fit_resample" not in SampleConfig().to_json()
    assert "fit_resample" not in recorded_options(ScreentoneOptions())
    assert all("fit_resample" not in PipelineOptions().stage_settings(stage) for stage in STAGES)
    assert patch_geometry(512, 800, RESAMPLE_BICUBIC)["fit_resample"] == RESAMPLE_BICUBIC


def test_a_bicubic_dataset_fits_patches_tone_and_frames_bicubic(tmp_path: Path) -> None:
    data = tmp_path / "data"
    argv = ["--generate-sample", str(tmp_path / "corpus"), "--output", str(data), *PIPELINE_ARGS]
    record = pipeline_main([*argv, "--fit-resample", "bicubic"])
    assert record["complete"]
    layout = DataLayout.at(data)
    width, height = 128, 192

    encoder_id = read_json(layout.summary("retrieval"))["encoder"]["encoder_id"]
    lanczos_id = resolve_encoder("weightfree").with_patch_geometry(patch_geometry(width, height)).encoder_id
    bicubic_id = (
        resolve_encoder("weightfree").with_patch_geometry(patch_geometry(width, height, RESAMPLE_BICUBIC)).encoder_id
    )
    assert encoder_id == bicubic_id != lanczos_id  # its own embeddings folder: a Lanczos cache is never overwritten

    folder = data / read_json(layout.summary("screentone"))["folder"]
    part = sorted(folder.glob("*.parquet"))[0]
    rows = [r for r in read_parquet(part, SCREENTONE).to_pylist() if r["variant"] == "train" and r["status"] == "ok"]
    row = rows[0]
    page = decode_page(read_chapter_pages(layout, row["chapter_id"])[row["frame_id"]])
    renderer = renderer_for("halftone", None)
    seed = frame_seed(0, row["frame_id"], "train")
    stored = np.asarray(Image.open(io.BytesIO(row["image"])))
    bicubic = renderer.render(np.asarray(fit_image(page, width, height, resample=RESAMPLE_BICUBIC)), seed)
    lanczos = renderer.render(np.asarray(fit_image(page, width, height, resample=RESAMPLE_LANCZOS)), seed)
    assert np.array_equal(stored, bicubic) and not np.array_equal(stored, lanczos)

    manifest = read_json(layout.shards_manifest)
    assert manifest["sample"]["fit_resample"] == manifest["options"]["fit_resample"] == RESAMPLE_BICUBIC
    tar = sorted(layout.shards("train").glob("*.tar"))[0]
    with tarfile.open(tar) as members:
        meta = json.loads(members.extractfile(next(m for m in members if m.name.endswith(".json"))).read())
    source_w, source_h = meta["source_size"]
    assert meta["fit_box"] == list(fit_box(source_w, source_h, width, height, truncate=True))

    # tone rendered from the bicubic fit never pairs with Lanczos-fitted frames
    with pytest.raises(PreconditionError, match="--fit-resample bicubic"):
        shards_main(
            ["--data", str(data), "--size", "128x192", "--local", "--max-samples", "6", "--bench-chapters", "1"]
        )

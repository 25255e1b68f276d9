"""The report a person looks at after a run: contact sheets of retrievals, screentone blends and training samples.

Everything is drawn from the stored outputs (page store, retrievals, screentone renderings, shards), so the report
shows exactly what training will read.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.core.layout import DataLayout
from pipelines.core.storage import atomic_path, atomic_write_json, read_json

TRAIN_SPLIT = "train"


def _save(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def screentone_sheet(layout: DataLayout, path: Path, *, frames: int = 3) -> Path:
    """colour | grey | tone | blends for the first frames of the first kept chapter, from stored renderings."""
    from pipelines.core.geometry import fit_image
    from pipelines.core.pagestore import kept_chapter_ids, load_chapter_images
    from pipelines.shards.writer import read_screentone_chapter
    from screentone.contact_sheet import SheetRow, write_contact_sheet

    summary = read_json(layout.summary("screentone"))
    width, height = summary["sizes"]["train"]
    chapter = kept_chapter_ids(layout)[0]
    tones = read_screentone_chapter(layout, summary["renderer_id"], (width, height), chapter)
    rows = []
    for frame_id, page in sorted(load_chapter_images(layout, chapter).items())[:frames]:
        tone = np.asarray(Image.open(io.BytesIO(tones[(frame_id, "train")])))
        rows.append(SheetRow(color=np.asarray(fit_image(page, width, height)), tone=tone, label=frame_id))
    return write_contact_sheet(rows, path)


def training_sample_sheets(layout: DataLayout, folder: Path, *, samples: int = 2, variant: float = 0.5) -> list[Path]:
    """For a few train samples: C_bw | mask | C_color, rebuilt from the shard alone as training will."""
    import webdataset as wds

    from pipelines.core.sample_inputs import build_training_inputs

    manifest = read_json(layout.shards_manifest)
    shards = [s for s in manifest["splits"][TRAIN_SPLIT]["shards"]]
    urls = [str(layout.shards(TRAIN_SPLIT) / s["name"]) for s in shards[:1]]
    written = []
    for sample in wds.WebDataset(urls, shardshuffle=False).slice(samples):
        inputs = build_training_inputs(sample, variant)
        mask = Image.fromarray((inputs.mask * 255).astype(np.uint8), mode="L").convert("RGB")
        gap = 16
        sheet = Image.new("RGB", (3 * inputs.c_bw.width + 2 * gap, inputs.c_bw.height), (96, 96, 96))
        for i, panel in enumerate((inputs.c_bw, mask, inputs.c_color)):
            sheet.paste(panel, (i * (inputs.c_bw.width + gap), 0))
        written.append(_save(sheet, folder / f"sample_{sample['__key__']}.png"))
    return written


def write_report(
    data: str | os.PathLike,
    report_dir: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    retrieval_frames: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Contact sheets + counts under `report_dir`: how diverse the retrievals are (distinct reference pages per
    frame, and the cap used), and with sample-corpus labels the retrieval character hit rate."""
    from pipelines.retrieval.inspect import character_hit_rate, write_contact_sheets

    layout = DataLayout.at(data)
    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    retrieval = read_json(layout.summary("retrieval"))
    report: dict[str, Any] = {
        "retrieval_cap": {"max_per_page": retrieval["params"].get("max_per_page")},
        "distinct_ref_pages_per_frame": retrieval.get("distinct_ref_pages_per_frame"),
        "pool_refs_per_frame": retrieval.get("pool_refs_per_frame"),  # fewest and most references in a usable pool
        "retrieval_sheets": [
            str(p)
            for p in write_contact_sheets(data, random_frames=retrieval_frames, seed=seed, out_dir=folder / "retrieval")
        ],
        "screentone_sheet": str(screentone_sheet(layout, folder / "screentone_blends.png")),
        "training_samples": [str(p) for p in training_sample_sheets(layout, folder / "samples")],
        "stages": {
            stage: read_json(layout.summary(stage)) for stage in ("ingest", "retrieval", "screentone", "shards")
        },
    }
    if labels is not None:
        report["retrieval_character_hit_rate"] = character_hit_rate(data, labels).as_dict()
    atomic_write_json(folder / "report.json", report)
    return report

"""Upstream outputs for the shard-stage tests, written through the project's schemas and storage helpers.

Small and fast: colour pages from `screentone.synthetic`, a page store, whole-page embeddings from the
weight-free encoder, a deterministic retrievals table and real screentone renderings (`run_screentone`).
Pages can be planted as near-duplicates of other pages (re-encoded copies) to exercise the leakage check.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.core.encoders import WEIGHT_FREE, load_encoder, resolve_encoder
from pipelines.core.geometry import WHOLE_PAGE_PATCH
from pipelines.core.layout import DataLayout
from pipelines.core.pagestore import encode_page, write_chapter_pages
from pipelines.core.schemas import CHAPTERS, EMBEDDINGS, PAGES, RETRIEVALS, STATUS_OK, table_from_rows
from pipelines.core.storage import atomic_write_bytes, atomic_write_json, write_marker, write_parquet
from pipelines.screentone.stage import ScreentoneOptions, run_screentone
from screentone.synthetic import synthetic_color_page


@dataclass
class Corpus:
    root: Path
    series: list[str]
    pages: dict[str, dict] = field(default_factory=dict)  # page_id -> page row
    planted: dict[str, str] = field(default_factory=dict)  # planted copy page_id -> original page_id

    @property
    def layout(self) -> DataLayout:
        return DataLayout.at(self.root)


def page_id_of(series: str, chapter: str, index: int) -> str:
    return hashlib.sha1(f"{series}/{chapter}/{index:03d}.jpg".encode()).hexdigest()[:16]


def chapter_id_of(series: str, chapter: str) -> str:
    return hashlib.sha1(f"{series}/{chapter}".encode()).hexdigest()[:16]


def _page_image(series_index: int, chapter_index: int, page_index: int, size: tuple[int, int]) -> Image.Image:
    seed = 1000 * series_index + 100 * chapter_index + page_index
    return Image.fromarray(synthetic_color_page(size[1], size[0], seed=seed))


def build_corpus(
    root: Path,
    *,
    series: int = 5,
    chapters_per_series: int = 2,
    pages_per_chapter: int = 8,
    page_size: tuple[int, int] = (160, 240),
    plant: list[tuple[tuple[int, int, int], tuple[int, int]]] = (),
    render: tuple[int, int] | None = (128, 192),
    hires_scale: float = 1.5,
) -> Corpus:
    """Write pages, chapters, page store, embeddings, retrievals (+ screentone if `render`) under `root`.

    `plant`: ((series, chapter, page) of an original, (series, chapter) it is copied into as an extra page).
    """
    layout = DataLayout.at(root)
    names = [f"s{i}" for i in range(series)]
    corpus = Corpus(root=Path(root), series=names)
    images: dict[str, dict[str, Image.Image]] = {}
    page_rows, chapter_rows = [], []
    extra: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for original, target in plant:
        extra.setdefault(target, []).append(original)
    for si, s in enumerate(names):
        for ci in range(chapters_per_series):
            chapter = f"ch{ci:02d}"
            cid = chapter_id_of(s, chapter)
            chapter_images: dict[str, Image.Image] = {}
            specs = [
                (page_index, _page_image(si, ci, page_index, page_size), None)
                for page_index in range(pages_per_chapter)
            ]
            for n, (osi, oci, opi) in enumerate(extra.get((si, ci), [])):
                copy = _page_image(osi, oci, opi, page_size)
                buf = io.BytesIO()
                copy.save(buf, format="JPEG", quality=88)  # the same art, re-saved
                original_id = page_id_of(names[osi], f"ch{oci:02d}", opi)
                specs.append((pages_per_chapter + n, Image.open(buf).convert("RGB"), original_id))
            for page_index, image, original_id in specs:
                pid = page_id_of(s, chapter, page_index)
                chapter_images[pid] = image
                if original_id:
                    corpus.planted[pid] = original_id
                row = {
                    "page_id": pid,
                    "chapter_id": cid,
                    "series": s,
                    "chapter": chapter,
                    "page_index": page_index,
                    "source": f"{s}/{chapter}/{page_index:03d}.jpg",
                    "width": image.width,
                    "height": image.height,
                    "is_color": True,
                    "stored": True,
                    "status": STATUS_OK,
                }
                page_rows.append(row)
                corpus.pages[pid] = row
            images[cid] = chapter_images
            n = len(chapter_images)
            chapter_rows.append(
                {
                    "chapter_id": cid,
                    "series": s,
                    "chapter": chapter,
                    "source": f"{s}/{chapter}",
                    "kind": "folder",
                    "n_pages": n,
                    "n_color": n,
                    "n_bw": 0,
                    "n_error": 0,
                    "kept": True,
                    "status": STATUS_OK,
                }
            )
            store = [
                {
                    "page_id": pid,
                    "chapter_id": cid,
                    "width": im.width,
                    "height": im.height,
                    "encoding": "jpeg",
                    "image": encode_page(im, "jpeg"),
                }
                for pid, im in chapter_images.items()
            ]
            write_chapter_pages(layout, cid, store)
    write_parquet(table_from_rows(page_rows, PAGES), layout.pages, PAGES)
    write_parquet(table_from_rows(chapter_rows, CHAPTERS), layout.chapters, CHAPTERS)
    atomic_write_json(
        layout.summary("ingest"), {"stage": "ingest", "complete": True, "note": "written by tests/shard_inputs.py"}
    )
    _write_embeddings(layout, images)
    _write_retrievals(layout, images)
    if render is not None:
        run_screentone(
            str(root), ScreentoneOptions(width=render[0], height=render[1], hires_scale=hires_scale), local=True
        )
    return corpus


def _write_embeddings(layout: DataLayout, images: dict[str, dict[str, Image.Image]]) -> None:
    info = resolve_encoder(WEIGHT_FREE)
    encoder = load_encoder(info)
    folder = layout.embeddings(info.encoder_id)
    for cid, chapter_images in sorted(images.items()):
        ids = sorted(chapter_images)
        prepare = info.preparer()
        vectors = encoder.embed(np.stack([prepare(chapter_images[p]) for p in ids])).astype(np.float16)
        rows = [{"page_id": p, "role": "ref", "patch": WHOLE_PAGE_PATCH, "row": i} for i, p in enumerate(ids)]
        buf = io.BytesIO()
        np.save(buf, vectors)
        atomic_write_bytes(folder / f"{cid}.npy", buf.getvalue())
        write_parquet(table_from_rows(rows, EMBEDDINGS), folder / f"{cid}.parquet", EMBEDDINGS)
        write_marker(folder / cid, {"version": "shard_inputs", "rows": len(rows)})  # last, as the retrieval job does
    atomic_write_json(
        layout.summary("retrieval"),
        {"complete": True, "encoder": {"encoder_id": info.encoder_id, "fingerprint": info.fingerprint}},
    )


def _write_retrievals(layout: DataLayout, images: dict[str, dict[str, Image.Image]]) -> None:
    """Each frame's 12 cells point at other pages of its chapter, in a fixed pattern (not a real search)."""
    rows = []
    for cid, chapter_images in sorted(images.items()):
        ids = sorted(chapter_images)
        for fi, frame in enumerate(ids):
            others = [p for p in ids if p != frame]
            for query_patch in range(4):
                for rank in range(3):
                    rows.append(
                        {
                            "frame_id": frame,
                            "chapter_id": cid,
                            "query_patch": query_patch,
                            "rank": rank,
                            "ref_page_id": others[(fi + query_patch + rank) % len(others)],
                            "ref_patch": (query_patch + rank) % 5,
                            "score": 0.9 - 0.1 * rank,
                        }
                    )
    write_parquet(table_from_rows(rows, RETRIEVALS), layout.retrievals, RETRIEVALS)

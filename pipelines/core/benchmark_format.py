"""The benchmark folder's format, as every reader sees it: its version, layout, style names and readers.

The shards stage writes the folder (`pipelines.shards.benchmark`); colorize and evaluate read it through here, so
a format change is made in one place and a reader of another version refuses with a clear error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipelines.core.seeding import derive_seed
from pipelines.core.storage import read_json

EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
BENCHMARK_FORMAT_VERSION = 2
GREY_STYLE = "grey"
LINE_ART_STYLES = ("sketch", "shading")  # the line-art family's inputs; their renderer id is the line extractor's
FOLDER_LAYOUT = {
    "index": "<chapter_id>/index.json",
    "refs": "<chapter_id>/refs/<page_id>.<ext> (colour, as stored)",
    "gt": "<chapter_id>/gt/<page_id>.jpg (colour ground truth at the benchmark size)",
    "bw_grey": "<chapter_id>/bw_grey/<page_id>.png (greyscale input)",
    "bw_<style>": "<chapter_id>/bw_<style>/<page_id>.png (screentone input; <style> = renderer id prefix)",
    "bw_sketch": "<chapter_id>/bw_sketch/<page_id>.png (line art of the greyscale input)",
    "bw_shading": "<chapter_id>/bw_shading/<page_id>.png (that line art shaded by the greyscale input)",
}


def style_of(renderer_id: str) -> str:
    """The style name of a screentone renderer: the prefix of its id (``halftone``, ``screenstyle``)."""
    style = renderer_id.split("-", 1)[0]
    if not style or style in (GREY_STYLE, *LINE_ART_STYLES):
        raise ValueError(f"renderer id {renderer_id!r} does not name a screentone style")
    return style


def benchmark_styles(renderer_id: str, line_extractor_id: str) -> dict[str, dict[str, str]]:
    """style -> {folder, renderer_id}: greyscale, the screentone style of `renderer_id` and the line-art styles
    (made by the line extractor `line_extractor_id`)."""
    return {
        GREY_STYLE: {"folder": f"bw_{GREY_STYLE}", "renderer_id": GREY_STYLE},
        style_of(renderer_id): {"folder": f"bw_{style_of(renderer_id)}", "renderer_id": renderer_id},
        **{style: {"folder": f"bw_{style}", "renderer_id": line_extractor_id} for style in LINE_ART_STYLES},
    }


def _check_format(document: dict[str, Any], path: Path) -> dict[str, Any]:
    version = document.get("format_version") if isinstance(document, dict) else None
    if version != BENCHMARK_FORMAT_VERSION:
        raise ValueError(
            f"{path}: benchmark format_version {version!r}, this code reads version {BENCHMARK_FORMAT_VERSION}; "
            "rebuild the benchmark with `python -m jobs.shards --data OUT`"
        )
    return document


def read_benchmark(root: str | os.PathLike) -> dict[str, Any]:
    """``benchmark.json`` of a benchmark folder; ValueError on another format version, FileNotFoundError if absent."""
    path = Path(root) / "benchmark.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no benchmark.json; the benchmark folder is incomplete or not one")
    return _check_format(read_json(path), path)


def read_chapter_index(root: str | os.PathLike, chapter_id: str) -> dict[str, Any]:
    """``<chapter_id>/index.json`` of a benchmark folder, checked like `read_benchmark`."""
    path = Path(root) / chapter_id / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index.json for chapter {chapter_id!r} in the benchmark folder")
    return _check_format(read_json(path), path)


def page_seed(seed: int, page_id: str) -> int:
    """The screentone seed of a benchmark page: fixed by the seed and the page, independent of order."""
    return derive_seed(seed, "screentone", page_id, "bench")

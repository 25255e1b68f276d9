"""What `evaluation.scoring` writes for people: tables (CSV, Markdown) beside the paper's figures, image grids.

Numbers are formatted one way everywhere: an infinite PSNR (a prediction identical to its ground truth) is
written ``inf``; a metric that was not computed is empty in CSV and ``—`` in Markdown.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from pipelines.core.storage import atomic_write_bytes

METRICS = ("clip_is", "fid", "psnr", "ssim", "aesthetic")
LABELS = {"clip_is": "CLIP-IS", "fid": "FID", "psnr": "PSNR", "ssim": "SSIM", "aesthetic": "AS"}
HIGHER_IS_BETTER = {"clip_is": True, "fid": False, "psnr": True, "ssim": True, "aesthetic": True}
DECIMALS = {"clip_is": 4, "fid": 2, "psnr": 2, "ssim": 4, "aesthetic": 3}
PAGE_METRICS = ("psnr", "ssim", "clip_is", "aesthetic")  # per-page values (FID is a set metric)

# ColorFlow paper, ColorFlow-Bench results (table of the main comparison), by input style.
PAPER_FIGURES = {
    "screenstyle": {"clip_is": 0.9419, "fid": 13.37, "psnr": 25.88, "ssim": 0.9541, "aesthetic": 4.924},
    "grey": {"clip_is": 0.9433, "fid": 12.17, "psnr": 26.01, "ssim": 0.9579, "aesthetic": 5.011},
}
PAPER_ROW_NAME = {"screenstyle": "paper: ColorFlow, screenstyle", "grey": "paper: ColorFlow, greyscale"}
COLUMNS = ("scope", "style", "pages", "scored", "failed", *METRICS)


def json_value(value: float | None) -> float | str | None:
    """A metric value for JSON, which has no infinity: ``inf`` becomes the string ``"inf"``."""
    if value is None:
        return None
    return "inf" if math.isinf(value) else float(value)


def format_value(metric: str, value: float | None, empty: str = "") -> str:
    if value is None:
        return empty
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{DECIMALS[metric]}f}"


def paper_row(paper_style: str | None) -> dict[str, Any] | None:
    """The paper's figures as a table row for the style they were measured on (None: no paper row)."""
    if paper_style is None:
        return None
    return {"scope": PAPER_ROW_NAME[paper_style], "style": paper_style, **PAPER_FIGURES[paper_style]}


def table_csv(rows: Sequence[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        cells = [row.get(c, "") for c in COLUMNS[:5]]
        writer.writerow([*("" if c is None else c for c in cells), *(format_value(m, row.get(m)) for m in METRICS)])
    return out.getvalue().encode()


def table_markdown(title: str, rows: Sequence[dict[str, Any]], notes: Sequence[str]) -> bytes:
    arrows = {m: "↑" if HIGHER_IS_BETTER[m] else "↓" for m in METRICS}
    header = ["scope", "style", "pages", "scored", "failed", *(f"{LABELS[m]} {arrows[m]}" for m in METRICS)]
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:
        cells = [str(row.get(c, "") if row.get(c) is not None else "") for c in COLUMNS[:5]]
        cells += [format_value(m, row.get(m), "—") for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return ("\n".join(lines) + "\n").encode()


def write_tables(folder: Path, name: str, title: str, rows: Sequence[dict[str, Any]], notes: Sequence[str]) -> None:
    """``<name>.csv`` and ``<name>.md`` in `folder`, each written atomically."""
    atomic_write_bytes(folder / f"{name}.csv", table_csv(rows))
    atomic_write_bytes(folder / f"{name}.md", table_markdown(title, rows, notes))


# ----------------------------------------------------------------------------------------------------------------
# Grids


@dataclass(frozen=True)
class GridPage:
    caption: str
    truth: Path
    prediction: Path


def ranked(pages: Sequence[tuple[str, float]], metric: str, count: int) -> tuple[list[str], list[str]]:
    """(best, worst) page keys by a metric, `count` each, best first / worst first; ties in key order."""
    sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
    order = [key for key, _ in sorted(pages, key=lambda kv: (sign * kv[1], kv[0]))]
    return order[:count], order[::-1][:count]


def _thumbnail(path: Path, height: int) -> Image.Image:
    with Image.open(path) as image:
        image = image.convert("RGB")
        width = max(1, round(image.width * height / image.height))
        return image.resize((width, height), Image.Resampling.LANCZOS)


def _cell(page: GridPage, height: int) -> Image.Image:
    """Ground truth | prediction side by side, the caption below."""
    truth, prediction = _thumbnail(page.truth, height), _thumbnail(page.prediction, height)
    caption_height = 14
    cell = Image.new("RGB", (truth.width + prediction.width + 4, height + caption_height), "white")
    cell.paste(truth, (0, 0))
    cell.paste(prediction, (truth.width + 4, 0))
    ImageDraw.Draw(cell).text((2, height + 1), page.caption, fill="black")
    return cell


def write_grid(path: Path, title: str, best: Sequence[GridPage], worst: Sequence[GridPage], height: int = 192) -> None:
    """One JPEG: a row of the best pages and a row of the worst, each cell ground truth | prediction."""
    rows = [
        (f"best by {title}", [_cell(p, height) for p in best]),
        (f"worst by {title}", [_cell(p, height) for p in worst]),
    ]
    label_height, gap = 16, 6
    width = max(sum(c.width + gap for c in cells) for _, cells in rows) + gap
    row_height = height + 14 + label_height + gap
    sheet = Image.new("RGB", (max(width, 240), row_height * len(rows) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, cells) in enumerate(rows):
        top = gap + r * row_height
        draw.text((gap, top), f"{label}  (each: ground truth | prediction)", fill="black")
        x = gap
        for cell in cells:
            sheet.paste(cell, (x, top + label_height))
            x += cell.width + gap
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=90)
    atomic_write_bytes(path, buffer.getvalue())

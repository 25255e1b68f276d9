"""Contact sheets of the screenstyle augmentation: colour | grey | tone | blends at the evaluation alphas.

Every panel is pasted at its native resolution (a rescaled tone would show moire, not the tone), one row per
page, with a caption strip above each column. Used by the demo report to show what training inputs look like.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from screentone.augment import EVAL_ALPHAS, blend, to_grey
from screentone.render import ScreentoneRenderer

_CAPTION_HEIGHT = 18
_GAP = 8
_BACKGROUND = (96, 96, 96)


@dataclass(frozen=True)
class SheetRow:
    """One page: its colour image (H x W x 3 uint8) and its screentone (H x W uint8, same size)."""

    color: np.ndarray
    tone: np.ndarray
    label: str = ""


def build_contact_sheet(rows: Sequence[SheetRow], alphas: Sequence[float] = EVAL_ALPHAS) -> Image.Image:
    """The sheet as an RGB image: columns colour, grey, tone, then one blend per alpha."""
    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    panels_per_row = [_panels(row, alphas) for row in rows]
    captions = ["colour", "grey", "tone", *(f"blend a={a:g}" for a in alphas)]
    column_widths = [max(panels[i][1].width for panels in panels_per_row) for i in range(len(captions))]
    row_heights = [max(image.height for _, image in panels) for panels in panels_per_row]
    width = sum(column_widths) + _GAP * (len(captions) + 1)
    height = sum(h + _CAPTION_HEIGHT + _GAP for h in row_heights) + _GAP
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = _GAP
    for row, panels, row_height in zip(rows, panels_per_row, row_heights, strict=True):
        x = _GAP
        for (caption, image), column_width in zip(panels, column_widths, strict=True):
            text = f"{row.label}: {caption}" if row.label and caption == "colour" else caption
            draw.text((x + 2, y + 3), text, fill=(255, 255, 255))
            sheet.paste(image.convert("RGB"), (x, y + _CAPTION_HEIGHT))
            x += column_width + _GAP
        y += row_height + _CAPTION_HEIGHT + _GAP
    return sheet


def _panels(row: SheetRow, alphas: Sequence[float]) -> list[tuple[str, Image.Image]]:
    color = np.asarray(row.color)
    grey = to_grey(color)
    if grey.shape != row.tone.shape:
        raise ValueError(f"row {row.label!r}: tone {row.tone.shape} does not match the page {grey.shape}")
    panels = [
        ("colour", Image.fromarray(color)),
        ("grey", Image.fromarray(grey)),
        ("tone", Image.fromarray(row.tone)),
    ]
    panels += [(f"blend a={a:g}", Image.fromarray(blend(grey, row.tone, a))) for a in alphas]
    return panels


def write_contact_sheet(
    rows: Sequence[SheetRow], path: str | os.PathLike, alphas: Sequence[float] = EVAL_ALPHAS
) -> Path:
    """Write the sheet as PNG atomically (temporary file, then rename) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        build_contact_sheet(rows, alphas).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def render_contact_sheet(
    pages: Sequence[np.ndarray],
    renderer: ScreentoneRenderer,
    path: str | os.PathLike,
    *,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    alphas: Sequence[float] = EVAL_ALPHAS,
) -> Path:
    """Render each colour page with ``renderer`` (page i with seed ``seed + i``) and write the sheet."""
    labels = list(labels) if labels is not None else [f"page {i}" for i in range(len(pages))]
    if len(labels) != len(pages):
        raise ValueError(f"got {len(labels)} labels for {len(pages)} pages")
    rows = [
        SheetRow(color=page, tone=renderer.render(page, seed + i), label=label)
        for i, (page, label) in enumerate(zip(pages, labels, strict=True))
    ]
    return write_contact_sheet(rows, path, alphas)

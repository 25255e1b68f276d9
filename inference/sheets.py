"""Contact sheet of one coloured page: the B&W input with its query boxes, the 12 retrieved references, the output.

The left part is the retrieval contact sheet the data side draws (`pipelines.core.contact_sheets.draw_contact_sheet`:
input, one row per query box with its 3 references, best first, captioned with reference and score); the
coloured page is added on the right at the same height, so a glance tells whether a bad colour came from bad
references or from the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pipelines.core.contact_sheets import BACKGROUND, TEXT, RetrievedPatch, draw_contact_sheet
from pipelines.core.geometry import QUERY_PATCH_NAMES, RANKS_PER_PATCH, quadrant_boxes, reference_boxes

SHEET_HEIGHT = 480


def colorize_sheet(
    bw: Image.Image,
    grid: list[dict[str, Any]],
    fitted_refs: Mapping[str, Image.Image],
    output: Image.Image | None,
    *,
    title: str,
    height: int = SHEET_HEIGHT,
) -> Image.Image:
    """The sheet: `bw` is the W x H frame ICP saw, `grid` its 12 retrieval rows, `output` the coloured page."""
    boxes = reference_boxes(bw.width, bw.height)
    rows: list[list[RetrievedPatch]] = [[] for _ in QUERY_PATCH_NAMES]
    for row in sorted(grid, key=lambda r: (r["query_patch"], r["rank"])):
        if row["rank"] < RANKS_PER_PATCH:
            patch = fitted_refs[row["ref_page_id"]].crop(boxes[row["ref_patch"]])
            rows[row["query_patch"]].append(RetrievedPatch(patch, row["ref_page_id"], row["ref_patch"], row["score"]))
    left = draw_contact_sheet(bw, quadrant_boxes(bw.width, bw.height), rows, title=title, frame_height=height)
    if output is None:
        return left
    pad = 10
    scale = height / output.height
    shown = output.convert("RGB").resize((max(1, round(output.width * scale)), height), Image.Resampling.LANCZOS)
    sheet = Image.new("RGB", (left.width + shown.width + pad, left.height), BACKGROUND)
    sheet.paste(left, (0, 0))
    top = left.height - height - pad
    sheet.paste(shown, (left.width, top))
    label_font = ImageFont.load_default(size=14)
    ImageDraw.Draw(sheet).text((left.width, max(0, top - 18)), "output", fill=TEXT, font=label_font)
    return sheet

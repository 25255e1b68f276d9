"""Contact sheets of retrievals (pure PIL): see at a glance whether a frame's references make sense.

Left: the black-and-white frame with its four query boxes, each in its own colour. Right: one row per query
box: the query crop framed in the box's colour, then its retrieved reference patches (best first), each
captioned with its page id, patch name and score. The demo report reuses `draw_contact_sheet`.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from pipelines.core.geometry import QUERY_PATCH_NAMES, Box

QUERY_COLORS: tuple[tuple[int, int, int], ...] = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48))
PATCH_NAMES = (*QUERY_PATCH_NAMES, "page")
BACKGROUND = (250, 250, 250)
TEXT = (20, 20, 20)


@dataclass(frozen=True)
class RetrievedPatch:
    image: Image.Image  # the reference patch as cropped from the fitted colour page
    page_id: str
    patch: int  # 0..3 quadrants, 4 whole page
    score: float


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _thumbnail(image: Image.Image, box_w: int, box_h: int) -> Image.Image:
    """Fit inside box_w x box_h keeping the aspect ratio."""
    scale = min(box_w / image.width, box_h / image.height)
    return image.convert("RGB").resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
    )


def draw_contact_sheet(
    frame_bw: Image.Image,
    query_boxes: list[Box],
    retrieved: list[list[RetrievedPatch]],
    *,
    title: str = "",
    frame_height: int = 720,
) -> Image.Image:
    """The sheet for one frame: `retrieved[q]` are query patch q's references, best first."""
    if len(query_boxes) != len(retrieved):
        raise ValueError(f"{len(query_boxes)} query boxes but {len(retrieved)} rows of retrievals")
    pad, caption_h, title_h = 10, 34, 30 if title else 0
    scale = frame_height / frame_bw.height
    frame_w = round(frame_bw.width * scale)
    n_rows = len(query_boxes)
    n_cols = 1 + max((len(r) for r in retrieved), default=0)
    cell_h = (frame_height - (n_rows - 1) * pad) // n_rows
    thumb_h = cell_h - caption_h
    thumb_w = max(1, round(thumb_h * frame_bw.width / frame_bw.height))
    cell_w = max(thumb_w, 150)
    width = pad + frame_w + 2 * pad + n_cols * (cell_w + pad)
    height = title_h + pad + frame_height + pad
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    small, label_font = _font(12), _font(16)
    if title:
        draw.text((pad, 6), title, fill=TEXT, font=label_font)

    top = title_h + pad
    sheet.paste(frame_bw.convert("RGB").resize((frame_w, frame_height), Image.Resampling.LANCZOS), (pad, top))
    for q, box in enumerate(query_boxes):
        inset = 2 * q  # the boxes overlap by design; offsetting them keeps all four visible
        left, upper, right, lower = (round(v * scale) for v in box)
        outline = (pad + left + inset, top + upper + inset, pad + right - 1 - inset, top + lower - 1 - inset)
        draw.rectangle(outline, outline=QUERY_COLORS[q], width=3)
        name = QUERY_PATCH_NAMES[q]
        text_x = outline[0] + 4 if q in (0, 2) else outline[2] - 28
        text_y = outline[1] + 4 if q in (0, 1) else outline[3] - 22
        draw.rectangle((text_x - 2, text_y - 1, text_x + 24, text_y + 18), fill=QUERY_COLORS[q])
        draw.text((text_x, text_y), name, fill=(255, 255, 255), font=label_font)

    grid_left = pad + frame_w + 2 * pad
    for q, box in enumerate(query_boxes):
        row_top = top + q * (cell_h + pad)
        query = _thumbnail(frame_bw.crop(box), thumb_w, thumb_h)
        sheet.paste(query, (grid_left, row_top))
        draw.rectangle(
            (grid_left - 2, row_top - 2, grid_left + query.width + 1, row_top + query.height + 1),
            outline=QUERY_COLORS[q],
            width=3,
        )
        draw.text((grid_left, row_top + thumb_h + 3), f"query {QUERY_PATCH_NAMES[q]}", fill=TEXT, font=small)
        for rank, patch in enumerate(retrieved[q]):
            x = grid_left + (rank + 1) * (cell_w + pad)
            thumb = _thumbnail(patch.image, thumb_w, thumb_h)
            sheet.paste(thumb, (x, row_top))
            draw.text((x, row_top + thumb_h + 3), f"#{rank + 1} {patch.page_id[:12]}", fill=TEXT, font=small)
            draw.text(
                (x, row_top + thumb_h + 17), f"{PATCH_NAMES[patch.patch]}  {patch.score:.3f}", fill=TEXT, font=small
            )
    return sheet

"""Screentone rendering for the screenstyle augmentation: colour page -> manga-like tone -> blend with grey.

Renderers (`screentone.render`), all ``render(page, seed) -> uint8 H x W`` at the page's own resolution:

- `HalftoneRenderer` (default, no files): clustered-dot and line screens per tone step and hue sector, XDoG
  lines in black, output strictly bitonal (`screentone.halftone`).
- `ScreenStyleRenderer`: a re-implementation of ScreenStyle's colour2manga generator (`color2manga`) and
  ScreenVAE decoder (`screenvae`) that loads the published checkpoints strictly (`loader`).

Choices the project makes where the published code differs or leaves options (see each module for details):

- ScreenStyle line map: by default the greyscale page, eroded 3x3, multiplied in twice (ColorFlow's released
  preprocessing: once sign-binarised inside the ScreenVAE wrapper, once as grey afterwards); ``line_source=
  "xdog"`` uses weight-free XDoG lines, ``line_passes=1`` keeps ScreenStyle's single multiplication.
- Padding is replicate (the published colour2manga preprocessing pads white), networks run in eval mode, and
  the decoder's noise comes from a generator seeded per page, so renders are reproducible.
- Tone is never resampled: pages are not halved above 2500 px as ScreenStyle does; callers resize the colour
  page to its final size, and pages above ``max_pixels`` are refused.
- Augmentation: ``blend(grey, tone, alpha)`` with alpha the tone weight; training draws alpha per sample,
  evaluation uses `EVAL_ALPHAS` = (0.33, 0.5, 0.66) (paper's figure and the released 50/50).
- Greyscale is `to_grey` (ITU-R 601 luma, identical to Pillow's ``convert("L")``) everywhere in the project.

Importing the package (or `screentone.augment`, which every CPU worker uses) does not import torch: the names
below load their module on first use (`__getattr__`), so only the neural renderers pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EVAL_ALPHAS": "screentone.augment",
    "blend": "screentone.augment",
    "sample_alpha": "screentone.augment",
    "to_grey": "screentone.augment",
    "HalftoneConfig": "screentone.halftone",
    "render_halftone": "screentone.halftone",
    "CheckpointMismatchError": "screentone.loader",
    "load_screenstyle": "screentone.loader",
    "HalftoneRenderer": "screentone.render",
    "ScreenStyleRenderer": "screentone.render",
    "ScreentoneRenderer": "screentone.render",
    "make_renderer": "screentone.render",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'screentone' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

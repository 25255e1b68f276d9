"""The line extractor of the sketch and shading styles: the release's network (`LE/erika.pth`) when its weights are
given, else the weight-free XDoG extractor (`screentone.lines`), so the styles run without any download.

Both map a grey page (uint8 H x W) to line art (uint8 H x W, 255 = paper). The network pads to multiples of 16 and
crops back (`model.line_extractor.extract_lines`), as the release does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inference.sources import ColorizeInputError

RELEASED_LE_FOLDER = "LE"  # inside the released ColorFlow weights folder
RELEASED_LE_FILE = "erika.pth"
XDOG = "xdog"


def find_line_extractor_weights(weights: str | None, colorflow_weights: str | None) -> str | None:
    """The erika.pth to use: `--line-extractor-weights` (a file or a folder holding it), else the release's
    `LE/erika.pth` when `--colorflow-weights` has one, else None (XDoG). A named file that is missing is refused."""
    if weights is not None:
        path = Path(weights)
        if path.is_dir():
            path = path / RELEASED_LE_FILE
        if not path.is_file():
            raise ColorizeInputError(f"--line-extractor-weights {weights}: no {RELEASED_LE_FILE} there")
        return str(path.absolute())
    if colorflow_weights:
        released = Path(colorflow_weights) / RELEASED_LE_FOLDER / RELEASED_LE_FILE
        if released.is_file():
            return str(released.absolute())
    return None


class LineExtractor:
    """Grey page -> line art, by the network on `device` (weights given) or by XDoG (None)."""

    def __init__(self, weights: str | None = None, device: str | None = None) -> None:
        self.weights = weights
        self._model = None
        if weights is not None:
            from model.line_extractor import MangaLineExtractor

            self._model = MangaLineExtractor.from_released(weights).to(device or "cpu")

    def __call__(self, grey: np.ndarray) -> np.ndarray:
        if self._model is None:
            from screentone.lines import extract_lines

            return extract_lines(grey)
        from model.line_extractor import extract_lines

        return extract_lines(self._model, [grey])[0]

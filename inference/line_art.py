"""Which line extractor colorize's sketch and shading styles use: the release's network (`LE/erika.pth`) when its
weights are given or found in the released folder, else the weight-free XDoG extractor, so the styles run without
any download. The extractor itself is `model.line_extractor.LineExtractor`, shared with the screentone stage and the
benchmark.
"""

from __future__ import annotations

from pathlib import Path

from inference.sources import ColorizeInputError

RELEASED_LE_FOLDER = "LE"  # inside the released ColorFlow weights folder
RELEASED_LE_FILE = "erika.pth"


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

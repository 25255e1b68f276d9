"""The fixed samples a trainer colours at each validation, and their canvases at the training resolution: the
same samples on every run and every resume, so validation images compare across steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from training.data import ShardSource, first_samples, resolve_shard_source, training_size

VALIDATION_ALPHA = 0.5  # the released preprocessing's 50/50 grey/tone blend


def validation_inputs(
    source: ShardSource, count: int, data: Sequence[str], variant: str | float = VALIDATION_ALPHA
) -> list[Any]:
    """Fixed samples to colourise: the val split's first ones, else the first train samples (same every run), with
    the B&W frame of `variant` (default: the 50/50 blend; a line-art trainer passes its style)."""
    from pipelines.core.sample_inputs import build_training_inputs, decode_sample

    try:
        urls = resolve_shard_source(data if len(data) > 1 else data[0], "val").urls
    except (FileNotFoundError, ValueError):
        urls = source.urls
    inputs = []
    for raw in first_samples(urls, count):
        members = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
        inputs.append(build_training_inputs(decode_sample(members), variant))
    return inputs


def validation_canvases(sample: Any, resolution: tuple[int, int] | None) -> tuple[Image.Image, Image.Image, np.ndarray]:
    """The guider's canvases and mask of a validation sample at 2x the training resolution: the model colours the
    whole canvas at the frame size it was trained on (as inference colours 1024x1600 for 512x800 frames)."""
    size = training_size(sample.color.size, resolution, 1)
    if size == sample.color.size:
        return sample.refs_only, sample.frame_only, sample.mask
    canvas = (2 * size[0], 2 * size[1])
    mask = Image.fromarray(sample.mask.astype(np.float32), mode="F").resize(canvas, Image.Resampling.NEAREST)
    return (
        sample.refs_only.resize(canvas, Image.Resampling.BICUBIC),
        sample.frame_only.resize(canvas, Image.Resampling.BICUBIC),
        np.asarray(mask, dtype=np.float32),
    )

"""GSRP fusion weights on disk: our export folder, and ColorFlow's released `MultiResNetModel.bin`.

Export folder (what `training.train_gsrp` writes and `load_gsrp` reads):

    <folder>/fusion/config.json + diffusion_pytorch_model.safetensors   (GSRPFusion.save_pretrained)
    <folder>/export.json                                                (written last: the completion marker)

`export.json` records the format, the fusion config and the trainer's metadata (base model, sr scale, steps, shard
manifest hash, `batchnorm_statistics`: the BatchNorm mode the export is meant to run in; an export without it means
"running", the eval mode our trainer validates in). The folder is built under a temporary name and renamed into
place, so a reader never sees half of it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from model.gsrp_fusion import GSRPFusion
from pipelines.core.storage import atomic_write_json, read_json, replace_tree

EXPORT_FORMAT = "colorflow-gsrp-export"
EXPORT_FORMAT_VERSION = 1
EXPORT_FILE = "export.json"
FUSION_FOLDER = "fusion"
RELEASED_FILE = "MultiResNetModel.bin"
RUN_EXPORT_FOLDER = "export"  # where train_gsrp puts the export inside its run folder
STATISTICS_KEY = "batchnorm_statistics"
RELEASED_STATISTICS = "page"  # the released app never switches its fusion net to eval mode
EXPORT_STATISTICS = "running"  # our trainer validates in eval mode; exports without the field mean this


def save_gsrp_export(folder: str | os.PathLike, fusion: GSRPFusion, meta: dict[str, Any]) -> Path:
    """Write (or atomically replace) an export folder; returns it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = folder.with_name(f"{folder.name}.tmp-{tag}")
    fusion.save_pretrained(tmp / FUSION_FOLDER, safe_serialization=True)
    record = {
        **meta,
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "fusion": FUSION_FOLDER,
        "fusion_config": {key: value for key, value in fusion.config.items() if not key.startswith("_")},
    }
    atomic_write_json(tmp / EXPORT_FILE, record)
    replace_tree(tmp, folder)
    return folder


def read_gsrp_export(folder: str | os.PathLike) -> dict[str, Any]:
    """The export.json of an export folder, checked for format and version."""
    record = read_json(Path(folder) / EXPORT_FILE)
    if record.get("format") != EXPORT_FORMAT or record.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{folder}: {EXPORT_FILE} is format {record.get('format')!r} version {record.get('format_version')!r}, "
            f"expected {EXPORT_FORMAT!r} version {EXPORT_FORMAT_VERSION}"
        )
    return record


def run_export(path: Path) -> Path:
    """A GSRP training run folder stands for its export (`train_gsrp` exports to OUTPUT_DIR/export, beside the
    checkpoints, since an export replaces its folder whole); any other path is returned unchanged."""
    nested = path / RUN_EXPORT_FOLDER
    if path.is_dir() and not (path / EXPORT_FILE).is_file() and (nested / EXPORT_FILE).is_file():
        return nested
    return path


def default_statistics(path_or_dir: str | os.PathLike) -> str:
    """The BatchNorm statistics a GSRP weight is meant to run with: "page" for a released `MultiResNetModel.bin`
    (as the released app runs it), else what our export records ("running" when it records nothing)."""
    path = run_export(Path(path_or_dir))
    if path.is_file() or (not (path / EXPORT_FILE).is_file() and (path / RELEASED_FILE).is_file()):
        return RELEASED_STATISTICS
    if (path / EXPORT_FILE).is_file():
        return str(read_gsrp_export(path).get(STATISTICS_KEY, EXPORT_STATISTICS))
    return EXPORT_STATISTICS


def load_gsrp(path_or_dir: str | os.PathLike) -> GSRPFusion:
    """A fusion net (eval mode) from: our export folder (export.json + fusion/) or the train_gsrp run
    folder holding it (OUTPUT_DIR/export), a `save_pretrained` folder (config.json), a released
    `MultiResNetModel.bin`, or a folder holding one (e.g. ColorFlow's `GraySD/`).

    Raises FileNotFoundError when nothing loadable is there, ValueError on a wrong layout (naming the key).
    """
    path = run_export(Path(path_or_dir))
    if path.is_file():
        return GSRPFusion.from_released(path)
    if (path / EXPORT_FILE).is_file():
        record = read_gsrp_export(path)
        return GSRPFusion.from_pretrained(path / record["fusion"]).eval()
    if (path / "config.json").is_file():
        return GSRPFusion.from_pretrained(path).eval()
    if (path / RELEASED_FILE).is_file():
        return GSRPFusion.from_released(path / RELEASED_FILE)
    raise FileNotFoundError(
        f"{path}: no GSRP weights (expected {EXPORT_FILE} + {FUSION_FOLDER}/, a config.json folder, or {RELEASED_FILE})"
    )

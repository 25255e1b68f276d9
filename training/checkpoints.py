"""Checkpoints of both trainers: where they are, which one a resume takes, and how one is published whole.

A checkpoint is ``checkpoint-<step>/`` holding accelerate's state and ``train_state.json`` (the run settings an
exact resume needs). It is written under a scratch name and renamed into place, so only complete checkpoints carry
the final name and `list_checkpoints` never offers a half-written one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from pipelines.core.storage import atomic_write_json, publish_tree

CHECKPOINT_PREFIX = "checkpoint-"
TRAIN_STATE = "train_state.json"

logger = logging.getLogger(__name__)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-<step>`` with a train_state.json), oldest first."""
    found = []
    for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
        if suffix.isdigit() and (path / TRAIN_STATE).is_file():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: Path, value: str | None) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names: None when unset, 'latest' -> the newest complete one in
    `output_dir` (None when there is none yet), else the given folder, which must be a complete checkpoint."""
    if value is None:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(value)
    if not (path / TRAIN_STATE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: not a complete checkpoint (no {TRAIN_STATE})")
    return path


def publish_state(accelerator: Any, output_dir: Path, step: int, total_limit: int | None, state: dict) -> Path:
    """`save_state` on every rank (each writes its own random states) into a scratch folder; then the main process
    writes `train_state.json`, renames the folder to checkpoint-<step> and only then prunes to `total_limit`, so a
    kill at any point leaves every earlier checkpoint whole and never a half-written one under a final name.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    scratch = output_dir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(scratch))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(scratch / TRAIN_STATE, state)
        if final.exists():
            shutil.rmtree(final)
        publish_tree(scratch, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final

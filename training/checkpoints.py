"""Checkpoints of both trainers: where they are, which one a resume takes, and how one is published whole.

A checkpoint is ``checkpoint-<step>/`` holding accelerate's state and ``train_state.json`` (the run settings an
exact resume needs). It is written under a scratch name and renamed into place, so only complete checkpoints carry
the final name and `list_checkpoints` never offers a half-written one.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

from pipelines.core.storage import atomic_write_json, publish_tree, read_json
from training.data import ShardSource

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


def unreadable_file(checkpoint: Path) -> str | None:
    """The first file of a checkpoint that cannot be read back, with why (None when every file reads).

    Cheap structural checks, no tensors loaded: safetensors headers against the file's length, torch's zip
    archives (optimizer, scheduler, random states) by their CRCs, JSON by parsing.
    """
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            problem = _file_problem(path)
        except OSError as exc:
            problem = str(exc)
        if problem:
            return f"{path}: {problem}"
    return None


def _file_problem(path: Path) -> str | None:
    if path.suffix == ".safetensors":
        with open(path, "rb") as handle:
            size = path.stat().st_size
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or 8 + length > size:
                return f"truncated safetensors file ({size} bytes)"
            try:
                header = json.loads(handle.read(length))
            except ValueError:
                return "safetensors header is not valid JSON"
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        if 8 + length + max(ends, default=0) > size:
            return f"truncated safetensors file ({size} bytes, its header needs {8 + length + max(ends)})"
    elif path.suffix in (".bin", ".pkl", ".pt", ".pth"):
        if not zipfile.is_zipfile(path):
            return "not a complete torch archive (truncated or overwritten)"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"torch archive member {bad} is corrupt"
    elif path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except ValueError:
            return "not valid JSON"
    return None


def resolve_resume(output_dir: Path, value: str | None, *, skip_unreadable: bool = False) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names: None when unset, 'latest' -> the newest complete one in
    `output_dir` (None when there is none yet), else the given folder, which must be a complete checkpoint.

    A checkpoint with an unreadable file is refused, naming the file and the newest readable checkpoint; with
    `skip_unreadable` (and 'latest') the newest readable one is taken instead, with a warning: skipping silently
    would lose steps and the run's exactness without anyone knowing.
    """
    if value is None:
        return None
    if value != "latest":
        path = Path(value)
        if not (path / TRAIN_STATE).is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: not a complete checkpoint (no {TRAIN_STATE})")
        problem = unreadable_file(path)
        if problem:
            raise ValueError(f"--resume_from_checkpoint {value}: unreadable checkpoint: {problem}")
        return path
    checkpoints = list_checkpoints(output_dir)
    problems = []
    for checkpoint in reversed(checkpoints):
        problem = unreadable_file(checkpoint)
        if problem is None:
            break
        problems.append(problem)
    else:
        checkpoint = None
    if not problems:
        return checkpoint
    readable = f"the newest readable one is {checkpoint.name}" if checkpoint else "no checkpoint is readable"
    if not skip_unreadable or checkpoint is None:
        hint = "; rerun with --skip_unreadable_checkpoints to resume from it" if checkpoint else ""
        raise ValueError(f"unreadable checkpoint: {problems[0]}; {readable}{hint}")
    logger.warning(
        "skipping %d unreadable checkpoint(s) (%s); resuming from %s", len(problems), problems[0], checkpoint
    )
    return checkpoint


def check_resume_settings(checkpoint: Path, settings: dict[str, Any]) -> None:
    """The settings an exact resume needs unchanged must equal the checkpoint's (ValueError listing the others)."""
    saved = read_json(checkpoint / TRAIN_STATE)
    different = {key: (saved[key], value) for key, value in settings.items() if key in saved and saved[key] != value}
    if different:
        raise ValueError(f"{checkpoint}: cannot resume exactly, settings differ (saved, now): {different}")


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


def save_checkpoint(
    accelerator: Any, output_dir: Path, step: int, args: argparse.Namespace, world: int, source: ShardSource
) -> None:
    """checkpoint-<step> with the run settings that an exact resume needs (see `publish_state`)."""
    state = {
        "global_step": step,
        "world_size": world,
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "seed": args.seed,
        "samples_per_rank": step * args.train_batch_size * args.gradient_accumulation_steps,
        "shard_manifest_sha256": source.sha256,
        "shard_manifest": source.manifest,
    }
    publish_state(accelerator, output_dir, step, args.checkpoints_total_limit, state)

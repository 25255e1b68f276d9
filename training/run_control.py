"""What makes a training run safe to start, stop and rerun: inputs checked before any model loads, one run per
output folder (a lock), a clean stop on SIGTERM (a scheduler's preemption), and a budget of skipped samples.

Both trainers use these the same way: `check_base_model` and `check_resolution` before loading, `run_folder` around
the run, `Preemption.agreed` and `BadSampleBudget.exceeded` after every optimiser step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core.errors import JobStopped, PreconditionError, UsageError
from pipelines.runtime.preconditions import created_folder

logger = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
PREEMPTED_EXIT = 128 + signal.SIGTERM  # 143: what a process ended by SIGTERM reports


# ---- inputs, before any model loads --------------------------------------------------------------------------------


def add_safety_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags both trainers share for damaged inputs and a shared output folder."""
    parser.add_argument(
        "--max_bad_fraction",
        type=float,
        default=0.01,
        help="stop when more than this fraction of the samples read (and more than one) had to be skipped",
    )
    parser.add_argument(
        "--verify_shards", action="store_true", help="also check every shard's sha256 against its manifest"
    )
    parser.add_argument(
        "--skip_unreadable_checkpoints",
        action="store_true",
        help="with --resume_from_checkpoint latest: resume from the newest readable checkpoint (steps after it are "
        "lost) instead of stopping at an unreadable one",
    )
    parser.add_argument(
        "--force_unlock",
        "--force-unlock",
        action="store_true",
        help="take over --output_dir even though its lock names a run that may still be alive",
    )


def looks_like_path(value: str) -> bool:
    """A local path rather than a hub id ('name' or 'namespace/name'): absolute, relative with a dot or tilde, or
    with more than one separator."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value


def check_base_model(value: str, subfolders: Sequence[str], flag: str = "--pretrained_model_name_or_path") -> None:
    """A local base model must be a diffusers pipeline folder with the subfolders this trainer loads; a value that
    is no path and names no folder is left to the hub."""
    path = Path(value).expanduser()
    if not path.exists() and not looks_like_path(value):
        return
    if not path.is_dir():
        raise UsageError(f"{flag} {value}: no such folder (a local diffusers Stable Diffusion 1.5 folder is needed)")
    missing = [name for name in ("model_index.json", *subfolders) if not (path / name).exists()]
    if missing:
        raise UsageError(f"{flag} {value}: not a diffusers Stable Diffusion folder: it has no {', '.join(missing)}")


def check_vae_folder(value: str) -> None:
    path = Path(value).expanduser()
    if not (path / "config.json").is_file():
        raise UsageError(f"--vae {value}: not a diffusers AutoencoderKL folder (no config.json)")


def vae_factor(vae_folder: Path) -> int | None:
    """The VAE's downsampling factor from its config.json (None when it cannot be read without loading)."""
    try:
        channels = json.loads((vae_folder / "config.json").read_text())["block_out_channels"]
    except (OSError, ValueError, KeyError):
        return None
    return 2 ** (len(channels) - 1)


def check_resolution(
    resolution: tuple[int, int] | None, frame_sizes: Sequence[tuple[int, int]], factor: int | None, where: str
) -> None:
    """A training size must fit the data (at most the largest frame size) and the VAE (multiples of its factor)."""
    if resolution is None:
        return
    width, height = resolution
    if factor and (width % factor or height % factor):
        raise UsageError(f"--resolution {width}x{height}: must be multiples of the VAE's factor {factor}")
    if frame_sizes:
        largest = max(frame_sizes, key=lambda size: size[0] * size[1])
        if width > largest[0] or height > largest[1]:
            raise UsageError(
                f"--resolution {width}x{height} is larger than the data's frames ({largest[0]}x{largest[1]}, {where}): "
                f"training would only upscale them; use at most {largest[0]}x{largest[1]}"
            )


# ---- one run per output folder -------------------------------------------------------------------------------------


def _lock_record() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def acquire_run_lock(output_dir: Path, *, force: bool = False) -> Path:
    """Create `output_dir/.train.lock` exclusively (host, pid, start time, command). A lock whose process is gone
    (same host, pid not running) is stale and taken over; `force` takes over any lock. Another live run's lock is
    a PreconditionError saying who holds it."""
    path = output_dir / LOCK_NAME
    for _ in range(3):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            stale = holder is not None and holder.get("host") == socket.gethostname() and not _pid_alive(holder["pid"])
            if not (force or stale):
                who = (
                    f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}: "
                    f"{holder.get('command')}"
                    if holder
                    else "an unreadable lock"
                )
                raise PreconditionError(
                    f"--output_dir {output_dir} is in use by another training run ({who}); wait for it to end, or "
                    f"pass --force_unlock if it is gone (lock file {path})"
                ) from None
            logger.warning("taking over the %s lock of %s: %s", "stale" if stale else "forced", output_dir, holder)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(handle, "w") as stream:
            json.dump(_lock_record(), stream)
        return path
    raise PreconditionError(f"--output_dir {output_dir}: could not take its lock {path} (another run keeps taking it)")


def release_run_lock(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    holder = _read_lock(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def run_folder(accelerator: Any, output_dir: Path, *, force_unlock: bool = False) -> Iterator[None]:
    """The run's output folder for the block: created (and removed again if a failed run leaves it empty) and
    locked by the main process; every rank learns whether the lock was taken, so none trains beside another run."""
    from accelerate.utils import broadcast_object_list

    with contextlib.ExitStack() as stack:
        refused = [None]
        lock = None
        if accelerator.is_main_process:
            stack.enter_context(created_folder(output_dir))
            try:
                lock = acquire_run_lock(output_dir, force=force_unlock)
            except PreconditionError as exc:
                refused = [str(exc)]
        if accelerator.num_processes > 1:
            refused = broadcast_object_list(refused)
        if refused[0]:
            raise PreconditionError(refused[0])
        try:
            yield
        finally:
            if lock is not None:
                release_run_lock(lock)


# ---- preemption ----------------------------------------------------------------------------------------------------


class Preemption:
    """SIGTERM sets a flag; `agreed` turns the ranks' flags into one decision (a collective max), so every rank
    stops at the same step and saves together instead of rank 0 saving while the others wait in a collective."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._request)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _request(self, signum: int, frame: object) -> None:
        self.requested = True

    def agreed(self, accelerator: Any) -> bool:
        import torch

        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.gather(flag).max().item() > 0)


def preempted(step: int, accelerator: Any) -> JobStopped:
    """The stop of a preempted run: every rank exits with 143, the main process alone says where to resume."""
    message = (
        f"preempted at step {step}: checkpoint-{step} saved; rerun the same command with "
        "--resume_from_checkpoint latest to resume"
    )
    return JobStopped(message if accelerator.is_main_process else "", exit_status=PREEMPTED_EXIT)


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM to the training process, which stops them after saving (a scheduler sends
    it to every process of the job)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---- skipped samples -----------------------------------------------------------------------------------------------


@dataclass
class BadSampleBudget:
    """Counts samples read and skipped on this rank; `exceeded` is true once, over all ranks, more than
    max(1, max_fraction x read) were skipped, and `stop` ends the run in one line naming the first reason: a damaged
    shard is not trained around silently."""

    max_fraction: float
    bad: int = 0
    read: int = 0
    reason: str = ""
    total_bad: int = 0
    total_read: int = 0

    def add(self, batch: dict[str, Any]) -> None:
        skipped = int(batch["bad_skipped"].sum())
        self.bad += skipped
        self.read += skipped + len(batch["key"])
        if not self.reason:
            self.reason = next((reason for reason in batch["bad_reason"] if reason), "")

    def exceeded(self, accelerator: Any) -> bool:
        """Whether the ranks together passed the budget (a collective: every rank calls it at every step)."""
        import torch
        from accelerate.utils import gather_object

        totals = accelerator.gather(torch.tensor([[self.bad, self.read]], device=accelerator.device)).sum(0).tolist()
        self.total_bad, self.total_read = int(totals[0]), int(totals[1])
        if self.total_bad <= max(1.0, self.max_fraction * self.total_read):
            return False
        reasons = gather_object([self.reason]) if accelerator.num_processes > 1 else [self.reason]
        self.reason = next((r for r in reasons if r), "see the warnings above")
        return True

    def stop(self) -> None:
        """Raise the one line that ends the run."""
        raise RuntimeError(
            f"{self.total_bad} of {self.total_read} samples read were skipped (more than --max_bad_fraction "
            f"{self.max_fraction}); first: {self.reason}"
        )

"""One training run per output folder: a lock file created exclusively by the main process, naming who holds it.

Two runs writing checkpoints into one folder corrupt each other, so the second refuses and says who holds the lock.
A lock is stale when, on the same host, its process is gone; `--force_unlock` takes over any lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.core.cli import RUNTIME_ERROR
from pipelines.core.errors import JobStopped, PreconditionError
from pipelines.runtime.preconditions import created_folder

logger = logging.getLogger(__name__)


LOCK_NAME = ".train.lock"


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
            if not _take_over(path, holder):
                continue  # another run replaced the lock meanwhile: look again
            logger.warning("taking over the %s lock of %s: %s", "stale" if stale else "forced", output_dir, holder)
            continue
        with os.fdopen(handle, "w") as stream:
            json.dump(_lock_record(), stream)
        return path
    raise PreconditionError(f"--output_dir {output_dir}: could not take its lock {path} (another run keeps taking it)")


def _take_over(path: Path, holder: dict[str, Any] | None) -> bool:
    """Remove the lock judged stale only if it is still the one that was read: it is renamed aside atomically (of
    two runs taking over at once, one rename wins) and put back when it turns out to be another run's new lock."""
    aside = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return True  # already removed by the other run: try to create it
    if _read_lock(aside) == holder:
        aside.unlink(missing_ok=True)
        return True
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)  # restore the other run's lock unless a third run created one meanwhile
    aside.unlink(missing_ok=True)
    return False


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
        if refused[0]:  # the main process says who holds the lock; the other ranks stop without a word
            raise PreconditionError(refused[0]) if accelerator.is_main_process else JobStopped("", RUNTIME_ERROR)
        try:
            yield
        finally:
            if lock is not None:
                release_run_lock(lock)

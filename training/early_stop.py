"""Ending a run before its last step, cleanly: on SIGTERM (a scheduler's preemption) every rank stops at the same
step after a checkpoint, and a run whose skipped samples pass a budget stops with one line naming why."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import Any

from pipelines.core.errors import JobStopped

logger = logging.getLogger(__name__)


PREEMPTED_EXIT = 128 + signal.SIGTERM  # 143: what a process ended by SIGTERM reports


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

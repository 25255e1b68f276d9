"""What every command line shares, whatever layer it lives in: the argument parser, how it exits, sizes as WxH.

A command fails the way a user can act on: one line on stderr (what, where, why), exit status 2 for a usage error
and 1 for a runtime error, and the traceback only with ``--debug``. `JobArgumentParser` gives every command the
same ``--help`` (every flag described, every default shown) and the one-line usage errors; `run_job` turns an
exception of ``main`` into that line and the exit status. The jobs, the trainers and ``model.tiny`` all end
through `run_job`, so this policy lives here once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.core.errors import JobFailed, JobStopped, PreconditionError, UsageError

USAGE_ERROR = 2
RUNTIME_ERROR = 1
log = logging.getLogger(__name__)

_job_end_hooks: list[Callable[[], None]] | None = None  # a list while `run_job` runs a job


def at_job_end(hook: Callable[[], None]) -> None:
    """Run `hook` when the running job's ``main`` returns or raises, before its last line is printed.

    Whatever the job started that still talks (a Ray session forwarding its workers' and raylets' logs) is stopped
    by such a hook, so that the job's own line stays the last one. Outside `run_job` (a library call, a test)
    nothing is registered: the caller owns what it started.
    """
    if _job_end_hooks is not None and hook not in _job_end_hooks:
        _job_end_hooks.append(hook)


def _call_main(main: Callable[[Sequence[str] | None], Any], argv: list[str]) -> Any:
    """``main(argv)``, then the hooks it registered with `at_job_end`, whatever way it ended."""
    global _job_end_hooks
    outer, _job_end_hooks = _job_end_hooks, []
    try:
        return main(argv)
    finally:
        hooks, _job_end_hooks = _job_end_hooks, outer
        for hook in reversed(hooks):
            try:
                hook()
            except Exception as exc:  # noqa: BLE001 - ending a session must not turn the job's outcome into another
                log.warning("at the end of the job, %s failed: %s", getattr(hook, "__qualname__", hook), exc)


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to every option that takes a value, unless its text already states the default or
    says it is required (alone, or as one of a required choice of options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        takes_value = action.nargs != 0 and action.option_strings
        stated = "default" in text.lower() or "required" in text.lower()
        if not takes_value or action.required or action.default is argparse.SUPPRESS or stated:
            return text
        return f"{text} (default: %(default)s)"


class JobArgumentParser(argparse.ArgumentParser):
    """argparse for the jobs: defaults in ``--help``, ``--debug``, and a usage error in one line (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="on an error, also print its full traceback")

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def run_job(
    main: Callable[[Sequence[str] | None], Any],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    show: Callable[[Any], str] | None = None,
) -> int:
    """Run a job's ``main(argv)`` and return its exit status: 0 done, 1 failed units, a failed result (`JobFailed`)
    or a runtime error, 2 a usage error (argparse's, or a `UsageError`), 130 interrupted, a `JobStopped`'s own status.

    The order of what a user reads is decided here, for every job: a failure is one line on stderr (the traceback
    too with ``--debug``) and nothing else; ``show(result)``, the job's summary for stdout, is printed only when the
    job ended. Jobs check their inputs before they create an output folder or load a model, and raise; they never
    print a summary of a run that failed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = _call_main(main, argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except JobStopped as exc:
        if str(exc):  # one process of several may stop without a word
            print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_status
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line; --debug shows where it came from
        if "--debug" in argv:
            traceback.print_exc()
        print(f"{prog}: error: {error_line(exc)}", file=sys.stderr)
        return USAGE_ERROR if isinstance(exc, UsageError) else RUNTIME_ERROR
    if show is not None:
        print(show(result))
    if isinstance(result, dict):
        line = outcome_line(result)
        if line:
            print(f"{prog}: {line}", file=sys.stderr)
        return exit_status(result)
    return result if isinstance(result, int) else 0  # an exit status, or what a job printed (paths, ...)


EXPECTED_ERRORS = (ValueError, OSError, LookupError, RuntimeError)


def error_line(exc: BaseException) -> str:
    """One line for an exception: its message (first line), with its type when it is not an expected error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = lines[0] if lines else type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        message = exc.args[0]  # str(KeyError) quotes its text
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:  # not "[Errno 2] ...: 'path'"
        message = f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, (PreconditionError, JobFailed, *EXPECTED_ERRORS)):
        return message
    return f"{type(exc).__name__}: {message} (rerun with --debug for the traceback)"


def parse_size(text: str) -> tuple[int, int]:
    """'512x800' -> (512, 800); argparse reports the ValueError text to the user."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 512x800") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return width, height


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def int_range(text: str) -> tuple[int, int]:
    """'4' -> (4, 4), '2:16' -> (2, 16): a fixed count or MIN:MAX bounds, both positive, min <= max."""
    low, _, high = text.partition(":")
    bounds = (positive_int(low), positive_int(high or low))
    if bounds[0] > bounds[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: MIN {bounds[0]} is above MAX {bounds[1]}")
    return bounds


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def exit_status(summary: dict) -> int:
    """The process exit code of a job: non-zero when units failed, so `ray job submit` reports FAILED."""
    return 0 if summary.get("complete", True) else 1


FAULT_KINDS = ("task_retries", "actor_restarts", "lost_objects_recovered")


def summary_failures(summary: Any) -> list[str]:
    """Every failed unit a (stage or pipeline) summary lists under a ``failures`` key, as "unit: reason"."""
    found: list[str] = []
    if isinstance(summary, dict):
        for key, value in summary.items():
            if key == "failures" and isinstance(value, list):
                for failure in value:
                    unit = failure.get("key") or failure.get("chapter_id") or "?"
                    reason = str(failure.get("error") or "no reason recorded").strip().splitlines()[0]
                    found.append(f"{unit}: {reason}")
            else:
                found += summary_failures(value)
    elif isinstance(summary, list):
        for item in summary:
            found += summary_failures(item)
    return found


def summary_faults(summary: Any) -> dict[str, int]:
    """Lost work a summary recovered from, summed over its ``faults`` records (the outermost of each branch)."""
    totals = dict.fromkeys(FAULT_KINDS, 0)
    if isinstance(summary, dict):
        if isinstance(summary.get("faults"), dict):
            return {kind: totals[kind] + int(summary["faults"].get(kind, 0)) for kind in FAULT_KINDS}
        for value in summary.values():
            for kind, count in summary_faults(value).items():
                totals[kind] += count
    return totals


def faults_text(faults: dict[str, int]) -> str:
    """ "2 task retries, 1 actor restart, 0 lost objects recovered" """
    n = [faults.get(kind, 0) for kind in FAULT_KINDS]
    return (
        f"{n[0]} task {'retry' if n[0] == 1 else 'retries'}, {n[1]} actor restart{'' if n[1] == 1 else 's'}, "
        f"{n[2]} lost object{'' if n[2] == 1 else 's'} recovered"
    )


def outcome_line(summary: dict, shown: int = 3) -> str | None:
    """The job's last line: for an incomplete run, the failed units and that a rerun retries them; for a complete
    run that recovered from lost work, what it retried; nothing for a clean run."""
    faults = summary_faults(summary)
    if summary.get("complete", True):
        return f"complete after recovering from lost work: {faults_text(faults)}" if any(faults.values()) else None
    failures = summary_failures(summary)
    parts = []
    if failures:
        more = f" (and {len(failures) - shown} more, listed in the summary)" if len(failures) > shown else ""
        units = f"{len(failures)} unit{'s' if len(failures) != 1 else ''}"
        parts.append(f"{units} failed: {'; '.join(failures[:shown])}{more}")
    for stage, reason in (summary.get("blocked") or {}).items():
        parts.append(f"{stage} not run ({reason})")
    if not parts:
        parts.append("the run is incomplete (see its summary)")
    retried = f"; retried on the way: {faults_text(faults)}" if any(faults.values()) else ""
    return f"error: {'; '.join(parts)}{retried}; rerun the same command to retry them (finished units are kept)"


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news

"""Argument groups the data jobs share (sizes, renderer, seed; where Ray runs; lost work and stalls) and starting
Ray for a job.

The parser, the one-line errors and the exit statuses are `pipelines.core.cli`, shared with the trainers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.core.cli import configure_logging, non_negative_int, parse_size, positive_float
from pipelines.core.errors import UsageError
from pipelines.core.geometry import RESAMPLE_LANCZOS, RESAMPLERS
from pipelines.runtime.faults import DEFAULT_MAX_RETRIES, DEFAULT_STALL_TIMEOUT, FaultPolicy, configure_faults


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every sample-producing stage shares: sizes, screentone renderer, line extractor, seed."""
    parser.add_argument("--size", type=parse_size, default=(512, 800), help="training size WxH (default 512x800)")
    parser.add_argument(
        "--hires-scale", type=float, default=1.5, help="GSRP (high-resolution) size as a multiple of --size"
    )
    parser.add_argument(
        "--renderer",
        default="halftone",
        help="screentone renderer: 'halftone' (weight-free, default), 'screenstyle:<weights folder>' or "
        "'screenstyle:<latest_net_G_RGB2INTSCR.pth>,<latest_net_dec.pth>'",
    )
    parser.add_argument(
        "--line-extractor-weights",
        default=None,
        help="erika.pth (or a folder holding it, e.g. the release's LE/) for the samples' sketch and shading line art "
        "(default: the weight-free XDoG extractor)",
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes every random choice")
    add_fit_argument(parser)


def add_fit_argument(parser: argparse.ArgumentParser) -> None:
    """How pages are fitted to the frame size; the stages of one dataset must agree (the pipeline passes one)."""
    parser.add_argument(
        "--fit-resample",
        choices=RESAMPLERS,
        default=RESAMPLE_LANCZOS,
        help="filter fitting a page to the frame size for the retrieval patches, the screentone renders and the "
        "frames: lanczos (kept: the stored bytes of existing datasets, finer detail) or bicubic (the released "
        "app's fit, as colorize and the composite ring use); the benchmark's truth pages stay Lanczos",
    )


def line_extractor_file(text: str | None) -> str | None:
    """--line-extractor-weights as the erika.pth it names (the file, or a folder holding it), checked before any
    work; None (XDoG) stays None."""
    if text is None:
        return None
    path = Path(text)
    if path.is_dir():
        path = path / "erika.pth"
    if not path.is_file():
        raise UsageError(f"--line-extractor-weights {text}: no erika.pth there (give the file or the release's LE/)")
    return str(path.absolute())


def add_verify_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check every chapter (and shard) against its completion marker and files, as after a killed run, "
        "instead of trusting the last run's summary and chapter ledgers; redoes only what is missing (after files "
        "were deleted or changed by hand)",
    )


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where it runs")
    group.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS, which `ray job submit` sets; else a local Ray in-process)",
    )
    group.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    group.add_argument("--local", action="store_true", help="run in this process without Ray (debugging, tiny runs)")


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    """Lost work and stalls (the data jobs): how often lost work is retried, how long no progress is tolerated."""
    group = parser.add_argument_group("lost work and stalls")
    group.add_argument(
        "--max-retries",
        type=non_negative_int,
        default=DEFAULT_MAX_RETRIES,
        help="times a unit is run again when its worker, encoder actor or node was lost (OOM kill, preemption); a "
        "unit lost on every attempt becomes a failed row",
    )
    group.add_argument(
        "--stall-timeout",
        type=positive_float,
        default=DEFAULT_STALL_TIMEOUT,
        help="seconds a stage may go without finishing any unit before it fails, saying what it waited for",
    )
    group.add_argument(
        "--pause-file",
        default=None,
        help="while this file exists (on storage every node sees), no new unit starts and the stall clock stops; "
        "remove it to resume (default: none)",
    )


def configure_fault_policy(args: argparse.Namespace) -> None:
    """The policy of `add_fault_arguments`' flags, for every stage this process runs."""
    configure_faults(FaultPolicy(args.max_retries, args.stall_timeout, args.pause_file))


def start_ray(args: argparse.Namespace) -> None:
    """Logging for the job, then Ray as the arguments say (nothing with --local)."""
    configure_logging()
    if args.local:
        return
    from pipelines.runtime.ray import init_ray

    init_ray(args.ray_address, num_cpus=args.num_cpus)

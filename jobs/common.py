"""Argument groups the data jobs share (sizes, renderer, seed; where Ray runs) and starting Ray for a job.

The parser, the one-line errors and the exit statuses are `pipelines.core.cli`, shared with the trainers.
"""

from __future__ import annotations

import argparse

from pipelines.core.cli import configure_logging, parse_size


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every sample-producing stage shares: sizes, screentone renderer, seed."""
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
    parser.add_argument("--seed", type=int, default=0, help="fixes every random choice")


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where it runs")
    group.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS, which `ray job submit` sets; else a local Ray in-process)",
    )
    group.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    group.add_argument("--local", action="store_true", help="run in this process without Ray (debugging, tiny runs)")


def start_ray(args: argparse.Namespace) -> None:
    """Logging for the job, then Ray as the arguments say (nothing with --local)."""
    configure_logging()
    if args.local:
        return
    from pipelines.runtime.ray import init_ray

    init_ray(args.ray_address, num_cpus=args.num_cpus)

"""Argument helpers every job shares: where Ray runs, and sizes written as WxH."""

from __future__ import annotations

import argparse
import logging


def parse_size(text: str) -> tuple[int, int]:
    """'512x800' -> (512, 800); argparse reports the ValueError text to the user."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 512x800") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return width, height


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every sample-producing stage shares: sizes, screentone renderer, seed."""
    parser.add_argument("--size", type=parse_size, default=(512, 800), help="training size WxH (default 512x800)")
    parser.add_argument("--hires-scale", type=float, default=1.5, help="GSRP size as a multiple of --size")
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


def exit_status(summary: dict) -> int:
    """The process exit code of a job: non-zero when units failed, so `ray job submit` reports FAILED."""
    return 0 if summary.get("complete", True) else 1


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news


def start_ray(args: argparse.Namespace) -> None:
    """Logging for the job, then Ray as the arguments say (nothing with --local)."""
    configure_logging()
    if args.local:
        return
    from pipelines.runtime import init_ray

    init_ray(args.ray_address, num_cpus=args.num_cpus)

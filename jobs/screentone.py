"""Render the screentone and the line art (sketch, shading) of every frame: `python -m jobs.screentone --data OUT
[options]`."""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import (
    add_common_arguments,
    add_fault_arguments,
    add_ray_arguments,
    add_verify_argument,
    configure_fault_policy,
    line_extractor_file,
    start_ray,
)
from pipelines.core.cli import JobArgumentParser, positive_int, run_job
from pipelines.core.geometry import CompositeLayout
from pipelines.runtime.preconditions import require_stage
from pipelines.screentone.stage import ScreentoneOptions, run_screentone

PROG = "python -m jobs.screentone"


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--data", required=True, help="the data folder written by jobs.ingest (OUT)")
    add_common_arguments(parser)
    parser.add_argument(
        "--device",
        default=None,
        help="torch device for neural renderers and the line extractor network (default: cuda if present)",
    )
    parser.add_argument("--chapters-per-task", type=positive_int, default=1, help="chapters rendered per Ray task")
    add_fault_arguments(parser)
    add_verify_argument(parser)
    add_ray_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    CompositeLayout(*args.size)  # a size the composite cannot use is refused before any work
    require_stage(args.data, "ingest", needed_by="screentone")
    configure_fault_policy(args)
    start_ray(args)
    options = ScreentoneOptions(
        renderer=args.renderer,
        width=args.size[0],
        height=args.size[1],
        fit_resample=args.fit_resample,
        hires_scale=args.hires_scale,
        seed=args.seed,
        device=args.device,
        line_extractor_weights=line_extractor_file(args.line_extractor_weights),
    )
    summary = run_screentone(
        args.data, options, chapters_per_task=args.chapters_per_task, local=args.local, verify=args.verify
    )
    print(json.dumps(summary, indent=2, sort_keys=True))
    return summary


if __name__ == "__main__":
    sys.exit(run_job(main, prog=PROG))

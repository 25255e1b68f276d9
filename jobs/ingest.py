"""`python -m jobs.ingest --input ROOT --output OUT`: keep the colour pages of a raw manga dump.

Also runs as `ray job submit --working-dir . -- python -m jobs.ingest ...` against a running cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from jobs.common import add_fault_arguments, add_ray_arguments, add_verify_argument, configure_fault_policy
from pipelines.core.cli import JobArgumentParser, configure_logging, positive_int, run_job
from pipelines.core.decode import DEFAULT_ANALYSIS_SIDE, DEFAULT_MAX_PIXELS
from pipelines.core.pagestore import ENCODINGS
from pipelines.core.sources import DEFAULT_MAX_FILE_BYTES
from pipelines.ingest.color import ColorThresholds, FeatureConfig
from pipelines.ingest.stage import (
    DEFAULT_CHAPTERS_PER_TASK,
    DEFAULT_MIN_COLOR_PAGES,
    DEFAULT_STORE_LONGEST_SIDE,
    IngestOptions,
    run_ingest,
)

PROG = "python -m jobs.ingest"


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(
        prog=PROG,
        description="List the chapters of a raw dump (<series>/<chapter>/ or <series>/<chapter>.cbz|.zip), "
        "classify every page as colour or B&W, keep chapters with enough colour pages and store their colour "
        "pages once, normalised. Reruns skip chapters already done and rewrite identical outputs.",
    )
    parser.add_argument(
        "--input",
        required=True,
        help="root of the dump, laid out <series>/<chapter>/<pages> or <series>/<chapter>.cbz: a local folder or "
        "an fsspec URI (file://, s3://, ...)",
    )
    parser.add_argument(
        "--output", required=True, help="data folder OUT (tables, page store, summary); created if missing"
    )
    parser.add_argument(
        "--min-color-pages",
        type=positive_int,
        default=DEFAULT_MIN_COLOR_PAGES,
        help="colour pages a chapter needs to be kept (default %(default)s: a frame plus 20 references)",
    )
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse images declaring more pixels than this, before decoding (default %(default)s)",
    )
    parser.add_argument(
        "--max-file-bytes",
        type=positive_int,
        default=DEFAULT_MAX_FILE_BYTES,
        help="refuse page files larger than this, before reading them (default %(default)s)",
    )
    parser.add_argument(
        "--analysis-side",
        type=positive_int,
        default=DEFAULT_ANALYSIS_SIDE,
        help="longest side of the reduced decode the classifier sees, within a factor 1.5 (default %(default)s)",
    )
    parser.add_argument(
        "--store-longest-side",
        type=int,
        default=DEFAULT_STORE_LONGEST_SIDE,
        help="downscale stored pages to this longest side, never upscaling; 0 keeps the full size "
        "(default %(default)s)",
    )
    parser.add_argument("--store-encoding", choices=ENCODINGS, default="jpeg", help="encoding of the stored pages")
    parser.add_argument(
        "--store-quality", type=positive_int, default=95, help="JPEG (or WebP) quality of the stored pages"
    )
    parser.add_argument(
        "--color-threshold",
        type=float,
        default=ColorThresholds().threshold,
        help="colour iff color_score >= this (default %(default)s; see pipelines/colour.py)",
    )
    parser.add_argument(
        "--chapters-per-task",
        type=positive_int,
        default=DEFAULT_CHAPTERS_PER_TASK,
        help="chapters per Ray task (default %(default)s)",
    )
    parser.add_argument(
        "--task-memory-mb",
        type=positive_int,
        default=None,
        help="memory Ray reserves per task, in MB (default: none reserved)",
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="only the first N chapters, for trial runs into a fresh --output (default: all)",
    )
    add_fault_arguments(parser)
    add_verify_argument(parser)
    add_ray_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def options_from_args(args: argparse.Namespace) -> IngestOptions:
    return IngestOptions(
        min_color_pages=args.min_color_pages,
        max_pixels=args.max_pixels,
        max_file_bytes=args.max_file_bytes,
        analysis_side=args.analysis_side,
        store_longest_side=args.store_longest_side or None,
        store_encoding=args.store_encoding,
        store_quality=args.store_quality,
        features=FeatureConfig(),
        thresholds=dataclasses.replace(ColorThresholds(), threshold=args.color_threshold),
    )


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_logging()
    configure_fault_policy(args)
    summary = run_ingest(
        args.input,
        args.output,
        options=options_from_args(args),
        chapters_per_task=args.chapters_per_task,
        limit=args.limit,
        local=args.local,
        ray_address=args.ray_address,
        num_cpus=args.num_cpus,
        task_memory=args.task_memory_mb * 1024 * 1024 if args.task_memory_mb else None,
        verify=args.verify,
    )
    return summary


if __name__ == "__main__":
    sys.exit(run_job(main, prog=PROG))

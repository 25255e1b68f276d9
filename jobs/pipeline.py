"""The whole data pipeline: `python -m jobs.pipeline --input ROOT --output OUT [options]`.

Runs ingest, retrieval, screentone and shards in order, skipping stages whose outputs are current, and prints a
summary per stage. `--generate-sample ROOT` first writes the sample corpus there and uses it as the input
(what `make demo` does); `--report DIR` then draws the contact sheets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.common import (
    add_common_arguments,
    add_fault_arguments,
    add_ray_arguments,
    add_verify_argument,
    configure_fault_policy,
)
from jobs.retrieval import add_encoder_arguments, add_retrieval_arguments
from jobs.shards import add_shard_arguments, shard_options
from pipelines.core.cli import JobArgumentParser, configure_logging, positive_int, run_job
from pipelines.retrieval.stage import RetrievalOptions
from pipelines.runner import PipelineOptions, run_pipeline, stage_lines
from pipelines.runtime.preconditions import check_encoder, check_output_creatable

PROG = "python -m jobs.pipeline"


def build_parser() -> argparse.ArgumentParser:
    defaults = PipelineOptions()
    parser = JobArgumentParser(prog=PROG, description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        help="raw chapters laid out <series>/<chapter>/<pages> or <series>/<chapter>.cbz (or a URI); this or "
        "--generate-sample is required",
    )
    source.add_argument(
        "--generate-sample",
        metavar="ROOT",
        help="generate the sample corpus at ROOT and use it as the input; this or --input is required",
    )
    parser.add_argument(
        "--sample-preset",
        default="demo",
        choices=("tiny", "small", "demo"),
        help="size of the generated sample corpus (with --generate-sample)",
    )
    parser.add_argument("--output", required=True, help="the data folder (OUT); created if missing")
    parser.add_argument(
        "--report", default=None, help="write contact sheets and counts to this folder (default: no report)"
    )
    add_common_arguments(parser)
    ingest = parser.add_argument_group("ingestion")
    ingest.add_argument(
        "--min-color-pages",
        type=positive_int,
        default=defaults.min_color_pages,
        help="colour pages a chapter needs to be kept",
    )
    ingest.add_argument(
        "--chapters-per-task", type=positive_int, default=defaults.chapters_per_task, help="chapters per Ray task"
    )
    add_retrieval_arguments(parser, "retrieval")
    add_encoder_arguments(parser, "retrieval encoder pool")
    add_shard_arguments(parser)
    add_fault_arguments(parser)
    add_verify_argument(parser)
    add_ray_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_logging()
    labels = None
    input_root = args.input
    if args.generate_sample:
        from pipelines.sample_corpus.generate import generate_corpus
        from pipelines.sample_corpus.labels import default_labels_path

        input_root = args.generate_sample
        labels = default_labels_path(Path(input_root))
        check_output_creatable(input_root, "--generate-sample")
        check_output_creatable(args.output)
        check_encoder(args.encoder)  # before minutes of corpus generation
        if not labels.exists():
            generate_corpus(Path(input_root), preset=args.sample_preset, seed=args.seed)
    options = PipelineOptions(
        shards=shard_options(args),
        retrieval=RetrievalOptions(
            encoder=args.encoder,
            refs=args.refs,
            min_refs=args.min_refs,
            k_per_patch=args.k_per_patch,
            max_per_page=args.max_per_page,
            batch_size=args.batch_size,
            encoder_actors=args.encoder_actors,
            encoder_threads=args.encoder_threads,
        ),
        min_color_pages=args.min_color_pages,
        chapters_per_task=args.chapters_per_task,
        rebuild=args.rebuild,
        verify=args.verify,
    )
    configure_fault_policy(args)
    record = run_pipeline(
        input_root,
        args.output,
        options,
        local=args.local,
        ray_address=args.ray_address,
        num_cpus=args.num_cpus,
    )
    print("\n".join(["", "pipeline summary", *stage_lines(record)]))
    if args.report:
        from pipelines.report import write_report

        report = write_report(args.output, args.report, labels=labels, seed=args.seed)
        record["report"] = {k: v for k, v in report.items() if k != "stages"}
        print(json.dumps(record["report"], indent=2))
    return record


if __name__ == "__main__":
    sys.exit(run_job(main, prog=PROG))

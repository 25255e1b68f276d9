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

from jobs.common import add_common_arguments, add_ray_arguments, configure_logging, exit_status
from jobs.shards import add_shard_arguments, shard_options
from pipelines.pipeline import PipelineOptions, run_pipeline, stage_lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = PipelineOptions()
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="raw chapters: <series>/<chapter>/<pages> or <series>/<chapter>.cbz")
    source.add_argument("--generate-sample", metavar="ROOT", help="generate the sample corpus at ROOT and use it")
    parser.add_argument("--sample-preset", default="demo", choices=("tiny", "small", "demo"))
    parser.add_argument("--output", required=True, help="the data folder (OUT)")
    parser.add_argument("--report", default=None, help="write contact sheets and counts to this folder")
    add_common_arguments(parser)
    ingest = parser.add_argument_group("ingestion")
    ingest.add_argument("--min-color-pages", type=int, default=defaults.min_color_pages)
    ingest.add_argument("--chapters-per-task", type=int, default=defaults.chapters_per_task)
    retrieval = parser.add_argument_group("retrieval")
    retrieval.add_argument("--encoder", default=defaults.encoder, help="retrieval encoder spec ('weightfree' offline)")
    retrieval.add_argument("--refs", type=int, default=defaults.refs)
    retrieval.add_argument("--min-refs", type=int, default=defaults.min_refs)
    retrieval.add_argument("--k-per-patch", type=int, default=defaults.k_per_patch)
    add_shard_arguments(parser)
    add_ray_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_logging()
    labels = None
    input_root = args.input
    if args.generate_sample:
        from pipelines.sample_corpus import default_labels_path, generate_corpus

        input_root = args.generate_sample
        labels = default_labels_path(Path(input_root))
        if not labels.exists():
            generate_corpus(Path(input_root), preset=args.sample_preset, seed=args.seed)
    options = PipelineOptions(
        shards=shard_options(args),
        min_color_pages=args.min_color_pages,
        chapters_per_task=args.chapters_per_task,
        encoder=args.encoder,
        refs=args.refs,
        min_refs=args.min_refs,
        k_per_patch=args.k_per_patch,
    )
    record = run_pipeline(
        input_root, args.output, options, local=args.local, ray_address=args.ray_address, num_cpus=args.num_cpus
    )
    print("\n".join(["", "pipeline summary", *stage_lines(record)]))
    if args.report:
        from pipelines.report import write_report

        report = write_report(args.output, args.report, labels=labels, seed=args.seed)
        record["report"] = {k: v for k, v in report.items() if k != "stages"}
        print(json.dumps(record["report"], indent=2))
    return record


if __name__ == "__main__":
    sys.exit(exit_status(main()))

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

from jobs.common import add_ray_arguments, configure_logging, exit_status, parse_size
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
    parser.add_argument("--size", type=parse_size, default=defaults.size, help="training size WxH (default 512x800)")
    parser.add_argument("--hires-scale", type=float, default=defaults.hires_scale)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--min-color-pages", type=int, default=defaults.min_color_pages)
    parser.add_argument("--encoder", default=defaults.encoder, help="retrieval encoder spec ('weightfree' offline)")
    parser.add_argument("--refs", type=int, default=defaults.refs)
    parser.add_argument("--min-refs", type=int, default=defaults.min_refs)
    parser.add_argument("--k-per-patch", type=int, default=defaults.k_per_patch)
    parser.add_argument("--renderer", default=defaults.renderer, help="screentone renderer spec")
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size, help="bytes per shard")
    parser.add_argument("--max-samples", type=int, default=None, help="samples per shard (overrides --shard-size)")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--bench-chapters", type=int, default=defaults.bench_chapters)
    parser.add_argument("--bench-refs", type=int, default=defaults.bench_refs)
    parser.add_argument("--bench-bw", type=int, default=defaults.bench_bw)
    parser.add_argument("--bench-max-series-fraction", type=float, default=defaults.bench_max_series_fraction)
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
        size=args.size,
        hires_scale=args.hires_scale,
        seed=args.seed,
        min_color_pages=args.min_color_pages,
        encoder=args.encoder,
        refs=args.refs,
        min_refs=args.min_refs,
        k_per_patch=args.k_per_patch,
        renderer=args.renderer,
        shard_size=args.shard_size,
        max_samples=args.max_samples,
        val_fraction=args.val_fraction,
        bench_chapters=args.bench_chapters,
        bench_refs=args.bench_refs,
        bench_bw=args.bench_bw,
        bench_max_series_fraction=args.bench_max_series_fraction,
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

"""Build or update the retrieval cache (pools, patch embeddings, top-k): `python -m jobs.retrieval --data OUT`.

Also runs under `ray job submit -- python -m jobs.retrieval --data OUT ...` (RAY_ADDRESS is then set).
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import (
    add_fault_arguments,
    add_fit_argument,
    add_ray_arguments,
    add_verify_argument,
    configure_fault_policy,
    start_ray,
)
from pipelines.core.cli import JobArgumentParser, int_range, parse_size, positive_int, run_job
from pipelines.core.encoders import DEFAULT_ENCODER, WEIGHT_FREE
from pipelines.core.pools import NearDuplicateRule
from pipelines.retrieval.inspect import character_hit_rate
from pipelines.retrieval.stage import RetrievalOptions, run_retrieval
from pipelines.runtime.preconditions import check_encoder, require_stage

PROG = "python -m jobs.retrieval"
ENCODER_HELP = (
    f"patch encoder: 'open_clip:<model or config.json>:<pretrained tag or checkpoint file>' or {WEIGHT_FREE!r} "
    f"(offline, no weights). Default {DEFAULT_ENCODER}, the paper's CLIP ViT-H/14: it needs its weights (about "
    "4 GB) in the Hugging Face cache, downloaded on first use, or give a local checkpoint file as "
    "open_clip:ViT-H-14:/path/to/open_clip_pytorch_model.bin"
)


def add_retrieval_arguments(parser: argparse.ArgumentParser, group_title: str | None = None) -> None:
    """The retrieval settings (shared with jobs.pipeline)."""
    group = parser.add_argument_group(group_title) if group_title else parser
    group.add_argument("--encoder", default=DEFAULT_ENCODER, help=ENCODER_HELP)
    group.add_argument("--refs", type=positive_int, default=20, help="reference pages in a frame's pool")
    group.add_argument(
        "--min-refs", type=positive_int, default=10, help="smallest pool accepted; a frame with fewer is excluded"
    )
    group.add_argument("--k-per-patch", type=positive_int, default=3, help="retrieved patches per query patch")
    group.add_argument(
        "--max-per-page",
        type=positive_int,
        default=None,
        help="diversity cap (beyond the paper): at most N of a frame's 4 x k patches from one reference page "
        "(default: off, the paper's independent top-k per query patch)",
    )


def add_encoder_arguments(parser: argparse.ArgumentParser, group_title: str = "encoder pool") -> None:
    """How the encoder runs (shared with jobs.pipeline): actor pool bounds, batch size, threads per actor."""
    group = parser.add_argument_group(group_title)
    group.add_argument(
        "--encoder-actors",
        type=int_range,
        default=None,
        metavar="N|MIN:MAX",
        help="encoder actors, a fixed count or MIN:MAX bounds of an autoscaling pool (default: one per GPU on a "
        "cluster with GPUs, which then embed while the CPUs prepare; without GPUs 1:CPUs/threads, spread over "
        "every node and grown while prepared chapters wait)",
    )
    group.add_argument(
        "--batch-size", type=positive_int, default=None, help="encoder batch (default: 64 on GPU, 32 on CPU)"
    )
    group.add_argument(
        "--encoder-threads",
        type=positive_int,
        default=None,
        help="CPUs each CPU encoder actor reserves, and its torch threads (default: 1 for the weight-free encoder, "
        "4 for open_clip models; GPU actors hold 1 CPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--data", required=True, help="the data folder written by the ingestion job (OUT)")
    add_retrieval_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="fixes every pool")
    parser.add_argument("--size", type=parse_size, default=(512, 800), help="frame size WxH (default 512x800)")
    add_fit_argument(parser)
    parser.add_argument("--rebuild", action="store_true", help="re-embed and re-search everything")
    add_encoder_arguments(parser)
    parser.add_argument(
        "--random-references",
        action="store_true",
        help="\"without RAP\" (our reading of the paper's ablation): draw each frame's patches at random from its pool "
        "instead of retrieving them; write such a run to its own data folder",
    )
    parser.add_argument("--faiss-threads", type=positive_int, default=1, help="FAISS OpenMP threads per search task")
    rule = NearDuplicateRule()
    dup = parser.add_argument_group("near-duplicates (never in a frame's pool)")
    dup.add_argument(
        "--dup-hash-distance",
        type=float,
        default=rule.max_hash_distance,
        help="edge-hash distance at or below which two pages are duplicates",
    )
    dup.add_argument(
        "--dup-loose-hash-distance",
        type=float,
        default=rule.loose_hash_distance,
        help="looser edge-hash distance that marks duplicates when the cosine also exceeds --dup-min-cosine",
    )
    dup.add_argument(
        "--dup-min-cosine",
        type=float,
        default=rule.min_cosine,
        help="whole-page cosine that, with the loose hash distance, marks duplicates",
    )
    parser.add_argument(
        "--eval-labels",
        default=None,
        help="sample-corpus labels JSONL: also print how often the top-1 patch shows a character of its query "
        "(default: not measured)",
    )
    add_fault_arguments(parser)
    add_verify_argument(parser)
    add_ray_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def retrieval_options(args: argparse.Namespace) -> RetrievalOptions:
    """The stage's options from the command line (validated on construction, before any work)."""
    width, height = args.size
    return RetrievalOptions(
        refs=args.refs,
        min_refs=args.min_refs,
        k_per_patch=args.k_per_patch,
        seed=args.seed,
        width=width,
        height=height,
        fit_resample=args.fit_resample,
        rule=NearDuplicateRule(args.dup_hash_distance, args.dup_loose_hash_distance, args.dup_min_cosine),
        max_per_page=args.max_per_page,
        random_references=args.random_references,
        encoder=args.encoder,
        batch_size=args.batch_size,
        encoder_actors=args.encoder_actors,
        encoder_threads=args.encoder_threads,
        faiss_threads=args.faiss_threads,
        rebuild=args.rebuild,
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    options = retrieval_options(args)
    check_encoder(args.encoder)
    require_stage(args.data, "ingest", needed_by="retrieval")
    configure_fault_policy(args)
    start_ray(args)
    summary = run_retrieval(args.data, options, local=args.local, verify=args.verify)
    print(json.dumps(summary, indent=2, sort_keys=True))
    if args.eval_labels:
        hits = character_hit_rate(args.data, args.eval_labels).as_dict()
        print(json.dumps({"character_hit_rate": hits}, indent=2))
        summary = {**summary, "character_hit_rate": hits}
    return summary


if __name__ == "__main__":
    sys.exit(run_job(main, prog=PROG))

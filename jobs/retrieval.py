"""Build or update the retrieval cache (pools, patch embeddings, top-k): `python -m jobs.retrieval --data OUT`.

Also runs under `ray job submit -- python -m jobs.retrieval --data OUT ...` (RAY_ADDRESS is then set).
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import add_ray_arguments, exit_status, parse_size, start_ray
from pipelines.encoders import DEFAULT_ENCODER, WEIGHT_FREE
from pipelines.pools import NearDuplicateRule
from pipelines.retrieval import run_retrieval
from pipelines.retrieval_eval import character_hit_rate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.retrieval", description=__doc__)
    parser.add_argument("--data", required=True, help="the data folder written by the ingestion job (OUT)")
    parser.add_argument(
        "--encoder",
        default=DEFAULT_ENCODER,
        help=f"'open_clip:<model or config.json>:<pretrained tag or checkpoint>' or {WEIGHT_FREE!r} "
        f"(default {DEFAULT_ENCODER})",
    )
    parser.add_argument("--refs", type=int, default=20, help="reference pages per frame's pool (default 20)")
    parser.add_argument(
        "--min-refs", type=int, default=10, help="smallest pool accepted; smaller: the frame is excluded (default 10)"
    )
    parser.add_argument("--k-per-patch", type=int, default=3, help="retrieved patches per query patch (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="fixes every pool")
    parser.add_argument("--size", type=parse_size, default=(512, 800), help="frame size WxH (default 512x800)")
    parser.add_argument("--rebuild", action="store_true", help="re-embed and re-search everything")
    parser.add_argument("--batch-size", type=int, default=None, help="encoder batch (default 64 on GPU, 32 on CPU)")
    parser.add_argument("--encoder-actors", type=int, default=None, help="encoder actors (default: one per GPU)")
    parser.add_argument("--faiss-threads", type=int, default=1, help="FAISS OpenMP threads per search task")
    rule = NearDuplicateRule()
    dup = parser.add_argument_group("near-duplicates (never in a frame's pool)")
    dup.add_argument("--dup-hash-distance", type=float, default=rule.max_hash_distance)
    dup.add_argument("--dup-loose-hash-distance", type=float, default=rule.loose_hash_distance)
    dup.add_argument("--dup-min-cosine", type=float, default=rule.min_cosine)
    parser.add_argument(
        "--eval-labels",
        default=None,
        help="sample-corpus labels JSONL: also print how often the top-1 patch shows a character of its query",
    )
    add_ray_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start_ray(args)
    summary = run_retrieval(
        args.data,
        encoder=args.encoder,
        refs=args.refs,
        min_refs=args.min_refs,
        k_per_patch=args.k_per_patch,
        seed=args.seed,
        width=args.size[0],
        height=args.size[1],
        rebuild=args.rebuild,
        batch_size=args.batch_size,
        encoder_actors=args.encoder_actors,
        faiss_threads=args.faiss_threads,
        rule=NearDuplicateRule(args.dup_hash_distance, args.dup_loose_hash_distance, args.dup_min_cosine),
        local=args.local,
    )
    print(json.dumps(summary, indent=2, sort_keys=True))
    if args.eval_labels:
        hits = character_hit_rate(args.data, args.eval_labels).as_dict()
        print(json.dumps({"character_hit_rate": hits}, indent=2))
        summary = {**summary, "character_hit_rate": hits}
    return summary


if __name__ == "__main__":
    sys.exit(exit_status(main()))

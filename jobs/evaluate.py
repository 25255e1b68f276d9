"""Score colourisations against their ground truth: `python -m jobs.evaluate --pred PRED --truth TRUTH [options]`.

TRUTH is a benchmark folder (from `jobs.shards`/`jobs.pipeline`; predictions at PRED/<chapter_id>/<page_id>.png)
or a plain folder of images (PRED mirrors its relative paths). PSNR and SSIM are always computed; CLIP-IS, FID and
the aesthetic score when their networks are given, else they are named as skipped with the reason. Exit status:
0 when at least one page was scored (missing or broken predictions are counted and listed, not fatal; with
--strict every page must be), 1 when none was or on a runtime error, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

from evaluation.scoring import RESAMPLING, EvaluateOptions, run_evaluate
from pipelines.core.cli import JobArgumentParser, configure_logging, run_job
from pipelines.core.encoders import WEIGHT_FREE
from pipelines.core.errors import JobFailed

PROG = "python -m jobs.evaluate"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = JobArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--pred", required=True, help="folder of predictions (PRED)")
    parser.add_argument("--truth", required=True, help="benchmark folder, or a plain folder of ground-truth images")
    parser.add_argument("--output", default=None, help="where tables, grids and the summary go (default PRED/evaluate)")
    parser.add_argument(
        "--style",
        default=None,
        help="input style of the predictions (grey, halftone, screenstyle, sketch, shading; default: 'style' of "
        "PRED/colorize.summary.json); picks the paper row (sketch and shading have none)",
    )
    parser.add_argument(
        "--resize",
        choices=sorted(RESAMPLING),
        default=None,
        help="resample predictions of another size than their ground truth (default: such a page is an error)",
    )
    clip = parser.add_argument_group("CLIP image similarity and aesthetic score")
    clip.add_argument(
        "--clip-encoder",
        default=None,
        help=f"encoder spec as in jobs.retrieval: 'open_clip:<model or config.json>:<tag or checkpoint>' or "
        f"{WEIGHT_FREE!r} (default: CLIP-IS skipped)",
    )
    clip.add_argument(
        "--aesthetic-predictor",
        default=None,
        help="linear/MLP head file on CLIP embeddings, e.g. LAION's sac+logos+ava1-l14-linearMSE.pth "
        "(default: skipped)",
    )
    clip.add_argument(
        "--aesthetic-encoder",
        default=None,
        help="encoder the head was trained on, e.g. open_clip:ViT-L-14:openai (default: --clip-encoder)",
    )
    clip.add_argument("--aesthetic-relu", action="store_true", help="ReLU between the head's layers (reluMSE heads)")
    fid = parser.add_argument_group("FID (one of)").add_mutually_exclusive_group()
    fid.add_argument(
        "--inception-weights",
        default=None,
        help="torch-fidelity Inception-v3 file weights-inception-2015-12-05-6726825d.pth (the standard FID; "
        "default: FID skipped unless --fid-features)",
    )
    fid.add_argument(
        "--fid-features",
        default=None,
        help=f"another feature network: {WEIGHT_FREE!r}, 'open_clip:<model>:<weights>', 'torchscript:<file>' or "
        "'<module>:<callable>' returning an nn.Module (uint8 N x 3 x H x W -> N x D); default: none",
    )
    parser.add_argument(
        "--ssim-precision",
        choices=["float64", "float32"],
        default="float64",
        help="float64 (default, exact: identical pages score 1) or float32 (~30x faster on CPU, ~2e-4 off)",
    )
    parser.add_argument(
        "--fid-per-chapter",
        action="store_true",
        help="FID of every chapter too, not only overall (~2 min each at 2048-d on 2 CPU cores; biased on few pages)",
    )
    parser.add_argument("--grid-pages", type=int, default=3, help="best and worst pages shown per metric (default 3)")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 1) unless every ground-truth page was scored (default: a score over the pages found)",
    )
    parser.add_argument("--device", default=None, help="torch device for the networks (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.aesthetic_predictor and not (args.aesthetic_encoder or args.clip_encoder):
        parser.error("--aesthetic-predictor needs --aesthetic-encoder (or --clip-encoder): the embeddings it scores")
    if args.grid_pages < 1:
        parser.error("--grid-pages must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_logging()
    options = EvaluateOptions(
        output=args.output,
        style=args.style,
        resize=args.resize,
        clip_encoder=args.clip_encoder,
        inception_weights=args.inception_weights,
        fid_features=args.fid_features,
        aesthetic_predictor=args.aesthetic_predictor,
        aesthetic_encoder=args.aesthetic_encoder,
        aesthetic_relu=args.aesthetic_relu,
        grid_pages=args.grid_pages,
        device=args.device,
        ssim_precision=args.ssim_precision,
        fid_per_chapter=args.fid_per_chapter,
    )
    summary = run_evaluate(args.pred, args.truth, options)
    first = summary["failures"][0]["reason"] if summary["failures"] else "no ground-truth pages"
    if not summary["scored"]:
        raise JobFailed(f"no page scored ({summary['failed']} failed; first: {first})", summary)
    if args.strict and summary["failed"]:
        raise JobFailed(f"--strict: {summary['headline']}; first: {first}", summary)
    return summary


def show(summary: dict) -> str:
    """What a finished run prints: the headline ("scored N of M pages"), then the overall scores as JSON."""
    shown = {k: summary[k] for k in ("overall", "paper_row", "scored", "failed", "output")}
    return f"{summary['headline']}\n{json.dumps(shown, indent=2)}"


def cli(argv: list[str] | None = None) -> int:
    """The command line: exit 0 when a page was scored (every page with --strict), 1 when not or on an error (one
    line, or --debug)."""
    return run_job(main, argv, prog=PROG, show=show)


if __name__ == "__main__":
    sys.exit(cli())

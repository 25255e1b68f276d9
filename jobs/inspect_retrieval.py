"""Contact sheets of the retrieval cache: `python -m jobs.inspect_retrieval --data OUT --frame ID [--out PNG]`
or `--random N --seed S --out-dir DIR`. Each sheet shows the B&W frame with its four query boxes and, per box,
the retrieved reference patches with their page ids and scores.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.core.cli import JobArgumentParser, positive_int, run_job
from pipelines.retrieval.inspect import write_contact_sheets
from pipelines.runtime.preconditions import require_stage

PROG = "python -m jobs.inspect_retrieval"


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--data", required=True, help="the data folder of the retrieval job (OUT)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--frame", action="append", help="frame (page) id; repeat for several; this or --random is required"
    )
    which.add_argument(
        "--random",
        type=positive_int,
        metavar="N",
        help="N frames drawn at random (with --seed); this or --frame is required",
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes the --random draw")
    parser.add_argument("--out", default=None, help="output PNG for a single --frame (default: <out-dir>/<id>.png)")
    parser.add_argument("--out-dir", default="contact_sheets", help="output folder")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out and (args.random is not None or len(args.frame) != 1):
        parser.error("--out names one file: use it with a single --frame, else --out-dir")
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    require_stage(args.data, "retrieval", needed_by="inspect_retrieval")
    written = write_contact_sheets(
        args.data,
        frame_ids=args.frame,
        random_frames=args.random or 0,
        seed=args.seed,
        out=args.out,
        out_dir=args.out_dir,
    )
    for path in written:
        print(path)
    return [str(p) for p in written]


if __name__ == "__main__":
    sys.exit(run_job(main, prog=PROG))

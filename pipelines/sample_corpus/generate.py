"""Entry point of the sample corpus: `generate_corpus` writes a preset's corpus under a root and its labels beside it,
atomically; `python -m pipelines.sample_corpus.generate --out DIR` does the same from the command line."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.core.storage import atomic_write_bytes
from pipelines.sample_corpus.builder import Builder, write_chapter
from pipelines.sample_corpus.labels import CorpusInfo, default_labels_path, summary_path_for
from pipelines.sample_corpus.plans import PRESETS

_BASE_SIZE = {"tiny": (256, 384), "small": (384, 544), "demo": (512, 720)}


def generate_corpus(
    root: Path,
    *,
    labels: Path | None = None,
    seed: int = 0,
    preset: str = "small",
    scale: float = 1.0,
    overwrite: bool = False,
) -> CorpusInfo:
    """Write the `preset` corpus under `root` and its labels beside it; returns the summary.

    `scale` multiplies the preset's page size (tiny 256x384, small 384x544, demo 512x720). The corpus is built in
    a hidden sibling folder and renamed into place; the labels file is written last (the completion marker).
    An existing `root` is replaced only with `overwrite=True` and only if it has labels beside it (i.e. it is a
    generated corpus), so a user's real data is never deleted.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    root = Path(root).absolute()
    labels = Path(labels).absolute() if labels is not None else default_labels_path(root)
    if labels == root or root in labels.parents:
        raise ValueError(f"labels {labels} must be outside the corpus root {root}: ingestion would read them")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"corpus root {root} exists and is not empty (pass overwrite=True to replace it)")
        if not labels.exists():
            raise FileExistsError(f"refusing to replace {root}: no labels file {labels} marks it as a generated corpus")
    base_w, base_h = _BASE_SIZE[preset]
    size = (max(64, 2 * round(base_w * scale / 2)), max(96, 2 * round(base_h * scale / 2)))

    builder = Builder(seed, preset, size)
    partial = root.parent / f".{root.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    all_labels: list[dict[str, Any]] = []
    summaries = []
    for plan in builder.plans:
        files, junk, summary = builder.chapter(plan)
        write_chapter(partial, plan, files, junk)
        all_labels.extend(f.label for f in files)
        summaries.append(summary)

    summary_path = summary_path_for(labels)
    info = CorpusInfo(
        root=root,
        labels_path=labels,
        summary_path=summary_path,
        preset=preset,
        seed=seed,
        page_size=size,
        n_files=len(all_labels),
        counts_by_style=dict(sorted(Counter(lb["style"] for lb in all_labels).items())),
        chapters=summaries,
        cast=[ch for series in sorted(builder.casts) for ch in builder.casts[series]],
    )
    labels.unlink(missing_ok=True)
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    atomic_write_bytes(summary_path, (json.dumps(info.to_dict(summary_path.parent), indent=2) + "\n").encode())
    atomic_write_bytes(labels, "".join(json.dumps(lb) + "\n" for lb in all_labels).encode())
    return info


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate the deterministic synthetic manga corpus.")
    parser.add_argument("--out", type=Path, required=True, help="corpus root to create")
    parser.add_argument("--labels", type=Path, default=None, help="labels JSONL (default: beside the root)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the preset's page size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing generated corpus")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = generate_corpus(
        args.out, labels=args.labels, seed=args.seed, preset=args.preset, scale=args.scale, overwrite=args.overwrite
    )
    brief = {k: v for k, v in info.to_dict().items() if k not in ("chapters", "cast")}
    brief["chapters"] = [
        f"{c.source}: {c.content} {c.n_color} colour / {c.n_bw} bw / {c.n_broken} broken" for c in info.chapters
    ]
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

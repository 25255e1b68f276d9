"""Score colourisations against their ground truth the way ColorFlow-Bench does (`python -m jobs.evaluate`).

Truth is a benchmark folder (format version 2, read with `pipelines.shards.benchmark.read_benchmark` and
`read_chapter_index`; predictions at ``PRED/<chapter_id>/<page_id>.png``) or a plain folder of images (PRED
mirrors its relative paths; the chapter of a page is its folder). A prediction may be PNG, JPEG or WebP.

The input style of the predictions (``grey``, ``halftone``, ``screenstyle``, and the line-art family's ``sketch``
and ``shading``) comes from ``--style`` or else from ``PRED/colorize.summary.json`` (``"style"``); what that style
was rendered with (a renderer id, or the line extractor's for the line-art styles) comes from the benchmark's index,
never from folder names. Only a style whose renderer id is a ScreenStyle renderer is set beside the paper's
screenstyle figures, greyscale beside its greyscale figures; halftone, sketch and shading have no paper row (the
paper scored neither line-art style).

Every ground-truth page becomes a row of ``per_page.csv``: scored, or failed with its reason (missing,
unreadable, other size than the ground truth without ``--resize``, metric error). Tables hold the scored pages;
failures are counted beside them and listed in the summary. The job succeeds when at least one page was
scored. Outputs (in ``--output``, default ``PRED/evaluate``; every file written atomically, the summary last)::

    per_page.csv                    every page: status, reason, its values
    per_chapter.csv / .md           one row per chapter, the overall row and the paper's row
    overall.csv / .md               the overall row and the paper's row
    grids/<metric>.jpg              the best and worst pages by each per-page metric (ground truth | prediction)
    evaluate.summary.json           counts, failures, skipped metrics and why, specs, rates: written last
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from evaluation.metrics import (
    AestheticHead,
    FeatureExtractor,
    frechet_distance,
    inception_features,
    load_aesthetic_head,
    resolve_fid_features,
)
from evaluation.reports import (
    LABELS,
    METRICS,
    PAGE_METRICS,
    GridPage,
    json_value,
    paper_row,
    ranked,
    write_grid,
    write_tables,
)
from pipelines.core.benchmark_format import read_benchmark, read_chapter_index
from pipelines.core.image_metrics import SSIM_PRECISIONS, ImageEmbedder, cosine, psnr, ssim
from pipelines.core.storage import TMP_TAG, atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SUMMARY_NAME = "evaluate.summary.json"
COLORIZE_SUMMARY = "colorize.summary.json"
OK = "ok"


@dataclass(frozen=True)
class EvaluateOptions:
    output: str | None = None  # default PRED/evaluate
    style: str | None = None  # overrides PRED/colorize.summary.json
    resize: str | None = None  # resample predictions of another size (a key of RESAMPLING)
    clip_encoder: str | None = None  # pipelines.core.encoders spec for CLIP-IS
    inception_weights: str | None = None  # torch-fidelity Inception-v3 weights file for FID
    fid_features: str | None = None  # or a user-named feature network (see evaluation.metrics.resolve_fid_features)
    aesthetic_predictor: str | None = None  # linear/MLP head file (see evaluation.metrics.load_aesthetic_head)
    aesthetic_encoder: str | None = None  # encoder spec the head was trained on (default: clip_encoder)
    aesthetic_relu: bool = False
    grid_pages: int = 3
    device: str | None = None  # default: cuda when available
    ssim_precision: str = "float64"  # or "float32": ~30x faster on CPU, ~2e-4 off
    fid_per_chapter: bool = False  # FID of every chapter too (one eigen-decomposition of D x D per chapter)

    def __post_init__(self) -> None:
        if self.ssim_precision not in SSIM_PRECISIONS:
            raise ValueError(f"ssim_precision {self.ssim_precision!r}: expected one of {sorted(SSIM_PRECISIONS)}")
        if self.resize is not None and self.resize not in RESAMPLING:
            raise ValueError(f"resize {self.resize!r}: expected one of {sorted(RESAMPLING)}")
        if self.inception_weights and self.fid_features:
            raise ValueError("give --inception-weights or --fid-features, not both")
        if self.aesthetic_predictor and not (self.aesthetic_encoder or self.clip_encoder):
            raise ValueError("--aesthetic-predictor needs the encoder it was trained on: --aesthetic-encoder")
        if self.grid_pages < 1:
            raise ValueError(f"grid_pages must be >= 1, got {self.grid_pages}")


# ----------------------------------------------------------------------------------------------------------------
# Pairing predictions with the ground truth


@dataclass(frozen=True)
class PagePair:
    chapter: str  # benchmark chapter id, or the folder of a plain-folder page ("." at the top)
    page_id: str
    truth: Path
    expected: str  # PRED-relative path of the prediction without extension
    prediction: Path | None  # None: no file found

    @property
    def key(self) -> str:
        return self.page_id if self.chapter == "." else f"{self.chapter}/{self.page_id}"


@dataclass
class TruthSet:
    kind: str  # "benchmark" | "folder"
    root: Path
    pairs: list[PagePair]
    styles: dict[str, str] = field(default_factory=dict)  # benchmark: style -> renderer id
    extra_predictions: list[str] = field(default_factory=list)  # images under PRED that match no ground truth


def find_prediction(pred: Path, stem: str) -> Path | None:
    """The prediction file for a PRED-relative stem: PNG first, then JPEG and WebP."""
    for extension in IMAGE_EXTENSIONS:
        path = pred / f"{stem}{extension}"
        if path.is_file():
            return path
    return None


def _images_under(folder: Path, skip: Path | None = None) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and TMP_TAG not in p.name
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and (skip is None or not p.is_relative_to(skip))
    )


def collect_pairs(pred: Path, truth: Path, output: Path) -> TruthSet:
    """Every ground-truth page with its prediction (or None), from a benchmark folder or a plain folder."""
    if not truth.is_dir():
        raise FileNotFoundError(f"--truth {truth}: no such folder")
    if not pred.is_dir():
        raise FileNotFoundError(f"--pred {pred}: no such folder")
    pairs: list[PagePair] = []
    styles: dict[str, str] = {}
    if (truth / "benchmark.json").exists() or any(truth.glob("*/index.json")):
        kind = "benchmark"  # chapters without benchmark.json: an unfinished benchmark, which read_benchmark refuses
        for chapter in read_benchmark(truth)["chapters"]:
            chapter_id = chapter["chapter_id"]
            index = read_chapter_index(truth, chapter_id)
            for style, entry in index["styles"].items():
                styles.setdefault(style, entry["renderer_id"])
            for page in index["bw"]:
                stem = f"{chapter_id}/{page['page_id']}"
                truth_path = truth / chapter_id / page["gt"]
                pairs.append(PagePair(chapter_id, page["page_id"], truth_path, stem, find_prediction(pred, stem)))
    else:
        kind = "folder"
        for path in _images_under(truth, skip=pred if pred.is_relative_to(truth) else None):
            relative = path.relative_to(truth)
            stem = relative.with_suffix("").as_posix()
            chapter = relative.parent.as_posix()
            pairs.append(PagePair(chapter, relative.stem, path, stem, find_prediction(pred, stem)))
        if not pairs:
            raise FileNotFoundError(f"--truth {truth}: no images ({', '.join(IMAGE_EXTENSIONS)}) and no benchmark.json")
    return TruthSet(kind, truth, pairs, styles, _extra_predictions(pred, pairs, output, truth))


def _extra_predictions(pred: Path, pairs: list[PagePair], output: Path, truth: Path) -> list[str]:
    """Images in PRED's chapter folders that match no ground-truth page (a misnamed page shows up here).

    Only the folders pages belong in are looked at, so colorize's contact sheets and our own output are not.
    """
    chapters = {p.chapter for p in pairs}
    matched = {p.prediction.resolve() for p in pairs if p.prediction is not None}
    return [
        path.relative_to(pred).as_posix()
        for path in _images_under(pred, skip=output)
        if path.relative_to(pred).parent.as_posix() in chapters
        and path.resolve() not in matched
        and not path.resolve().is_relative_to(truth.resolve())
    ]


# ----------------------------------------------------------------------------------------------------------------
# Style and the paper's row


@dataclass(frozen=True)
class StyleChoice:
    name: str | None
    renderer_id: str | None
    source: str
    paper: str | None  # key of evaluate_report.PAPER_FIGURES, or None
    note: str


def paper_style(style: str, renderer_id: str | None) -> str | None:
    """The paper row these predictions may stand beside: only real ScreenStyle or greyscale inputs have one."""
    if style == "grey" and renderer_id in (None, "grey"):
        return "grey"
    if renderer_id is not None:
        return "screenstyle" if renderer_id.split("-", 1)[0] == "screenstyle" else None
    return "screenstyle" if style == "screenstyle" else None


def choose_style(pred: Path, truth: TruthSet, style: str | None) -> StyleChoice:
    """The predictions' input style: ``--style``, else PRED/colorize.summary.json; checked against the benchmark."""
    source = "--style"
    if style is None:
        summary_path = pred / COLORIZE_SUMMARY
        if summary_path.is_file():
            style = _read_json_file(summary_path).get("style")
            source = f"PRED/{COLORIZE_SUMMARY}"
    if not style:
        note = f"style unknown (no --style, no 'style' in PRED/{COLORIZE_SUMMARY}): no paper row"
        return StyleChoice(None, None, "unknown", None, note)
    renderer_id = None
    if truth.kind == "benchmark":
        if style not in truth.styles:
            raise ValueError(
                f"style {style!r} (from {source}) is not a style of the benchmark {truth.root}: it has "
                f"{sorted(truth.styles)}"
            )
        renderer_id = truth.styles[style]
    paper = paper_style(style, renderer_id)
    if paper is None:
        note = (
            f"no paper row: the paper scored ScreenStyle and greyscale inputs only; these predictions are from "
            f"{style!r} input (renderer {renderer_id or 'not recorded'})"
        )
    elif renderer_id is None:
        note = f"paper row {paper!r} chosen by the style name alone ({source}): a plain folder records no renderer"
    else:
        note = f"paper row {paper!r}: input style {style!r}, renderer {renderer_id}"
    return StyleChoice(style, renderer_id, source, paper, note)


def _read_json_file(path: Path) -> dict[str, Any]:
    import json

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable JSON ({error})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return document


# ----------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Scorers:
    """The loaded metric networks, what each is (specs), and the metrics that are off with their reasons."""

    device: str = "cpu"
    ssim_precision: str = "float64"
    fid: FeatureExtractor | None = None
    clip: ImageEmbedder | None = None
    aesthetic: AestheticHead | None = None
    aesthetic_embedder: ImageEmbedder | None = None
    specs: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def load_scorers(options: EvaluateOptions, device: str) -> Scorers:
    specs = {
        "psnr": "torchmetrics PSNR, data_range 255, float64",
        "ssim": f"torchmetrics SSIM, data_range 255, Gaussian 11 sigma 1.5, {options.ssim_precision}",
    }
    scorers = Scorers(device=device, ssim_precision=options.ssim_precision, specs=specs)
    if options.inception_weights:
        scorers.fid = inception_features(options.inception_weights, device)
    elif options.fid_features:
        scorers.fid = resolve_fid_features(options.fid_features, device)
    else:
        scorers.skipped["fid"] = "no --inception-weights or --fid-features given"
    if scorers.fid is not None:
        scorers.specs["fid"] = scorers.fid.spec
    if options.clip_encoder:
        scorers.clip = ImageEmbedder(options.clip_encoder, device)
        scorers.specs["clip_is"] = scorers.clip.spec
    else:
        scorers.skipped["clip_is"] = "no --clip-encoder given"
    if options.aesthetic_predictor:
        encoder_spec = options.aesthetic_encoder or options.clip_encoder
        if scorers.clip is not None and encoder_spec == scorers.clip.spec:
            scorers.aesthetic_embedder = scorers.clip
        else:
            scorers.aesthetic_embedder = ImageEmbedder(encoder_spec, device)
        scorers.aesthetic = load_aesthetic_head(options.aesthetic_predictor, options.aesthetic_relu).to(device)
        if scorers.aesthetic.input_dim != scorers.aesthetic_embedder.dim:
            raise ValueError(
                f"--aesthetic-predictor {options.aesthetic_predictor} takes {scorers.aesthetic.input_dim}-d "
                f"embeddings, the encoder {encoder_spec} gives {scorers.aesthetic_embedder.dim}-d: pass the "
                "encoder it was trained on (--aesthetic-encoder)"
            )
        relu = ", ReLU between layers" if options.aesthetic_relu else ""
        scorers.specs["aesthetic"] = f"{Path(options.aesthetic_predictor).name}{relu} on {encoder_spec}"
    else:
        scorers.skipped["aesthetic"] = "no --aesthetic-predictor given"
    return scorers


@dataclass
class PageResult:
    pair: PagePair
    status: str  # OK, "missing", "unreadable", "wrong_size", "truth_unreadable", "error"
    reason: str = ""
    values: dict[str, float] = field(default_factory=dict)
    truth_features: np.ndarray | None = None
    prediction_features: np.ndarray | None = None


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def score_page(pair: PagePair, scorers: Scorers, resize: str | None) -> PageResult:
    """One page's values, or its failure with the reason; never raises for a bad file."""
    try:
        truth = _open_rgb(pair.truth)
    except OSError as error:
        return PageResult(pair, "truth_unreadable", f"ground truth {pair.truth}: {error}")
    if pair.prediction is None:
        return PageResult(pair, "missing", f"no prediction {pair.expected}.png (nor .jpg/.jpeg/.webp)")
    try:
        prediction = _open_rgb(pair.prediction)
    except OSError as error:
        return PageResult(pair, "unreadable", f"{pair.prediction}: {error}")
    if prediction.size != truth.size:
        if resize is None:
            size, wanted = "x".join(map(str, prediction.size)), "x".join(map(str, truth.size))
            reason = f"{pair.prediction} is {size}, its ground truth {wanted}; pass --resize to resample it"
            return PageResult(pair, "wrong_size", reason)
        prediction = prediction.resize(truth.size, RESAMPLING[resize])
    result = PageResult(pair, OK)
    try:
        truth_array, prediction_array = np.asarray(truth), np.asarray(prediction)
        result.values["psnr"] = psnr(prediction_array, truth_array)
        result.values["ssim"] = ssim(prediction_array, truth_array, scorers.ssim_precision, scorers.device)
        embeddings = None
        if scorers.clip is not None:
            embeddings = scorers.clip.embed([truth, prediction])
            result.values["clip_is"] = cosine(embeddings[0], embeddings[1])
        if scorers.aesthetic is not None:
            if scorers.aesthetic_embedder is scorers.clip and embeddings is not None:
                vector = embeddings[1:]
            else:
                vector = scorers.aesthetic_embedder.embed([prediction])
            result.values["aesthetic"] = float(scorers.aesthetic.score(vector)[0])
        if scorers.fid is not None:
            features = scorers.fid.features([truth_array, prediction_array])
            result.truth_features, result.prediction_features = features[0], features[1]
    except (RuntimeError, ValueError, TypeError) as error:
        return PageResult(pair, "error", f"{pair.key}: metric failed: {type(error).__name__}: {error}")
    return result


def group_row(
    scope: str, style: str | None, results: list[PageResult], fid_on: bool, device: str = "cpu"
) -> dict[str, Any]:
    """A table row: page counts and the means of the scored pages' values, FID over the group's pages."""
    scored = [r for r in results if r.status == OK]
    row: dict[str, Any] = {
        "scope": scope,
        "style": style or "",
        "pages": len(results),
        "scored": len(scored),
        "failed": len(results) - len(scored),
    }
    for metric in PAGE_METRICS:
        values = [r.values[metric] for r in scored if metric in r.values]
        row[metric] = float(np.mean(values)) if values else None
    row["fid"] = None
    if fid_on and len(scored) >= 2:
        real = np.stack([r.truth_features for r in scored])
        fake = np.stack([r.prediction_features for r in scored])
        row["fid"] = frechet_distance(real, fake, device)
    return row


# ----------------------------------------------------------------------------------------------------------------
# The job


def per_page_csv(results: list[PageResult]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["chapter", "page_id", "status", "reason", "prediction", *PAGE_METRICS])
    for r in results:
        values = [_cell_value(r.values.get(m)) for m in PAGE_METRICS]
        prediction = r.pair.prediction.as_posix() if r.pair.prediction else ""
        writer.writerow([r.pair.chapter, r.pair.page_id, r.status, r.reason, prediction, *values])
    return out.getvalue().encode()


def _cell_value(value: float | None) -> str:
    if value is None:
        return ""
    return "inf" if math.isinf(value) else f"{value:.6g}"


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: json_value(v) if k in METRICS else v for k, v in row.items()}


def write_grids(folder: Path, results: list[PageResult], count: int) -> list[str]:
    """grids/<metric>.jpg for each per-page metric with values; stale grids of earlier runs are removed."""
    scored = {r.pair.key: r for r in results if r.status == OK}
    written = []
    for metric in PAGE_METRICS:
        pages = [(key, r.values[metric]) for key, r in scored.items() if metric in r.values]
        path = folder / f"{metric}.jpg"
        if not pages:
            path.unlink(missing_ok=True)
            continue
        best, worst = ranked(pages, metric, count)

        def cells(keys: list[str], metric: str = metric) -> list[GridPage]:
            return [
                GridPage(
                    f"{key} {LABELS[metric]} {_short(scored[key].values[metric])}",
                    scored[key].pair.truth,
                    scored[key].pair.prediction,
                )
                for key in keys
            ]

        write_grid(path, LABELS[metric], cells(best), cells(worst))
        written.append(path.name)
    return written


def _short(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4g}"


def run_evaluate(pred: str | Path, truth: str | Path, options: EvaluateOptions | None = None) -> dict[str, Any]:
    """Score PRED against TRUTH, write the tables, grids and summary; returns the summary."""
    options = options or EvaluateOptions()
    started = time.perf_counter()
    pred, truth = Path(pred), Path(truth)
    output = Path(options.output) if options.output else pred / "evaluate"
    truth_set = collect_pairs(pred, truth, output)
    style = choose_style(pred, truth_set, options.style)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorers = load_scorers(options, device)
    (output / SUMMARY_NAME).unlink(missing_ok=True)  # the summary marks a finished run: gone until this one is

    results = [score_page(p, scorers, options.resize) for p in tqdm(truth_set.pairs, desc="evaluate", unit="page")]
    scored = [r for r in results if r.status == OK]
    failures = [{"page": r.pair.key, "status": r.status, "reason": r.reason} for r in results if r.status != OK]
    failed_counts: dict[str, int] = {}
    for failure in failures:
        failed_counts[failure["status"]] = failed_counts.get(failure["status"], 0) + 1

    fid_on = scorers.fid is not None
    chapter_fid = fid_on and options.fid_per_chapter
    chapters = sorted({r.pair.chapter for r in results})
    chapter_rows = [
        group_row(c, style.name, [r for r in results if r.pair.chapter == c], chapter_fid, device)
        for c in tqdm(chapters, desc="evaluate: chapter rows", unit="chapter", disable=not chapter_fid)
    ]
    overall = group_row("overall", style.name, results, fid_on, device)
    paper = paper_row(style.paper)
    infinite = sum(1 for r in scored if math.isinf(r.values["psnr"]))

    skipped = dict(scorers.skipped)
    if fid_on and len(scored) < 2:
        skipped["fid"] = "fewer than 2 scored pages"
    notes = [
        f"{len(scored)} of {len(results)} pages scored",
        f"predictions {pred}, ground truth {truth} ({truth_set.kind})",
        style.note,
    ]
    notes += [f"{LABELS[m]}: {spec}" for m, spec in scorers.specs.items()]
    notes += [f"{LABELS[m]} skipped: {reason}" for m, reason in skipped.items()]
    if chapter_fid:
        notes.append("FID is computed over each row's pages; on few pages it is biased upward (compare like with like)")
    elif fid_on:
        notes.append("FID per chapter not computed (--fid-per-chapter; each costs ~2 min at 2048-d on 2 CPU cores)")
    if failures:
        counts = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(failed_counts.items()))
        notes.append(f"{len(failures)} pages not scored ({counts}): listed in per_page.csv and {SUMMARY_NAME}")
    if infinite:
        notes.append(f"{infinite} pages equal their ground truth (PSNR inf); a mean over them is inf")
    if truth_set.extra_predictions:
        notes.append(f"{len(truth_set.extra_predictions)} images under PRED match no ground truth (ignored)")
    with_paper = [paper] if paper else []
    write_tables(output, "per_chapter", "Scores per chapter", [*chapter_rows, overall, *with_paper], notes)
    write_tables(output, "overall", "Overall scores", [overall, *with_paper], notes)
    atomic_write_bytes(output / "per_page.csv", per_page_csv(results))
    grids = write_grids(output / "grids", results, options.grid_pages)

    seconds = time.perf_counter() - started
    not_scored = f" ({', '.join(f'{n} {s}' for s, n in sorted(failed_counts.items()))} not scored)" if failures else ""
    summary = {
        "headline": f"scored {len(scored)} of {len(results)} pages{not_scored}",
        "pred": str(pred),
        "truth": str(truth),
        "truth_kind": truth_set.kind,
        "output": str(output),
        "style": {"name": style.name, "renderer_id": style.renderer_id, "source": style.source},
        "paper_row": paper["scope"] if paper else None,
        "paper_figures": {k: paper[k] for k in LABELS} if paper else None,
        "notes": notes,
        "metrics": {"specs": scorers.specs, "skipped": skipped},
        "pages": len(results),
        "scored": len(scored),
        "failed": len(failures),
        "failed_by_status": failed_counts,
        "failures": failures,
        "extra_predictions": truth_set.extra_predictions,
        "psnr_infinite_pages": infinite,
        "infinity": 'an infinite PSNR is written as the string "inf"',
        "overall": _json_row(overall),
        "chapters": {row["scope"]: _json_row(row) for row in chapter_rows},
        "files": ["per_page.csv", "per_chapter.csv", "per_chapter.md", "overall.csv", "overall.md"]
        + [f"grids/{g}" for g in grids],
        "seconds": round(seconds, 3),
        "pages_per_second": round(len(results) / seconds, 3) if seconds > 0 else None,
        "complete": bool(scored),
    }
    atomic_write_json(output / SUMMARY_NAME, summary)
    logger.info(
        "evaluate: %s in %.1f s (%.2f pages/s) -> %s",
        summary["headline"],
        seconds,
        len(results) / seconds if seconds > 0 else 0.0,
        output,
    )
    return summary

"""Colour black-and-white pages from colour references: `python -m jobs.colorize --pages P --refs R --output OUT`.

PAGES and REFS are folders or .cbz/.zip archives. `--benchmark DIR --style NAME` instead colours every chapter of
a benchmark folder from its own references (`OUT/<chapter_id>/<page_id>.png`, scored by `jobs.evaluate`).
Weights: `--icp`/`--gsrp` (our exports) or `--colorflow-weights` (the release), on a local SD1.5 folder (`--sd15`);
the line-art styles `--style sketch|shading` run the PixArt family instead (`--icp` a line-art export or a released
`sketch/`/`shading/` folder, or `--colorflow-weights`'s own, on `--pixart` with a `--text-cache`).
Also runs under `ray job submit -- python -m jobs.colorize ...` (RAY_ADDRESS is then set).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from inference.colorize import run_colorize
from inference.line_art import find_line_extractor_weights
from inference.models import DTYPES, GSRP_STATISTICS, MEMORY_MODES, SamplingOptions, resolve_model_paths
from inference.pixart_models import DEFAULT_GUIDANCE, lineart_folder, resolve_lineart_paths, text_cache_prompts
from inference.plan import (
    SIZE_PRESETS,
    ColorizeOptions,
    chapter_tasks_for_benchmark,
    chapter_tasks_for_sources,
    default_dtype,
    default_encoder,
    export_defaults,
)
from inference.sources import ColorizeInputError
from inference.styles import LINE_ART_STYLES, PAGE_STYLES, RELEASED_SCREENSTYLE_FOLDER, check_screenstyle_weights
from inference.worker import RunOptions
from jobs.common import add_ray_arguments, start_ray
from pipelines.core.cli import JobArgumentParser, parse_size, run_job
from pipelines.runtime.preconditions import created_folder

PROG = "python -m jobs.colorize"

PRESETS = ", ".join(f"{w}x{h}" for w, h in SIZE_PRESETS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = JobArgumentParser(prog=PROG, description=__doc__)
    inputs = parser.add_argument_group("what to colour")
    inputs.add_argument(
        "--pages",
        nargs="+",
        help="B&W pages: a folder or a .cbz/.zip archive (one chapter, natural page order); several of them (one "
        "output folder each, named after it); or a <series>/<chapter> tree (outputs in OUT/<series>/<chapter>)",
    )
    inputs.add_argument(
        "--refs",
        nargs="+",
        help="colour reference pages: a folder or archive per chapter of --pages, in the same order, or a tree of the "
        "same <series>/<chapter> as --pages",
    )
    inputs.add_argument("--benchmark", help="a benchmark folder (jobs.shards): colour every chapter from its refs")
    inputs.add_argument(
        "--style",
        choices=PAGE_STYLES,
        help="the pages' input style: with --pages, how each page is turned into the models' inputs (grey; "
        "screenstyle: ScreenStyle blended 50/50 with grey, the released app's GrayImage(ScreenStyle); halftone: the "
        "same blend with the weight-free halftone; sketch: line art; shading: line art with the release's flat "
        "shading; sketch and shading need line-art (PixArt) weights, the others SD1.5 ICP weights); with "
        "--benchmark, which style folder to colour (required). Default with --pages: screenstyle with "
        "--colorflow-weights, else grey (a released sketch/ or shading/ folder given as --icp: its own style)",
    )
    inputs.add_argument(
        "--line-extractor-weights",
        help="the release's line extractor (LE/erika.pth, or its folder) for --style sketch|shading (default: the "
        "LE/ folder of --colorflow-weights, else the weight-free XDoG extractor)",
    )
    inputs.add_argument(
        "--screenstyle-weights",
        help="ScreenStyle weights folder for --style screenstyle (default: the ScreenStyle/ folder of "
        "--colorflow-weights)",
    )
    inputs.add_argument("--output", required=True, help="output folder (OUT)")
    weights = parser.add_argument_group("weights (local files only)")
    weights.add_argument(
        "--icp",
        help="our ICP export folder (export.json, colorguider/, unet_lora/); or line-art weights: our PixArt export "
        "(training.train_pixart_icp's export/ or its run folder) or a released sketch/ or shading/ folder",
    )
    weights.add_argument("--gsrp", help="our GSRP export folder, or a released MultiResNetModel.bin")
    weights.add_argument(
        "--colorflow-weights", help="the released ColorFlow folder (GraySD/, image_encoder/), e.g. a HF snapshot"
    )
    weights.add_argument("--sd15", help="a local stable-diffusion-v1-5 folder (diffusers layout)")
    weights.add_argument(
        "--pixart",
        help="a local PixArt-XL-2 diffusers folder for the line-art family (default: the base model its export "
        "records); its text encoder is never loaded",
    )
    weights.add_argument(
        "--text-cache",
        help="the line-art family's prompt embeddings: a model.text_cache file (.safetensors + .json, made by "
        "`python -m model.text_cache PIXART_DIR FILE`; default: the cache its export records)",
    )
    weights.add_argument(
        "--gsrp-statistics",
        choices=GSRP_STATISTICS,
        default=None,
        help="BatchNorm statistics of the GSRP fusion net: 'page' (each page's own, as the released app runs its "
        "fusion net) or 'running' (the stored ones, eval mode); default: page for a released MultiResNetModel.bin, "
        "else what the GSRP export records (running when it records nothing)",
    )
    weights.add_argument(
        "--prompt-cache",
        default=None,
        help="folder of cached prompt embeddings for --guidance-scale 1 (default: prompt_embeds/ in the ICP "
        "weights folder); with a cached embedding the text encoder is never loaded",
    )
    weights.add_argument(
        "--references-only", action="store_true", help="retrieve and draw contact sheets only; no model is loaded"
    )
    retrieval = parser.add_argument_group("retrieval")
    retrieval.add_argument(
        "--encoder",
        default=None,
        help="'open_clip:<model>:<weights>', 'weightfree' or 'clip_vision:<folder>' (a transformers "
        "CLIPVisionModelWithProjection); default: the release's image_encoder/ with --colorflow-weights, else "
        "the paper's open_clip ViT-H-14",
    )
    retrieval.add_argument(
        "--max-per-page", type=int, default=None, help="cap on one reference page's patches per page (default: none)"
    )
    sampling = parser.add_argument_group("sampling (defaults: the export's export.json, then the released app's)")
    sampling.add_argument(
        "--size",
        type=parse_size,
        default=None,
        help=f"frame WxH: {PRESETS} or multiples of 16 (default: the ICP export's, else 512x800)",
    )
    sampling.add_argument(
        "--sr-scale",
        type=float,
        default=None,
        help="GSRP size as a multiple of --size (default: the GSRP export's, else 1.5)",
    )
    sampling.add_argument(
        "--steps", type=int, default=None, help="UniPC (SD1.5) or DPM-Solver (PixArt) steps (default: 10, as released)"
    )
    sampling.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance (default: 7.5 for SD1.5, 4.5 for PixArt, as released); 1 turns it off: one "
        "UNet pass per step and the prompt embedded once and cached (see --prompt-cache)",
    )
    sampling.add_argument("--prompt", default=None, help="text prompt (default: the ICP export's, else 'manga')")
    sampling.add_argument("--negative-prompt", default=None, help="negative prompt (default: empty, as released)")
    sampling.add_argument("--conditioning-scale", type=float, default=1.0, help="guider residual scale")
    sampling.add_argument("--seed", type=int, default=0, help="noise of each page: derived from the seed and the page")
    run = parser.add_argument_group("devices")
    run.add_argument("--device", default=None, help="torch device of the workers (default: cuda when present)")
    run.add_argument(
        "--dtype", choices=DTYPES, default=None, help="model dtype (default: float16 on GPU, else float32)"
    )
    run.add_argument(
        "--memory",
        choices=MEMORY_MODES,
        default="none",
        help="lower peak memory: 'vae-slicing' (sliced and tiled VAE) or 'offload' (models on the GPU one at a time)",
    )
    run.add_argument("--batch-size", type=int, default=1, help="pages per ICP call (default 1)")
    run.add_argument("--actors", type=int, default=None, help="Ray workers (default: one per GPU, else 1)")
    run.add_argument("--cpus-per-actor", type=int, default=None, help="CPUs of a CPU worker (default: all / actors)")
    run.add_argument("--rebuild", action="store_true", help="redo every page, finished or not")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    if bool(args.benchmark) == bool(args.pages or args.refs):
        parser.error("give --pages and --refs, or --benchmark (with --style)")
    if args.benchmark and not args.style:
        parser.error("--benchmark needs --style (e.g. grey, or the screentone style of its index)")
    if not args.benchmark and not (args.pages and args.refs):
        parser.error("--pages and --refs go together")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def build_settings(args: argparse.Namespace) -> ColorizeOptions:
    lineart = _lineart_weights(args)
    if lineart is not None:
        return _lineart_settings(args, lineart)
    if args.style in LINE_ART_STYLES and not args.references_only:
        raise ColorizeInputError(
            f"--style {args.style} is a line-art style: it needs line-art (PixArt) weights (--icp a PixArt export or "
            "a released sketch/ or shading/ folder, or --colorflow-weights holding them)"
        )
    models = None
    defaults = {}
    if not args.references_only:
        models = resolve_model_paths(
            icp=args.icp,
            gsrp=args.gsrp,
            colorflow_weights=args.colorflow_weights,
            sd15=args.sd15,
            prompt_cache=args.prompt_cache,
        )
        defaults = export_defaults(args.icp, args.gsrp)
    style, screenstyle_weights = _page_style(args)

    def chosen(value, key: str, fallback):
        """The command line wins, then the export's export.json, then the released app's value."""
        return value if value is not None else defaults.get(key, fallback)

    return _options(
        args,
        models,
        size=args.size or defaults.get("size", (512, 800)),
        sr_scale=chosen(args.sr_scale, "sr_scale", 1.5),
        steps=chosen(args.steps, "steps", 10),
        guidance_scale=chosen(args.guidance_scale, "guidance_scale", 7.5),
        prompt=chosen(args.prompt, "prompt", "manga"),
        negative_prompt=chosen(args.negative_prompt, "negative_prompt", ""),
        style=style,
        screenstyle_weights=screenstyle_weights,
        line_extractor_weights=_line_extractor(args, style),
    )


def _options(
    args: argparse.Namespace,
    models: Any,
    *,
    size: tuple[int, int],
    sr_scale: float,
    steps: int,
    guidance_scale: float,
    prompt: str,
    negative_prompt: str,
    style: str,
    **style_weights: str | None,
) -> ColorizeOptions:
    """The settings both families build the same way from the run's flags, given what each family chose."""
    sampling = SamplingOptions(
        steps=steps,
        guidance_scale=guidance_scale,
        prompt=prompt,
        negative_prompt=negative_prompt,
        conditioning_scale=args.conditioning_scale,
        dtype=args.dtype or "float32",  # a placeholder: main chooses the default once the inputs are listed
        memory=args.memory,
        gsrp_statistics=args.gsrp_statistics or _default_statistics(models),
    )
    width, height = size
    return ColorizeOptions(
        width=width,
        height=height,
        sr_scale=sr_scale,
        seed=args.seed,
        encoder=args.encoder or default_encoder(args.colorflow_weights),
        max_per_page=args.max_per_page,
        sampling=sampling,
        models=models,
        style=style,
        **style_weights,
    )


def _lineart_weights(args: argparse.Namespace) -> Path | None:
    """The line-art style folder the weight options name, or None (the SD1.5 family): `--icp` holding line-art
    weights, or the release's `sketch/`/`shading/` of `--colorflow-weights` when a line-art style is asked for."""
    folder = lineart_folder(args.icp)
    if folder is None and args.colorflow_weights and args.style in LINE_ART_STYLES and not args.icp:
        folder = Path(args.colorflow_weights) / args.style
        if not folder.is_dir():
            raise ColorizeInputError(
                f"--style {args.style}: --colorflow-weights {args.colorflow_weights} has no {args.style}/ folder"
            )
    return folder


def _lineart_settings(args: argparse.Namespace, weights: Path) -> ColorizeOptions:
    """The settings of a line-art (PixArt) run: its style checked against the weights, the release's sampling
    defaults (CFG 4.5, 10 steps), the prompt the text cache holds, the line extractor of the styles."""
    style = args.style or (weights.name if weights.name in LINE_ART_STYLES else None)
    if style not in LINE_ART_STYLES:
        shown = f"--style {style}" if style else "no --style"
        raise ColorizeInputError(
            f"{shown} with line-art (PixArt) weights {weights}: they colour the line-art styles; give --style "
            "sketch or --style shading"
        )
    if args.prompt is not None or args.negative_prompt is not None:
        raise ColorizeInputError(
            "--prompt/--negative-prompt: the line-art family reads its text from --text-cache (T5 is not loaded); "
            "make a cache for another prompt with python -m model.text_cache"
        )
    models = None
    defaults: dict = {}
    if not args.references_only:
        models = resolve_lineart_paths(
            weights, style=style, pixart=args.pixart, text_cache=args.text_cache, gsrp=args.gsrp
        )
        defaults = export_defaults(str(weights), args.gsrp)
    prompt, negative = text_cache_prompts(models.text_cache) if models else ("", "")
    line_extractor = _line_extractor(args, style)
    return _options(
        args,
        models,
        size=args.size or defaults.get("size", (512, 800)),
        sr_scale=args.sr_scale if args.sr_scale is not None else defaults.get("sr_scale", 1.5),
        steps=args.steps if args.steps is not None else 10,
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else DEFAULT_GUIDANCE,
        prompt=prompt,
        negative_prompt=negative,
        style=style,
        line_extractor_weights=line_extractor,
    )


def _line_extractor(args: argparse.Namespace, style: str) -> str | None:
    """The line extractor's weights of a line-art style (None: XDoG); other styles have none."""
    if style not in LINE_ART_STYLES:
        return None
    return find_line_extractor_weights(args.line_extractor_weights, args.colorflow_weights)


def _default_statistics(models) -> str:
    """Per-page statistics for the released fusion file (as the app runs it), else what our export records."""
    if models is None or models.gsrp is None:
        return "running"
    from model.gsrp_weights import default_statistics

    return default_statistics(models.gsrp)


def _page_style(args: argparse.Namespace) -> tuple[str, str | None]:
    """(the style applied to each page, the ScreenStyle folder it needs). A benchmark's pages are already in their
    style: they are only greyed, the released app's way."""
    if args.benchmark:
        return "grey", None
    style = args.style or ("screenstyle" if args.colorflow_weights else "grey")
    if style != "screenstyle":
        return style, None
    folder = args.screenstyle_weights
    if folder is None and args.colorflow_weights:
        folder = str(Path(args.colorflow_weights) / RELEASED_SCREENSTYLE_FOLDER)
    return style, check_screenstyle_weights(folder)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.benchmark:  # the pages are listed first, a benchmark's once its style is known
        tasks, extra = chapter_tasks_for_sources(args.pages, args.refs), {}
    settings = build_settings(args)  # weights and sizes are checked before Ray starts
    if args.benchmark:
        tasks, extra = chapter_tasks_for_benchmark(args.benchmark, settings.style)
    if args.dtype is None:  # chosen last: on a cluster, seeing whether it has GPUs starts Ray
        settings = replace(settings, sampling=replace(settings.sampling, dtype=default_dtype(args.device, args.local)))
    start_ray(args)
    options = RunOptions(
        batch_size=args.batch_size,
        local=args.local,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        device=args.device,
        rebuild=args.rebuild,
    )
    with created_folder(args.output):  # a run that fails before writing anything leaves no empty folder
        return run_colorize(tasks, args.output, settings, options, extra)


def show(summary: dict) -> str:
    """What a finished run prints: the summary without its per-page rows and settings (in the summary file)."""
    shown = {k: v for k, v in summary.items() if k not in ("page_rows", "settings")}
    return json.dumps(shown, indent=2, sort_keys=True)


def cli(argv: list[str] | None = None) -> int:
    """The command line: 0 when every page was coloured, 1 on failed pages or an error, 2 on unusable inputs."""
    return run_job(main, argv, prog=PROG, show=show)


if __name__ == "__main__":
    sys.exit(cli())

"""Train ColorFlow's In-context Colorization Pipeline (Colorization Guider + UNet LoRA) on our shards.

    accelerate launch -m training.train_icp --pretrained_model_name_or_path SD15_DIR --data OUT \\
        --output_dir runs/icp --max_train_steps 150000 --train_batch_size 8 --mixed_precision bf16

The diffusers ControlNet/LoRA example skeleton: frozen VAE, text encoder and base UNet; the guider (built from the
UNet, or `--init_from` a released GraySD folder or one of our exports) and the UNet's LoRA train as one
`GuidedUNet` module through `accelerator.prepare`. Epsilon MSE at timesteps drawn with the paper's shift (mu 1.5);
the prompt ("manga") is encoded once. Data: `training.data.build_icp_dataset` (seeded, rank/worker-disjoint,
resumable). Every random draw of a step (VAE posterior samples, noise, timesteps) comes from a generator seeded by
(seed, step, micro-batch, rank), so a run resumed from `checkpoint-N` ends bitwise equal to an uninterrupted one.

Output: ``checkpoint-<step>/`` (accelerate state: colorguider/, unet_lora/, optimizer, scheduler, train_state.json;
at most `--checkpoints_total_limit`), ``logs/`` (TensorBoard: loss, lr, timestep histogram, validation
colourisations; with ``--benchmark`` the benchmark pages' PSNR, SSIM and CLIP-IS and the pages themselves),
``benchmark/step-<N>/`` (with ``--benchmark``: the coloured pages and their metrics, `training.benchmark_validation`),
the export (colorguider/, unet_lora/pytorch_lora_weights.safetensors, export.json) and, last,
``train_icp.summary.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.core.cli import parse_size, positive_int, run_job
from pipelines.core.encoders import DEFAULT_ENCODER
from pipelines.core.image_metrics import ImageEmbedder
from pipelines.core.storage import atomic_write_json, read_json
from pipelines.runtime.preconditions import check_output_creatable
from training.benchmark_validation import BENCHMARK_STYLES, METRICS, BenchmarkPage, best_step, check_benchmark
from training.checkpoints import TRAIN_STATE, check_resume_settings, resolve_resume, save_checkpoint
from training.data import (
    ICPDataConfig,
    ShardSource,
    build_icp_dataset,
    bw_variant_arg,
    check_shards,
    frame_size,
    resolve_shard_source,
    resumed_source,
    training_size,
)
from training.early_stop import BadSampleBudget, Preemption, ignore_sigterm, preempted
from training.inputs import (
    TrainerArgumentParser,
    add_icp_stream_arguments,
    add_safety_arguments,
    check_base_model,
    check_resolution,
    vae_factor,
)
from training.optimization import (
    EMA_FOLDER,
    add_adamw_arguments,
    add_optimizer_arguments,
    averaged_weights,
    check_optimizer_arguments,
    ema_digest,
    ema_on_device,
    init_weights_kind,
    make_ema,
    make_optimizer,
)
from training.reproducibility import step_generator, trainable_digest
from training.run_lock import run_folder
from training.validation import validation_canvases, validation_inputs

logger = logging.getLogger("training.train_icp")

PROG = "train_icp"
SUMMARY = "train_icp.summary.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = TrainerArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    # model loading
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="SD1.5 folder or hub id")
    parser.add_argument("--revision", default=None, help="hub revision of the base model")
    parser.add_argument("--variant", default=None, help="weight variant of the base model, e.g. fp16")
    parser.add_argument("--init_from", default=None, help="start from a released GraySD folder or one of our exports")
    parser.add_argument("--lora_rank", type=positive_int, default=64, help="LoRA rank (new LoRA only)")
    parser.add_argument("--lora_alpha", type=float, default=64.0, help="LoRA alpha (new LoRA only)")
    # data
    parser.add_argument("--data", nargs="+", required=True, help="data root, shards manifest, or shard URLs/patterns")
    parser.add_argument(
        "--resolution",
        type=parse_size,
        default=None,
        help="training WxH: each side of a frame's size capped at it (default: the frames' own sizes)",
    )
    parser.add_argument("--bw_variant", type=bw_variant_arg, default="screenstyle", help="screenstyle|grey|tone|weight")
    add_icp_stream_arguments(parser)
    add_safety_arguments(parser)
    # training
    parser.add_argument("--output_dir", type=Path, required=True, help="run folder: checkpoints, logs, export")
    parser.add_argument("--seed", type=int, default=0, help="fixes data order, alphas, crops, noise, timesteps")
    parser.add_argument("--train_batch_size", type=positive_int, default=1, help="samples per process per step")
    parser.add_argument("--max_train_steps", type=positive_int, default=150_000, help="optimiser steps")
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1, help="micro-batches per step")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="checkpoint UNet and guider")
    parser.add_argument(
        "--free_text_encoder",
        action="store_true",
        help="drop the text encoder once the prompt (and validation's empty prompt) is encoded: frees its memory",
    )
    parser.add_argument("--learning_rate", type=float, default=1e-5, help="AdamW learning rate (paper: 1e-5)")
    parser.add_argument("--scale_lr", action="store_true", help="multiply lr by batch x accumulation x processes")
    parser.add_argument("--lr_scheduler", default="constant", help="diffusers scheduler name")
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="warm-up steps")
    add_adamw_arguments(parser, weight_decay=1e-2)
    add_optimizer_arguments(parser)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="default: accelerate's")
    parser.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+")
    parser.add_argument("--prompt", default="manga", help="the text prompt (the released inference uses 'manga')")
    parser.add_argument("--timestep_mu", type=float, default=1.5, help="timestep shift mu (paper eq. 5)")
    parser.add_argument("--no_timestep_shift", action="store_true", help="uniform timesteps (mu = 0)")
    parser.add_argument("--conditioning_scale", type=float, default=1.0, help="guider residual scale")
    # checkpoints, logging, validation
    parser.add_argument("--checkpointing_steps", type=positive_int, default=500, help="save state every N steps")
    parser.add_argument("--checkpoints_total_limit", type=positive_int, default=None, help="keep the newest N")
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    parser.add_argument("--report_to", default="tensorboard", help="accelerate tracker ('none' to disable)")
    parser.add_argument("--logging_dir", default="logs", help="TensorBoard folder under output_dir")
    parser.add_argument("--histogram_steps", type=positive_int, default=50, help="timestep histogram every N steps")
    parser.add_argument("--validation_steps", type=int, default=500, help="validation colourisations every N (0: off)")
    parser.add_argument("--num_validation_samples", type=positive_int, default=2, help="fixed validation samples")
    parser.add_argument("--validation_inference_steps", type=positive_int, default=10, help="sampler steps")
    parser.add_argument(
        "--benchmark",
        default=None,
        help="benchmark folder: colour its first pages at each validation, log their metrics",
    )
    parser.add_argument(
        "--benchmark_pages", type=positive_int, default=8, help="benchmark pages coloured (index order)"
    )
    parser.add_argument("--benchmark_style", choices=BENCHMARK_STYLES, default="grey", help="the pages' input style")
    parser.add_argument(
        "--benchmark_screenstyle_weights",
        default=None,
        help="ScreenStyle weights folder for --benchmark_style screenstyle (as colorize's --screenstyle-weights)",
    )
    parser.add_argument("--benchmark_gsrp", default=None, help="GSRP weights to finish the pages (default: ICP alone)")
    parser.add_argument(
        "--benchmark_encoder", default=DEFAULT_ENCODER, help="retrieval encoder spec, as colorize's --encoder"
    )
    parser.add_argument("--benchmark_clip_encoder", default=None, help="CLIP-IS encoder (default: --benchmark_encoder)")
    parser.add_argument("--best_metric", choices=METRICS, default="psnr", help="the summary's best step is by this")
    parser.add_argument("--record_sample_keys", action="store_true", help="write every rank's sample keys to summary")
    args = parser.parse_args(argv)
    for name in ("alpha_range", "crop_scale", "crop_aspect"):
        low, high = getattr(args, name)
        if low > high:
            parser.error(f"--{name} {low},{high}: LOW must not exceed HIGH")
    if args.no_timestep_shift:
        args.timestep_mu = 0.0
    return args


# ---- pieces --------------------------------------------------------------------------------------------------------


def encode_prompt(tokenizer: Any, text_encoder: Any, prompt: str, device: torch.device) -> torch.Tensor:
    """(1, 77, D) hidden states of the prompt, computed once for the whole run."""
    tokens = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(device))[0]


def icp_loss(
    model: torch.nn.Module,
    vae: Any,
    noise_scheduler: Any,
    prompt_embeds: torch.Tensor,
    batch: dict[str, Any],
    generator: torch.Generator,
    *,
    mu: float,
    conditioning_scale: float,
    weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Epsilon MSE of one batch; returns (loss, timesteps).

    The three canvases go through the frozen VAE in one call: C_color is the diffusion target; refs-only and
    frame-only latents with the mask (already at latent size) make the guider's 9 condition channels.
    """
    from model.timesteps import sample_timesteps

    device = prompt_embeds.device
    images = torch.cat([batch["c_color"], batch["refs_only"], batch["frame_only"]]).to(device, weight_dtype)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(generator=generator) * vae.config.scaling_factor
    target_latents, refs_latents, frame_latents = latents.float().chunk(3)
    size = target_latents.shape[0]
    mask = batch["mask"].to(device, torch.float32)
    noise = torch.randn(target_latents.shape, generator=generator, device=device, dtype=torch.float32)
    timesteps = sample_timesteps(
        size, noise_scheduler.config.num_train_timesteps, mu=mu, generator=generator, device=device
    )
    noisy = noise_scheduler.add_noise(target_latents, noise, timesteps)
    cond = torch.cat([refs_latents, mask, frame_latents], dim=1)
    prediction = model(
        noisy.to(weight_dtype),
        timesteps,
        prompt_embeds.expand(size, -1, -1).to(weight_dtype),
        cond.to(weight_dtype),
        conditioning_scale=conditioning_scale,
    )
    return F.mse_loss(prediction.float(), noise, reduction="mean"), timesteps


def cached_prompt_embeds(
    cache: dict[str, torch.Tensor], prompts: list[str], device: torch.device, *, dtype: torch.dtype
) -> torch.Tensor:
    """The pipeline's `encode_prompt` once the text encoder is gone: the embeddings encoded at the start."""
    unknown = [prompt for prompt in prompts if prompt not in cache]
    if unknown:
        raise KeyError(f"prompt {unknown[0]!r} was not encoded before the text encoder was freed")
    return torch.cat([cache[prompt] for prompt in prompts]).to(device, dtype)


# ---- models ---------------------------------------------------------------------------------------------------------


def load_models(args: argparse.Namespace) -> dict[str, Any]:
    """Frozen VAE, text encoder, tokenizer and scheduler; the trainable GuidedUNet (guider + LoRA-injected UNet)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from model.colorguider import ColorGuider
    from model.guided_unet import GuidedUNet
    from model.icp_weights import load_icp_weights
    from model.lora import add_icp_lora

    base = args.pretrained_model_name_or_path
    kwargs = {"revision": args.revision}
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", revision=args.revision)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **kwargs, variant=args.variant)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **kwargs, variant=args.variant)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **kwargs, variant=args.variant)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", revision=args.revision)
    for frozen in (vae, text_encoder, unet):
        frozen.requires_grad_(False)
    if args.init_from:  # our export or a released GraySD folder, loaded strictly
        guider, unet, _ = load_icp_weights(unet, args.init_from)
        logger.info("init from %s (%s weights)", args.init_from, init_weights_kind(args.init_from))
    else:
        guider = ColorGuider.from_unet(unet)
        add_icp_lora(unet, rank=args.lora_rank, alpha=args.lora_alpha)
    guider.requires_grad_(True)
    guider.train()
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "noise_scheduler": noise_scheduler,
        "model": GuidedUNet(unet, guider),
    }


def register_hooks(accelerator: Any, model_type: type) -> None:
    """save_state/load_state write the trainables as diffusers folders (colorguider/, unet_lora/) and nothing else."""
    from model.colorguider import ColorGuider
    from model.lora import load_icp_lora, save_icp_lora

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            inner = accelerator.unwrap_model(model)
            if not isinstance(inner, model_type):
                raise TypeError(f"unexpected model in save_state: {type(inner).__name__}")
            if accelerator.is_main_process:
                inner.guider.save_pretrained(Path(output_dir) / "colorguider")
                save_icp_lora(inner.unet, Path(output_dir) / "unet_lora")
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            inner = accelerator.unwrap_model(models.pop())
            if not isinstance(inner, model_type):
                raise TypeError(f"unexpected model in load_state: {type(inner).__name__}")
            loaded = ColorGuider.from_pretrained(Path(input_dir) / "colorguider")
            inner.guider.load_state_dict(loaded.state_dict())
            load_icp_lora(inner.unet, Path(input_dir) / "unet_lora")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---- validation -----------------------------------------------------------------------------------------------------


def validation_pipeline(accelerator: Any, models: dict[str, Any], model: Any) -> Any:
    """The sampling pipeline around the current weights (the module itself, not a copy)."""
    from diffusers import UniPCMultistepScheduler

    from model.pipeline_icp import ColorFlowICPPipeline

    inner = accelerator.unwrap_model(model)
    pipeline = ColorFlowICPPipeline(
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=models["tokenizer"],
        unet=inner.unet,
        guider=inner.guider,
        scheduler=UniPCMultistepScheduler.from_config(models["noise_scheduler"].config),
    )
    if models["text_encoder"] is None:  # --free_text_encoder: the prompts were encoded before it was dropped
        pipeline.encode_prompt = partial(cached_prompt_embeds, models["prompt_cache"], dtype=inner.unet.dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@contextmanager
def sampling_mode(accelerator: Any, model: Any) -> Iterator[None]:
    """Eval mode, no gradients, the run's autocast (the frozen base runs in the mixed-precision dtype, trainables in
    fp32); training mode restored after."""
    inner = accelerator.unwrap_model(model)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), accelerator.autocast():
            yield
    finally:
        if was_training:
            inner.train()


def log_validation(accelerator: Any, pipeline: Any, samples: list[Any], args: argparse.Namespace, step: int) -> None:
    """Colourise the fixed samples with the sampling pipeline; log C_bw | output | target per sample."""
    from pipelines.core.geometry import CompositeLayout

    rows = []
    for index, sample in enumerate(samples):
        generator = torch.Generator(device="cpu").manual_seed(args.seed + index)
        refs_only, frame_only, mask = validation_canvases(sample, args.resolution)
        output = pipeline(
            refs_only=refs_only,
            frame_only=frame_only,
            mask=mask,
            prompt=args.prompt,
            num_inference_steps=args.validation_inference_steps,
            generator=generator,
        ).images[0]
        layout = CompositeLayout(*sample.color.size)
        centre = layout.crop_centre(output.resize(layout.canvas_size))
        rows.append(np.concatenate([np.asarray(sample.bw), np.asarray(centre), np.asarray(sample.color)], axis=1))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(rows), step, dataformats="NHWC")


@dataclass
class BenchmarkValidation:
    """The run's benchmark pages (retrieved once), how they are finished and scored."""

    pages: list[BenchmarkPage]
    finish: Callable[[Image.Image, BenchmarkPage], Image.Image]
    embedder: ImageEmbedder


def prepare_benchmark_validation(
    args: argparse.Namespace, models: dict[str, Any], size: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> BenchmarkValidation:
    """Retrieve the benchmark pages' references once, load the GSRP weights (if any) and the CLIP-IS encoder."""
    from model.devices import place
    from model.gsrp_weights import default_statistics, load_gsrp
    from training.benchmark_validation import gsrp_finisher, gsrp_scale, prepare_benchmark

    started = time.perf_counter()
    pages = prepare_benchmark(
        args.benchmark,
        args.benchmark_style,
        args.benchmark_pages,
        size,
        gsrp_scale(args.benchmark_gsrp),
        args.benchmark_encoder,
        args.seed,
        str(device),
        args.benchmark_screenstyle_weights,
    )
    fusion, statistics = None, "running"
    if args.benchmark_gsrp:
        fusion = place(load_gsrp(args.benchmark_gsrp), device, dtype).eval()
        statistics = default_statistics(args.benchmark_gsrp)
    embedder = ImageEmbedder(args.benchmark_clip_encoder or args.benchmark_encoder, str(device))
    logger.info("benchmark: %d pages retrieved at %dx%d in %.1f s", len(pages), *size, time.perf_counter() - started)
    return BenchmarkValidation(pages, gsrp_finisher(models["vae"], fusion, statistics), embedder)


def log_benchmark(
    accelerator: Any, pipeline: Any, benchmark: BenchmarkValidation, args: argparse.Namespace, step: int
) -> dict[str, Any]:
    """Colour the benchmark pages, write and score them; log the mean metrics beside the loss and the pages
    (styled input | output | ground truth)."""
    from training.benchmark_validation import colour_benchmark, score_and_save, step_folder

    steps = args.validation_inference_steps
    outputs = colour_benchmark(pipeline, benchmark.pages, args.prompt, steps, benchmark.finish)
    folder = step_folder(Path(args.output_dir), step)
    record = score_and_save(folder, benchmark.pages, outputs, benchmark.embedder, str(accelerator.device))
    accelerator.log({f"benchmark/{name}": value for name, value in record["mean"].items()}, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for page, output in zip(benchmark.pages, outputs, strict=True):
                styled = page.guide.resize(page.truth.size, Image.Resampling.BICUBIC)
                row = np.concatenate([np.asarray(styled), np.asarray(output), np.asarray(page.truth)], axis=1)
                tracker.writer.add_image(f"benchmark/{page.chapter_id}/{page.page_id}", row, step, dataformats="HWC")
    return record


# ---- the run --------------------------------------------------------------------------------------------------------


def _sanitised(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in vars(args).items()}


BASE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_inputs(args: argparse.Namespace) -> tuple[ShardSource, Path | None]:
    """Everything that can be checked without a model, before one loads or an output folder exists: the base
    model folder, the shards (sizes, hashes on request), the resolution against the frames, the init weights, the
    checkpoint to resume and the output folder. Returns the shard source and the checkpoint to resume."""
    from model.icp_weights import describe_weights

    check_base_model(args.pretrained_model_name_or_path, BASE_SUBFOLDERS)
    check_optimizer_arguments(args)
    output_dir = check_output_creatable(args.output_dir, "--output_dir")
    resume = resolve_resume(output_dir, args.resume_from_checkpoint, skip_unreadable=args.skip_unreadable_checkpoints)
    current = resolve_shard_source(args.data if len(args.data) > 1 else args.data[0])
    source = resumed_source(current, resume)  # a resumed run keeps the generation it started with
    check_shards(source, verify_sha256=args.verify_shards)
    base = Path(args.pretrained_model_name_or_path).expanduser()
    where = f"from {source.manifest}" if source.frame_sizes else "read from the first sample"
    check_resolution(args.resolution, source.frame_sizes or (frame_size(source),), vae_factor(base / "vae"), where)
    if args.init_from:
        describe_weights(args.init_from)
    if args.benchmark:
        check_benchmark_arguments(args)
    return source, resume


def check_benchmark_arguments(args: argparse.Namespace) -> None:
    """The benchmark folder, its style and pages, the encoders and the GSRP weights: ValueError in one line."""
    from pipelines.core.encoders import resolve_encoder
    from pipelines.core.page_references import resolve_colorize_encoder

    if args.validation_steps <= 0:
        raise ValueError("--benchmark colours its pages at each validation: give --validation_steps N (N > 0)")
    check_benchmark(args.benchmark, args.benchmark_style, args.benchmark_pages, args.benchmark_screenstyle_weights)
    resolve_colorize_encoder(args.benchmark_encoder)
    resolve_encoder(args.benchmark_clip_encoder or args.benchmark_encoder)
    if args.benchmark_gsrp and not Path(args.benchmark_gsrp).exists():
        raise FileNotFoundError(f"--benchmark_gsrp {args.benchmark_gsrp}: no such file or folder")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Check the inputs, then train in the locked output folder; SIGTERM saves a checkpoint and stops cleanly."""
    with Preemption() as preemption:
        source, resume = check_inputs(args)
        accelerator = make_accelerator(args)
        if resume is not None:
            check_resume_settings(resume, run_settings(args, accelerator.num_processes))
        with run_folder(accelerator, Path(args.output_dir), force_unlock=args.force_unlock):
            return train(args, accelerator, source, resume, preemption)


def run_settings(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """What an exact resume needs unchanged: the sample order and the samples per step depend on all of it."""
    return {
        "world_size": world_size,
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "seed": args.seed,
    }


def make_accelerator(args: argparse.Namespace) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(args.output_dir)
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=_report_to(args),
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        cpu=not torch.cuda.is_available(),
    )


def _report_to(args: argparse.Namespace) -> str | None:
    return None if args.report_to in ("none", "", None) else args.report_to


def train(
    args: argparse.Namespace, accelerator: Any, source: ShardSource, resume: Path | None, preemption: Preemption
) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from model.devices import place
    from model.guided_unet import GuidedUNet

    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    report_to = _report_to(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.ERROR)
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    models = load_models(args)
    vae, text_encoder, model = models["vae"], models["text_encoder"], models["model"]
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    place(vae, device, weight_dtype)
    place(text_encoder, device, weight_dtype)
    place(model.unet, device, weight_dtype)
    model.guider.to(device)
    cast_training_params(model.unet, dtype=torch.float32)  # LoRA weights train in fp32; the frozen base stays low
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    prompt_embeds = encode_prompt(models["tokenizer"], text_encoder, args.prompt, device)
    if args.free_text_encoder:
        models["prompt_cache"] = {
            prompt: encode_prompt(models["tokenizer"], text_encoder, prompt, device) for prompt in (args.prompt, "")
        }
        models["text_encoder"] = text_encoder = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    register_hooks(accelerator, GuidedUNet)

    world, rank = accelerator.num_processes, accelerator.process_index
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * world
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args, learning_rate)
    ema = make_ema(params, args, accelerator)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * world,
        num_training_steps=args.max_train_steps * world,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    global_step = 0
    if resume is not None:
        state = read_json(resume / TRAIN_STATE)
        accelerator.load_state(str(resume))
        ema_on_device(ema, device)
        global_step = int(state["global_step"])
        logger.info("resumed from %s at step %d", resume, global_step)
    elif args.resume_from_checkpoint:
        logger.info("no checkpoint in %s: starting a new run", output_dir)

    latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    data_config = ICPDataConfig(
        resolution=args.resolution,
        variant=args.bw_variant,
        alpha_range=tuple(args.alpha_range),
        crop_scale=tuple(args.crop_scale),
        crop_aspect=tuple(args.crop_aspect),
        latent_factor=latent_factor,
        batch_size=args.train_batch_size,
        shuffle_shards=args.shuffle_shards,
    )
    per_step = args.train_batch_size * args.gradient_accumulation_steps
    dataset = build_icp_dataset(
        source, data_config, seed=args.seed, rank=rank, world_size=world, start_sample=global_step * per_step
    )
    loader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.dataloader_num_workers > 0,
        worker_init_fn=ignore_sigterm,
    )

    if accelerator.is_main_process and report_to:
        accelerator.init_trackers("train_icp", config=_sanitised(args))
    validation = []
    benchmark = None
    if accelerator.is_main_process and args.validation_steps > 0:
        validation = validation_inputs(source, args.num_validation_samples, args.data)
        if args.benchmark:
            benchmark_size = training_size(largest_frame(source), args.resolution, latent_factor)
            benchmark = prepare_benchmark_validation(args, models, benchmark_size, device, weight_dtype)

    mu = args.timestep_mu
    progress = tqdm(
        total=args.max_train_steps, initial=global_step, desc="train_icp", disable=not accelerator.is_local_main_process
    )
    batches = iter(loader)
    timestep_buffer: list[torch.Tensor] = []
    sample_keys: list[list[str]] = []
    bad_skipped = samples_seen = 0
    budget = BadSampleBudget(args.max_bad_fraction)
    start_step = global_step
    loss_history: list[float] = []
    loop_started = time.perf_counter()
    model.train()
    while global_step < args.max_train_steps:
        losses = []
        for micro in range(args.gradient_accumulation_steps):
            batch = next(batches)
            bad_skipped += int(batch["bad_skipped"].sum())
            samples_seen += len(batch["key"])
            budget.add(batch)
            if args.record_sample_keys:
                sample_keys.append(list(batch["key"]))
            generator = step_generator(args.seed, global_step, micro, rank, device)
            with accelerator.accumulate(model):
                loss, timesteps = icp_loss(
                    model,
                    vae,
                    models["noise_scheduler"],
                    prompt_embeds,
                    batch,
                    generator,
                    mu=mu,
                    conditioning_scale=args.conditioning_scale,
                    weight_dtype=weight_dtype,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            timestep_buffer.append(timesteps.detach())
        if ema is not None:
            ema.step(params)
        global_step += 1
        step_loss = accelerator.gather(torch.stack(losses).mean()[None]).mean().item()
        loss_history.append(step_loss)
        rate = samples_seen * world / max(1e-9, time.perf_counter() - loop_started)
        progress.update(1)
        learning_rate_now = lr_scheduler.get_last_lr()[0]
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{learning_rate_now:.2e}", samples_s=f"{rate:.1f}")
        accelerator.log({"loss": step_loss, "lr": learning_rate_now, "samples_per_s": rate}, step=global_step)
        if global_step % args.histogram_steps == 0 or global_step == args.max_train_steps:
            all_timesteps = accelerator.gather(torch.cat(timestep_buffer))
            timestep_buffer.clear()
            if accelerator.is_main_process:
                for tracker in accelerator.trackers:
                    if tracker.name == "tensorboard":
                        tracker.writer.add_histogram("timesteps", all_timesteps.cpu().numpy(), global_step)
        if budget.exceeded(accelerator):
            progress.close()
            budget.stop()
        stop = preemption.agreed(accelerator)
        if stop or global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(accelerator, output_dir, global_step, args, world, source)
        if stop:
            progress.close()
            raise preempted(global_step, accelerator)
        if validation and global_step % args.validation_steps == 0:
            with averaged_weights(ema, params), sampling_mode(accelerator, model):
                pipeline = validation_pipeline(accelerator, models, model)
                log_validation(accelerator, pipeline, validation, args, global_step)
                if benchmark is not None:
                    log_benchmark(accelerator, pipeline, benchmark, args, global_step)
    progress.close()

    accelerator.wait_for_everyone()
    digests = accelerator.gather_for_metrics([trainable_digest(model)], use_gather_object=True)
    ema_digests = accelerator.gather_for_metrics([ema_digest(ema)], use_gather_object=True)
    keys_per_rank = accelerator.gather_for_metrics([sample_keys], use_gather_object=True)
    totals = accelerator.gather(torch.tensor([bad_skipped, samples_seen], device=device)[None]).sum(0).tolist()
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        layout_size = largest_frame(source)
        meta = {
            "base_model": args.pretrained_model_name_or_path,
            "prompt": args.prompt,
            "frame_size": list(layout_size),
            "resolution": list(training_size(layout_size, args.resolution, 1)),
            "frame_sizes": [list(size) for size in source.frame_sizes] or [list(layout_size)],
            "training_steps": global_step,
            "shard_manifest": source.manifest,
            "shard_manifest_sha256": source.sha256,
            "seed": args.seed,
            "timestep_mu": mu,
            "init_from": args.init_from,
            "init_weights": init_weights_kind(args.init_from),
        }
        export_model(output_dir, inner, {**meta, "weights": "raw"})
        if ema is not None:
            with averaged_weights(ema, params):
                export_model(output_dir / EMA_FOLDER, inner, {**meta, "weights": "ema", "ema_decay": args.ema_decay})
        seconds = time.perf_counter() - started
        summary = {
            "steps": global_step,
            "world_size": world,
            "samples": int(totals[1]),
            "bad_samples_skipped": int(totals[0]),
            "seconds": round(seconds, 3),
            "samples_per_s": round(totals[1] / max(1e-9, time.perf_counter() - loop_started), 3),
            "loss_first_steps": loss_history[:10],
            "loss_last_steps": loss_history[-10:],
            "loss_steps": [start_step + 1, global_step],  # the steps the losses cover (a resumed run's start later)
            "trainable_sha256_per_rank": digests,
            "ema_sha256_per_rank": ema_digests if ema is not None else None,
            "export": str(output_dir),
        }
        if args.record_sample_keys:
            summary["sample_keys_per_rank"] = keys_per_rank
        if benchmark is not None:
            summary["benchmark"] = {
                "folder": args.benchmark,
                "pages": [f"{page.chapter_id}/{page.page_id}" for page in benchmark.pages],
                "style": args.benchmark_style,
                "screenstyle_weights": args.benchmark_screenstyle_weights,
                "gsrp": args.benchmark_gsrp,
                "best": best_step(output_dir, args.best_metric, global_step),
            }
        atomic_write_json(output_dir / SUMMARY, summary)  # last: the run's completion marker
        logger.info(
            "trained %d steps on %d process(es): %d samples (%.1f/s), %d bad samples skipped, in %.0f s",
            global_step,
            world,
            summary["samples"],
            summary["samples_per_s"],
            summary["bad_samples_skipped"],
            seconds,
        )
    accelerator.end_training()
    return summary


def largest_frame(source: ShardSource) -> tuple[int, int]:
    """The largest frame size of the shards: the one the export records and the benchmark pages are coloured at."""
    return max(source.frame_sizes or (frame_size(source),), key=lambda size: size[0] * size[1])


def export_model(output_dir: Path, model: Any, meta: dict[str, Any]) -> Path:
    """The final export: guider `save_pretrained`, LoRA safetensors and export.json (model/icp_weights.py)."""
    from model.icp_weights import save_icp_export

    return save_icp_export(output_dir, model.guider, model.unet, meta)


def cli(argv: Sequence[str] | None = None) -> int:
    return run_job(lambda a: main(parse_args(a)), argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(cli())

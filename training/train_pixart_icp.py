"""Train the line-art family's In-context Colorization (PixArt Colorization Guider + transformer LoRA) on our shards.

    python -m model.text_cache PIXART_DIR runs/manga-t5.safetensors --prompt manga
    accelerate launch -m training.train_pixart_icp --pretrained_model_name_or_path PIXART_DIR \\
        --text_cache runs/manga-t5.safetensors --data OUT --output_dir runs/pixart-icp --resolution 512x800 \\
        --max_train_steps 150000 --train_batch_size 2 --gradient_checkpointing --mixed_precision bf16

The train_icp skeleton on PixArt-alpha: frozen VAE and base transformer; the guider (built from the transformer, or
`--init_from` a released sketch/ or shading/ folder or one of our exports) trains in full and the transformer's LoRA
(rank 128, alpha 128, the release's 12 targets) trains with it, as one `GuidedPixArtTransformer` through
`accelerator.prepare`. Text comes only from a text cache (`model.text_cache`): T5 is never loaded.

Loss: MSE between the noise half of the 8-channel prediction and the noise, at timesteps drawn with the paper's
shift (mu 1.5; `--no_timestep_shift` for uniform). The variance half (PixArt's learned-variance head) gets no loss:
its weights are frozen apart from the LoRA on the shared output head, and its output is ignored here as at sampling.
Both the guider and the transformer get the resolution/aspect micro-conditions of the training canvas's pixel size
(the 2W x 2H composite's, as at inference). With probability `--prompt_drop_probability` a sample's prompt is
replaced by the cached empty prompt, so classifier-free guidance (4.5 in the release) contrasts something; the
release does not say whether or how often it dropped the prompt, so 0.1 is our choice, not theirs.

Data: the same ICP shards and stream as train_icp (`training.data.build_icp_dataset`). `--bw_variant` picks the B&W
input: ``sketch`` (default) or ``shading``, the line art the screentone stage stored in the samples (sample format
3; older shards are refused, naming the rebuild), made as colorize makes it; the tone variants of train_icp are
accepted too. Train one run per style, as the release ships one folder per style (its GSRP trains with
`training.train_gsrp --bw_variant sketch`: the plain line art at the GSRP size, its guide for both).

Every random draw of a step (VAE posterior samples, noise, timesteps, prompt drops) comes from a generator seeded by
(seed, step, micro-batch, rank), so a run resumed from `checkpoint-N` ends bitwise equal to an uninterrupted one.

Output: ``checkpoint-<step>/`` (accelerate state with lineart/ in the released style-folder layout, optimizer,
scheduler, train_state.json), ``logs/`` (TensorBoard: loss, lr, timestep histogram, validation colourisations),
``export/`` (config.json, diffusion_pytorch_model.bin, transformer_lora.bin, export.json: loadable by
`model.lineart_weights`) and, last, ``train_pixart_icp.summary.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.core.cli import JobArgumentParser, parse_size, positive_int, run_job
from pipelines.core.storage import atomic_write_json, read_json
from training.checkpoints import TRAIN_STATE, resolve_resume, save_checkpoint
from training.data import (
    ICPDataConfig,
    build_icp_dataset,
    bw_variant_arg,
    check_variant,
    frame_size,
    resolve_shard_source,
)
from training.inputs import add_icp_stream_arguments
from training.optimization import add_adamw_arguments
from training.reproducibility import step_generator, trainable_digest
from training.validation import validation_canvases, validation_inputs

logger = logging.getLogger("training.train_pixart_icp")

PROG = "train_pixart_icp"
SUMMARY = "train_pixart_icp.summary.json"
EXPORT_FOLDER = "export"
CHECKPOINT_WEIGHTS = "lineart"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = JobArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    # model loading
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="PixArt-alpha folder or hub id")
    parser.add_argument("--revision", default=None, help="hub revision of the base model")
    parser.add_argument("--variant", default=None, help="weight variant of the base model, e.g. fp16")
    parser.add_argument("--text_cache", type=Path, required=True, help="cached prompt embeddings (model.text_cache)")
    parser.add_argument("--init_from", default=None, help="start from a released sketch/ or shading/ folder or ours")
    parser.add_argument("--lora_rank", type=positive_int, default=128, help="LoRA rank (new LoRA only)")
    parser.add_argument("--lora_alpha", type=float, default=128.0, help="LoRA alpha (new LoRA only)")
    # data
    parser.add_argument("--data", nargs="+", required=True, help="data root, shards manifest, or shard URLs/patterns")
    parser.add_argument("--resolution", type=parse_size, default=None, help="training WxH (default: the shards' size)")
    parser.add_argument(
        "--bw_variant",
        type=bw_variant_arg,
        default="sketch",
        help="B&W input: sketch or shading (the line-art styles), or screenstyle|grey|tone|weight",
    )
    add_icp_stream_arguments(parser)
    # training
    parser.add_argument("--output_dir", type=Path, required=True, help="run folder: checkpoints, logs, export")
    parser.add_argument("--seed", type=int, default=0, help="fixes data order, crops, noise, timesteps, prompt drops")
    parser.add_argument("--train_batch_size", type=positive_int, default=1, help="samples per process per step")
    parser.add_argument("--max_train_steps", type=positive_int, default=150_000, help="optimiser steps")
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1, help="micro-batches per step")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="checkpoint transformer and guider")
    parser.add_argument("--learning_rate", type=float, default=1e-5, help="AdamW learning rate (paper: 1e-5)")
    parser.add_argument("--scale_lr", action="store_true", help="multiply lr by batch x accumulation x processes")
    parser.add_argument("--lr_scheduler", default="constant", help="diffusers scheduler name")
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="warm-up steps")
    add_adamw_arguments(parser, weight_decay=1e-2)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="default: accelerate's")
    parser.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+")
    parser.add_argument("--prompt_drop_probability", type=float, default=0.1, help="empty-prompt rate (for CFG)")
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
    parser.add_argument("--validation_guidance_scale", type=float, default=4.5, help="CFG scale of validation")
    args = parser.parse_args(argv)
    for name in ("alpha_range", "crop_scale", "crop_aspect"):
        low, high = getattr(args, name)
        if low > high:
            parser.error(f"--{name} {low},{high}: LOW must not exceed HIGH")
    if not 0.0 <= args.prompt_drop_probability <= 1.0:
        parser.error(f"--prompt_drop_probability {args.prompt_drop_probability}: must be within [0, 1]")
    if args.no_timestep_shift:
        args.timestep_mu = 0.0
    return args


# ---- pieces --------------------------------------------------------------------------------------------------------


def pixart_loss(
    model: torch.nn.Module,
    vae: Any,
    noise_scheduler: Any,
    text: Any,
    batch: dict[str, Any],
    generator: torch.Generator,
    *,
    mu: float,
    drop_probability: float,
    conditioning_scale: float,
    weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise MSE of one batch on the noise half of the prediction; returns (loss, timesteps).

    Draw order (all from `generator`): the VAE posterior samples, the noise, the timesteps, the prompt drops.
    """
    from model.guided_pixart import noise_half
    from model.pixart_walk import micro_conditions
    from model.timesteps import sample_timesteps

    device = text.prompt_embeds.device
    images = torch.cat([batch["c_color"], batch["refs_only"], batch["frame_only"]]).to(device, weight_dtype)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(generator=generator) * vae.config.scaling_factor
    target_latents, refs_latents, frame_latents = latents.float().chunk(3)
    size = target_latents.shape[0]
    noise = torch.randn(target_latents.shape, generator=generator, device=device, dtype=torch.float32)
    timesteps = sample_timesteps(
        size, noise_scheduler.config.num_train_timesteps, mu=mu, generator=generator, device=device
    )
    dropped = torch.rand(size, generator=generator, device=device) < drop_probability
    prompt, prompt_mask = text.for_batch(size)
    empty, empty_mask = text.for_batch(size, negative=True)
    embeds = torch.where(dropped[:, None, None], empty, prompt)
    mask = torch.where(dropped[:, None], empty_mask, prompt_mask)
    noisy = noise_scheduler.add_noise(target_latents, noise, timesteps)
    cond = torch.cat([refs_latents, batch["mask"].to(device, torch.float32), frame_latents], dim=1)
    height, width = batch["c_color"].shape[-2:]
    conditions = micro_conditions(height, width, size, device, weight_dtype)
    prediction = model(
        noisy.to(weight_dtype),
        timesteps,
        embeds.to(weight_dtype),
        mask,
        conditions,
        guider_cond=cond.to(weight_dtype),
        conditioning_scale=conditioning_scale,
    )
    predicted_noise = noise_half(prediction, target_latents.shape[1])
    return F.mse_loss(predicted_noise.float(), noise, reduction="mean"), timesteps


# ---- models ---------------------------------------------------------------------------------------------------------


def load_models(args: argparse.Namespace) -> dict[str, Any]:
    """Frozen VAE and noise scheduler, the cached text, and the trainable GuidedPixArtTransformer (guider + LoRA)."""
    from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel

    from model.colorguider_pixart import PixArtColorGuider
    from model.guided_pixart import GuidedPixArtTransformer
    from model.lineart_weights import load_lineart_weights
    from model.pixart_lora import add_pixart_lora
    from model.text_cache import load_text_cache

    base = args.pretrained_model_name_or_path
    text = load_text_cache(args.text_cache)
    kwargs = {"revision": args.revision, "variant": args.variant}
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **kwargs)
    transformer = PixArtTransformer2DModel.from_pretrained(base, subfolder="transformer", **kwargs)
    caption_channels = transformer.config.caption_channels
    if caption_channels is not None and text.prompt_embeds.shape[-1] != caption_channels:
        raise ValueError(
            f"{args.text_cache}: embeddings are {text.prompt_embeds.shape[-1]} wide, the transformer's caption "
            f"projection takes {caption_channels} (was the cache made with this model's text encoder?)"
        )
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", revision=args.revision)
    vae.requires_grad_(False)
    transformer.requires_grad_(False)
    if args.init_from:  # our export or a released style folder, loaded strictly
        guider, transformer, _ = load_lineart_weights(transformer, args.init_from)
    else:
        guider = PixArtColorGuider.from_transformer(transformer)
        add_pixart_lora(transformer, rank=args.lora_rank, alpha=args.lora_alpha)
    guider.requires_grad_(True)
    guider.train()
    return {
        "text": text,
        "vae": vae,
        "noise_scheduler": noise_scheduler,
        "model": GuidedPixArtTransformer(transformer, guider),
    }


def register_hooks(accelerator: Any, model_type: type) -> None:
    """save_state/load_state write the trainables as a style folder (lineart/: guider + LoRA) and nothing else."""
    from model.colorguider_pixart import PixArtColorGuider
    from model.pixart_lora import RELEASED_LORA_FILE, load_pixart_lora, save_pixart_lora

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            inner = accelerator.unwrap_model(model)
            if not isinstance(inner, model_type):
                raise TypeError(f"unexpected model in save_state: {type(inner).__name__}")
            if accelerator.is_main_process:
                folder = Path(output_dir) / CHECKPOINT_WEIGHTS
                inner.guider.save_released(folder)
                save_pixart_lora(inner.transformer, folder / RELEASED_LORA_FILE)
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            inner = accelerator.unwrap_model(models.pop())
            if not isinstance(inner, model_type):
                raise TypeError(f"unexpected model in load_state: {type(inner).__name__}")
            folder = Path(input_dir) / CHECKPOINT_WEIGHTS
            inner.guider.load_state_dict(PixArtColorGuider.from_pretrained(folder).state_dict())
            load_pixart_lora(inner.transformer, folder / RELEASED_LORA_FILE)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---- validation -----------------------------------------------------------------------------------------------------


def log_validation(
    accelerator: Any, models: dict[str, Any], model: Any, samples: list[Any], args: argparse.Namespace, step: int
) -> None:
    """Colourise the fixed samples with the line-art pipeline; log C_bw | output | target per sample."""
    from diffusers import DPMSolverMultistepScheduler

    from model.pipeline_pixart import ColorFlowPixArtPipeline
    from pipelines.core.geometry import CompositeLayout

    inner = accelerator.unwrap_model(model)
    pipeline = ColorFlowPixArtPipeline(
        vae=models["vae"],
        transformer=inner.transformer,
        guider=inner.guider,
        scheduler=DPMSolverMultistepScheduler.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="scheduler"
        ),
    )
    pipeline.set_progress_bar_config(disable=True)
    rows = []
    was_training = inner.training
    inner.eval()
    with torch.no_grad(), accelerator.autocast():
        for index, sample in enumerate(samples):
            generator = torch.Generator(device="cpu").manual_seed(args.seed + index)
            refs_only, frame_only, mask = validation_canvases(sample, args.resolution)
            output = pipeline(
                refs_only=refs_only,
                frame_only=frame_only,
                mask=mask,
                text=models["text"],
                num_inference_steps=args.validation_inference_steps,
                guidance_scale=args.validation_guidance_scale,
                generator=generator,
            ).images[0]
            layout = CompositeLayout(*sample.color.size)
            centre = layout.crop_centre(output.resize(layout.canvas_size))
            rows.append(np.concatenate([np.asarray(sample.bw), np.asarray(centre), np.asarray(sample.color)], axis=1))
    if was_training:
        inner.train()
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(rows), step, dataformats="NHWC")


# ---- the run --------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from model.devices import place
    from model.guided_pixart import GuidedPixArtTransformer
    from model.lineart_weights import save_lineart_export

    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    report_to = None if args.report_to in ("none", "", None) else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        cpu=not torch.cuda.is_available(),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.ERROR)
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    source = resolve_shard_source(args.data if len(args.data) > 1 else args.data[0])
    check_variant(source, args.bw_variant)  # before the models load
    models = load_models(args)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    vae, model = models["vae"], models["model"]
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    models["text"] = models["text"].to(device)
    place(vae, device, weight_dtype)
    place(model.transformer, device, weight_dtype)
    model.guider.to(device)
    cast_training_params(
        model.transformer, dtype=torch.float32
    )  # LoRA weights train in fp32; the frozen base stays low
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    register_hooks(accelerator, GuidedPixArtTransformer)

    world, rank = accelerator.num_processes, accelerator.process_index
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * world
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * world,
        num_training_steps=args.max_train_steps * world,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    global_step = 0
    resume = resolve_resume(output_dir, args.resume_from_checkpoint)
    if resume is not None:
        state = read_json(resume / TRAIN_STATE)
        expected = {"world_size": world, "train_batch_size": args.train_batch_size, "seed": args.seed}
        expected["gradient_accumulation_steps"] = args.gradient_accumulation_steps
        different = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if different:
            raise ValueError(f"{resume}: cannot resume exactly, settings differ (saved, now): {different}")
        accelerator.load_state(str(resume))
        global_step = int(state["global_step"])
        logger.info("resumed from %s at step %d", resume, global_step)
    elif args.resume_from_checkpoint:
        logger.info("no checkpoint in %s: starting a new run", output_dir)

    latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    patch = accelerator.unwrap_model(model).guider.config.patch_size
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
    width, height = args.resolution or frame_size(source)
    if width % (latent_factor * patch) or height % (latent_factor * patch):
        raise ValueError(
            f"resolution {width}x{height}: sides must be multiples of {latent_factor * patch} (VAE x patch)"
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
    )

    if accelerator.is_main_process and report_to:
        config = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers(PROG, config=config)
    validation = []
    if accelerator.is_main_process and args.validation_steps > 0:
        validation = validation_inputs(source, args.num_validation_samples, args.data, args.bw_variant)

    progress = tqdm(
        total=args.max_train_steps, initial=global_step, desc=PROG, disable=not accelerator.is_local_main_process
    )
    batches = iter(loader)
    timestep_buffer: list[torch.Tensor] = []
    bad_skipped = samples_seen = 0
    loss_history: list[float] = []
    loop_started = time.perf_counter()
    model.train()
    while global_step < args.max_train_steps:
        losses = []
        for micro in range(args.gradient_accumulation_steps):
            batch = next(batches)
            bad_skipped += int(batch["bad_skipped"].sum())
            samples_seen += len(batch["key"])
            generator = step_generator(args.seed, global_step, micro, rank, device)
            with accelerator.accumulate(model):
                loss, timesteps = pixart_loss(
                    model,
                    vae,
                    models["noise_scheduler"],
                    models["text"],
                    batch,
                    generator,
                    mu=args.timestep_mu,
                    drop_probability=args.prompt_drop_probability,
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
        global_step += 1
        step_loss = accelerator.gather(torch.stack(losses).mean()[None]).mean().item()
        loss_history.append(step_loss)
        progress.update(1)
        learning_rate_now = lr_scheduler.get_last_lr()[0]
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{learning_rate_now:.2e}")
        accelerator.log({"loss": step_loss, "lr": learning_rate_now}, step=global_step)
        if global_step % args.histogram_steps == 0 or global_step == args.max_train_steps:
            all_timesteps = accelerator.gather(torch.cat(timestep_buffer))
            timestep_buffer.clear()
            if accelerator.is_main_process:
                for tracker in accelerator.trackers:
                    if tracker.name == "tensorboard":
                        tracker.writer.add_histogram("timesteps", all_timesteps.cpu().numpy(), global_step)
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(accelerator, output_dir, global_step, args, world, source)
        if validation and global_step % args.validation_steps == 0:
            log_validation(accelerator, models, model, validation, args, global_step)
    progress.close()

    accelerator.wait_for_everyone()
    digests = accelerator.gather_for_metrics([trainable_digest(model)], use_gather_object=True)
    totals = accelerator.gather(torch.tensor([bad_skipped, samples_seen], device=device)[None]).sum(0).tolist()
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        layout_size = frame_size(source)
        meta = {
            "base_model": args.pretrained_model_name_or_path,
            "text_cache": str(args.text_cache),
            "prompt": models["text"].meta.get("prompt"),
            "frame_size": list(layout_size),
            "resolution": list(args.resolution or layout_size),
            "training_steps": global_step,
            "shard_manifest": source.manifest,
            "shard_manifest_sha256": source.sha256,
            "seed": args.seed,
            "timestep_mu": args.timestep_mu,
            "prompt_drop_probability": args.prompt_drop_probability,
            "init_from": args.init_from,
            "bw_variant": args.bw_variant,
        }
        save_lineart_export(output_dir / EXPORT_FOLDER, inner.guider, inner.transformer, meta)
        summary = {
            "steps": global_step,
            "world_size": world,
            "samples": int(totals[1]),
            "bad_samples_skipped": int(totals[0]),
            "seconds": round(time.perf_counter() - started, 3),
            "samples_per_s": round(totals[1] / max(1e-9, time.perf_counter() - loop_started), 3),
            "loss_first_steps": loss_history[:10],
            "loss_last_steps": loss_history[-10:],
            "trainable_sha256_per_rank": digests,
            "export": str(output_dir / EXPORT_FOLDER),
        }
        atomic_write_json(output_dir / SUMMARY, summary)  # last: the run's completion marker
    accelerator.end_training()
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    return run_job(lambda a: main(parse_args(a)), argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(cli())

"""Train the GSRP fusion net: the high-resolution B&W frame guides the VAE decoder of a degraded colour frame.

    accelerate launch -m training.train_gsrp --pretrained_model_name_or_path SD15_DIR --data DATA_ROOT \\
        --output_dir runs/gsrp [--init_from GraySD/MultiResNetModel.bin] [--resume_from_checkpoint latest]

Pairs come from the shards' high-resolution members (`training.data.build_gsrp_dataset`: the same random crop of
the B&W frame, a screenstyle blend at the project's one alpha draw, and of `hr_color`). The colour input simulates
what the ICP stage hands over: `hr_color` down to the ICP size (hr / sr_scale, bicubic with antialias), through the
VAE (encode, posterior mean, decode), and back up to the high-resolution size (bicubic). The frozen VAE encodes that
and the B&W crop, the fusion net fuses the taps, the VAE decodes the colour posterior's sample with the fused maps
added (`model.gsrp_vae.GuidedVAE.restore`), and an L1 loss against `hr_color` trains the fusion net only.

Determinism: the data order is a function of the seed (and resumes at the consumed sample count); the posterior
sample of a batch is drawn from a generator seeded by (seed, the batch's first stream position); so a resumed run
ends with the weights of an uninterrupted one, bit for bit on the same machine.

Outputs under --output_dir: `checkpoint-<step>/` (accelerate state; `fusion/` is a `save_pretrained` folder), `logs/`
(TensorBoard: loss, lr, validation PSNR of the fused and of the plain decode, images degraded | output | target),
and `export/` (`model.gsrp_weights.save_gsrp_export`: what colorize loads with `load_gsrp`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from model.gsrp_fusion import NORMS, GSRPFusion
from model.gsrp_vae import GuidedVAE
from model.gsrp_weights import EXPORT_STATISTICS, STATISTICS_KEY, load_gsrp, save_gsrp_export
from pipelines.core.cli import parse_size, run_job
from pipelines.runtime.preconditions import check_output_creatable
from training.checkpoints import check_resume_settings, publish_state, resolve_resume
from training.data import (
    GSRPDataConfig,
    ShardSource,
    build_gsrp_dataset,
    bw_variant_arg,
    check_shards,
    resolve_shard_source,
    resumed_source,
)
from training.early_stop import BadSampleBudget, Preemption, ignore_sigterm, preempted
from training.inputs import TrainerArgumentParser, add_safety_arguments, check_base_model, check_vae_folder
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
from training.run_lock import run_folder

PROG = "train_gsrp"
FUSION_SUBFOLDER = "fusion"
CHECKPOINT_PREFIX = "checkpoint-"
logger = logging.getLogger(PROG)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = TrainerArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("models")
    model.add_argument(
        "--pretrained_model_name_or_path", default=None, help="SD1.5-style folder; the VAE is its vae/ subfolder"
    )
    model.add_argument("--vae", default=None, help="a diffusers AutoencoderKL folder (instead of the SD folder's vae/)")
    model.add_argument(
        "--init_from",
        default=None,
        help="start from trained fusion weights: a released MultiResNetModel.bin (or its folder) or our export",
    )
    model.add_argument("--norm", choices=NORMS, default="batch", help="normalisation when training from scratch")
    model.add_argument(
        "--batchnorm_stats",
        choices=("auto", "frozen", "update"),
        default="auto",
        help="BatchNorm running statistics: frozen (fine-tuning) or updated; auto = frozen with --init_from",
    )
    model.add_argument("--blocks_per_branch", type=int, default=4, help="residual blocks per branch (scratch only)")

    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", required=True, help="data root, shards manifest, or shard URLs/patterns")
    data.add_argument(
        "--validation_data", nargs="+", default=None, help="validation shards (default: the data root's val split)"
    )
    data.add_argument(
        "--crop_size",
        type=parse_size,
        default=(512, 512),
        help="training crop WxH (whole frame if smaller)",
    )
    data.add_argument("--sr_scale", type=float, default=1.5, help="GSRP size / ICP size (released: 1.5)")
    data.add_argument(
        "--bw_variant",
        type=bw_variant_arg,
        default="screenstyle",
        help="B&W input: screenstyle, grey, tone or a weight; sketch or shading (the plain line art for both)",
    )
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader workers per process")
    add_safety_arguments(data)

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="gsrp-out", help="run folder: checkpoints, logs, export")
    train.add_argument("--seed", type=int, default=0, help="fixes data order, alphas, crops and VAE samples")
    train.add_argument("--train_batch_size", type=int, default=1, help="per device")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per step")
    train.add_argument("--max_train_steps", type=int, default=30000, help="optimizer steps (paper: 30k)")
    train.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate (our choice)")
    train.add_argument("--lr_scheduler", default="constant", help="diffusers get_scheduler name")
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="warm-up steps")
    add_adamw_arguments(train, weight_decay=0.0)
    add_optimizer_arguments(train)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="default: accelerate's")
    train.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute VAE and fusion blocks in backward (fusion blocks only while BatchNorm statistics are frozen "
        "or with --norm group: updating statistics twice would be wrong)",
    )
    train.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+")

    save = parser.add_argument_group("checkpoints, logging, validation")
    save.add_argument("--checkpointing_steps", type=int, default=500, help="save state every N steps")
    save.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep the newest N (none: all)")
    save.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-<step> folder or 'latest'")
    save.add_argument("--validation_steps", type=int, default=500, help="validation images every N steps (0: off)")
    save.add_argument("--num_validation_images", type=int, default=4, help="fixed validation samples")
    save.add_argument("--report_to", default="tensorboard", help="accelerate tracker ('none' for no tracking)")
    save.add_argument("--export_dir", default=None, help="final export folder (default OUTPUT_DIR/export)")

    args = parser.parse_args(argv)
    if args.pretrained_model_name_or_path is None and args.vae is None:
        parser.error("give --pretrained_model_name_or_path (an SD folder with vae/) or --vae")
    if args.sr_scale < 1.0:
        parser.error(f"--sr_scale must be >= 1, got {args.sr_scale}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error("--checkpoints_total_limit must be >= 1")
    width, height = args.crop_size
    if width % 8 or height % 8:
        parser.error(f"--crop_size {width}x{height}: must be multiples of 8 (the VAE's factor)")
    return args


# ---- the math of one step (pure functions, shared with bench/bench_train_gsrp.py) ----------------------------------


def crop_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Crop (..., H, W) to the largest multiples of `multiple` (top-left), as the VAE needs."""
    height, width = images.shape[-2:]
    if height < multiple or width < multiple:
        raise ValueError(f"crop {width}x{height} is smaller than the VAE factor {multiple}")
    return images[..., : height - height % multiple, : width - width % multiple]


def icp_size(height: int, width: int, sr_scale: float, multiple: int) -> tuple[int, int]:
    """The ICP-size (h, w) a high-resolution (h, w) came from: divided by sr_scale, rounded to the VAE factor."""
    return (
        max(multiple, round(height / sr_scale / multiple) * multiple),
        max(multiple, round(width / sr_scale / multiple) * multiple),
    )


@torch.no_grad()
def degrade_like_icp(guided: GuidedVAE, hr_color: torch.Tensor, sr_scale: float) -> torch.Tensor:
    """hr_color (B,3,H,W) -> what GSRP sees at inference: down to the ICP size, VAE round trip, up again."""
    vae = guided.vae
    height, width = hr_color.shape[-2:]
    low = F.interpolate(
        hr_color.float(), size=icp_size(height, width, sr_scale, guided.scale_factor), mode="bicubic", antialias=True
    ).clamp(-1, 1)
    latents = vae.encode(low.to(vae.dtype)).latent_dist.mode()
    decoded = vae.decode(latents).sample.float().clamp(-1, 1)
    return F.interpolate(decoded, size=(height, width), mode="bicubic").clamp(-1, 1)


def gsrp_loss(
    guided: GuidedVAE,
    fusion: torch.nn.Module,
    hr_color: torch.Tensor,
    hr_bw: torch.Tensor,
    sr_scale: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """One batch's loss: degrade the target as ICP's output would be, restore it with the fusion net guided by the
    B&W page, L1 against the target. The trainer's step and the memory-ladder bench both call this."""
    degraded = degrade_like_icp(guided, hr_color, sr_scale)
    output = guided.restore(fusion, degraded, hr_bw, generator)
    return F.l1_loss(output.float(), hr_color.float())


def batch_generator(seed: int, position: int) -> torch.Generator:
    """The posterior-sampling generator of a batch, fixed by the seed and the batch's first stream position."""
    return torch.Generator().manual_seed(seed * 1_000_003 + position)


def psnr(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (images.float().clamp(-1, 1) - targets.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def evaluate_pairs(
    guided: GuidedVAE, fusion: GSRPFusion, pairs: Sequence[dict[str, torch.Tensor]], sr_scale: float, seed: int
) -> dict[str, Any]:
    """Fused output and plain VAE decode of the degraded input, against the target, pair by pair (eval mode)."""
    was_training = fusion.training
    fusion.eval()
    rows, fused_db, plain_db = [], [], []
    try:
        for index, pair in enumerate(pairs):
            device = guided.vae.device
            target = pair["hr_color"][None].to(device)
            degraded = degrade_like_icp(guided, target, sr_scale)
            output = guided.restore(fusion, degraded, pair["hr_bw"][None].to(device), batch_generator(seed, index))
            latents = guided.encode_features(degraded.to(guided.vae.dtype))[0].sample(batch_generator(seed, index))
            plain = guided.decode_fused(latents, None)
            fused_db.append(float(psnr(output, target)[0]))
            plain_db.append(float(psnr(plain, target)[0]))
            rows.append(torch.cat([degraded, output.float().clamp(-1, 1), target.float()], dim=-1)[0].cpu())
    finally:
        fusion.train(was_training)
    return {
        "psnr": float(np.mean(fused_db)),
        "psnr_plain_decode": float(np.mean(plain_db)),
        "rows": rows,
    }


# ---- setup ---------------------------------------------------------------------------------------------------------


def load_vae(args: argparse.Namespace, dtype: torch.dtype) -> AutoencoderKL:
    if args.vae is not None:
        return AutoencoderKL.from_pretrained(args.vae, torch_dtype=dtype)
    return AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", torch_dtype=dtype)


def build_fusion(args: argparse.Namespace, guided: GuidedVAE) -> GSRPFusion:
    if args.init_from:
        fusion = load_gsrp(args.init_from)
    else:
        fusion = GSRPFusion.from_vae_config(guided.vae.config, norm=args.norm, blocks_per_branch=args.blocks_per_branch)
    guided.check_fusion(fusion)
    frozen = args.batchnorm_stats == "frozen" or (args.batchnorm_stats == "auto" and bool(args.init_from))
    fusion.freeze_batchnorm_statistics(frozen and fusion.config.norm == "batch")
    if fusion.dtype != torch.float32:  # trainable weights stay fp32 under mixed precision
        fusion = fusion.float()
    return fusion.train()


def run_settings(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """What an exact resume needs unchanged: the sample order and the samples per step depend on all of it."""
    return {
        "world_size": world_size,
        "seed": args.seed,
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
    }


def validation_source(args: argparse.Namespace, train_source: ShardSource) -> ShardSource:
    if args.validation_data:
        return resolve_shard_source(args.validation_data)
    try:
        return resolve_shard_source(args.data, split="val")
    except (FileNotFoundError, ValueError):
        logger.info("no validation split next to --data: validation images come from the training shards")
        return train_source


def validation_pairs(args: argparse.Namespace, source: ShardSource, multiple: int) -> list[dict[str, torch.Tensor]]:
    """The first N samples of the validation stream (seeded; the same pairs at every validation)."""
    if args.num_validation_images <= 0:
        return []
    config = GSRPDataConfig(crop_size=args.crop_size, variant=args.bw_variant, batch_size=1)
    stream = iter(build_gsrp_dataset(source, config, seed=args.seed, rank=0, world_size=1))
    pairs = []
    for _ in range(min(args.num_validation_images, source.nsamples)):
        sample = next(stream)
        pairs.append({name: crop_to_multiple(sample[name], multiple) for name in ("hr_bw", "hr_color")})
    return pairs


def log_validation(accelerator: Accelerator, result: dict[str, Any], step: int) -> None:
    accelerator.log({"val/psnr": result["psnr"], "val/psnr_plain_decode": result["psnr_plain_decode"]}, step=step)
    images = [
        ((row.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8) for row in result["rows"]
    ]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard" and images:
            for index, image in enumerate(images):  # rows may differ in size: one image per pair
                tracker.writer.add_image(f"validation/{index} degraded|output|target", image, step, dataformats="HWC")


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """TensorBoard's hparams take scalars and strings only."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in vars(args).items()}


# ---- main ----------------------------------------------------------------------------------------------------------


def check_inputs(args: argparse.Namespace) -> tuple[ShardSource, Path | None]:
    """Everything that can be checked without a model, before one loads or an output folder exists: the VAE's
    folder, the shards (sizes, hashes on request), the init weights, the checkpoint to resume, the output folder."""
    if args.vae is not None:
        check_vae_folder(args.vae)
    else:
        check_base_model(args.pretrained_model_name_or_path, ("vae",))
    output_dir = check_output_creatable(args.output_dir, "--output_dir")
    resume = resolve_resume(output_dir, args.resume_from_checkpoint, skip_unreadable=args.skip_unreadable_checkpoints)
    source = resumed_source(resolve_shard_source(args.data), resume)  # a resumed run keeps its generation
    check_shards(source, verify_sha256=args.verify_shards)
    if args.validation_data:
        check_shards(resolve_shard_source(args.validation_data), verify_sha256=args.verify_shards)
    check_optimizer_arguments(args)
    if args.init_from and not Path(args.init_from).exists():
        raise FileNotFoundError(f"--init_from {args.init_from}: no such file or folder")
    return source, resume


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Check the inputs, then train in the locked output folder; SIGTERM saves a checkpoint and stops cleanly."""
    with Preemption() as preemption:
        train_source, checkpoint = check_inputs(args)
        output_dir = Path(args.output_dir)
        accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        )
        if checkpoint is not None:
            check_resume_settings(checkpoint, run_settings(args, accelerator.num_processes))
        with run_folder(accelerator, output_dir, force_unlock=args.force_unlock):
            return train(args, accelerator, train_source, checkpoint, preemption)


def train(
    args: argparse.Namespace,
    accelerator: Accelerator,
    train_source: ShardSource,
    checkpoint: Path | None,
    preemption: Preemption,
) -> dict[str, Any]:
    output_dir = Path(args.output_dir)
    logging.basicConfig(level=logging.INFO if accelerator.is_local_main_process else logging.ERROR)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    vae = load_vae(args, weight_dtype).requires_grad_(False).eval().to(accelerator.device)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    guided = GuidedVAE(vae)
    fusion = build_fusion(args, guided)
    if args.gradient_checkpointing:
        fusion.enable_gradient_checkpointing()

    def save_model_hook(models, weights, folder):
        if accelerator.is_main_process:
            for model in models:
                unwrapped = accelerator.unwrap_model(model)
                if not isinstance(unwrapped, GSRPFusion):
                    raise TypeError(f"unexpected model in the checkpoint: {type(unwrapped).__name__}")
                unwrapped.save_pretrained(Path(folder) / FUSION_SUBFOLDER, safe_serialization=True)
        while weights:
            weights.pop()

    def load_model_hook(models, folder):
        while models:
            model = accelerator.unwrap_model(models.pop())
            loaded = GSRPFusion.from_pretrained(folder, subfolder=FUSION_SUBFOLDER)
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    params = list(fusion.parameters())
    optimizer = make_optimizer(params, args, args.learning_rate)
    ema = make_ema(params, args, accelerator)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    fusion, optimizer, lr_scheduler = accelerator.prepare(fusion, optimizer, lr_scheduler)
    unwrapped_fusion = accelerator.unwrap_model(fusion)

    global_step = 0
    if args.resume_from_checkpoint:
        if checkpoint is None:
            logger.info("no checkpoint in %s: starting a new run", output_dir)
        else:
            accelerator.load_state(str(checkpoint))
            ema_on_device(ema, accelerator.device)
            global_step = int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))
            unwrapped_fusion.train()
            logger.info("resumed from %s at step %d", checkpoint, global_step)

    samples_per_step = args.train_batch_size * args.gradient_accumulation_steps
    data_config = GSRPDataConfig(crop_size=args.crop_size, variant=args.bw_variant, batch_size=args.train_batch_size)
    dataset = build_gsrp_dataset(
        train_source,
        data_config,
        seed=args.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        start_sample=global_step * samples_per_step,
    )
    loader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=args.dataloader_num_workers > 0,
        worker_init_fn=ignore_sigterm,
    )
    pairs = validation_pairs(args, validation_source(args, train_source), guided.scale_factor)
    if accelerator.is_main_process:
        accelerator.init_trackers(PROG, config=tracker_config(args))

    def validate() -> dict[str, Any] | None:
        if not pairs or not accelerator.is_main_process:
            return None
        with accelerator.autocast(), averaged_weights(ema, params):
            result = evaluate_pairs(guided, unwrapped_fusion, pairs, args.sr_scale, args.seed)
        log_validation(accelerator, result, global_step)
        return result

    total_batch = samples_per_step * accelerator.num_processes
    logger.info(
        "GSRP training: %d samples in %d shards, %d steps of %d samples (%d per device x %d accumulation x %d "
        "processes), crop %dx%d, sr scale %.2f, norm %s%s, init %s",
        train_source.nsamples,
        len(train_source.urls),
        args.max_train_steps,
        total_batch,
        args.train_batch_size,
        args.gradient_accumulation_steps,
        accelerator.num_processes,
        *args.crop_size,
        args.sr_scale,
        unwrapped_fusion.config.norm,
        " (frozen statistics)" if unwrapped_fusion.batchnorm_statistics_frozen else "",
        f"{args.init_from} ({init_weights_kind(args.init_from)} weights)" if args.init_from else "scratch",
    )
    progress = tqdm(
        total=args.max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    losses: list[float] = []
    first_loss = last_loss = None
    step_loss, started, start_step, bad_skipped = 0.0, time.perf_counter(), global_step, 0
    budget = BadSampleBudget(args.max_bad_fraction)
    batches = iter(loader)
    while global_step < args.max_train_steps:
        batch = next(batches)
        bad_skipped += int(batch["bad_skipped"].sum())
        budget.add(batch)
        with accelerator.accumulate(fusion), accelerator.autocast():
            hr_color = crop_to_multiple(batch["hr_color"], guided.scale_factor).to(accelerator.device)
            hr_bw = crop_to_multiple(batch["hr_bw"], guided.scale_factor).to(accelerator.device)
            generator = batch_generator(args.seed, int(batch["position"][0]))
            loss = gsrp_loss(guided, fusion, hr_color, hr_bw, args.sr_scale, generator)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(fusion.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss += float(accelerator.gather(loss.detach()[None]).mean()) / args.gradient_accumulation_steps
        if not accelerator.sync_gradients:
            continue
        if ema is not None:
            ema.step(params)
        global_step += 1
        losses.append(step_loss)
        first_loss = step_loss if first_loss is None else first_loss
        last_loss = step_loss
        rate = (global_step - start_step) * total_batch / max(time.perf_counter() - started, 1e-9)
        progress.update(1)
        progress.set_postfix(
            loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}", samples_s=f"{rate:.2f}"
        )
        accelerator.log({"train/loss": step_loss, "train/lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
        step_loss = 0.0
        if budget.exceeded(accelerator):
            progress.close()
            budget.stop()
        stop = preemption.agreed(accelerator)
        if stop or global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            state = {
                "global_step": global_step,
                **run_settings(args, accelerator.num_processes),
                "shard_manifest": train_source.manifest,
            }
            publish_state(accelerator, output_dir, global_step, args.checkpoints_total_limit, state)
        if stop:
            progress.close()
            raise preempted(global_step, accelerator)
        if (
            args.validation_steps > 0
            and global_step % args.validation_steps == 0
            and global_step < args.max_train_steps
        ):
            validate()
    progress.close()
    elapsed = time.perf_counter() - started

    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {
        "global_step": global_step,
        "first_loss": first_loss,
        "final_loss": last_loss,
        "losses": losses,
        "loss_steps": [start_step + 1, global_step],  # the steps `losses` cover (a resumed run's start later)
    }
    if accelerator.is_main_process:
        result = validate()
        meta = {
            "base_model": str(args.pretrained_model_name_or_path or args.vae),
            "vae": str(args.vae) if args.vae else f"{args.pretrained_model_name_or_path}/vae",
            "sr_scale": args.sr_scale,
            STATISTICS_KEY: EXPORT_STATISTICS,  # validation above ran in eval mode
            "steps": global_step,
            "crop_size": list(args.crop_size),
            "bw_variant": args.bw_variant,
            "init_from": args.init_from,
            "init_weights": init_weights_kind(args.init_from),
            "seed": args.seed,
            "shard_manifest": train_source.manifest,
            "shard_manifest_sha256": train_source.sha256,
            "final_loss": last_loss,
            "weights": "raw",
        }
        export_dir = Path(args.export_dir) if args.export_dir else output_dir / "export"
        export = save_gsrp_export(export_dir, unwrapped_fusion, meta)
        if ema is not None:  # after the raw export, which replaces its folder whole
            with averaged_weights(ema, params):
                ema_meta = {**meta, "weights": "ema", "ema_decay": args.ema_decay}
                summary["ema_export"] = str(save_gsrp_export(export_dir / EMA_FOLDER, unwrapped_fusion, ema_meta))
            summary["ema_sha256"] = ema_digest(ema)
        summary.update(export=str(export), bad_skipped=bad_skipped, seconds=round(elapsed, 3))
        steps_run = global_step - start_step
        summary["samples_per_s"] = round(steps_run * total_batch / elapsed, 3) if elapsed > 0 and steps_run else None
        if result is not None:
            summary.update(psnr=result["psnr"], psnr_plain_decode=result["psnr_plain_decode"])
        logger.info(
            "done: %d steps (%d this run, %.1f s, %s samples/s), loss %s -> %s, validation PSNR %s dB "
            "(plain decode %s dB), %d bad samples skipped; export %s",
            global_step,
            steps_run,
            elapsed,
            summary["samples_per_s"],
            _fmt(first_loss),
            _fmt(last_loss),
            _fmt(summary.get("psnr")),
            _fmt(summary.get("psnr_plain_decode")),
            bad_skipped,
            export,
        )
    accelerator.end_training()
    return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def cli(argv: Sequence[str] | None = None) -> int:
    return run_job(lambda arguments: main(parse_args(arguments)), argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(cli())

"""ICP training throughput: the data path per CPU core, and on a GPU the step split, each against a baseline.

Data path (always): generated samples at the training size (default 512x800) are written to real shards, then
one process with one thread turns them into training tensors twice, interleaved over `--repeat` rounds, timed
per CPU-second of the process (the per-core rate, robust to other load on the machine) and by the wall clock:

- baseline: `decode_sample` + `build_training_inputs` (every member decoded) + the same crop, resize and tensor
  conversion the trainer needs (C_color, refs-only, frame-only, mask at latent size; `training.data.crop_resize`,
  the stream's own resize, so the ratio shows what reading and decoding less saves);
- stream: `training.data.build_icp_dataset` (wids reads, only ICP's members decoded, the one composite function,
  the patch-wise crop), as a training loop consumes it.

GPU (when CUDA is available): SD1.5-size random models built from configs (UNet, VAE, the Colorization Guider from
the UNet, LoRA rank 64), bf16 frozen weights, at the training size and `--batch` 8: VAE encodes per sample (three
images: C_color, refs-only, frame-only), guider + UNet forward/backward with and without gradient checkpointing:
s/step, samples/s, peak memory; against the same two networks run uncoupled (no residual wiring: the issue's anchor
workload) in the same run, and against the anchor's figures (13.8 samples/s at 20 GB with checkpointing, 20.1 at
47 GB without, one H100).

Run: ``.venv/bin/python bench/bench_train_icp.py [--size 512x800] [--samples 24] [--repeat 3] [--batch 8]``
(``--work DIR`` keeps the generated data).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from jobs.common import parse_size
from model.line_extractor import LineExtractor
from pipelines.core.geometry import hires_size
from pipelines.core.page_styles import pages_line_art
from pipelines.core.pagestore import encode_page
from pipelines.core.sample_inputs import build_training_inputs, decode_sample
from pipelines.core.samples import ChapterPages, FrameRecord, SampleConfig, build_sample, encode_line_art
from pipelines.shards.writer import write_tar
from screentone.halftone import render_halftone
from screentone.synthetic import synthetic_color_page
from training.data import ICPDataConfig, build_icp_dataset, crop_resize, crop_window, resolve_shard_source


def _png(array: np.ndarray) -> bytes:
    return encode_page(Image.fromarray(array, mode="L"), "png")


def build_shards(work: Path, size: tuple[int, int], samples: int, per_shard: int = 8) -> Path:
    """Real shards of generated frames: synthetic colour pages, halftone tones, rings of the chapter's pages."""
    folder = work / f"shards-{size[0]}x{size[1]}-{samples}"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    config = SampleConfig(width=width, height=height, renderer_id="halftone-bench")
    hr = hires_size(width, height, config.hires_scale)
    pages = {f"p{i:04d}": synthetic_color_page(height + 16, width + 64, seed=i) for i in range(samples)}
    store = ChapterPages({pid: encode_page(Image.fromarray(page), "png") for pid, page in pages.items()})
    built = []
    lines = LineExtractor()
    for n, pid in enumerate(pages):
        others = [p for p in pages if p != pid]
        rows = [
            {
                "query_patch": q,
                "rank": r,
                "ref_page_id": others[(3 * q + r) % len(others)],
                "ref_patch": (q + r) % 5,
                "score": 1.0 - 0.1 * r,
            }
            for q in range(4)
            for r in range(3)
        ]
        color = np.asarray(store.fitted(pid, width, height))
        hr_color = np.asarray(store.fitted(pid, *hr, keep=False))
        frame = FrameRecord(pid, "bench", "bench-ch0", "ch0", n)
        tone, hr_tone = _png(render_halftone(color, seed=n)), _png(render_halftone(hr_color, seed=n))
        line_art = encode_line_art(pages_line_art([store.page(pid)], size, hr, lines.many)[0])
        built.append(build_sample(frame, store, rows, tone, hr_tone, config, line_art))
    for start in range(0, samples, per_shard):
        write_tar(folder / f"train-{start // per_shard:06d}.tar", built[start : start + per_shard])
    (folder / "done").write_text("ok")
    return folder


def baseline_sample(raw: dict, config: ICPDataConfig, seed: int) -> dict:
    """What training cost before the stream: decode every member, build every input, convert what ICP needs."""
    decoded = decode_sample(raw)
    inputs = build_training_inputs(decoded, seed=seed)
    layout = decoded.layout
    box = crop_window(layout, config, seed, 0, decoded.key)
    size = (layout.width, layout.height)
    tensors = {name: crop_resize(getattr(inputs, name), box, size) for name in ("c_color", "refs_only", "frame_only")}
    left, top, right, bottom = box
    mask = torch.from_numpy(inputs.mask[top:bottom, left:right].copy())[None, None]
    tensors["mask"] = F.interpolate(mask, size=(size[1] // 8, size[0] // 8), mode="nearest")[0]
    return tensors


def raw_samples(folder: Path) -> list[dict]:
    from wids.wids import IndexedTarSamples

    out = []
    for tar in sorted(folder.glob("*.tar")):
        shard = IndexedTarSamples(path=str(tar))
        for i in range(len(shard)):
            out.append({k: (v.getvalue() if isinstance(v, io.BytesIO) else v) for k, v in shard[i].items()})
        shard.close()
    return out


def bench_data(folder: Path, samples: int, repeat: int) -> dict[str, float]:
    torch.set_num_threads(1)
    config = ICPDataConfig()
    last = len(list(folder.glob("*.tar"))) - 1
    source = resolve_shard_source(f"{folder}/train-{{000000..{last:06d}}}.tar")
    raws = [{k: v for k, v in r.items() if not k.startswith("__") or k == "__key__"} for r in raw_samples(folder)]
    rates: dict[str, list[tuple[float, float]]] = {"baseline": [], "stream": []}  # (CPU-second, wall) rates
    for round_ in range(repeat):
        cpu, wall = time.process_time(), time.perf_counter()
        for raw in raws:
            baseline_sample(raw, config, seed=round_)
        rates["baseline"].append((len(raws) / (time.process_time() - cpu), len(raws) / (time.perf_counter() - wall)))
        stream = iter(build_icp_dataset(source, config, seed=round_, rank=0, world_size=1))
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(samples):
            next(stream)
        rates["stream"].append((samples / (time.process_time() - cpu), samples / (time.perf_counter() - wall)))
    medians = {name: [statistics.median(r[i] for r in runs) for i in (0, 1)] for name, runs in rates.items()}
    (base, base_wall), (mine, mine_wall) = medians["baseline"], medians["stream"]
    print(f"data path, 1 process 1 thread, {samples} samples x {repeat} rounds (median): per CPU-second | wall clock")
    print(f"  baseline build_training_inputs + conversion : {base:6.1f} | {base_wall:6.1f} samples/s per core")
    print(
        f"  training.data ICP stream                    : {mine:6.1f} | {mine_wall:6.1f} samples/s per core"
        f"  ({mine / base:.2f}x | {mine_wall / base_wall:.2f}x)"
    )
    return {"baseline": base, "stream": mine}


ANCHOR = {  # one H100, random weights, the same two networks coupled without the residual wiring (issue 12)
    True: {"samples_per_s": 13.8, "gib": 20.0},
    False: {"samples_per_s": 20.1, "gib": 47.0},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(step, steps: int, device: torch.device) -> float:
    """Seconds per call of `step` (one warm-up call first)."""
    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _models(kind: str, device: torch.device, dtype: torch.dtype):
    """(vae, unet) built on `device`: SD1.5's configs, or the tiny test folder's (a smoke run anywhere)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from model.tiny import SD15_UNET_CONFIG, SD15_VAE_CONFIG, build_tiny_unet, build_tiny_vae

    torch.manual_seed(0)
    with torch.device(device):  # built in place: random init of ~1.7B parameters on a CPU takes minutes
        if kind == "tiny":
            vae, unet = build_tiny_vae(), build_tiny_unet()
        else:
            vae, unet = AutoencoderKL(**SD15_VAE_CONFIG), UNet2DConditionModel(**SD15_UNET_CONFIG)
    return vae.to(dtype=dtype).requires_grad_(False), unet


def bench_step_split(size: tuple[int, int], batch: int, steps: int, kind: str, device: torch.device) -> None:
    """VAE encodes, then guider + UNet forward/backward (ours, and the uncoupled baseline) with and without
    gradient checkpointing: s/step, samples/s, peak memory."""
    from diffusers.training_utils import cast_training_params

    from model.colorguider import ColorGuider
    from model.guided_unet import GuidedUNet
    from model.lora import add_icp_lora

    dtype = torch.bfloat16
    width, height = size
    vae, _ = _models(kind, device, dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    images = torch.randn(3 * batch, 3, height, width, device=device, dtype=dtype)  # C_color, refs-only, frame-only

    def encode(vae=vae, images=images) -> None:
        with torch.no_grad():
            vae.encode(images).latent_dist.sample()

    encode_s = _time_steps(encode, steps, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, {kind} models, {width}x{height}, bf16, batch {batch}")
    print(
        f"  VAE encodes (3 images per sample, one call): {encode_s:.3f} s/step, {3 * batch / encode_s:.1f} images/s, "
        f"{1000 * encode_s / batch:.1f} ms per sample"
    )
    del vae, images
    for checkpointing in (True, False):
        results = {}
        for coupled in (True, False):
            _, unet = _models(kind, device, dtype)
            guider = ColorGuider.from_unet(unet)
            add_icp_lora(unet)
            unet.to(dtype=dtype)
            cast_training_params(unet, dtype=torch.float32)  # LoRA in fp32, frozen base in bf16; guider fp32
            model = GuidedUNet(unet, guider)
            if checkpointing:
                model.enable_gradient_checkpointing()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            latents = torch.randn(batch, 4, height // factor, width // factor, device=device)
            cond = torch.randn(batch, 9, height // factor, width // factor, device=device)
            text = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)
            timesteps = torch.randint(0, 1000, (batch,), device=device)

            def step(model=model, unet=unet, guider=guider, optimizer=optimizer, coupled=coupled,
                     latents=latents, timesteps=timesteps, text=text, cond=cond) -> None:  # fmt: skip
                with torch.autocast(device.type, dtype=dtype):
                    if coupled:
                        loss = F.mse_loss(model(latents, timesteps, text, cond).float(), latents)
                    else:  # both networks, no residual wiring: the anchor's workload
                        residuals = guider(latents, timesteps, cond)
                        extra = sum(r.float().mean() for r in (*residuals.down_residuals, residuals.mid_residual))
                        prediction = unet(latents, timesteps, text).sample
                        loss = F.mse_loss(prediction.float(), latents) + extra
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            seconds = _time_steps(step, steps, device)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            results[coupled] = (seconds, peak)
            del model, unet, guider, optimizer
        (ours, ours_peak), (base, base_peak) = results[True], results[False]
        anchor = ANCHOR[checkpointing]
        print(
            f"  guider + UNet fwd/bwd, checkpointing {'on ' if checkpointing else 'off'}: {ours:.3f} s/step, "
            f"{batch / ours:.1f} samples/s, peak {ours_peak:.1f} GiB | uncoupled baseline {batch / base:.1f} "
            f"samples/s, {base_peak:.1f} GiB: {base / ours:.2f}x | issue anchor {anchor['samples_per_s']} samples/s, "
            f"{anchor['gib']:.0f} GB: {batch / ours / anchor['samples_per_s']:.2f}x"
        )


def bench_rungs(rungs: list[Path], size: tuple[int, int], steps: int, kind: str, device: torch.device) -> None:
    """The memory ladder: for each arguments file (configs/icp/*.args) the trainer's own step with its settings
    (per-device batch x accumulation, checkpointing, 8-bit AdamW, EMA, text encoder freed or kept resident) on
    random SD1.5-size models: s/step, samples/s and peak memory, against the first rung measured in the same run.
    A rung whose optional package is missing (8-bit AdamW without bitsandbytes) is skipped in one line."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    from model.colorguider import ColorGuider
    from model.guided_unet import GuidedUNet
    from model.lora import add_icp_lora
    from pipelines.core.errors import UsageError
    from training.optimization import check_optimizer_arguments, make_ema, make_optimizer
    from training.train_icp import icp_loss, parse_args

    diffusers_logging.set_verbosity_error()  # casting random models to bf16 is what we mean to do
    dtype, (width, height) = torch.bfloat16, size
    baseline = None
    for rung in rungs:
        args = parse_args([f"@{rung}", "--pretrained_model_name_or_path", "-", "--data", "-", "--output_dir", "-"])
        try:
            check_optimizer_arguments(args)
        except UsageError as error:
            print(f"  rung {rung}: skipped ({error})")
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        vae, unet = _models(kind, device, dtype)
        text_encoder = None
        if not args.free_text_encoder:  # SD1.5's CLIP ViT-L/14 text tower stays resident (tiny: a small one)
            layers, width_te = (12, 768) if kind == "sd15" else (2, 32)
            config = CLIPTextConfig(hidden_size=width_te, num_hidden_layers=layers, intermediate_size=4 * width_te)
            text_encoder = CLIPTextModel(config).to(device, dtype)
        guider = ColorGuider.from_unet(unet)
        add_icp_lora(unet, rank=args.lora_rank, alpha=args.lora_alpha)
        unet.to(dtype=dtype)
        cast_training_params(unet, dtype=torch.float32)
        model = GuidedUNet(unet, guider).to(device)
        if args.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, args, args.learning_rate)
        ema = make_ema(params, args, _NoCheckpoints())
        scheduler = DDPMScheduler(num_train_timesteps=1000)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        prompt = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
        batch = {
            "c_color": torch.rand(args.train_batch_size, 3, height, width) * 2 - 1,
            "refs_only": torch.rand(args.train_batch_size, 3, height, width) * 2 - 1,
            "frame_only": torch.rand(args.train_batch_size, 3, height, width) * 2 - 1,
            "mask": torch.ones(args.train_batch_size, 1, height // factor, width // factor),
        }
        generator = torch.Generator(device=device).manual_seed(0)

        def step(model=model, vae=vae, optimizer=optimizer, ema=ema, params=params, args=args, prompt=prompt,
                 batch=batch, generator=generator, scheduler=scheduler) -> None:  # fmt: skip
            for _ in range(args.gradient_accumulation_steps):
                with torch.autocast(device.type, dtype=dtype):
                    loss, _ = icp_loss(model, vae, scheduler, prompt, batch, generator, mu=args.timestep_mu,
                                       conditioning_scale=1.0, weight_dtype=dtype)  # fmt: skip
                (loss / args.gradient_accumulation_steps).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(params)

        seconds = _time_steps(step, steps, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        samples = args.train_batch_size * args.gradient_accumulation_steps / seconds
        baseline = baseline or samples
        print(
            f"  rung {rung}: batch {args.train_batch_size} x {args.gradient_accumulation_steps}, checkpointing "
            f"{args.gradient_checkpointing}, 8-bit AdamW {args.use_8bit_adam}, EMA {args.use_ema}, text encoder "
            f"{'freed' if args.free_text_encoder else 'resident'}: {seconds:.3f} s/step, {samples:.1f} samples/s "
            f"({samples / baseline:.2f}x the first rung), peak {peak:.1f} GiB"
        )
        del model, unet, guider, vae, text_encoder, optimizer, ema


class _NoCheckpoints:
    """The bench saves no checkpoint: `make_ema` registers its EMA with nothing."""

    def register_for_checkpointing(self, *objects: object) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(512, 800), help="training frame size WxH")
    parser.add_argument("--samples", type=int, default=24, help="generated samples (shards of 8)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds of baseline and stream")
    parser.add_argument("--batch", type=int, default=8, help="GPU batch size")
    parser.add_argument("--steps", type=int, default=5, help="timed GPU steps per configuration")
    parser.add_argument("--work", type=Path, default=None, help="folder for the generated shards (kept)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU part even when CUDA is available")
    parser.add_argument(
        "--models",
        choices=("sd15", "tiny"),
        default="sd15",
        help="step-split models (tiny: CPU smoke run)",
    )
    parser.add_argument(
        "--rung",
        type=Path,
        nargs="+",
        default=None,
        help="arguments files of the memory ladder (configs/icp/*.args): time the trainer's step with each, instead",
    )
    args = parser.parse_args(argv)
    if args.rung:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and args.models == "sd15":
            print("rungs: skipped (no CUDA device; --models tiny runs a CPU smoke run)")
            return
        name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        print(f"memory ladder on {name}, {args.models} models, {args.size[0]}x{args.size[1]}, bf16")
        bench_rungs(args.rung, args.size, args.steps, args.models, device)
        return
    work = args.work or Path(tempfile.gettempdir()) / "colorflow-bench-train-icp"
    started = time.perf_counter()
    folder = build_shards(work, args.size, args.samples)
    digest = hashlib.sha256(b"".join(p.read_bytes()[:4096] for p in sorted(folder.glob("*.tar")))).hexdigest()[:12]
    print(
        f"shards: {folder} ({args.samples} samples at {args.size[0]}x{args.size[1]}, {digest}) in "
        f"{time.perf_counter() - started:.1f} s"
    )
    bench_data(folder, args.samples, args.repeat)
    if args.no_gpu:
        return
    if torch.cuda.is_available():
        bench_step_split(args.size, args.batch, args.steps, args.models, torch.device("cuda"))
    elif args.models == "tiny":
        bench_step_split(args.size, args.batch, args.steps, args.models, torch.device("cpu"))
    else:
        print("step split: skipped (no CUDA device; --models tiny runs a CPU smoke run)")


if __name__ == "__main__":
    main()

"""GSRP training costs: the data path's samples/s per core, and on CUDA the full step's s/step and peak memory.

1. Data path (CPU, one thread): `training.data.build_gsrp_dataset` at the paper's sizes (frames 512x800, GSRP pairs
   768x1200, 512x512 crops, screenstyle blend) against the baseline of decoding the same members (hr_color.jpg,
   hr_grey.png, hr_tone.png) straight from the tars with PIL, which any reader must at least do. Repeats alternate
   the two and report the median. The shards are built once under --work by `jobs.pipeline` on the generated corpus.
2. Training step (CUDA when available, bf16 autocast, an SD1.5-size VAE with random weights built from its config,
   gradient checkpointing on VAE and fusion, batch --batch at 768x1200): the trainer's full step (degradation round
   trip, two encodes, fusion forward/backward, fused decode forward/backward, AdamW) against the anchor, the VAE
   decoder's forward + backward alone (decoder weights trainable, checkpointing). Reports s/step, samples/s and
   peak memory for both and their ratio. Without CUDA this part is skipped, unless --step-device cpu asks for a
   (slow) smoke run at a size of your choosing.

3. The memory ladder (``--rung FILE...``, instead of 1 and 2): for each arguments file (configs/gsrp/*.args) the
   trainer's own step with that file's settings (per-device batch x accumulation, crop, checkpointing, 8-bit AdamW,
   EMA, gradient clipping) on random weights: SD1.5-size VAE and fusion net on CUDA, the tiny test models on a CPU
   (a smoke run; ``--models`` chooses). Prints s/step, samples/s, peak memory (CUDA: peak allocated; CPU: the
   process's peak resident set during the rung, sampled, labelled as such) and the ratio to the first rung.

Run: ``.venv/bin/python bench/bench_train_gsrp.py [--work DIR] [--samples 24] [--repeat 3] [--batch 4] [--steps 5]``;
``.venv/bin/python bench/bench_train_gsrp.py --rung configs/gsrp/paper.args configs/gsrp/memory-24gb.args``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from jobs.common import parse_size
from model.gsrp_fusion import GSRPFusion
from model.gsrp_vae import GuidedVAE
from model.tiny import SD15_VAE_CONFIG, build_tiny_vae
from pipelines.core.errors import UsageError
from training.data import GSRPDataConfig, build_gsrp_dataset, resolve_shard_source
from training.optimization import check_optimizer_arguments, make_ema, make_optimizer
from training.train_gsrp import batch_generator, build_fusion, gsrp_loss, parse_args

HR_MEMBERS = ("hr_color.jpg", "hr_grey.png", "hr_tone.png")


def build_data(work: Path) -> Path:
    """Shards of the generated tiny corpus at 512x800 (GSRP 768x1200), built once."""
    data = work / "data"
    if not (data / "shards" / "manifest.json").exists():
        from jobs.pipeline import main as pipeline_main

        pipeline_main(
            ["--generate-sample", str(work / "corpus"), "--output", str(data), "--sample-preset", "tiny",
             "--size", "512x800", "--encoder", "weightfree", "--local", "--bench-chapters", "1", "--bench-refs", "8",
             "--bench-bw", "8", "--bench-max-series-fraction", "0.5", "--max-samples", "6"]
        )  # fmt: skip
    return data


def time_baseline(urls: list[str], samples: int) -> float:
    """Seconds per sample to decode the three high-resolution members from the tars (wids, PIL)."""
    from wids.wids import IndexedTarSamples

    shards = [IndexedTarSamples(path=url) for url in urls]
    positions = [(s, i) for s, shard in enumerate(shards) for i in range(len(shard))]
    started = time.perf_counter()
    for n in range(samples):
        shard, index = positions[n % len(positions)]
        raw = shards[shard][index]
        for member in HR_MEMBERS:
            Image.open(raw["." + member]).load()
    elapsed = time.perf_counter() - started
    for shard in shards:
        shard.close()
    return elapsed / samples


def time_data_path(source, samples: int, crop: tuple[int, int]) -> float:
    """Seconds per sample of the GSRP stream (read, decode, screenstyle blend, crop, to tensors)."""
    config = GSRPDataConfig(crop_size=crop, variant="screenstyle", batch_size=1)
    stream = iter(build_gsrp_dataset(source, config, seed=0, rank=0, world_size=1))
    next(stream)  # open the first shards outside the timing
    started = time.perf_counter()
    for _ in range(samples):
        sample = next(stream)
    elapsed = time.perf_counter() - started
    assert sample["hr_bw"].shape[0] == 3
    return elapsed / samples


def bench_data(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    source = resolve_shard_source(build_data(args.work))
    first = next(iter(build_gsrp_dataset(source, GSRPDataConfig(crop_size=args.crop), seed=0, rank=0, world_size=1)))
    print(f"data path: {source.nsamples} samples in {len(source.urls)} shards, crops {tuple(first['hr_bw'].shape)}")
    baseline, stream = [], []
    for _ in range(args.repeat):
        baseline.append(time_baseline(list(source.urls), args.samples))
        stream.append(time_data_path(source, args.samples, args.crop))
    base_rate, stream_rate = 1 / statistics.median(baseline), 1 / statistics.median(stream)
    print(f"  baseline (decode the 3 members): {base_rate:8.2f} samples/s per core")
    print(f"  GSRP data path:                  {stream_rate:8.2f} samples/s per core")
    print(f"  ratio data path / baseline:      {stream_rate / base_rate:8.2f}")


def _timed(step, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step, peak GiB) over `steps` steps after two warm-up steps."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def time_full_step(guided: GuidedVAE, hr_color: torch.Tensor, steps: int) -> tuple[float, float]:
    """The trainer's step: degradation, two encodes, fusion, fused decode, L1, backward, AdamW."""
    device = hr_color.device
    fusion = GSRPFusion.from_vae_config(guided.vae.config).to(device).train()
    fusion.freeze_batchnorm_statistics()  # fine-tuning the released weights: the default
    fusion.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(fusion.parameters(), lr=1e-5)
    hr_bw = hr_color.mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = gsrp_loss(guided, fusion, hr_color, hr_bw, 1.5, batch_generator(0, 0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed(step, steps, device)


def time_anchor(vae: AutoencoderKL, hr_color: torch.Tensor, steps: int) -> tuple[float, float]:
    """The anchor: the VAE decoder's forward + backward (decoder weights trainable), checkpointing on."""
    vae.decoder.requires_grad_(True)
    batch, _, height, width = hr_color.shape
    latents = torch.randn(batch, 4, height // 8, width // 8, device=hr_color.device, dtype=vae.dtype)

    def step() -> None:
        with torch.autocast(hr_color.device.type, dtype=torch.bfloat16):
            loss = F.l1_loss(vae.decode(latents).sample.float(), hr_color)
        loss.backward()
        vae.zero_grad(set_to_none=True)

    try:
        return _timed(step, steps, hr_color.device)
    finally:
        vae.decoder.requires_grad_(False)


def bench_step(args: argparse.Namespace) -> None:
    diffusers_logging.set_verbosity_error()  # casting a random VAE to bf16 is what we mean to do
    device = torch.device(args.step_device)
    width, height = args.size
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE_CONFIG).to(device, torch.bfloat16).requires_grad_(False).eval()
    vae.enable_gradient_checkpointing()
    hr_color = torch.rand(args.batch, 3, height, width, device=device) * 2 - 1
    step_s, step_gib = time_full_step(GuidedVAE(vae), hr_color, args.steps)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    anchor_s, anchor_gib = time_anchor(vae, hr_color, args.steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"training step at {width}x{height}, batch {args.batch}, bf16, checkpointing, on {name}:")
    print(f"  anchor (VAE decoder fwd+bwd): {anchor_s:7.3f} s/step  {args.batch / anchor_s:6.2f} samples/s  "
          f"peak {anchor_gib:6.1f} GiB")  # fmt: skip
    print(f"  GSRP full step:               {step_s:7.3f} s/step  {args.batch / step_s:6.2f} samples/s  "
          f"peak {step_gib:6.1f} GiB")  # fmt: skip
    print(f"  ratio full step / anchor:     {step_s / anchor_s:7.2f} (goal <= 2)")


class _PeakResidentSet:
    """The process's peak resident set while the block runs, sampled every 5 ms (a CPU has no allocator peak)."""

    def __enter__(self) -> _PeakResidentSet:
        self.peak, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self.peak = max(self.peak, process.memory_info().rss)
            if self._done.wait(0.005):
                return

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


class _NoCheckpoints:
    """The bench saves no checkpoint: `make_ema` registers its EMA with nothing."""

    def register_for_checkpointing(self, *objects: object) -> None:
        pass


def _rung_step(args: argparse.Namespace, guided: GuidedVAE, size: tuple[int, int], device: torch.device) -> Callable:
    """The trainer's optimizer step with the rung's settings: accumulation micro-batches of `gsrp_loss`, gradient
    clipping, the optimizer, the EMA."""
    fusion = build_fusion(args, guided).to(device)
    if args.gradient_checkpointing:
        fusion.enable_gradient_checkpointing()
    params = list(fusion.parameters())
    optimizer = make_optimizer(params, args, args.learning_rate)
    ema = make_ema(params, args, _NoCheckpoints())
    width, height = size
    hr_color = torch.rand(args.train_batch_size, 3, height, width, device=device) * 2 - 1
    hr_bw = hr_color.mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()

    def step() -> None:
        for micro in range(args.gradient_accumulation_steps):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = gsrp_loss(guided, fusion, hr_color, hr_bw, args.sr_scale, batch_generator(args.seed, micro))
            (loss / args.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)

    return step


def bench_rungs(
    rungs: list[Path], size: tuple[int, int] | None, steps: int, models: str, device: torch.device
) -> list[dict]:
    """Each arguments file's step on random weights: s/step, samples/s, peak memory and the ratio of samples/s to
    the first rung measured. `size` overrides each file's --crop_size. Returns one row per rung."""
    diffusers_logging.set_verbosity_error()  # casting a random VAE to bf16 is what we mean to do
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    memory = "peak allocated (CUDA)" if device.type == "cuda" else "peak resident set of the process (CPU, sampled)"
    print(f"GSRP memory ladder on {name}, {models} models, bf16 autocast; memory: {memory}")
    rows: list[dict] = []
    for rung in rungs:
        args = parse_args([f"@{rung}", "--pretrained_model_name_or_path", "-", "--data", "-", "--output_dir", "-"])
        try:
            check_optimizer_arguments(args)
        except UsageError as error:
            print(f"  rung {rung}: skipped ({error})")
            continue
        crop = size or args.crop_size
        torch.manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with torch.device(device):  # built in place: random init of a real-size VAE on a CPU is slow
            vae = build_tiny_vae() if models == "tiny" else AutoencoderKL(**SD15_VAE_CONFIG)
        vae = vae.to(torch.bfloat16).requires_grad_(False).eval()
        if args.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        step = _rung_step(args, GuidedVAE(vae), crop, device)
        if device.type == "cuda":
            seconds, peak_gib = _timed(step, steps, device)
        else:
            with _PeakResidentSet() as resident:
                seconds, _ = _timed(step, steps, device)
            peak_gib = resident.peak / 2**30
        samples = args.train_batch_size * args.gradient_accumulation_steps / seconds
        baseline = rows[0]["samples_per_s"] if rows else samples
        rows.append({"rung": str(rung), "s_per_step": seconds, "samples_per_s": samples, "peak_gib": peak_gib})
        print(
            f"  rung {rung}: crop {crop[0]}x{crop[1]}, batch {args.train_batch_size} x "
            f"{args.gradient_accumulation_steps}, checkpointing {args.gradient_checkpointing}, 8-bit AdamW "
            f"{args.use_8bit_adam}, EMA {args.use_ema}: {seconds:.3f} s/step, {samples:.2f} samples/s "
            f"({samples / baseline:.2f}x the first rung), peak {peak_gib:.2f} GiB"
        )
        del step, vae
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/colorflow-bench-gsrp"), help="data cache folder")
    parser.add_argument("--samples", type=int, default=24, help="samples per timed pass")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--crop", type=parse_size, default=(512, 512), help="training crop WxH")
    parser.add_argument(
        "--size", type=parse_size, default=None, help="training-step image WxH (default 768x1200; rungs: each crop)"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--step-device", default="cuda" if torch.cuda.is_available() else None, help="default: cuda when available"
    )
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument(
        "--rung",
        type=Path,
        nargs="+",
        default=None,
        help="arguments files of the memory ladder (configs/gsrp/*.args): time the trainer's step with each, instead",
    )
    parser.add_argument(
        "--models",
        choices=("sd15", "tiny"),
        default=None,
        help="rung models: SD1.5-size random weights (default on CUDA) or the tiny test VAE (default on a CPU)",
    )
    args = parser.parse_args(argv)
    if args.rung:
        device = torch.device(args.step_device or "cpu")
        models = args.models or ("sd15" if device.type == "cuda" else "tiny")
        bench_rungs(args.rung, args.size, args.steps, models, device)
        return
    args.size = args.size or (768, 1200)
    if not args.skip_data:
        bench_data(args)
    if args.step_device is None:
        print("training step: no CUDA device here, skipped (run on a GPU machine, or --step-device cpu --size 64x64)")
    else:
        bench_step(args)


if __name__ == "__main__":
    main()

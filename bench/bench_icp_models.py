"""Cost of the ICP guidance per denoising step, against the plain UNet step, in one run.

Builds the UNet (random weights: shapes are what cost time), a `from_unet` Colorization Guider and the rank-64
LoRA, then times on the composite's latent (a W x H frame -> 2W x 2H canvas -> latent / 8), with classifier-free
guidance (UNet batch 2):
  baseline  the plain LoRA UNet step (what SD1.5 inpainting-free sampling costs);
  pipeline  guider once on batch 1 + guided UNet on batch 2 (what `ColorFlowICPPipeline` does: the guider ignores
            the text, so both CFG halves share its residuals);
  release   guider on the doubled batch + guided UNet (what the released pipeline does).
Prints ms/step, the ratios to the baseline, and on CUDA the peak memory of each.

Run: ``.venv/bin/python bench/bench_icp_models.py [--size sd15|tiny] [--frame 512x800] [--repeat 5] [--dtype fp16]``.
On CPU use ``--size tiny --frame 128x192`` (SD1.5 at 512x800 takes minutes per step there) and
``OMP_NUM_THREADS=1`` on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from diffusers import UNet2DConditionModel

from model.colorguider import ColorGuider, GuiderOutput
from model.guided_unet import guided_unet_forward
from model.lora import add_icp_lora
from model.tiny import SD15_UNET_CONFIG, TINY_TEXT_DIM, build_tiny_unet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build(size: str) -> tuple[UNet2DConditionModel, int]:
    if size == "tiny":
        return build_tiny_unet(), TINY_TEXT_DIM
    return UNet2DConditionModel(**SD15_UNET_CONFIG), SD15_UNET_CONFIG["cross_attention_dim"]


def timed(
    steps: dict[str, Callable[[], object]], repeat: int, device: torch.device
) -> dict[str, tuple[float, float | None]]:
    """Median ms per step of each variant, run interleaved (round-robin, after one warm-up each) so machine load
    hits all alike, and each variant's peak CUDA memory in GiB (None on CPU)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    peaks: dict[str, float | None] = {}
    for name, step in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: (statistics.median(times[name]), peaks[name]) for name in steps}


def doubled(residuals: GuiderOutput) -> GuiderOutput:
    return GuiderOutput(
        down_residuals=tuple(torch.cat([r, r]) for r in residuals.down_residuals),
        mid_residual=torch.cat([residuals.mid_residual] * 2),
        up_residuals=tuple(torch.cat([r, r]) for r in residuals.up_residuals),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--frame", default="512x800", help="frame W x H (the canvas is twice that)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.frame.lower().split("x"))
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    torch.manual_seed(0)

    unet, text_dim = build(args.size)
    guider = ColorGuider.from_unet(unet)
    add_icp_lora(unet)
    unet.to(device, dtype).eval()
    guider.to(device, dtype).eval()
    latent = (2 * height // 8, 2 * width // 8)
    sample = torch.randn(1, 4, *latent, device=device, dtype=dtype)
    cond = torch.randn(1, 9, *latent, device=device, dtype=dtype)
    text = torch.randn(2, 77, text_dim, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    pair = torch.cat([sample, sample])

    steps = {
        "baseline": lambda: unet(pair, t, text).sample,
        "pipeline": lambda: guided_unet_forward(unet, pair, t, text, doubled(guider(sample, t, cond))),
        "release": lambda: guided_unet_forward(unet, pair, t, text, guider(pair, t, torch.cat([cond, cond]))),
    }
    with torch.no_grad():
        results = timed(steps, args.repeat, device)
    baseline, pipeline, release = results["baseline"], results["pipeline"], results["release"]

    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {args.size}, "
        f"{dtype}, frame {width}x{height} -> latent {latent[1]}x{latent[0]}, CFG batch 2, median of {args.repeat}"
    )
    for name, (ms, peak) in (("baseline", baseline), ("pipeline", pipeline), ("release", release)):
        memory = f", peak {peak:.2f} GiB" if peak is not None else ""
        print(f"{name:9s} {ms:9.1f} ms/step  x{ms / baseline[0]:.2f} of baseline{memory}")
    print(f"shared guider residuals save {100 * (1 - pipeline[0] / release[0]):.0f}% of the released step time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Colorize benchmark: seconds per page and peak memory per frame size, device and memory option.

For every frame size (`--sizes`, default the 640x640 and 512x800 presets and 1024x1600), device (the CPU, and CUDA
when present) and mode ("none" is the baseline; "vae-slicing" = sliced and tiled VAE; "offload" =
`enable_model_cpu_offload`, CUDA only; "no-cfg" = memory none at guidance scale 1: one UNet pass per step, the prompt
embedding cached and no text encoder loaded), a fresh process runs `inference.colorize` on a
generated chapter, in-process (`local`): a one-page warm-up run (models loaded, kernels chosen), then the measured
run over `--pages` pages (retrieval, ICP, GSRP and writing included; model loading excluded). It reports pages/s,
the process's peak resident memory and, on CUDA, the peak allocated GPU memory, each with its ratio to the
baseline mode on the same device in the same run.

Models: a tiny random SD1.5-shaped folder (`model.tiny.build_tiny_sd15`) by default, or with `--full-size` a random
model of SD1.5's real architecture (UNet 860M, guider, VAE, text encoder; LoRA rank 64): no weights are downloaded,
the figures measure the architecture's cost, not its output quality. Use `--full-size --sizes 512x800` on a GPU for
the paper's 1024x1600 canvas.

    python bench/bench_colorize.py [--pages 4] [--sizes 640x640,512x800,1024x1600] [--steps 2] [--full-size]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jobs.common import parse_size

MODES = ("none", "vae-slicing", "offload", "no-cfg")


def drawn_page(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        left, top = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        size = (int(rng.integers(20, width // 3)), int(rng.integers(20, height // 3)))
        draw.ellipse((left, top, left + size[0], top + size[1]), fill=color, outline=(0, 0, 0), width=3)
    return image


def write_chapter(root: Path, pages: int, refs: int, size: tuple[int, int]) -> tuple[Path, Path, Path]:
    """(pages, refs, warm-up page) folders of generated pages at 1.5x the frame size."""
    width, height = round(size[0] * 1.5), round(size[1] * 1.5)
    folders = [root / "pages", root / "refs", root / "warmup"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(refs):
        drawn_page(i, width, height).save(folders[1] / f"ref{i:03d}.png")
    for i in range(pages):
        drawn_page(1000 + i, width, height).convert("L").save(folders[0] / f"{i:03d}.png")
    drawn_page(999, width, height).convert("L").save(folders[2] / "000.png")
    return folders[0], folders[1], folders[2]


def build_full_size_sd15(folder: Path) -> Path:
    """A random model with SD1.5's architecture (configs of stable-diffusion-v1-5), saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from model.tiny import SD15_UNET_CONFIG, SD15_VAE_CONFIG, build_tiny_tokenizer, save_sd_folder

    tokenizer = build_tiny_tokenizer(folder.parent / "tokenizer-src")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    vae = AutoencoderKL(**SD15_VAE_CONFIG)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0, pad_token_id=1, eos_token_id=2)
    )  # SD1.5's text tower (768 wide, 12 layers); only the vocabulary is the tiny hand-written one
    return save_sd_folder(folder, vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer)


def build_models(root: Path, full_size: bool) -> tuple[Path, Path, Path]:
    """(sd15, ICP export, GSRP export) folders: random weights in our export layouts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from model.colorguider import ColorGuider
    from model.gsrp_fusion import GSRPFusion
    from model.gsrp_weights import save_gsrp_export
    from model.icp_weights import save_icp_export
    from model.lora import add_icp_lora
    from model.tiny import build_tiny_sd15

    sd15 = build_full_size_sd15(root / "sd15") if full_size else build_tiny_sd15(root / "sd15")
    unet = UNet2DConditionModel.from_pretrained(sd15, subfolder="unet")
    guider = ColorGuider.from_unet(unet)
    add_icp_lora(unet)
    icp = save_icp_export(root / "icp", guider, unet, {"bench": "random weights"})
    vae = AutoencoderKL.from_pretrained(sd15, subfolder="vae")
    gsrp = save_gsrp_export(root / "gsrp", GSRPFusion.from_vae_config(vae.config), {"bench": "random weights"})
    return sd15, icp, gsrp


def child(args: argparse.Namespace) -> dict:
    """One device and memory mode in this (fresh) process: warm-up run, then the measured run."""
    import torch

    from inference.colorize import run_colorize
    from inference.models import SamplingOptions, resolve_model_paths
    from inference.plan import ColorizeOptions, chapter_tasks_for_sources
    from inference.worker import RunOptions

    work = Path(args.workdir)
    models = resolve_model_paths(icp=str(work / "icp"), gsrp=str(work / "gsrp"), colorflow_weights=None,
                                 sd15=str(work / "sd15"))  # fmt: skip
    dtype = "float16" if args.device.startswith("cuda") else "float32"
    no_cfg = args.memory == "no-cfg"
    memory = "none" if no_cfg else args.memory
    sampling = SamplingOptions(steps=args.steps, dtype=dtype, memory=memory, guidance_scale=1.0 if no_cfg else 7.5)
    settings = ColorizeOptions(*args.size, encoder="weightfree", sampling=sampling, models=models)
    options = RunOptions(local=True, device=args.device, rebuild=True)
    out = work / "out" / f"{args.size[0]}x{args.size[1]}-{args.device}-{args.memory}"
    run_colorize(chapter_tasks_for_sources(str(work / "warmup"), str(work / "refs")), out / "warmup", settings, options)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = run_colorize(chapter_tasks_for_sources(str(work / "pages"), str(work / "refs")), out, settings, options)
    seconds = time.perf_counter() - started
    if summary["pages_done"] != summary["pages"]:
        raise RuntimeError(f"{args.device}/{args.memory}: pages failed: {summary['failures'][:2]}")
    return {
        "device": args.device,
        "memory": args.memory,
        "pages": summary["pages_done"],
        "pages_per_second": summary["pages_per_second"],
        "seconds_per_page": round(1 / summary["pages_per_second"], 2),
        "pages_per_second_with_retrieval": round(summary["pages_done"] / seconds, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if args.device.startswith("cuda") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=4)
    parser.add_argument("--refs", type=int, default=6)
    parser.add_argument("--sizes", default="640x640,512x800,1024x1600", help="comma-separated frame sizes WxH")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes (default: all)")
    parser.add_argument("--size", type=parse_size, default=(128, 192), help=argparse.SUPPRESS)  # one child's size
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--full-size", action="store_true", help="SD1.5's real architecture (random weights)")
    parser.add_argument("--devices", default=None, help="comma-separated (default: cpu, and cuda when present)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--memory", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return

    import torch

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    sizes = [parse_size(size) for size in args.sizes.split(",")]
    modes = [mode for mode in args.modes.split(",") if mode in MODES]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        build_models(work, args.full_size)
        print(f"models built in {time.perf_counter() - started:.1f} s in {work}", flush=True)
        print(f"\n{'full-size' if args.full_size else 'tiny'} SD1.5, {args.steps} steps, {args.pages} pages, batch 1")
        header = f"{'frame':10} {'device':8} {'mode':12} {'s/page':>8} {'ratio':>6} {'peak RSS MB':>12} {'ratio':>6}"
        print(header + f" {'peak CUDA MB':>13} {'ratio':>6}")
        for width, height in sizes:
            size = f"{width}x{height}"
            chapter = work / size
            write_chapter(chapter, args.pages, args.refs, (width, height))
            for name in ("pages", "refs", "warmup"):
                link = work / name
                link.unlink(missing_ok=True)
                link.symlink_to(chapter / name)
            for device in devices:
                baseline = None
                for mode in modes:
                    if mode == "offload" and not device.startswith("cuda"):
                        continue
                    command = [sys.executable, __file__, "--child", "--workdir", str(work), "--device", device,
                               "--memory", mode, "--size", size, "--steps", str(args.steps)]  # fmt: skip
                    done = subprocess.run(command, capture_output=True, text=True)
                    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if done.returncode or line is None:
                        print(f"{size:10} {device:8} {mode:12} failed: {done.stderr.strip().splitlines()[-1:]}")
                        continue
                    result = json.loads(line[len("RESULT ") :])
                    baseline = baseline or result

                    def ratio(key: str, result: dict = result, baseline: dict = baseline) -> str:
                        return f"{result[key] / baseline[key]:6.2f}" if result[key] and baseline[key] else f"{'-':>6}"

                    cuda = f"{result['peak_cuda_mb']:13.1f}" if result["peak_cuda_mb"] is not None else f"{'-':>13}"
                    print(
                        f"{size:10} {device:8} {mode:12} {result['seconds_per_page']:8.2f} {ratio('seconds_per_page')} "
                        f"{result['peak_rss_mb']:12.1f} {ratio('peak_rss_mb')} {cuda} {ratio('peak_cuda_mb')}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()

"""The models colorize runs, located and loaded: ICP (guider + UNet LoRA on SD1.5) and GSRP (VAE fusion net).

Weights come from our exports (`--icp DIR`, `--gsrp DIR`: folders with `export.json`, written by the trainers) or
from the released ColorFlow folder (`--colorflow-weights DIR`: `GraySD/` with `config.json`,
`diffusion_pytorch_model.bin`, `unet_lora.bin`, `MultiResNetModel.bin`; `image_encoder/`), always on a local
SD1.5 folder (`--sd15 DIR`, or the base model an export records). Loading goes through the model package's own
loaders (`model.icp_weights.load_icp_pipeline`, `model.gsrp_weights.load_gsrp`), strict on released layouts.

One page, as the released app colours it: ICP samples the whole 2W x 2H canvas (UniPC, prompt "manga", CFG 7.5,
10 steps), the centre W x H is cropped out, then GSRP fuses it (upsampled to the GSRP size) with the B&W page at
that size through the frozen VAE. Without GSRP the centre crop is only upsampled (bicubic), the app's `up_img`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from inference.sources import ColorizeInputError
from pipelines.core.storage import stable_hash

MEMORY_MODES = ("none", "vae-slicing", "offload")
DTYPES = ("float32", "float16", "bfloat16")
GSRP_STATISTICS = ("running", "page")  # model.gsrp_fusion.BATCHNORM_STATISTICS, without importing torch here
EXPORT_FILE = "export.json"
RELEASED_ICP_FOLDER = "GraySD"
RELEASED_GSRP_FILE = "MultiResNetModel.bin"
RELEASED_ENCODER_FOLDER = "image_encoder"
BASE_MODEL_KEYS = ("base_model", "pretrained_model_name_or_path")  # where an export may record its SD1.5


PROMPT_CACHE_FOLDER = "prompt_embeds"  # inside the ICP folder: cached prompt embeddings, not part of the weights


@dataclass(frozen=True)
class ModelPaths:
    """Where every model's files are; resolved once in the driver, shipped to the workers."""

    sd15: str
    icp: str  # our ICP export folder or a released GraySD/ folder
    gsrp: str | None  # our GSRP export folder, a released MultiResNetModel.bin, or None (bicubic upsampling)
    prompt_cache: str | None = None  # prompt embeddings of runs without guidance (default: ICP/prompt_embeds)
    family: ClassVar[str] = "sd15"

    def identity(self) -> dict[str, Any]:
        """What names these weights in a fingerprint: each weight file's name, size and modification time."""
        return {"sd15": files_token(self.sd15), "icp": files_token(self.icp), "gsrp": files_token(self.gsrp)}

    @property
    def prompt_cache_folder(self) -> Path:
        return Path(self.prompt_cache) if self.prompt_cache else Path(self.icp) / PROMPT_CACHE_FOLDER


def files_token(path: str | None) -> Any:
    """A cheap token of a model file or folder's contents (hashing gigabytes on every run would cost minutes)."""
    if path is None:
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and _is_weight_file(root, p))
    return stable_hash(
        [[str(p.relative_to(root)) if p != root else p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        16,
    )


def _is_weight_file(root: Path, path: Path) -> bool:
    """Files that decide the weights: not a training run's checkpoints, TensorBoard logs or scratch (an ICP export
    sits at the top of its run folder, so those grow beside it while the export itself stays the same)."""
    parts = path.relative_to(root).parts
    return not any(part.startswith(("checkpoint-", ".")) or part in ("logs", PROMPT_CACHE_FOLDER) for part in parts)


def read_export(folder: str | Path | None) -> dict[str, Any]:
    """The `export.json` of an export folder ({} when there is none, e.g. a released folder)."""
    if folder is None:
        return {}
    path = Path(folder) / EXPORT_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ColorizeInputError(f"{path}: not valid JSON: {exc}") from None


def resolve_model_paths(
    *,
    icp: str | None,
    gsrp: str | None,
    colorflow_weights: str | None,
    sd15: str | None,
    prompt_cache: str | None = None,
) -> ModelPaths:
    """Check the weight options and locate every file; ColorizeInputError says which option is wrong and why."""
    if colorflow_weights and icp:
        raise ColorizeInputError("--colorflow-weights and --icp both name ICP weights; give one")
    if colorflow_weights:
        root = Path(colorflow_weights)
        icp_dir = root / RELEASED_ICP_FOLDER
        if not icp_dir.is_dir():
            raise ColorizeInputError(f"--colorflow-weights {root}: no {RELEASED_ICP_FOLDER}/ folder (release layout)")
        icp = str(icp_dir)
        if gsrp is None:
            released = icp_dir / RELEASED_GSRP_FILE
            gsrp = str(released) if released.is_file() else None
    if not icp:
        raise ColorizeInputError("no ICP weights: give --icp EXPORT_DIR or --colorflow-weights DIR")
    if not Path(icp).is_dir():
        raise ColorizeInputError(f"ICP weights {icp}: no such folder")
    if gsrp is not None and not Path(gsrp).exists():
        raise ColorizeInputError(f"GSRP weights {gsrp}: no such file or folder")
    _check_weight_kinds(icp, gsrp)
    base = sd15 or next((read_export(icp).get(key) for key in BASE_MODEL_KEYS if read_export(icp).get(key)), None)
    if not base:
        raise ColorizeInputError("no SD1.5 folder: give --sd15 DIR (a local stable-diffusion-v1-5 folder)")
    if not (Path(base) / "model_index.json").is_file():
        raise ColorizeInputError(
            f"SD1.5 folder {base}: no model_index.json (a local diffusers pipeline folder is needed; give --sd15 DIR)"
        )
    from model.gsrp_weights import run_export

    gsrp = str(run_export(Path(gsrp)).absolute()) if gsrp else None  # a train_gsrp run folder: its export/
    return ModelPaths(
        sd15=str(Path(base).absolute()),
        icp=str(Path(icp).absolute()),
        gsrp=gsrp,
        prompt_cache=str(Path(prompt_cache).absolute()) if prompt_cache else None,
    )


def _check_weight_kinds(icp: str, gsrp: str | None) -> None:
    """ICP weights must be ICP weights and GSRP weights GSRP weights (a GSRP export given as --icp, or the
    reverse, is refused here rather than when a worker loads it)."""
    from model.gsrp_weights import EXPORT_FORMAT as GSRP_FORMAT
    from model.gsrp_weights import RELEASED_FILE, run_export
    from model.icp_weights import EXPORT_FORMAT as ICP_FORMAT
    from model.icp_weights import describe_weights

    try:
        describe_weights(icp)
    except FileNotFoundError as exc:
        raise ColorizeInputError(f"--icp: {exc}") from None
    icp_format = read_export(icp).get("format", ICP_FORMAT)
    if icp_format != ICP_FORMAT:
        raise ColorizeInputError(f"--icp {icp}: its {EXPORT_FILE} is a {icp_format!r}, not ICP weights ({ICP_FORMAT})")
    if gsrp is None:
        return
    folder = run_export(Path(gsrp))
    if folder.is_dir():
        gsrp_format = read_export(folder).get("format", GSRP_FORMAT)
        if gsrp_format != GSRP_FORMAT:
            raise ColorizeInputError(
                f"--gsrp {gsrp}: its {EXPORT_FILE} is a {gsrp_format!r}, not GSRP weights ({GSRP_FORMAT})"
            )
        if not any((folder / name).is_file() for name in (EXPORT_FILE, "config.json", RELEASED_FILE)):
            raise ColorizeInputError(
                f"--gsrp {gsrp}: no GSRP weights ({EXPORT_FILE}, config.json or {RELEASED_FILE}) in that folder"
            )


@dataclass(frozen=True)
class SamplingOptions:
    """Everything that decides a page's pixels given its inputs (the device and batch size excepted)."""

    steps: int = 10
    guidance_scale: float = 7.5
    prompt: str = "manga"
    negative_prompt: str = ""
    conditioning_scale: float = 1.0
    dtype: str = "float32"
    memory: str = "none"
    gsrp_statistics: str = "running"  # the fusion net's BatchNorm statistics: "running" (eval) or "page"

    @property
    def guided(self) -> bool:
        """Classifier-free guidance on (scale > 1); at 1 the UNet runs once per step on the cached prompt."""
        return self.guidance_scale > 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ColorizeInputError(f"--steps must be at least 1, got {self.steps}")
        if self.guidance_scale < 1.0:
            raise ColorizeInputError(f"--guidance-scale must be at least 1 (1: no guidance), got {self.guidance_scale}")
        if self.gsrp_statistics not in GSRP_STATISTICS:
            raise ColorizeInputError(f"--gsrp-statistics {self.gsrp_statistics!r}: choose one of {GSRP_STATISTICS}")
        if self.dtype not in DTYPES:
            raise ColorizeInputError(f"--dtype {self.dtype!r}: choose one of {DTYPES}")
        if self.memory not in MEMORY_MODES:
            raise ColorizeInputError(f"--memory {self.memory!r}: choose one of {MEMORY_MODES}")


def _text_encoder_token(sd15: str) -> str:
    """Names the SD1.5 text encoder and tokenizer files (what a cached prompt embedding depends on)."""
    return stable_hash([files_token(str(Path(sd15) / "text_encoder")), files_token(str(Path(sd15) / "tokenizer"))], 16)


@dataclass
class PageBatchItem:
    """One page's model inputs: the ICP canvases, the B&W page at the GSRP size, and its noise seed."""

    refs_only: Image.Image
    frame_only: Image.Image
    mask: Any  # float32 2H x 2W, 1 on the ring
    hr_bw: Image.Image
    seed: int


class Colorizer:
    """ICP and GSRP loaded once (per Ray actor), colouring batches of pages."""

    def __init__(self, paths: ModelPaths, sampling: SamplingOptions, device: str) -> None:
        import torch

        from model.icp_weights import load_icp_pipeline

        self.device = torch.device(device)
        self.sampling = sampling
        dtype = getattr(torch, sampling.dtype)
        if sampling.memory == "offload" and self.device.type != "cuda":
            raise ColorizeInputError("--memory offload moves models between CPU and GPU: it needs a CUDA device")
        load_device = "cpu" if sampling.memory == "offload" else str(self.device)
        self.prompt_embeds = None
        cache_file = None
        if not sampling.guided:
            from model.text_cache import keyed_cache_path, load_text_cache

            cache_file = keyed_cache_path(
                paths.prompt_cache_folder, _text_encoder_token(paths.sd15), sampling.prompt, sampling.negative_prompt
            )
            if cache_file.with_suffix(".json").is_file():
                self.prompt_embeds = load_text_cache(cache_file).prompt_embeds
        self.pipeline = load_icp_pipeline(
            paths.sd15, paths.icp, device=load_device, dtype=dtype, text_encoder=self.prompt_embeds is None
        )
        self.pipeline.set_progress_bar_config(disable=True)
        if cache_file is not None and self.prompt_embeds is None:
            self.prompt_embeds = self._cache_prompt(cache_file, paths.sd15)
        self.fusion = None
        if paths.gsrp is not None:
            from model.devices import place
            from model.gsrp_weights import load_gsrp

            self.fusion = place(load_gsrp(paths.gsrp), self.device, dtype).eval()
        if sampling.memory == "offload":
            self.pipeline.enable_model_cpu_offload(device=self.device)
        elif sampling.memory == "vae-slicing":
            self.pipeline.vae.enable_slicing()  # tiling only for the final decode (see tiled_decode below)

    def _cache_prompt(self, cache_file: Path, sd15: str):
        """Embed the prompt once, cache it (`model.text_cache`, the format the line-art models' T5 text uses too),
        and drop the text encoder: a run without guidance needs no other."""
        import torch

        from model.text_cache import save_text_cache, text_cache_from_encoder

        with torch.inference_mode():
            cache = text_cache_from_encoder(
                self.pipeline.tokenizer,
                self.pipeline.text_encoder,
                self.sampling.prompt,
                self.sampling.negative_prompt,
                source=f"{sd15} ({_text_encoder_token(sd15)})",
            )
        save_text_cache(cache, cache_file)
        self.pipeline.register_modules(text_encoder=None, tokenizer=None)
        return cache.prompt_embeds

    def colorize(self, items: list[PageBatchItem], layout: Any) -> list[Image.Image]:
        """The final pages (GSRP size) of a batch: ICP canvases, their centre W x H crops, then GSRP."""
        import torch

        generators = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
        canvases = self.pipeline(
            refs_only=[item.refs_only for item in items],
            frame_only=[item.frame_only for item in items],
            mask=[item.mask for item in items],
            prompt=[self.sampling.prompt] * len(items),
            negative_prompt=[self.sampling.negative_prompt] * len(items),
            num_inference_steps=self.sampling.steps,
            guidance_scale=self.sampling.guidance_scale,
            conditioning_scale=self.sampling.conditioning_scale,
            generator=generators if len(items) > 1 else generators[0],
            output_type="pil",
            tiled_decode=self.sampling.memory == "vae-slicing",
            prompt_embeds=self.prompt_embeds,
        ).images
        lowres = [layout.crop_centre(canvas) for canvas in canvases]
        return finish_pages(self.pipeline.vae, self.fusion, items, lowres, self.sampling, self.device)


def finish_pages(
    vae: Any, fusion: Any, items: list[PageBatchItem], lowres: list[Image.Image], sampling: SamplingOptions, device: Any
) -> list[Image.Image]:
    """The final pages: each centre crop fused by GSRP with its B&W guide at the GSRP size (both families run the
    same GSRP), or only upsampled (bicubic, the app's `up_img`) without a fusion net."""
    import torch

    from model.gsrp_vae import super_resolve

    if fusion is None:
        return [low.resize(item.hr_bw.size, Image.Resampling.BICUBIC) for item, low in zip(items, lowres, strict=True)]
    offloaded = sampling.memory == "offload"
    if offloaded:  # GSRP calls the VAE's encoder and decoder directly, past the offload hooks: move it here
        vae.to(device)
    try:
        finals = []
        for item, low in zip(items, lowres, strict=True):
            generator = torch.Generator("cpu").manual_seed(item.seed + 1)
            with torch.inference_mode():
                finals.append(
                    super_resolve(
                        vae, fusion, low, item.hr_bw, generator=generator, statistics=sampling.gsrp_statistics
                    )
                )
    finally:
        if offloaded:
            vae.to("cpu")
    return finals

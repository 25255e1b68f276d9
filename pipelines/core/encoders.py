"""Patch encoders of the retrieval cache, chosen by a spec string and identified by a fingerprint.

Two kinds:

- ``open_clip:<model>:<weights>`` — an open_clip image tower, e.g. the paper's
  ``open_clip:ViT-H-14:laion2b_s32b_b79k``. ``<weights>`` is a pretrained tag of that model or a local checkpoint
  file (a state dict, as open_clip saves it); ``<model>`` is a built-in open_clip name or a model-config JSON file
  (``embed_dim``, ``vision_cfg``, ``text_cfg``), registered with ``open_clip.add_model_config`` under the file's
  stem, for custom or tiny architectures. Weights load through ``open_clip.create_model_and_transforms``; the
  preprocessing is the model's own inference transform (resize shortest side, centre crop, normalise). Output:
  the projected image embedding, L2-normalised. On CUDA the tower runs in fp16.
- ``weightfree`` — a deterministic, file-free encoder for offline demos and tests; see `WeightFreeEncoder`.

Work is split so that decoding and cropping stay in CPU tasks: `EncoderInfo.preparer()` turns a patch image into a
small uint8 array (the geometric part of the preprocessing), and `load_encoder(info).embed` turns a batch of
those arrays into vectors (the part that needs the model). The fingerprint (model, weights tag or checkpoint
sha256, preprocessing, dim) is hashed into `EncoderInfo.encoder_id`, the folder name of the embeddings: a new
encoder writes beside the old ones, never over them.
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.core.storage import sha256_file, stable_hash
from screentone.augment import to_grey

DEFAULT_ENCODER = "open_clip:ViT-H-14:laion2b_s32b_b79k"
WEIGHT_FREE = "weightfree"
logger = logging.getLogger(__name__)


def grey_version(image: Image.Image) -> Image.Image:
    """The black-and-white ("L") version of an image: the project's one PIL-level grey conversion (`to_grey`)."""
    return image if image.mode == "L" else Image.fromarray(to_grey(np.asarray(image.convert("RGB"))), "L")


def _canonical(obj: Any) -> Any:
    """JSON-stable form (tuples as lists) so fingerprints compare and hash identically everywhere."""
    return json.loads(json.dumps(obj, sort_keys=True))


@dataclass(frozen=True)
class EncoderInfo:
    """What the driver and CPU tasks need to know about an encoder, without loading any weights."""

    spec: str
    kind: str  # "open_clip" | "weightfree"
    fingerprint: dict[str, Any]
    dim: int
    load_args: dict[str, Any] = field(default_factory=dict)  # how an actor loads the model

    @property
    def encoder_id(self) -> str:
        """Short folder-safe id: readable slug + hash of the whole fingerprint (patch geometry included if set)."""
        digest = stable_hash(self.fingerprint, 10)
        name = str(self.fingerprint.get("name", self.kind))
        size = self.fingerprint.get("patches", {}).get("page_size")
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:48].strip("_.") + (f"-{size}" if size else "")
        return f"{slug}-{digest}"

    def with_patch_geometry(self, geometry: dict[str, Any]) -> EncoderInfo:
        """This encoder applied to patches cut a given way: the geometry joins the fingerprint, hence the id.

        Embeddings of the same encoder on pages fitted to another size are other vectors, so they get their
        own folder. `geometry` should hold a ``page_size`` entry ("WxH"), shown in the id.
        """
        return replace(self, fingerprint=_canonical({**self.fingerprint, "patches": geometry}))

    def preparer(self) -> Callable[[Image.Image], np.ndarray]:
        """CPU half of the preprocessing: patch image -> fixed-shape uint8 array for `Encoder.embed`."""
        if self.kind == WEIGHT_FREE:
            return WeightFreeEncoder.prepare
        return _open_clip_geometric_transform(self.fingerprint["preprocessing"])


def resolve_encoder(spec: str) -> EncoderInfo:
    """Parse an encoder spec and fingerprint it (hashes a checkpoint file; never downloads or loads weights)."""
    spec = spec.strip()
    if spec == WEIGHT_FREE:
        return WeightFreeEncoder.info()
    if spec.startswith("open_clip:"):
        return _resolve_open_clip(spec)
    raise ValueError(
        f"unknown encoder spec {spec!r}: expected {WEIGHT_FREE!r} or 'open_clip:<model or config.json>:<tag or "
        f"checkpoint file>' (default {DEFAULT_ENCODER!r})"
    )


class EncoderWeightsMissing(FileNotFoundError):
    """The encoder's weights are neither a local file nor in the download cache, and cannot be downloaded."""


def _cached_open_clip_weights(model_name: str, tag: str) -> str | None:
    """Where open_clip would find a pretrained tag's weights without a download (hub cache, URL cache), or None."""
    import os

    import open_clip
    from open_clip import pretrained

    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    if cfg.get("file"):
        return cfg["file"] if Path(cfg["file"]).is_file() else None
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        model_id, filename = os.path.split(cfg["hf_hub"])
        filename = filename or pretrained.HF_WEIGHTS_NAME
        for candidate in (*pretrained._get_safe_alternatives(filename), filename):
            found = try_to_load_from_cache(model_id, candidate)
            if isinstance(found, str):
                return found
        return None
    if cfg.get("url"):
        target = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        return str(target) if target.is_file() else None
    return None


def ensure_encoder_weights(info: EncoderInfo) -> str | None:
    """Make sure the encoder's weights are on this machine before any worker starts; returns their path.

    A local checkpoint was checked by `resolve_encoder`. A pretrained tag is looked up in the Hugging Face hub
    cache (and open_clip's URL cache); if absent it is downloaded once here, in the driver, so actors never race
    to download. Offline (``HF_HUB_OFFLINE=1``) or when the download fails, raises `EncoderWeightsMissing` with one
    line naming the alternatives: a local checkpoint file or the weight-free encoder.
    """
    if info.kind != "open_clip" or not str(info.fingerprint.get("weights", "")).startswith("tag:"):
        return None
    model_name, tag = info.load_args["model_name"], info.load_args["pretrained"]
    found = _cached_open_clip_weights(model_name, tag)
    if found:
        return found
    remedy = (
        f"download them once with network access, pass a local checkpoint as --encoder "
        f"open_clip:{model_name}:/path/to/open_clip_pytorch_model.bin, or use --encoder {WEIGHT_FREE} (no weights)"
    )
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise EncoderWeightsMissing(
            f"encoder {info.spec}: its weights are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"HF_HUB_OFFLINE is set: {remedy}"
        )
    import open_clip
    from huggingface_hub.utils import logging as hub_logging
    from open_clip import pretrained

    logger.info("encoder %s: weights not in the cache, downloading them once", info.spec)
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # each failed retry would print its own warning; the error below says it all
    try:
        return pretrained.download_pretrained(open_clip.get_pretrained_cfg(model_name, tag))
    except Exception as exc:  # noqa: BLE001 - any download failure has the same remedy
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EncoderWeightsMissing(f"encoder {info.spec}: cannot download its weights ({cause}): {remedy}") from exc
    finally:
        hub_logging.set_verbosity(verbosity)


def load_encoder(info: EncoderInfo, device: str = "cpu") -> Encoder:
    """Load the model half of an encoder on `device` (fp16 on CUDA)."""
    if info.kind == WEIGHT_FREE:
        return WeightFreeEncoder()
    return OpenClipEncoder(info, device)


class Encoder(ABC):
    """The model half: `embed` maps a batch of prepared arrays to L2-normalised float32 vectors."""

    dim: int

    @abstractmethod
    def embed(self, batch: np.ndarray) -> np.ndarray: ...


# ----------------------------------------------------------------------------------------------------------------
# open_clip


def _register_model_config(config_path: Path) -> str:
    """Register a model-config JSON with open_clip; refuses to shadow a built-in model with a different config."""
    import open_clip

    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(config)
    if missing:
        raise ValueError(f"open_clip model config {config_path} lacks {sorted(missing)}")
    name = config_path.stem
    known = open_clip.get_model_config(name)
    if known is not None and _canonical(known) != _canonical(config):
        raise ValueError(
            f"model config {config_path} is named {name!r} like an open_clip model with a different config; "
            "rename the file"
        )
    if known is None:
        open_clip.add_model_config(config_path)
    return name


def _resolve_open_clip(spec: str) -> EncoderInfo:
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ValueError(
            f"encoder spec {spec!r}: expected 'open_clip:<model>:<pretrained tag or checkpoint file>' — an encoder "
            "without weights would embed noise"
        )
    _, model, weights = parts
    fingerprint: dict[str, Any] = {"kind": "open_clip"}
    load_args: dict[str, Any] = {}
    if model.endswith(".json"):
        config_path = Path(model).expanduser().absolute()
        if not config_path.is_file():
            raise FileNotFoundError(f"encoder spec {spec!r}: model config file {config_path} does not exist")
        model_name = _register_model_config(config_path)
        fingerprint["config_sha256"] = sha256_file(config_path)
        load_args["config_path"] = str(config_path)
    else:
        model_name = model
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(
            f"encoder spec {spec!r}: open_clip has no model {model_name!r} (pass a config .json for custom models)"
        )
    preprocess = dict(PreprocessCfg().__dict__)
    pretrained_cfg = open_clip.get_pretrained_cfg(model_name, weights)
    if pretrained_cfg:
        fingerprint["weights"] = f"tag:{weights}"
        preprocess = merge_preprocess_dict(preprocess, pretrained_cfg)
        name = f"{model_name}-{weights}"
    else:
        checkpoint = Path(weights).expanduser().absolute()
        if not checkpoint.is_file():
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            known = ", ".join(tags[:4]) + (f" and {len(tags) - 4} more" if len(tags) > 4 else "")
            raise FileNotFoundError(
                f"encoder spec {spec!r}: {weights!r} is neither a pretrained tag of {model_name} "
                f"(known: {known or 'none'}) nor an existing checkpoint file"
            )
        fingerprint["weights"] = f"sha256:{sha256_file(checkpoint)}"
        weights = str(checkpoint)
        name = f"{model_name}-ckpt"
    image_size = model_cfg["vision_cfg"].get("image_size", 224)
    preprocess["size"] = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    dim = int(model_cfg["embed_dim"])
    fingerprint.update(
        name=f"open_clip-{name}",
        model=model_name,
        preprocessing=_canonical(preprocess),
        output="encode_image projected, L2-normalised",
        dim=dim,
    )
    load_args.update(model_name=model_name, pretrained=weights)
    return EncoderInfo(spec=spec, kind="open_clip", fingerprint=fingerprint, dim=dim, load_args=load_args)


def _open_clip_transforms(preprocessing: dict[str, Any]):
    """open_clip's inference transform for this preprocessing, split before its ToTensor step."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = dict(preprocessing)
    cfg["size"] = tuple(cfg["size"]) if isinstance(cfg["size"], list) else cfg["size"]
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    steps = list(transform.transforms)
    split = next((i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__), None)
    if split is None:
        raise RuntimeError(f"open_clip's transform has no ToTensor step to split at: {transform}")
    return steps[:split], steps[split:]


def _open_clip_geometric_transform(preprocessing: dict[str, Any]):
    geometric, _ = _open_clip_transforms(preprocessing)

    def apply(patch: Image.Image) -> np.ndarray:
        image = patch.convert("RGB")
        for step in geometric:
            image = step(image)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)

    return apply


def encoder_dtype(device: Any) -> Any:
    """The tower's dtype on a device: fp16 on CUDA (half the memory, tensor cores), float32 elsewhere (CPUs have
    no fast fp16 matmul and fp16 on CPU loses accuracy for nothing)."""
    import torch

    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


class OpenClipEncoder(Encoder):
    """The image tower of an open_clip model, loaded through `create_model_and_transforms` like real weights."""

    def __init__(self, info: EncoderInfo, device: str = "cpu") -> None:
        import open_clip

        if "config_path" in info.load_args:
            _register_model_config(Path(info.load_args["config_path"]))
        model, _, preprocess = open_clip.create_model_and_transforms(
            info.load_args["model_name"], pretrained=info.load_args["pretrained"], device="cpu"
        )
        loaded = _canonical({k: model.visual.preprocess_cfg[k] for k in info.fingerprint["preprocessing"]})
        if loaded != info.fingerprint["preprocessing"]:
            raise RuntimeError(
                f"{info.spec}: open_clip preprocessing {loaded} differs from the fingerprint "
                f"{info.fingerprint['preprocessing']}; the embeddings would not match their id"
            )
        self._use(model, preprocess, info.dim, device)

    @classmethod
    def from_model(cls, model: Any, preprocess: Any, dim: int, device: str = "cpu") -> OpenClipEncoder:
        """An encoder around an open_clip model already built (benchmarks with random weights)."""
        encoder = cls.__new__(cls)
        encoder._use(model, preprocess, dim, device)
        return encoder

    def _use(self, model: Any, preprocess: Any, dim: int, device: str) -> None:
        import torch

        normalise = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
        self.device = torch.device(device)
        self.dtype = encoder_dtype(self.device)
        self.visual = model.visual.to(self.device, dtype=self.dtype).eval()  # the text tower is never used
        self.mean = torch.tensor(normalise.mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(normalise.std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self.dim = dim

    def embed(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            x = ((x - self.mean) / self.std).to(self.dtype)
            features = self.visual(x).float()
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Weight-free encoder


def _block(features: np.ndarray) -> np.ndarray:
    """Hellinger-map a non-negative histogram block, L2-normalise it, and centre it.

    The square root tames dominant bins (white paper); centring removes what every manga patch shares, so the
    cosine between two blocks measures how their histograms differ rather than that both are mostly white.
    """
    block = np.sqrt(np.maximum(features, 0.0))
    block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-8)
    block = block - block.mean(axis=1, keepdims=True)
    return block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-8)


def _pooled_histogram(values: np.ndarray, weights: np.ndarray, bins: int, grid: int, circular: bool) -> np.ndarray:
    """Soft (linear) histograms of `values` in [0, bins) pooled over a grid x grid layout: (N, grid*grid, bins)."""
    n, h, w = values.shape
    lower = np.floor(values - 0.5)
    upper_share = (values - 0.5 - lower).astype(np.float32)
    lower = lower.astype(np.int64)
    cell_y = (np.arange(h) * grid // h)[None, :, None]
    cell_x = (np.arange(w) * grid // w)[None, None, :]
    base = ((np.arange(n)[:, None, None] * grid + cell_y) * grid + cell_x) * bins
    size = n * grid * grid * bins
    out = np.zeros(size, dtype=np.float64)
    for offset, share in ((0, 1.0 - upper_share), (1, upper_share)):
        index = lower + offset
        index = np.mod(index, bins) if circular else np.clip(index, 0, bins - 1)
        out += np.bincount((base + index).ravel(), weights=(share * weights).ravel(), minlength=size)
    return out.reshape(n, grid * grid, bins)


class WeightFreeEncoder(Encoder):
    """Hand-made luminance-structure features: no weights, no files, deterministic, fast on a CPU.

    What it is: every patch is converted to luminance first, so a colour crop and its greyscale version get
    exactly the same vector (the B&W query and the colour references live in one space). Blocks, each
    Hellinger-mapped, normalised and centred, then weighted and concatenated (dim 639):
    - luminance histogram (16 bins): which grey levels (hair, clothes, skin, background) a patch holds;
    - gradient-orientation histograms (HOG-like, 12 unsigned bins, magnitude weighted) over the whole patch and
      on a 3x3 grid, at full and half resolution: the shapes and line directions of what is drawn;
    - luminance layout (4x4 grid x 8 bins): coarse placement of dark and light areas;
    - local binary patterns (8 neighbours, flat pixels dropped, 255 codes) at half resolution: line and texture
      micro-structure (screentone, hatching, hair strands).
    What it is not: a semantic encoder. It does not know what a character is, ignores hue (two characters
    differing only in hue look the same), and is sensitive to scale. Use it for offline demos, tests and
    benchmarks; use an open_clip model for real caches.
    """

    VERSION = 1
    SIZE = 128
    ORIENTATIONS = 12
    LUMA_BINS = 16
    WEIGHTS = {
        "luma": 1.0,
        "hog": 1.0,
        "hog_grid": 0.8,
        "hog_half": 0.7,
        "hog_half_grid": 0.6,
        "layout": 0.6,
        "lbp": 0.8,
    }
    GRADIENT_FLOOR = 0.04  # gradients weaker than this (JPEG noise, paper texture) carry no orientation
    LBP_THRESHOLD = 0.03
    dim = 16 + 12 + 9 * 12 + 12 + 9 * 12 + 16 * 8 + 255

    @classmethod
    def info(cls) -> EncoderInfo:
        fingerprint = {
            "kind": WEIGHT_FREE,
            "name": WEIGHT_FREE,
            "version": cls.VERSION,
            "preprocessing": f"luminance (screentone.augment.to_grey), Lanczos resize to {cls.SIZE}x{cls.SIZE}",
            "params": {
                "orientations": cls.ORIENTATIONS,
                "luma_bins": cls.LUMA_BINS,
                "weights": cls.WEIGHTS,
                "gradient_floor": cls.GRADIENT_FLOOR,
                "lbp_threshold": cls.LBP_THRESHOLD,
            },
            "dim": cls.dim,
        }
        return EncoderInfo(spec=WEIGHT_FREE, kind=WEIGHT_FREE, fingerprint=_canonical(fingerprint), dim=cls.dim)

    @classmethod
    def prepare(cls, patch: Image.Image) -> np.ndarray:
        return np.asarray(grey_version(patch).resize((cls.SIZE, cls.SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 3 or batch.shape[1:] != (self.SIZE, self.SIZE):
            raise ValueError(f"expected a (N, {self.SIZE}, {self.SIZE}) uint8 batch, got {batch.shape}")
        full = batch.astype(np.float32) / 255.0
        half = full.reshape(len(full), self.SIZE // 2, 2, self.SIZE // 2, 2).mean(axis=(2, 4))
        hog_grid, hog_half_grid = self._orientations(full), self._orientations(half)
        blocks = {
            "luma": self._luma(full, grid=1, bins=self.LUMA_BINS)[:, 0],
            "hog": hog_grid.sum(axis=1),
            "hog_grid": hog_grid.reshape(len(full), -1),
            "hog_half": hog_half_grid.sum(axis=1),
            "hog_half_grid": hog_half_grid.reshape(len(full), -1),
            "layout": self._luma(half, grid=4, bins=8).reshape(len(full), -1),
            "lbp": self._lbp(half),
        }
        vector = np.concatenate([self.WEIGHTS[name] * _block(block) for name, block in blocks.items()], axis=1)
        vector /= np.maximum(np.linalg.norm(vector, axis=1, keepdims=True), 1e-8)
        return vector.astype(np.float32)

    @staticmethod
    def _luma(images: np.ndarray, grid: int, bins: int) -> np.ndarray:
        return _pooled_histogram(images * bins, np.ones_like(images), bins, grid, circular=False)

    def _orientations(self, images: np.ndarray) -> np.ndarray:
        """Orientation histograms on a 3x3 grid, (N, 9, ORIENTATIONS); their sum is the whole-patch histogram."""
        gy, gx = np.gradient(images, axis=(1, 2))
        magnitude = np.hypot(gx, gy)
        angle = np.mod(np.arctan2(gy, gx), np.pi)  # unsigned: a dark line on white reads like white on dark
        weights = np.where(magnitude > self.GRADIENT_FLOOR, magnitude, 0.0)
        return _pooled_histogram(angle / np.pi * self.ORIENTATIONS, weights, self.ORIENTATIONS, 3, circular=True)

    def _lbp(self, images: np.ndarray) -> np.ndarray:
        centre = images[:, 1:-1, 1:-1]
        h, w = centre.shape[1:]
        codes = np.zeros(centre.shape, dtype=np.int64)
        neighbours = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))
        for bit, (dy, dx) in enumerate(neighbours):
            shifted = images[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            codes |= (shifted > centre + self.LBP_THRESHOLD).astype(np.int64) << bit
        n = len(images)
        flat = (np.arange(n)[:, None, None] * 256 + codes).ravel()
        counts = np.bincount(flat, minlength=n * 256).reshape(n, 256).astype(np.float64)
        return counts[:, 1:]  # code 0: flat or locally brightest pixel, everywhere on paper

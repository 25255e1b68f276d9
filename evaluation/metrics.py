"""The benchmark's image metrics, each from a maintained implementation: PSNR, SSIM, FID, CLIP-IS, aesthetic score.

PSNR, SSIM and the CLIP image embeddings live in `pipelines.core.image_metrics` (the trainer's benchmark
validation scores with them too); FID and the aesthetic head are here.

- PSNR and SSIM: torchmetrics' functional metrics on RGB images as tensors in [0, 255] with ``data_range=255``
  (SSIM: Gaussian window 11, sigma 1.5, averaged over channels), in float64 (SSIM: float32 on request, see
  `ssim`). Identical images have an infinite PSNR (``float("inf")``; tables and JSON write it as ``"inf"``).
- FID: torchmetrics' `FrechetInceptionDistance` statistics and distance over features of a `FeatureExtractor`:
  torch-fidelity's Inception-v3 (the one torchmetrics uses, 2048-d pool features) loaded from a local weights
  file, or any extractor the user names (`resolve_fid_features`). Features are extracted once per page and kept,
  so the distance of any group of pages (a chapter, the whole benchmark) is computed without re-running the net.
- CLIP image similarity: cosine between the embeddings of prediction and ground truth by an encoder of
  `pipelines.core.encoders` (the spec strings of ``jobs.retrieval --encoder``).
- Aesthetic score: a linear or MLP head on L2-normalised CLIP image embeddings, as the LAION predictors are
  (`load_aesthetic_head`).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.core.encoders import EncoderInfo, load_encoder, resolve_encoder
from pipelines.core.storage import sha256_file

# ----------------------------------------------------------------------------------------------------------------
# FID


@dataclass
class FeatureExtractor:
    """A network mapping a uint8 (N, 3, H, W) batch to (N, D) features, and the spec recorded in the tables."""

    spec: str
    module: torch.nn.Module
    device: torch.device

    def features(self, images: list[np.ndarray]) -> np.ndarray:
        """Features of H x W x 3 uint8 images of one size, as float64 (N, D)."""
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().to(self.device)
        with torch.inference_mode():
            out = self.module(batch)
        out = out[0] if isinstance(out, tuple | list) else out
        return out.reshape(len(images), -1).double().cpu().numpy()


class EncoderFeatures(torch.nn.Module):
    """A `pipelines.core.encoders` encoder as a FID feature network: uint8 (N, 3, H, W) -> its embeddings."""

    def __init__(self, info: EncoderInfo, device: str) -> None:
        super().__init__()
        self.prepare = info.preparer()
        self.encoder = load_encoder(info, device)
        self.num_features = info.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        prepared = np.stack([self.prepare(Image.fromarray(a)) for a in arrays])
        return torch.from_numpy(self.encoder.embed(prepared))


def inception_features(weights: str | Path, device: str = "cpu") -> FeatureExtractor:
    """torch-fidelity's Inception-v3 (2048-d pool features, the FID standard) from a local weights file.

    The file is torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (what torchmetrics downloads when
    online); it is loaded strictly, so another network's weights fail here rather than give a wrong FID.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--inception-weights {path}: no such file")
    module = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
    )
    spec = f"inception-v3-compat:2048 (weights {path.name}, sha256 {sha256_file(path)[:12]})"
    return FeatureExtractor(spec, module.to(device), torch.device(device))


_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def resolve_fid_features(spec: str, device: str = "cpu") -> FeatureExtractor:
    """A user-named FID feature network.

    ``weightfree`` or ``open_clip:<model>:<weights>``: an encoder of `pipelines.core.encoders`;
    ``torchscript:<file>``: a TorchScript module (``torch.jit.save``);
    ``<module>:<callable>``: an importable callable returning an ``nn.Module`` (or the module class itself).
    The network takes a uint8 (N, 3, H, W) batch at the ground truth's size and returns (N, D) features.
    """
    spec = spec.strip()
    if spec == "weightfree" or spec.startswith("open_clip:"):
        info = resolve_encoder(spec)
        return FeatureExtractor(f"encoder {spec}", EncoderFeatures(info, device).eval(), torch.device(device))
    if spec.startswith("torchscript:"):
        path = Path(spec.removeprefix("torchscript:")).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--fid-features {spec!r}: no such TorchScript file {path}")
        module = torch.jit.load(str(path), map_location=device)
        spec = f"torchscript {path.name} (sha256 {sha256_file(path)[:12]})"
        return FeatureExtractor(spec, module.eval(), torch.device(device))
    if _CALLABLE.match(spec):
        module_name, attribute = spec.split(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            message = f"cannot import {attribute} from {module_name}: {error}"
            raise ValueError(f"--fid-features {spec!r}: {message}") from None
        module = factory()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"--fid-features {spec!r}: {attribute}() returned {type(module).__name__}, not nn.Module")
        return FeatureExtractor(spec, module.to(device).eval(), torch.device(device))
    raise ValueError(
        f"--fid-features {spec!r}: expected 'weightfree', 'open_clip:<model>:<weights>', 'torchscript:<file>' or "
        "'<module>:<callable>'"
    )


class _GivenFeatures(torch.nn.Module):
    """Identity 'network' so torchmetrics' FID accumulates features that were extracted beforehand."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: np.ndarray, fake: np.ndarray, device: str = "cpu") -> float:
    """FID between two sets of features (N, D), by torchmetrics' FID statistics (float64); needs N >= 2 each.

    Its cost is the eigenvalues of a D x D product: ~2 minutes at D = 2048 on 2 CPU cores, far less on a GPU.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 pages on each side, got {len(real)} and {len(fake)}")
    metric = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]), normalize=True).to(device)
    metric.update(torch.from_numpy(np.asarray(real, dtype=np.float64)).to(device), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, dtype=np.float64)).to(device), real=False)
    return max(float(metric.compute()), 0.0)  # negative only by rounding: the distance is >= 0


# ----------------------------------------------------------------------------------------------------------------
# CLIP embeddings and the aesthetic head


class AestheticHead(torch.nn.Module):
    """Linear layers applied in order (optionally ReLU between them): the LAION aesthetic predictors' shape."""

    def __init__(self, layers: list[torch.nn.Linear], relu: bool = False) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.relu = relu
        self.input_dim = layers[0].in_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.relu and i < len(self.layers) - 1:
                x = torch.relu(x)
        return x.squeeze(-1)

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Scores of L2-normalised embeddings (N, D)."""
        weight = self.layers[0].weight
        with torch.inference_mode():
            x = torch.as_tensor(embeddings, dtype=weight.dtype, device=weight.device)
            return self(x).double().cpu().numpy()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"aesthetic predictor {path}: expected a state dict of tensors")
    return state


def load_aesthetic_head(path: str | Path, relu: bool = False) -> AestheticHead:
    """Load an aesthetic predictor file (``.pth``/``.pt``/``.bin`` state dict or ``.safetensors``), strictly.

    Accepted layouts:
    - ``weight`` (1, D) and ``bias`` (1): one linear layer (LAION's first predictors, e.g.
      ``sa_0_4_vit_l_14_linear.pth``);
    - ``layers.<i>.weight`` / ``layers.<i>.bias``: a stack of Linear layers applied in the order of ``i`` (indices
      of Dropout/ReLU layers in between are absent from the file), last output 1 — LAION's improved predictor
      ``sac+logos+ava1-l14-linearMSE.pth`` (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activation; use
      ``relu=True`` for its ``reluMSE`` variants).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--aesthetic-predictor {path}: no such file")
    state = _read_state_dict(path)
    if set(state) == {"weight", "bias"}:
        groups = [(state["weight"], state["bias"])]
    else:
        indices = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(r"layers\.(\d+)\.(weight|bias)", k))})
        expected = {f"layers.{i}.{p}" for i in indices for p in ("weight", "bias")}
        if not indices or set(state) != expected:
            unexpected = sorted(set(state) - expected)[:5]
            raise ValueError(
                f"aesthetic predictor {path}: expected keys weight/bias or layers.<i>.weight/bias, got "
                f"{sorted(state)[:6]}{' (unexpected: ' + str(unexpected) + ')' if unexpected else ''}"
            )
        groups = [(state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]) for i in indices]
    layers = []
    for weight, bias in groups:
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(f"aesthetic predictor {path}: layer shapes {tuple(weight.shape)}, {tuple(bias.shape)}")
        if layers and layers[-1].out_features != weight.shape[1]:
            raise ValueError(
                f"aesthetic predictor {path}: a layer of {layers[-1].out_features} outputs feeds one of "
                f"{weight.shape[1]} inputs"
            )
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight.float(), "bias": bias.float()})
        layers.append(layer)
    if layers[-1].out_features != 1:
        raise ValueError(f"aesthetic predictor {path}: the last layer has {layers[-1].out_features} outputs, not 1")
    return AestheticHead(layers, relu=relu).eval()

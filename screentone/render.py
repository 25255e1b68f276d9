"""Screentone renderers behind one interface: ``render(page, seed) -> uint8 H x W`` plus an ``id``.

- `HalftoneRenderer`: weight-free clustered-dot screens (`screentone.halftone`), the default.
- `ScreenStyleRenderer`: ScreenStyle's colour -> ScreenMap -> tone path with the published weights.

Both render at the resolution of the page they are given and never resample the result: resampling destroys
the dots. ScreenStyle's own preprocessing halves pages taller than 2500 px (and ColorFlow then resizes the
tone); here the caller resizes the *colour page* to its final size first, and pages above ``max_pixels`` are
refused with an error instead of being rendered at another size.

The ``id`` names the renderer and everything that changes its output (settings, weights); pipelines use it in
output folders and metadata so renderings of different renderers never mix. `make_renderer` builds one from a
short spec string (for command lines and configs); without a spec it is the weight-free renderer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch

from screentone.augment import to_grey
from screentone.color2manga import GENERATOR_PAD_MULTIPLE
from screentone.halftone import HalftoneConfig, render_halftone
from screentone.layers import pad_to_multiple
from screentone.lines import XDoGParams, erode_lines, extract_lines
from screentone.loader import PathLike, ScreenStyleModels, find_screenstyle_files, load_screenstyle
from screentone.screenvae import decode_tone

HALFTONE_VERSION = 1  # bump when the halftone algorithm changes its output for equal settings
SCREENSTYLE_VERSION = 1  # bump when the ScreenStyle pre/post-processing changes
DEFAULT_MAX_PIXELS = 2560 * 2560

LineSource = Literal["grey", "xdog"]


@runtime_checkable
class ScreentoneRenderer(Protocol):
    """Anything that turns a uint8 RGB (H x W x 3) or grey (H x W) page into a uint8 H x W screentone."""

    @property
    def id(self) -> str: ...

    def render(self, page: np.ndarray, seed: int) -> np.ndarray: ...


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _as_rgb_page(page: np.ndarray, max_pixels: int | None = None) -> np.ndarray:
    page = np.asarray(page)
    if page.dtype != np.uint8:
        raise TypeError(f"screentone renderers expect uint8 pages, got {page.dtype}")
    if page.ndim == 2:
        page = np.repeat(page[..., None], 3, axis=2)
    if page.ndim != 3 or page.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB or H x W grey page, got shape {page.shape}")
    h, w = page.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"empty page of shape {page.shape}")
    if max_pixels is not None and h * w > max_pixels:
        raise ValueError(
            f"page of {w} x {h} px exceeds max_pixels={max_pixels}: resize the colour page to the size the "
            "tone is used at before rendering (rendered tone is never resampled)"
        )
    return page


class HalftoneRenderer:
    """The weight-free renderer (`render_halftone`); output holds only 0 and 255."""

    def __init__(self, config: HalftoneConfig | None = None):
        self.config = config or HalftoneConfig()

    @property
    def id(self) -> str:
        return f"halftone-v{HALFTONE_VERSION}-{self.config.fingerprint()}"

    def render(self, page: np.ndarray, seed: int) -> np.ndarray:
        return render_halftone(_as_rgb_page(page), _check_seed(seed), self.config)


class ScreenStyleRenderer:
    """Colour page -> ``G_RGB2INTSCR`` ScreenMap -> ScreenVAE decoder -> tone, in eval mode.

    line_source: the line map fed to both networks. ``"grey"`` (default) is what ColorFlow's preprocessing does
    (the greyscale page serves as the line map); ``"xdog"`` uses the weight-free XDoG extractor. Either is
    eroded 3x3 as ScreenStyle does. line_passes: how often the line map is multiplied in. The decoder wrapper
    always multiplies once with the sign-binarised map (with ``"grey"``: every pixel darker than mid-grey turns
    black); ColorFlow multiplies the result by the line map once more, which with ``"grey"`` also darkens the
    lighter tones by their grey value: 2 (default) reproduces ColorFlow, 1 keeps ScreenStyle's own output. With
    XDoG lines both give the same result (binary lines).

    Inputs are replicate-padded (bottom/right) to multiples of 256 for the generator and 128 for the decoder
    and cropped back. The decoder's noise is drawn from a generator seeded with ``seed``.
    """

    def __init__(
        self,
        models: ScreenStyleModels,
        *,
        line_source: LineSource = "grey",
        line_passes: int = 2,
        xdog: XDoGParams | None = None,
        device: str | torch.device | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if line_source not in ("grey", "xdog"):
            raise ValueError(f"line_source must be 'grey' or 'xdog', got {line_source!r}")
        if line_passes not in (1, 2):
            raise ValueError(f"line_passes must be 1 or 2, got {line_passes!r}")
        self.device = torch.device(device or _default_device())
        self.generator = models.generator.eval().requires_grad_(False).to(self.device)
        self.decoder = models.decoder.eval().requires_grad_(False).to(self.device)
        self.line_source = line_source
        self.line_passes = line_passes
        self.xdog = xdog or XDoGParams()
        self.max_pixels = max_pixels
        self._weights_digest: str | None = None

    @classmethod
    def from_files(
        cls, g_path: PathLike, dec_path: PathLike, device: str | torch.device | None = None, **options
    ) -> ScreenStyleRenderer:
        """Load the published files strictly (see `load_screenstyle`) and build the renderer."""
        device = device or _default_device()
        return cls(load_screenstyle(g_path, dec_path, device=device), device=device, **options)

    @property
    def id(self) -> str:
        lines = self.line_source if self.line_source == "grey" else f"xdog{_xdog_digest(self.xdog)}"
        return f"screenstyle-v{SCREENSTYLE_VERSION}-{self.weights_digest()}-{lines}-x{self.line_passes}"

    def weights_digest(self) -> str:
        """Short SHA-256 of both networks' weights (names, shapes and bytes), computed once."""
        if self._weights_digest is None:
            digest = hashlib.sha256()
            for module in (self.generator, self.decoder):
                for key, tensor in module.state_dict().items():
                    digest.update(f"{key}:{tuple(tensor.shape)}".encode())
                    digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._weights_digest = digest.hexdigest()[:12]
        return self._weights_digest

    def line_map(self, page: np.ndarray) -> np.ndarray:
        """The eroded line map (uint8 H x W, 0 = ink) fed to the networks."""
        page = _as_rgb_page(page)
        lines = to_grey(page) if self.line_source == "grey" else extract_lines(page, self.xdog)
        return erode_lines(lines, 3)

    @torch.inference_mode()
    def screenmap(self, page: np.ndarray) -> np.ndarray:
        """The generator's 4-channel ScreenMap (float32 4 x H x W in [-1, 1]) of a colour page."""
        page = _as_rgb_page(page, self.max_pixels)
        return self._screenmap(page, self._signed(self.line_map(page)))[0].cpu().numpy()

    @torch.inference_mode()
    def render(self, page: np.ndarray, seed: int) -> np.ndarray:
        seed = _check_seed(seed)
        page = _as_rgb_page(page, self.max_pixels)
        lines = self._signed(self.line_map(page))
        screenmap = self._screenmap(page, lines)
        noise = torch.Generator(device=self.device).manual_seed(seed)
        tone = (decode_tone(self.decoder, screenmap, lines, noise) + 1) / 2
        if self.line_passes == 2:
            tone = tone * (lines + 1) / 2
        return (tone[0, 0] * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()

    def _signed(self, image: np.ndarray) -> torch.Tensor:
        """uint8 H x W (x C) -> float 1 x C x H x W in [-1, 1] on the device."""
        tensor = torch.from_numpy(np.ascontiguousarray(image)).to(self.device, torch.float32) / 127.5 - 1
        return tensor[None, None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)[None]

    def _screenmap(self, page: np.ndarray, lines: torch.Tensor) -> torch.Tensor:
        h, w = page.shape[:2]
        x = torch.cat([lines, self._signed(page)], dim=1)
        return self.generator(pad_to_multiple(x, GENERATOR_PAD_MULTIPLE))[..., :h, :w]


def _xdog_digest(params: XDoGParams) -> str:
    return hashlib.sha256(repr(params).encode()).hexdigest()[:6]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_renderer(
    spec: str | None = None,
    *,
    device: str | torch.device | None = None,
    halftone: HalftoneConfig | None = None,
    line_source: LineSource = "grey",
    line_passes: int = 2,
) -> ScreentoneRenderer:
    """A renderer from a spec string.

    ``None``, ``""`` or ``"halftone"``: the weight-free renderer (with ``halftone`` settings).
    ``"screenstyle:<folder>"``: ScreenStyle with the files found under a ScreenStyle or ColorFlow weights
    folder (``latest_net_G_RGB2INTSCR.pth`` in it or in ``color2manga/``, ``latest_net_dec.pth`` in it or in
    ``ScreenVAE/``). ``"screenstyle:<generator.pth>,<decoder.pth>"``: the two files given explicitly.
    """
    if spec is None or spec.strip() in ("", "halftone"):
        return HalftoneRenderer(halftone)
    kind, _, argument = spec.partition(":")
    if kind.strip() != "screenstyle":
        raise ValueError(
            f"unknown screentone renderer spec {spec!r}: use 'halftone', 'screenstyle:<weights folder>' or "
            "'screenstyle:<generator.pth>,<decoder.pth>'"
        )
    argument = argument.strip()
    if not argument:
        raise ValueError(f"renderer spec {spec!r} needs the ScreenStyle weights: 'screenstyle:<folder>'")
    if "," in argument:
        g_path, dec_path = (Path(p.strip()) for p in argument.split(",", 1))
    else:
        g_path, dec_path = find_screenstyle_files(argument)
    return ScreenStyleRenderer.from_files(
        g_path, dec_path, device=device, line_source=line_source, line_passes=line_passes
    )

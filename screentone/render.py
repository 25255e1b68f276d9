"""Screentone renderers behind one interface: ``render(page, seed) -> uint8 H x W`` plus an ``id``.

- `HalftoneRenderer`: weight-free clustered-dot screens (`screentone.halftone`), the default.
- `ScreenStyleRenderer`: ScreenStyle's colour -> ScreenMap -> tone path with the published weights, by default
  exactly as ColorFlow's released code runs it (`ScreenStyleRenderer` lists each step).

Both render at the resolution of the page they are given; callers resize the *colour page* to its final size
first (resampling a rendered tone destroys its dots). ``render_batch(pages, seeds)`` renders many pages at
once and returns exactly what ``render`` returns page by page (on CPU in float32). Pages above ``max_pixels``
are refused with an error.

The ``id`` names the renderer and everything that changes its output (settings, weights); pipelines use it in
output folders and metadata so renderings of different renderers never mix. `make_renderer` builds one from a
short spec string (for command lines and configs); without a spec it is the weight-free renderer.
"""

from __future__ import annotations

import copy
import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from screentone.augment import to_grey
from screentone.color2manga import GENERATOR_PAD_MULTIPLE
from screentone.halftone import HalftoneConfig, render_halftone
from screentone.layers import pad_to_multiple, padded_size
from screentone.lines import XDoGConfig, erode_lines, extract_lines
from screentone.loader import PathLike, ScreenStyleModels, find_screenstyle_files, load_screenstyle
from screentone.screenvae import decode_tone, decode_tone_binarised

HALFTONE_VERSION = 1  # bump when the halftone algorithm changes its output for equal settings
# Bump a path's version when its pre/post-processing changes its output; the id of each path carries it.
SCREENSTYLE_PATH_VERSIONS = {"colorflow": 2, "eroded-binarised": 1}
DEFAULT_MAX_PIXELS = 2560 * 2560
HALVE_ABOVE = 2500  # ColorFlow halves colour pages taller than this before rendering
DEFAULT_BATCH_SIZE = 8
PAD_FILL = 255  # ColorFlow's ImageOps.expand fill: white on the line map, (255, 0, 0) on the RGB page

LineSource = Literal["grey", "xdog"]
ScreenStylePath = Literal["colorflow", "eroded-binarised"]


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

    def render_batch(
        self, pages: Sequence[np.ndarray], seeds: Sequence[int], batch_size: int | None = None
    ) -> list[np.ndarray]:
        """``render`` page by page (the halftone has nothing to batch); same signature as ScreenStyle's."""
        return [self.render(page, seed) for page, seed in zip(pages, seeds, strict=True)]


@dataclass
class _Prepared:
    """One page ready for the networks: what ``render`` outputs at (``size``) and what the networks see."""

    size: tuple[int, int]  # H x W of the returned tone
    rgb: np.ndarray  # uint8 h x w x 3, the page as rendered (halved when tall)
    lines: np.ndarray  # uint8 h x w line map (0 = ink)

    @property
    def halved(self) -> bool:
        return self.rgb.shape[:2] != self.size


def colorflow_pad(page: np.ndarray, height: int, width: int) -> np.ndarray:
    """A uint8 page padded bottom/right to ``height`` x ``width`` as ``ImageOps.expand(fill=255)`` pads it.

    An integer fill is the first band's value: white (255) on a grey line map, pure red (255, 0, 0) on RGB.
    """
    fill = PAD_FILL if page.ndim == 2 else (PAD_FILL,) + (0,) * (page.shape[2] - 1)
    out = np.empty((height, width, *page.shape[2:]), dtype=np.uint8)
    out[:] = fill
    out[: page.shape[0], : page.shape[1]] = page
    return out


def to_unit_range(image: np.ndarray) -> torch.Tensor:
    """uint8 H x W (x C) -> float32 1 x C x H x W in [-1, 1], as ``ToTensor`` + ``Normalize(0.5, 0.5)`` compute it."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32).div(255)
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return tensor.sub(0.5).div(0.5)[None]


def colorflow_network_input(page: np.ndarray, lines: np.ndarray) -> torch.Tensor:
    """The generator's input for a uint8 RGB page and its line map: 1 x 4 x H' x W', line first, both padded to
    multiples of 256 with `colorflow_pad` (white line, red page), in [-1, 1]."""
    h, w = lines.shape
    size = padded_size(h, GENERATOR_PAD_MULTIPLE), padded_size(w, GENERATOR_PAD_MULTIPLE)
    return torch.cat([to_unit_range(colorflow_pad(lines, *size)), to_unit_range(colorflow_pad(page, *size))], dim=1)


def multiply_page_lines(tone: torch.Tensor, lines: torch.Tensor) -> torch.Tensor:
    """ColorFlow's second line multiplication (``fake_M2``): tone times line map in [0, 1] space, in [-1, 1]."""
    return ((tone + 1) / 2.0 * ((lines + 1) / 2.0)) * 2.0 - 1


def to_uint8_truncated(tone: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 by truncation, as ColorFlow's ``tensor2im`` (``astype(uint8)``) converts: 67.9 -> 67."""
    return ((tone.float() + 1) / 2.0 * 255.0).clamp(0, 255).to(torch.uint8)


def halve_page(page: np.ndarray) -> np.ndarray:
    """A page at half its size (Lanczos, as ColorFlow halves tall pages with ``Image.ANTIALIAS``)."""
    h, w = page.shape[:2]
    return np.asarray(Image.fromarray(page).resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS))


def double_tone(tone: np.ndarray, height: int, width: int) -> np.ndarray:
    """A halved page's tone back at the page size by pixel replication (each tone pixel becomes 2 x 2)."""
    doubled = np.repeat(np.repeat(tone, 2, axis=0), 2, axis=1)[:height, :width]
    return np.pad(doubled, ((0, height - doubled.shape[0]), (0, width - doubled.shape[1])), mode="edge")


class ScreenStyleRenderer:
    """Colour page -> ``G_RGB2INTSCR`` ScreenMap -> ScreenVAE decoder -> tone, in eval mode with seeded noise.

    ``path="colorflow"`` (default) runs ColorFlow's released colour-to-manga code step by step:

    1. pages taller than ``halve_above`` (2500) are halved (Lanczos) and their tone is returned pixel-doubled;
    2. the line map is the plain greyscale page (``line_source="grey"``; not eroded);
    3. line map and RGB page are padded bottom/right to multiples of 256 with fill 255: white on the line,
       pure red (255, 0, 0) on the page (`colorflow_network_input`); G runs on the padded pair;
    4. the decoder gets the uncropped ScreenMap, replicate-padded to ``h // 128 * 128 + 128`` per side, and
       its output (cropped to the 256-padded size) is multiplied by the raw line map (`decode_tone`);
    5. ``line_passes=2``: multiplied by the line map once more (`multiply_page_lines`); cropped to the page;
    6. uint8 by truncation (`to_uint8_truncated`).

    Where it differs from the released code: the networks run in eval mode (the release leaves the ScreenVAE in
    train mode: Dropout(0.5) active and unseeded noise) and the noise comes from a generator seeded with the
    page's ``seed``; the release would fail on pages over 2500 px (its line map is not halved with the page).

    ``path="eroded-binarised"`` is the project's first version (id ``screenstyle-v1-...``): line map eroded
    3x3, replicate padding to 256 (G) and to the next multiple of 128 (decoder) on the cropped ScreenMap,
    the line sign-binarised with the ScreenMap pushed to +1 on ink (`decode_tone_binarised`), rounding.

    line_source ``"xdog"`` feeds weight-free XDoG lines instead of the grey page; ``line_passes=1`` skips
    step 5 (ScreenStyle's own single multiplication). ``dtype`` (float32 or bfloat16) is what the networks
    run in; ``batch_size`` is how many pages of one size ``render_batch`` sends through the networks at once.
    """

    def __init__(
        self,
        models: ScreenStyleModels,
        *,
        path: ScreenStylePath = "colorflow",
        line_source: LineSource = "grey",
        line_passes: int = 2,
        xdog: XDoGConfig | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = torch.float32,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        halve_above: int = HALVE_ABOVE,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        if path not in SCREENSTYLE_PATH_VERSIONS:
            raise ValueError(f"path must be one of {sorted(SCREENSTYLE_PATH_VERSIONS)}, got {path!r}")
        if line_source not in ("grey", "xdog"):
            raise ValueError(f"line_source must be 'grey' or 'xdog', got {line_source!r}")
        if line_passes not in (1, 2):
            raise ValueError(f"line_passes must be 1 or 2, got {line_passes!r}")
        if batch_size < 1 or halve_above < 1:
            raise ValueError(f"batch_size and halve_above must be >= 1, got {batch_size} and {halve_above}")
        self.dtype = _torch_dtype(dtype)
        self.device = torch.device(device or _default_device())
        self.path = path
        self.line_source = line_source
        self.line_passes = line_passes
        self.xdog = xdog or XDoGConfig()
        self.max_pixels = max_pixels
        self.halve_above = halve_above
        self.batch_size = batch_size
        self._weights_digest = _weights_digest(models.generator, models.decoder)  # of the float32 weights
        self.generator = _prepared_module(models.generator, self.device, self.dtype)
        self.decoder = _prepared_module(models.decoder, self.device, self.dtype)

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
        version = SCREENSTYLE_PATH_VERSIONS[self.path]
        path = "" if self.path == "eroded-binarised" else f"{self.path}-"  # v1 ids stay what they were
        halving = "" if self.path != "colorflow" or self.halve_above == HALVE_ABOVE else f"-halve{self.halve_above}"
        dtype = "" if self.dtype == torch.float32 else f"-{_dtype_name(self.dtype)}"
        return f"screenstyle-v{version}-{self.weights_digest()}-{path}{lines}-x{self.line_passes}{halving}{dtype}"

    def weights_digest(self) -> str:
        """Short SHA-256 of both networks' float32 weights (names, shapes and bytes)."""
        return self._weights_digest

    def line_map(self, page: np.ndarray) -> np.ndarray:
        """The line map (uint8 H x W, 0 = ink) fed to the networks: eroded 3x3 only on ``"eroded-binarised"``."""
        page = _as_rgb_page(page)
        lines = to_grey(page) if self.line_source == "grey" else extract_lines(page, self.xdog)
        return erode_lines(lines, 3) if self.path == "eroded-binarised" else lines

    def network_input(self, page: np.ndarray) -> torch.Tensor:
        """The generator's float32 input (1 x 4 x H' x W', line map first) for a page, as this path builds it."""
        return self._network_input(self._prepare(page))

    def _network_input(self, prepared: _Prepared) -> torch.Tensor:
        if self.path == "colorflow":
            return colorflow_network_input(prepared.rgb, prepared.lines)
        x = torch.cat([_legacy_signed(prepared.lines), _legacy_signed(prepared.rgb)], dim=1)
        return pad_to_multiple(x, GENERATOR_PAD_MULTIPLE)

    @torch.inference_mode()
    def screenmap(self, page: np.ndarray) -> np.ndarray:
        """The generator's 4-channel ScreenMap (float32 4 x h x w in [-1, 1]) cropped to the (halved) page."""
        prepared = self._prepare(page)
        h, w = prepared.lines.shape
        x = self._network_input(prepared).to(self.device, self.dtype)
        return self.generator(x)[0, :, :h, :w].float().cpu().numpy()

    def render(self, page: np.ndarray, seed: int) -> np.ndarray:
        return self.render_batch([page], [seed], batch_size=1)[0]

    @torch.inference_mode()
    def render_batch(
        self, pages: Sequence[np.ndarray], seeds: Sequence[int], batch_size: int | None = None
    ) -> list[np.ndarray]:
        """Tones of many pages, equal to ``render`` page by page (exactly so on CPU in float32).

        Pages of one (rendered) size go through the networks together, ``batch_size`` at a time (default: the
        renderer's); each page's noise comes from its own generator seeded with its seed.
        """
        if len(pages) != len(seeds):
            raise ValueError(f"{len(pages)} pages but {len(seeds)} seeds")
        seeds = [_check_seed(seed) for seed in seeds]
        prepared = [self._prepare(page) for page in pages]
        batch_size = batch_size or self.batch_size
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, item in enumerate(prepared):
            groups[item.lines.shape].append(index)
        tones: list[np.ndarray | None] = [None] * len(pages)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                rendered = self._render_same_size([prepared[i] for i in chunk], [seeds[i] for i in chunk])
                for index, tone in zip(chunk, rendered, strict=True):
                    item = prepared[index]
                    tones[index] = double_tone(tone, *item.size) if item.halved else tone
        return tones

    def _prepare(self, page: np.ndarray) -> _Prepared:
        page = _as_rgb_page(page, self.max_pixels)
        size = page.shape[:2]
        if self.path == "colorflow" and size[0] > self.halve_above:
            page = halve_page(page)
        return _Prepared(size=size, rgb=page, lines=self.line_map(page))

    def _render_same_size(self, items: list[_Prepared], seeds: list[int]) -> list[np.ndarray]:
        h, w = items[0].lines.shape
        noise = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        if self.path == "colorflow":
            x = torch.cat([colorflow_network_input(item.rgb, item.lines) for item in items]).to(self.device)
            lines = x[:, :1]
            tone = decode_tone(self.decoder, self.generator(x.to(self.dtype)), lines, noise)
            if self.line_passes == 2:
                tone = multiply_page_lines(tone, lines)
            out = to_uint8_truncated(tone[:, 0, :h, :w])
        else:
            lines = torch.cat([_legacy_signed(item.lines) for item in items]).to(self.device)
            x = torch.cat([lines, torch.cat([_legacy_signed(item.rgb) for item in items]).to(self.device)], dim=1)
            screenmap = self.generator(pad_to_multiple(x, GENERATOR_PAD_MULTIPLE).to(self.dtype))[..., :h, :w]
            tone = (decode_tone_binarised(self.decoder, screenmap, lines, noise).float() + 1) / 2
            if self.line_passes == 2:
                tone = tone * (lines + 1) / 2
            out = (tone[:, 0] * 255).round().clamp(0, 255).to(torch.uint8)
        return list(out.cpu().numpy())


def _prepared_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The module in eval mode on ``device``; a copy when ``dtype`` differs, so the caller's weights stay as given."""
    module = module.eval().requires_grad_(False)
    if any(p.dtype != dtype for p in module.parameters()):
        module = copy.deepcopy(module)
    return module.to(device, dtype)


def _legacy_signed(image: np.ndarray) -> torch.Tensor:
    """uint8 H x W (x C) -> float32 1 x C x H x W in [-1, 1] as the first version computed it (x / 127.5 - 1)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32) / 127.5 - 1
    return tensor[None, None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)[None]


def _weights_digest(*modules: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for key, tensor in module.state_dict().items():
            digest.update(f"{key}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _xdog_digest(params: XDoGConfig) -> str:
    return hashlib.sha256(repr(params).encode()).hexdigest()[:6]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_SPEC_OPTIONS = {"path": "path", "lines": "line_source", "passes": "line_passes", "dtype": "dtype"}


def make_renderer(
    spec: str | None = None,
    *,
    device: str | torch.device | None = None,
    halftone: HalftoneConfig | None = None,
    path: ScreenStylePath = "colorflow",
    line_source: LineSource = "grey",
    line_passes: int = 2,
    dtype: str = "float32",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ScreentoneRenderer:
    """A renderer from a spec string.

    ``None``, ``""`` or ``"halftone"``: the weight-free renderer (with ``halftone`` settings).
    ``"screenstyle:<folder>"``: ScreenStyle with the files found under a ScreenStyle or ColorFlow weights
    folder (``latest_net_G_RGB2INTSCR.pth`` in it or in ``color2manga/``, ``latest_net_dec.pth`` in it or in
    ``ScreenVAE/``). ``"screenstyle:<generator.pth>,<decoder.pth>"``: the two files given explicitly.
    Options that change the output may follow, separated by ``;``, and override the keyword arguments:
    ``path=colorflow|eroded-binarised``, ``lines=grey|xdog``, ``passes=1|2``, ``dtype=float32|bfloat16``
    (e.g. ``"screenstyle:/weights;dtype=bfloat16"``): every stage given the same spec gets the same renderer id.
    """
    if spec is None or spec.strip() in ("", "halftone"):
        return HalftoneRenderer(halftone)
    kind, _, argument = spec.partition(":")
    if kind.strip() != "screenstyle":
        raise ValueError(
            f"unknown screentone renderer spec {spec!r}: use 'halftone', 'screenstyle:<weights folder>' or "
            "'screenstyle:<generator.pth>,<decoder.pth>'"
        )
    argument, *settings = (part.strip() for part in argument.split(";"))
    if not argument:
        raise ValueError(f"renderer spec {spec!r} needs the ScreenStyle weights: 'screenstyle:<folder>'")
    options: dict = {"path": path, "line_source": line_source, "line_passes": line_passes, "dtype": dtype}
    for setting in settings:
        key, _, value = setting.partition("=")
        if key.strip() not in _SPEC_OPTIONS or not value.strip():
            keys = ", ".join(sorted(_SPEC_OPTIONS))
            raise ValueError(f"renderer spec {spec!r}: bad option {setting!r}, expected key=value with key in {keys}")
        value = value.strip()
        options[_SPEC_OPTIONS[key.strip()]] = int(value) if key.strip() == "passes" and value.isdigit() else value
    if "," in argument:
        g_path, dec_path = (Path(p.strip()) for p in argument.split(",", 1))
    else:
        g_path, dec_path = find_screenstyle_files(argument)
    return ScreenStyleRenderer.from_files(g_path, dec_path, device=device, batch_size=batch_size, **options)


_RENDERERS: dict[tuple[str, str | None], Any] = {}


def renderer_for(spec: str, device: str | None = None):
    """One renderer per worker process and spec: weights load once, not once per chapter."""
    key = (spec, device)
    if key not in _RENDERERS:
        _RENDERERS[key] = make_renderer(spec, device=device)
    return _RENDERERS[key]

"""Seeded random streams, colour helpers and each series' recurring cast (colours and shapes per character)."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines.sample_corpus.labels import RGB, Character

_NAMES = ("aiko", "ren", "mika", "sora", "kenji", "yui", "haru", "nao", "rin", "taro", "emi", "kai", "saki", "jun")
_HAIR_STYLES = ("spiky", "long", "bob", "ponytail", "twin_tails", "short")
_CLOTHES_STYLES = ("shirt", "dress", "coat", "hoodie")
_SKINS: tuple[RGB, ...] = ((255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 140, 100))


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """Independent stream per (seed, keys): a page's content never depends on which other pages exist."""
    return np.random.default_rng([seed, *keys])


def hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def luma(c: RGB) -> RGB:
    y = round(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])
    return (y, y, y)


def mix(a: RGB, b: RGB, t: float) -> RGB:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def pick(rng: np.random.Generator, items: Sequence, p: Sequence[float] | None = None) -> Any:
    return items[int(rng.choice(len(items), p=p))]


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def make_cast(seed: int, series_index: int, series: str, n: int) -> list[Character]:
    """Hair hues spread around the wheel and hair values spread in lightness, so the cast differs in grey too."""
    rng = seeded_rng(seed, 1, series_index)
    names = [str(x) for x in rng.permutation(_NAMES)[:n]]
    hair_offset, clothes_offset = rng.uniform(0, 1, 2)
    hair_values = rng.permutation(np.linspace(0.35, 0.95, n))
    clothes_values = rng.permutation(np.linspace(0.45, 0.9, n))
    hair_styles = rng.permutation(_HAIR_STYLES)[:n]
    clothes_styles = [_CLOTHES_STYLES[i % len(_CLOTHES_STYLES)] for i in rng.permutation(n)]
    cast = []
    for i in range(n):
        hair_h = hair_offset + i / n + rng.uniform(-0.03, 0.03)
        clothes_h = clothes_offset + i / n
        if _hue_distance(hair_h, clothes_h) < 0.15:
            clothes_h += 0.5 / n + 0.1
        cast.append(
            Character(
                name=f"{series}_{names[i]}",
                series=series,
                hair=hsv(hair_h, rng.uniform(0.6, 0.9), hair_values[i]),
                hair_style=str(hair_styles[i]),
                clothes=hsv(clothes_h, rng.uniform(0.55, 0.85), clothes_values[i]),
                clothes_style=clothes_styles[i],
                accent=hsv(clothes_h + 0.45, 0.8, 0.9),
                skin=_SKINS[int(rng.integers(len(_SKINS)))],
                eyes=hsv(rng.uniform(0, 1), 0.8, 0.7),
                build=float(rng.uniform(0.85, 1.15)),
            )
        )
    return cast

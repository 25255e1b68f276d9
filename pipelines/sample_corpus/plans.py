"""The structure of a corpus: each preset as explicit chapter plans (series, chapters, page styles and oddities).

The preset fixes where every odd file sits, so tests can rely on positions; the seed only fixes content.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.sample_corpus.labels import BROKEN_KINDS, BW_STYLES

PRESETS = ("tiny", "small", "demo")


@dataclass(frozen=True)
class PageSpec:
    style: str  # label style; broken files use "broken_<reason>"
    variant: str = ""  # storage oddity (a key of builder._VARIANT_EXT, or "rgb", "spread", "dup")
    dup_of: tuple[int, int, int] | None = None  # (series index, chapter index, page position) it re-renders


@dataclass(frozen=True)
class ChapterPlan:
    series_index: int
    chapter_index: int
    series: str
    name: str
    kind: str  # folder | archive
    content: str  # colour | colour_short | bw
    bw_style: str | None
    pages: tuple[PageSpec, ...]
    ext: str  # default extension as written, e.g. "jpg", "JPG", "png", "webp"
    naming: str  # padded | unpadded | prefixed
    subfolder: str = ""
    junk: tuple[str, ...] = ()
    deflate: bool = False

    @property
    def cover(self) -> bool:
        return bool(self.pages) and self.pages[0].style == "cover"


_STYLE_CYCLE = ("colour", "colour", "colour_light", "colour", "colour_muted", "colour")


def _color_pages(
    n: int, specials: dict[int, str], broken: dict[int, str], dups: dict[int, tuple[int, int, int]] | None = None
) -> tuple[PageSpec, ...]:
    """`n` decodable colour pages (fixed style cycle), then broken files inserted at their final positions."""
    dups = dups or {}
    pages = []
    for i in range(n):
        style = _STYLE_CYCLE[i % len(_STYLE_CYCLE)]
        if i in dups:
            pages.append(PageSpec(style="colour", variant="dup", dup_of=dups[i]))
        else:
            variant = specials.get(i, "")
            pages.append(PageSpec("colour" if variant in ("spread", "exif6", "exif8") else style, variant))
    for position in sorted(broken):
        pages.insert(position, PageSpec(f"broken_{broken[position]}"))
    return tuple(pages)


def _bw_pages(
    style: str, n: int, cover: bool, specials: dict[int, str], broken: dict[int, str]
) -> tuple[PageSpec, ...]:
    pages = [PageSpec("cover") if cover and i == 0 else PageSpec(style, specials.get(i, "")) for i in range(n)]
    for position in sorted(broken):
        pages.insert(position, PageSpec(f"broken_{broken[position]}"))
    return tuple(pages)


_ALL_JUNK = ("macosx", "thumbs", "ds_store", "comicinfo")


def chapter_plans(preset: str) -> tuple[list[ChapterPlan], dict[str, int]]:
    """Chapter plans and cast sizes of a preset. Positions are fixed so tests can rely on them."""
    plans: list[ChapterPlan] = []
    cast_sizes: dict[str, int] = {}

    def add(series: str, name: str, kind: str, content: str, pages, ext: str, naming: str, **kw) -> None:
        series_index = int(series[1:]) - 1
        chapter_index = sum(p.series == series for p in plans)
        bw_style = next((p.style for p in pages if p.style in BW_STYLES), None) if content == "bw" else None
        plans.append(
            ChapterPlan(series_index, chapter_index, series, name, kind, content, bw_style, pages, ext, naming, **kw)
        )

    # fmt: off
    if preset == "tiny":
        cast_sizes.update(s1=3, s2=3)
        add("s1", "ch001", "folder", "colour",
            _color_pages(24, {3: "exif6", 6: "palette", 9: "rgba", 12: "cmyk", 15: "webp", 18: "upper_png"},
                          {5: "truncated", 20: "empty"}),
            "jpg", "unpadded", junk=("thumbs",))
        add("s1", "ch002", "archive", "colour_short", _color_pages(8, {}, {4: "not_image"}), "png", "padded",
            subfolder="pages", junk=_ALL_JUNK)
        add("s1", "ch003", "folder", "bw", _bw_pages("grey", 6, True, {2: "la", 3: "i16", 4: "rgb"}, {}), "png",
            "padded", junk=("ds_store",))
        add("s2", "ch001", "archive", "colour", _color_pages(24, {7: "exif8"}, {10: "decompression_bomb"}), "JPG",
            "padded", junk=("macosx", "thumbs", "ds_store"), deflate=True)
        add("s2", "ch002", "folder", "bw", _bw_pages("screentone", 5, False, {2: "bilevel"}, {}), "png", "unpadded")
        add("s2", "ch003", "archive", "bw", _bw_pages("sepia", 6, True, {}, {}), "jpg", "padded", junk=("macosx",))
        add("s2", "ch004", "folder", "bw", _bw_pages("chroma_noise", 5, False, {}, {}), "jpg", "padded")
    elif preset == "small":
        cast_sizes.update(s1=4, s2=3, s3=4)
        add("s1", "ch001", "folder", "colour",
            _color_pages(26, {3: "exif6", 6: "palette", 11: "cmyk", 14: "spread", 19: "upper_png"},
                          {5: "truncated", 22: "empty"}, {17: (0, 0, 8)}),
            "jpg", "unpadded", junk=("thumbs",))
        add("s1", "ch002", "archive", "colour", _color_pages(24, {2: "rgba", 9: "webp"}, {12: "decompression_bomb"}),
            "png", "padded", subfolder="ch002", junk=_ALL_JUNK)
        add("s1", "ch003", "folder", "bw", _bw_pages("grey", 10, True, {2: "la", 4: "i16", 6: "rgb"}, {}), "png",
            "padded", junk=("ds_store",))
        add("s1", "ch004", "archive", "bw", _bw_pages("screentone", 10, False, {3: "bilevel"}, {}), "png", "padded",
            junk=("macosx", "thumbs"))
        add("s2", "ch001", "archive", "colour", _color_pages(25, {7: "exif8"}, {15: "not_image"}), "JPG", "padded",
            subfolder="pages", junk=("macosx", "ds_store"), deflate=True)
        add("s2", "ch002", "folder", "colour_short", _color_pages(12, {}, {}), "webp", "padded")
        add("s2", "ch003", "folder", "bw", _bw_pages("sepia", 10, True, {}, {}), "jpg", "unpadded")
        add("s2", "ch004", "archive", "bw", _bw_pages("chroma_noise", 10, False, {}, {}), "jpg", "padded",
            junk=("thumbs",))
        add("s3", "ch001", "folder", "colour", _color_pages(24, {}, {}, {20: (0, 0, 10)}), "webp", "prefixed")
        add("s3", "ch002", "archive", "bw", _bw_pages("grey", 10, False, {5: "rgb"}, {6: "truncated"}), "jpg",
            "padded", junk=("comicinfo",))
        add("s3", "ch003", "folder", "bw", _bw_pages("screentone", 10, True, {}, {}), "jpg", "padded")
        add("s3", "ch004", "folder", "bw", _bw_pages("chroma_noise", 8, True, {}, {}), "jpg", "unpadded")
        add("s3", "ch005", "archive", "bw", _bw_pages("sepia", 8, False, {}, {}), "jpg", "padded")
    elif preset == "demo":
        for s in range(4):
            series = f"s{s + 1}"
            cast_sizes[series] = 4 if s % 2 == 0 else 3
            add(series, "ch001", "folder", "colour",
                _color_pages(28, {3: "exif6", 8: "palette", 13: "cmyk", 16: "spread"}, {5 + s: "truncated"},
                              {21: (s, 0, 9)}),
                "jpg", "unpadded", junk=("thumbs",))
            add(series, "ch002", "archive", "colour",
                _color_pages(24 + 2 * s, {2: "rgba", 9: "webp", 11: "exif8"}, {12: BROKEN_KINDS[s]}),
                ("png", "JPG", "webp", "jpg")[s], "padded", subfolder="pages" if s % 2 else "", junk=_ALL_JUNK,
                deflate=s % 2 == 1)
            add(series, "ch003", "folder", "colour_short", _color_pages(10 + s, {}, {}), "jpg", "padded")
            for k in range(3):
                style = BW_STYLES[(s + k) % len(BW_STYLES)]
                ext = "png" if style in ("grey", "screentone") and k != 1 else "jpg"
                specials = {"grey": {2: "la", 4: "i16", 6: "rgb"}, "screentone": {3: "bilevel"}}.get(style, {})
                add(series, f"ch{k + 4:03d}", "archive" if k == 1 else "folder", "bw",
                    _bw_pages(style, 12, k != 1, specials, {}), ext, ("padded", "unpadded", "prefixed")[k],
                    junk=("macosx", "ds_store") if k == 1 else ())
        cross = plans[0]  # a reposted page: s4's first colour chapter re-uses a page of s1 ch001
        target = next(i for i, p in enumerate(plans) if p.series == "s4")
        pages = list(plans[target].pages)
        pages.insert(len(pages) - 2, PageSpec("colour", "dup", (cross.series_index, cross.chapter_index, 1)))
        plans[target] = _replace_pages(plans[target], tuple(pages))
    # fmt: on
    else:
        raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    return plans, cast_sizes


def _replace_pages(plan: ChapterPlan, pages: tuple[PageSpec, ...]) -> ChapterPlan:
    return ChapterPlan(**{**plan.__dict__, "pages": pages})

"""The sample corpus is the fixture of every later stage: its files must be exactly what its labels say."""

import io
import json
import os
import struct
import zipfile
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.core.sources import natural_key
from pipelines.sample_corpus import generate as sample_corpus
from pipelines.sample_corpus.files import BOMB_SIZE
from pipelines.sample_corpus.generate import generate_corpus
from pipelines.sample_corpus.labels import BROKEN_KINDS, BW_STYLES, COLOR_STYLES, LABEL_FIELDS, CorpusInfo, read_labels
from pipelines.sample_corpus.plans import PRESETS, chapter_plans

JUNK_NAMES = ("Thumbs.db", ".DS_Store", "ComicInfo.xml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> CorpusInfo:
    return generate_corpus(tmp_path_factory.mktemp("tiny") / "corpus", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> CorpusInfo:
    return generate_corpus(tmp_path_factory.mktemp("small") / "corpus", preset="small", seed=3)


@pytest.fixture(params=["tiny", "small"])
def corpus(request) -> CorpusInfo:
    return request.getfixturevalue(request.param)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def page_bytes(root: Path, label: dict) -> bytes:
    chapter = label["chapter_source"]
    member = label["source"][len(chapter) + 1 :]
    if label["kind"] == "archive":
        with zipfile.ZipFile(root / chapter) as archive:
            return archive.read(member)
    return (root / chapter / member).read_bytes()


def upright_rgb(root: Path, label: dict) -> np.ndarray:
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(page_bytes(root, label))))
    if image.mode == "I;16":
        image = Image.fromarray((np.asarray(image) // 257).astype(np.uint8))
    if image.mode in ("RGBA", "LA"):
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return np.asarray(image.convert("RGB")).astype(np.int16)


def chroma(rgb: np.ndarray) -> np.ndarray:
    return rgb.max(axis=2) - rgb.min(axis=2)


def pages(info: CorpusInfo, *styles: str) -> list[dict]:
    return [lb for lb in read_labels(info.labels_path) if lb["style"] in styles]


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, tiny):
    via_cli = tmp_path / "cli" / "corpus"
    assert sample_corpus.main(["--out", str(via_cli), "--preset", "tiny", "--seed", "0"]) == 0
    other = generate_corpus(tmp_path / "other" / "corpus", preset="tiny", seed=1)

    first, second = tree_bytes(tiny.root), tree_bytes(via_cli)
    assert first == second
    assert tiny.labels_path.read_bytes() == (via_cli.parent / "corpus_labels.jsonl").read_bytes()
    assert tiny.summary_path.read_bytes() == (via_cli.parent / "corpus_labels.summary.json").read_bytes()

    third = tree_bytes(other.root)
    assert third.keys() == first.keys()  # the preset fixes the structure, the seed the content
    assert sum(third[k] != first[k] for k in first) > len(first) // 2
    assert other.cast != tiny.cast
    assert other.labels_path.read_bytes() != tiny.labels_path.read_bytes()


def test_labels_sit_beside_the_root_and_summary_matches(corpus):
    assert corpus.labels_path.parent == corpus.root.parent
    assert corpus.root not in corpus.labels_path.parents
    assert sorted(p.name for p in corpus.root.iterdir()) == sorted({c.series for c in corpus.chapters})
    summary = json.loads(corpus.summary_path.read_text())
    assert summary == json.loads(json.dumps(corpus.to_dict(corpus.summary_path.parent)))
    assert summary["root"] == "corpus"
    labels = read_labels(corpus.labels_path)
    assert len(labels) == corpus.n_files == sum(c.n_files for c in corpus.chapters)
    assert len({lb["source"] for lb in labels}) == len(labels)
    assert all(tuple(lb) == LABEL_FIELDS for lb in labels)


def test_every_labelled_file_decodes_or_is_broken_as_labelled(corpus):
    for label in read_labels(corpus.labels_path):
        data = page_bytes(corpus.root, label)
        reason = label["broken"]
        if reason == "empty":
            assert data == b""
        elif reason == "not_image":
            with pytest.raises(UnidentifiedImageError):
                Image.open(io.BytesIO(data))
        elif reason == "truncated":
            image = Image.open(io.BytesIO(data))
            assert image.format == "JPEG"
            with pytest.raises(OSError, match="truncated"):
                image.load()
        elif reason == "decompression_bomb":
            with pytest.raises(Image.DecompressionBombError):
                Image.open(io.BytesIO(data))
        else:
            assert reason is None
            image = Image.open(io.BytesIO(data))
            assert (image.format, image.mode) == (label["format"], label["mode"]), label["source"]
            image.load()
            assert ImageOps.exif_transpose(image).size == (label["width"], label["height"])
        if reason is not None:
            assert label["is_color"] is None and label["width"] is None and label["characters"] == []
            assert label["style"] == f"broken_{reason}"


def test_oddities_are_present(corpus):
    labels = read_labels(corpus.labels_path)
    modes = {lb["mode"] for lb in labels}
    assert {"P", "RGBA", "LA", "CMYK", "I;16", "1", "L", "RGB"} <= modes
    assert {"JPEG", "PNG", "WEBP"} <= {lb["format"] for lb in labels}
    extensions = {lb["source"].rsplit(".", 1)[1] for lb in labels}
    assert {"JPG", "PNG"} & extensions and {"jpg", "png", "webp"} <= extensions
    assert {lb["broken"] for lb in labels} == {None, *BROKEN_KINDS}
    assert {lb["style"] for lb in labels} >= {*COLOR_STYLES, *BW_STYLES}
    assert any(lb["kind"] == "archive" and lb["source"].count("/") == 3 for lb in labels)  # pages in a subfolder
    assert any(lb["kind"] == "archive" and lb["source"].count("/") == 2 for lb in labels)  # flat archive


def test_exif_pages_are_stored_rotated_and_upright_matches_labels(corpus):
    exif_pages = [lb for lb in read_labels(corpus.labels_path) if lb["exif_orientation"] is not None]
    assert {lb["exif_orientation"] for lb in exif_pages} >= {6} and exif_pages
    for label in exif_pages:
        stored = Image.open(io.BytesIO(page_bytes(corpus.root, label)))
        assert stored.getexif()[0x0112] == label["exif_orientation"]
        assert stored.size == (label["height"], label["width"])  # raw pixels are sideways
        assert_panel_borders_are_ink(upright_rgb(corpus.root, label), label)


def assert_panel_borders_are_ink(rgb: np.ndarray, label: dict) -> None:
    """Each labelled panel has a black border at its box: proves boxes are in upright page coordinates."""
    grey = rgb.mean(axis=2)
    for x0, y0, x1, y1 in label["panels"]:
        top, left = grey[y0, x0 + 2 : x1 - 2], grey[y0 + 2 : y1 - 2, x0]
        bottom, right = grey[y1 - 1, x0 + 2 : x1 - 2], grey[y0 + 2 : y1 - 2, x1 - 1]
        for edge in (top, left, bottom, right):
            assert np.median(edge) < 90, (label["source"], (x0, y0, x1, y1))
        outside = grey[max(0, y0 - 3), x0 + 2 : x1 - 2]  # the gutter or margin above is paper
        if y0 >= 3:
            assert np.median(outside) > 150, label["source"]


def test_panel_borders_match_labels_on_every_page_style(corpus):
    seen = set()
    for label in read_labels(corpus.labels_path):
        if label["broken"] or label["style"] == "cover" or label["style"] in seen:
            continue
        seen.add(label["style"])
        assert_panel_borders_are_ink(upright_rgb(corpus.root, label), label)
    assert seen >= {"colour", "colour_light", "colour_muted", *BW_STYLES}


def test_page_index_is_natural_order_of_the_chapter_listing(corpus):
    by_chapter = defaultdict(list)
    for label in read_labels(corpus.labels_path):
        by_chapter[(label["chapter_source"], label["kind"])].append(label)
    lexicographic_differs = False
    for (chapter, kind), labels in by_chapter.items():
        if kind == "archive":
            with zipfile.ZipFile(corpus.root / chapter) as archive:
                listing = [n for n in archive.namelist() if not n.endswith("/")]
        else:
            listing = [str(p.relative_to(corpus.root / chapter)) for p in (corpus.root / chapter).rglob("*")]
        pages_listed = [n for n in listing if "__MACOSX" not in n and n.rsplit("/", 1)[-1] not in JUNK_NAMES]
        members = [lb["source"][len(chapter) + 1 :] for lb in sorted(labels, key=lambda lb: lb["page_index"])]
        assert sorted(pages_listed, key=natural_key) == members
        assert [lb["page_index"] for lb in labels] == list(range(len(labels)))
        lexicographic_differs |= sorted(pages_listed) != members
    assert lexicographic_differs  # some chapter has 1.jpg, 2.jpg, 10.jpg


def test_archives_and_folders_hold_unlabelled_junk(corpus):
    sources = {lb["source"] for lb in read_labels(corpus.labels_path)}
    archives_with_junk = 0
    for chapter in corpus.chapters:
        if chapter.kind == "archive":
            with zipfile.ZipFile(corpus.root / chapter.source) as archive:
                names = set(archive.namelist())
            archives_with_junk += bool(chapter.junk)
        else:
            names = {
                str(p.relative_to(corpus.root / chapter.source)) for p in (corpus.root / chapter.source).rglob("*")
            }
        assert set(chapter.junk) <= names
        assert not {f"{chapter.source}/{j}" for j in chapter.junk} & sources
    junk = {name.rsplit("/", 1)[-1] for c in corpus.chapters for name in c.junk}
    assert {"Thumbs.db", ".DS_Store"} <= junk
    assert any(name.startswith("__MACOSX/._") for c in corpus.chapters for name in c.junk)
    assert archives_with_junk >= 1


def test_bomb_is_small_on_disk_but_declares_a_huge_valid_image(corpus):
    (label,) = [lb for lb in read_labels(corpus.labels_path) if lb["broken"] == "decompression_bomb"]
    data = page_bytes(corpus.root, label)
    assert len(data) < 2_000_000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, color_type = struct.unpack(">IIBB", data[16:26])
    assert (width, height) == BOMB_SIZE and width * height > 2 * Image.MAX_IMAGE_PIXELS
    chunks, offset = {}, 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        tag, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        assert struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])[0] == zlib.crc32(tag + body)
        chunks[tag] = body
        offset += 12 + length
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
    inflater, produced, stream = zlib.decompressobj(), 0, chunks[b"IDAT"]
    while stream:
        produced += len(inflater.decompress(stream, 1 << 24))
        stream = inflater.unconsumed_tail
    assert inflater.eof and produced == height * (1 + (width * depth + 7) // 8) and color_type == 0


def test_character_boxes_lie_inside_the_page_and_a_panel(corpus):
    names = {c.name for c in corpus.cast}
    counted = 0
    for label in read_labels(corpus.labels_path):
        for character in label["characters"]:
            x0, y0, x1, y1 = character["box"]
            assert 0 <= x0 < x1 <= label["width"] and 0 <= y0 < y1 <= label["height"]
            assert any(px0 <= x0 and py0 <= y0 and x1 <= px1 and y1 <= py1 for px0, py0, px1, py1 in label["panels"]), (
                label["source"]
            )
            assert character["name"] in names
            counted += 1
        if label["broken"] is None:
            assert label["characters"], f"{label['source']} has no character"
    assert counted > corpus.n_files


def test_character_boxes_contain_the_characters_colors(corpus):
    """On lossless colour pages each box shows its character's hair or clothes colour (labels are truthful)."""
    cast = {c.name: c for c in corpus.cast}
    checked = hits = 0
    for label in pages(corpus, "colour", "cover"):
        if label["format"] != "PNG" or label["mode"] != "RGB" or label["duplicate_of"]:
            continue
        rgb = upright_rgb(corpus.root, label)
        for character in label["characters"]:
            x0, y0, x1, y1 = character["box"]
            crop = rgb[y0:y1, x0:x1].reshape(-1, 3)
            member = cast[character["name"]]
            found = [np.abs(crop - np.array(c)).max(axis=1).min() <= 3 for c in (member.hair, member.clothes)]
            checked += 1
            hits += any(found)
    assert checked >= 20
    assert hits >= 0.95 * checked


def test_color_pages_have_chroma(corpus):
    for label in pages(corpus, *COLOR_STYLES):
        c = chroma(upright_rgb(corpus.root, label))
        if label["style"] in ("colour", "cover"):
            assert (c > 60).mean() > 0.02, label["source"]
        elif label["style"] == "colour_light":  # mostly white and grey line art, small but clear colour areas
            assert 0.001 < (c > 60).mean() < 0.15 and (c < 20).mean() > 0.85, label["source"]
        else:  # colour_muted: low saturation, yet a visible amount of colour
            assert np.percentile(c, 99) > 25 and (c > 100).mean() < 0.03, label["source"]


def test_bw_pages_stored_as_rgb_look_grey(corpus):
    checked = 0
    for label in pages(corpus, *BW_STYLES):
        rgb = upright_rgb(corpus.root, label)
        c = chroma(rgb)
        if label["mode"] != "RGB":
            assert c.max() == 0
            continue
        checked += 1
        if label["style"] == "sepia":  # one warm tint: red >= green >= blue everywhere, no other hue
            r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
            assert ((r >= g - 6) & (g >= b - 6)).mean() > 0.99, label["source"]
            assert (c > 20).mean() > 0.5, label["source"]  # the tint is really there (a hard negative)
        elif label["style"] == "chroma_noise":  # thin colour fringes, no colour areas
            assert c.mean() < 8 and np.percentile(c, 99) < 45 and c.max() > 10, label["source"]
        else:  # grey saved as RGB
            assert c.max() <= 12, label["source"]
    assert checked >= 5


def test_chapter_summary_covers_kept_and_dropped_chapters(corpus):
    contents = defaultdict(list)
    for chapter in corpus.chapters:
        contents[chapter.content].append(chapter)
        assert chapter.n_color + chapter.n_bw + chapter.n_broken == chapter.n_files
    assert all(c.n_color >= 24 for c in contents["colour"]) and contents["colour"]
    assert all(0 < c.n_color < 21 and c.n_bw == 0 for c in contents["colour_short"]) and contents["colour_short"]
    assert all(c.n_color == int(c.has_cover) and c.n_bw > 0 for c in contents["bw"])
    assert {c.bw_style for c in contents["bw"]} == set(BW_STYLES)
    assert any(c.has_cover for c in contents["bw"])
    assert set(corpus.chapter_sources(min_color_pages=21)) == {c.source for c in contents["colour"]}
    assert {"folder", "archive"} == {c.kind for c in corpus.chapters}
    assert sum(corpus.counts_by_style.values()) == corpus.n_files


def test_small_preset_has_spreads_and_near_duplicates(small):
    labels = read_labels(small.labels_path)
    by_source = {lb["source"]: lb for lb in labels}
    assert 150 <= len(labels) <= 250 and small.page_size == (384, 544)
    assert any(lb["width"] == 2 * small.page_size[0] for lb in labels if lb["width"])
    duplicates = [lb for lb in labels if lb["duplicate_of"]]
    assert {lb["series"] != by_source[lb["duplicate_of"]]["series"] for lb in duplicates} == {True, False}
    for duplicate in duplicates:
        original = by_source[duplicate["duplicate_of"]]
        assert duplicate["characters"] == original["characters"]
        a, b = upright_rgb(small.root, duplicate), upright_rgb(small.root, original)
        difference = np.abs(a - b).mean()
        assert 2 < difference < 25  # the same page re-released, not a byte copy


def test_every_preset_plan_is_consistent():
    for preset in PRESETS:
        plans, cast_sizes = chapter_plans(preset)
        by_key = {(p.series_index, p.chapter_index): p for p in plans}
        assert set(cast_sizes) == {p.series for p in plans}
        for plan in plans:
            for spec in plan.pages:
                if spec.dup_of is not None:
                    series_index, chapter_index, position = spec.dup_of
                    target = by_key[(series_index, chapter_index)].pages[position]
                    assert target.variant not in ("dup", "spread") and not target.style.startswith("broken_")
        broken = {spec.style for p in plans for spec in p.pages if spec.style.startswith("broken_")}
        assert broken == {f"broken_{kind}" for kind in BROKEN_KINDS}, preset


def test_scale_changes_page_size(tmp_path):
    info = generate_corpus(tmp_path / "corpus", preset="tiny", scale=0.5)
    assert info.page_size == (128, 192)
    label = next(lb for lb in read_labels(info.labels_path) if lb["style"] == "colour")
    assert (label["width"], label["height"]) == (128, 192)


def test_existing_roots_are_protected(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_corpus(root, preset="tiny")
    with pytest.raises(FileExistsError, match="no labels file"):
        generate_corpus(root, preset="tiny", overwrite=True)
    assert (root / "precious.txt").exists()
    with pytest.raises(ValueError, match="outside the corpus root"):
        generate_corpus(tmp_path / "other", preset="tiny", labels=tmp_path / "other" / "labels.jsonl")
    with pytest.raises(ValueError, match="unknown preset"):
        generate_corpus(tmp_path / "other", preset="huge")


def test_overwrite_replaces_a_generated_corpus_and_sweeps_a_killed_run(tmp_path, tiny):
    root = tmp_path / "corpus"
    generate_corpus(root, preset="tiny", seed=5)
    (tmp_path / ".corpus.partial").mkdir()  # what a killed run leaves behind
    (tmp_path / ".corpus.partial" / "half.jpg").write_bytes(b"\xff\xd8")
    info = generate_corpus(root, preset="tiny", seed=0, overwrite=True)
    assert tree_bytes(info.root) == tree_bytes(tiny.root)
    assert info.labels_path.read_bytes() == tiny.labels_path.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["corpus", "corpus_labels.jsonl", "corpus_labels.summary.json"]

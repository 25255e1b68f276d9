"""Every table the pipelines write, in one place: the single source of truth for column names.

Each schema is a `pyarrow.Schema`; column-name constants are derived from it so a rename happens here only.
docs/reference/schemas.md documents the same tables for users: its schema section is `markdown()`.
"""

from __future__ import annotations

import pyarrow as pa

# Status values shared by every per-item table: an item is either processed or recorded with its reason.
STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_EXCLUDED = "excluded"  # usable, but left out by a documented rule (e.g. a retrieval pool too small)

# Features the colour classifier computes per page. Stored so thresholds can be re-cut without decoding again.
COLOR_FEATURE_FIELDS: list[pa.Field] = [
    pa.field("chromatic_fraction", pa.float32()),  # share of non-dark pixels in solid areas of clear colour
    pa.field("raw_chromatic_fraction", pa.float32()),  # the same before erosion (fringes and noise included)
    pa.field("vivid_fraction", pa.float32()),  # share of non-dark pixels in solid areas of vivid colour (chroma >= 30)
    pa.field("chroma_p99", pa.float32()),  # 99th percentile of paper-corrected chroma of non-dark pixels (Lab)
    pa.field("chroma_p90", pa.float32()),
    pa.field("hue_spread", pa.float32()),  # circular variance of the hues of chromatic areas (0..1)
    pa.field("secondary_hue_share", pa.float32()),  # chromatic pixels outside the densest 60-degree hue arc
    pa.field("hue_bins", pa.int16()),  # 30-degree hue sectors holding >= 5% of the chromatic pixels
    pa.field("tint_a", pa.float32()),  # paper tint: Lab a*, b* of the median colour of the brightest pixels
    pa.field("tint_b", pa.float32()),
    pa.field("dark_fraction", pa.float32()),  # pixels ignored as too dark to carry hue
    pa.field("analysed_pixels", pa.int32()),  # pixels of the reduced decode the features come from
]

PAGES = pa.schema(
    [
        pa.field("page_id", pa.string(), nullable=False),  # sha1 of "<source>", 16 hex chars: stable across runs
        pa.field("chapter_id", pa.string(), nullable=False),
        pa.field("series", pa.string(), nullable=False),
        pa.field("chapter", pa.string(), nullable=False),
        pa.field("page_index", pa.int32(), nullable=False),  # natural order within the chapter, from 0
        pa.field("source", pa.string(), nullable=False),  # relative to the input root; archive members as a/b.cbz/m
        pa.field("file_bytes", pa.int64()),
        pa.field("format", pa.string()),  # decoder's format name (JPEG, PNG, WEBP, ...)
        pa.field("mode", pa.string()),  # mode as stored, before normalisation
        pa.field("width", pa.int32()),  # after EXIF orientation
        pa.field("height", pa.int32()),
        pa.field("is_color", pa.bool_()),  # null on error
        pa.field("color_score", pa.float32()),
        *COLOR_FEATURE_FIELDS,
        pa.field("stored", pa.bool_(), nullable=False),  # written to the page store
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)

CHAPTERS = pa.schema(
    [
        pa.field("chapter_id", pa.string(), nullable=False),
        pa.field("series", pa.string(), nullable=False),
        pa.field("chapter", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # folder or archive, relative to the input root
        pa.field("kind", pa.string(), nullable=False),  # "folder" | "archive"
        pa.field("n_pages", pa.int32(), nullable=False),
        pa.field("n_color", pa.int32(), nullable=False),
        pa.field("n_bw", pa.int32(), nullable=False),
        pa.field("n_error", pa.int32(), nullable=False),
        pa.field("kept", pa.bool_(), nullable=False),  # its colour pages become training frames
        pa.field("reason", pa.string()),  # why not kept; null when kept
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)

# The manifest lists chapters before any page is decoded: the unit of work of every stage.
MANIFEST = pa.schema(
    [
        pa.field("chapter_id", pa.string(), nullable=False),
        pa.field("series", pa.string(), nullable=False),
        pa.field("chapter", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
    ]
)

# Page store: normalised colour frames, written once so later stages never decode the raw dump again.
PAGE_STORE = pa.schema(
    [
        pa.field("page_id", pa.string(), nullable=False),
        pa.field("chapter_id", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("encoding", pa.string(), nullable=False),  # "jpeg" | "png" | "webp"
        pa.field("image", pa.binary(), nullable=False),
    ]
)

# Retrieval: patch indices 0..3 are the quadrant crops TL, TR, BL, BR; 4 is the whole page (references only).
QUERY_PATCHES = 4
REF_PATCHES = 5

EMBEDDINGS = pa.schema(
    [
        pa.field("page_id", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),  # "query" (B&W crop) | "ref" (colour crop)
        pa.field("patch", pa.int8(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),  # row of the vector in the companion .npy matrix
    ]
)

# Per chapter, beside the embeddings: every stored page once, so a rerun embeds only new or changed pages and
# the pool stage finds near-duplicates without decoding pages again.
EMBEDDED_PAGES = pa.schema(
    [
        pa.field("page_id", pa.string(), nullable=False),
        pa.field("chapter_id", pa.string(), nullable=False),
        pa.field("image_sha1", pa.string(), nullable=False),  # of the stored bytes: changed bytes are re-embedded
        pa.field("hashes", pa.list_(pa.binary()), nullable=False),  # edge hashes (pipelines.core.pools.page_hashes)
        pa.field("status", pa.string(), nullable=False),  # "error": undecodable page, no vectors, never in a pool
        pa.field("error", pa.string()),
    ]
)

POOLS = pa.schema(
    [
        pa.field("frame_id", pa.string(), nullable=False),
        pa.field("chapter_id", pa.string(), nullable=False),
        pa.field("ref_page_ids", pa.list_(pa.string()), nullable=False),
        pa.field("n_candidates", pa.int32(), nullable=False),  # colour pages of the chapter other than the frame
        pa.field("excluded_near_duplicates", pa.list_(pa.string()), nullable=False),
        pa.field("short", pa.bool_(), nullable=False),  # fewer candidates than --refs: see the README's rule
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)

RETRIEVALS = pa.schema(
    [
        pa.field("frame_id", pa.string(), nullable=False),
        pa.field("chapter_id", pa.string(), nullable=False),
        pa.field("query_patch", pa.int8(), nullable=False),  # 0..3 = TL, TR, BL, BR
        pa.field("rank", pa.int8(), nullable=False),  # 0 = best
        pa.field("ref_page_id", pa.string(), nullable=False),
        pa.field("ref_patch", pa.int8(), nullable=False),  # 0..3 quadrants, 4 whole page
        pa.field("score", pa.float32(), nullable=False),  # cosine similarity
    ]
)

SCREENTONE = pa.schema(
    [
        pa.field("frame_id", pa.string(), nullable=False),
        pa.field("chapter_id", pa.string(), nullable=False),
        pa.field("width", pa.int32()),  # its size (tone is rendered at it, never resampled afterwards)
        pa.field("height", pa.int32()),
        # tone: "train" (W x H) | "hires" (GSRP size); line art: "sketch" | "shading" (W x H) | "hires_sketch"
        pa.field("variant", pa.string(), nullable=False),
        pa.field("renderer", pa.string(), nullable=False),  # the renderer id; the line extractor's for line art
        pa.field("image", pa.binary()),  # lossless PNG, mode L
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)

SPLITS = pa.schema(
    [
        pa.field("series", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # "train" | "val" | "bench"
        pa.field("reason", pa.string(), nullable=False),  # the rule that decided it (hash, held out, guarantee)
    ]
)

SHARD_INDEX = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # WebDataset __key__: the frame id, dot-free
        pa.field("frame_id", pa.string(), nullable=False),
        pa.field("series", pa.string(), nullable=False),
        pa.field("chapter_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),  # sample number inside the tar (wids' index order)
        pa.field("offset", pa.int64(), nullable=False),  # byte offset of the sample's first member header in the tar
        pa.field("nbytes", pa.int64(), nullable=False),  # bytes from that header to the end of its last member
    ]
)

# The shard plan: which frame goes to which shard, fixed before any shard is written (so reruns match).
SHARD_PLAN = pa.schema(
    [
        pa.field("frame_id", pa.string(), nullable=False),
        pa.field("series", pa.string(), nullable=False),
        pa.field("chapter_id", pa.string(), nullable=False),
        pa.field("chapter", pa.string(), nullable=False),
        pa.field("page_index", pa.int32(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),  # planned order inside the shard
    ]
)

# Frames a shard could not turn into a sample (missing screentone, incomplete retrieval, unreadable page...).
SAMPLE_ERRORS = pa.schema(
    [
        pa.field("frame_id", pa.string(), nullable=False),
        pa.field("series", pa.string(), nullable=False),
        pa.field("chapter_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
    ]
)

DUPLICATES = pa.schema(
    [
        pa.field("page_id", pa.string(), nullable=False),  # the held-out (bench or val) page
        pa.field("split", pa.string(), nullable=False),
        pa.field("series", pa.string(), nullable=False),
        pa.field("train_page_id", pa.string(), nullable=False),
        pa.field("train_series", pa.string(), nullable=False),
        pa.field("train_chapter_id", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # cosine similarity of the whole-page embeddings
        pa.field("hash_distance", pa.float32()),  # edge-hash distance (pipelines.core.pools); null when not checked
        pa.field("duplicate", pa.bool_(), nullable=False),  # False: a candidate the edge-hash check rejected
    ]
)


LEAKAGE_STATE_PAGES = pa.schema(
    [
        pa.field("page_id", pa.string(), nullable=False),
        pa.field("chapter_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # the split it was searched as (train, val, bench)
        pa.field("version", pa.string(), nullable=False),  # its chapter's embeddings version when it was read
        pa.field("segment", pa.int32(), nullable=False),  # the vectors file of the state that holds its vector
        pa.field("row", pa.int64(), nullable=False),  # its row in that file
    ]
)


LEDGER = pa.schema(
    [
        pa.field("chapter_id", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),  # the versions the chapter's output depends on, joined
        pa.field("record", pa.string(), nullable=False),  # JSON: what the chapter's task returned (counts, parts)
    ]
)


# The shard stage's snapshot of the columns it plans from (`pipelines.shards.inputs`) keeps, beside each row of a
# table's columns, the sha256 of the part it was read from: a rerun reads only the parts whose sha256 changed.
SNAPSHOT_SHA256 = "part_sha256"


def names(schema: pa.Schema) -> list[str]:
    """Column names of a schema, in order."""
    return list(schema.names)


def empty(schema: pa.Schema) -> pa.Table:
    """A zero-row table with the schema, so an empty stage still writes a readable file."""
    return schema.empty_table()


def table_from_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table from row dicts, failing loudly on unknown columns (typos never pass silently)."""
    known = set(schema.names)
    for row in rows:
        unknown = set(row) - known
        if unknown:
            raise KeyError(f"columns {sorted(unknown)} are not in the schema ({sorted(known)})")
    return pa.Table.from_pylist(rows, schema=schema)


TABLES: dict[str, pa.Schema] = {
    "manifest": MANIFEST,
    "pages": PAGES,
    "chapters": CHAPTERS,
    "page store": PAGE_STORE,
    "embeddings ids": EMBEDDINGS,
    "embedded pages": EMBEDDED_PAGES,
    "pools": POOLS,
    "retrievals": RETRIEVALS,
    "screentone": SCREENTONE,
    "splits": SPLITS,
    "shard plan": SHARD_PLAN,
    "shard index": SHARD_INDEX,
    "sample errors": SAMPLE_ERRORS,
    "duplicates": DUPLICATES,
    "leakage state pages": LEAKAGE_STATE_PAGES,
    "chapter ledger": LEDGER,
}


# tables stored as Parquet datasets under the data folder: a folder of one part per chapter (pipelines.core.layout)
DATASET_FOLDERS: dict[str, str] = {
    "pages": "pages.parquet",
    "chapters": "chapters.parquet",
    "pools": "pools.parquet",
    "retrievals": "retrievals.parquet",
}


def markdown() -> str:
    """The schema section of docs/reference/schemas.md, generated so docs and code cannot drift
    (tests/test_docs.py compares them); `python -m pipelines.core.schemas` prints it."""
    lines: list[str] = []
    for name, schema in TABLES.items():
        lines += [f"#### {name}", ""]
        if name in DATASET_FOLDERS:
            folder = DATASET_FOLDERS[name]
            lines += [f"A Parquet dataset: `OUT/{folder}/<chapter_id>.parquet`, one part per chapter.", ""]
        lines += ["| column | type | nullable |", "| --- | --- | --- |"]
        lines += [f"| `{f.name}` | `{f.type}` | {'yes' if f.nullable else 'no'} |" for f in schema]
        lines.append("")
    return "\n".join(lines)


SCHEMAS_DOC = "docs/reference/schemas.md"


def update_docs(path: str = SCHEMAS_DOC) -> None:
    """Replace the schema section (between its markers) of the markdown file at `path` with the current schemas
    (``python -m pipelines.core.schemas --docs``; without the flag the section is printed)."""
    from pathlib import Path

    start, end = "<!-- schemas:start -->", "<!-- schemas:end -->"
    text = Path(path).read_text()
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    Path(path).write_text(f"{head}{start}\n{markdown().strip()}\n{end}{tail}")


if __name__ == "__main__":
    import sys

    if "--docs" in sys.argv:
        update_docs()
    else:
        print(markdown())

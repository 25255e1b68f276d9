"""Records the order of `os.fsync` calls (the one standard call a test wraps) and checks the durability rule:
every file a completion marker declares done, and the folder entry that names it, reach the disk before the
marker does."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from pipelines.core.storage import MARKER_SUFFIX

_TMP = re.compile(r"/\.?([^/]*?)\.tmp-[^/]*")  # /dir/[.]name.tmp-<pid>-<id> (a temporary, hidden or not) -> /dir/name


@contextlib.contextmanager
def record_fsyncs() -> Iterator[list[str]]:
    """Final path (temporary names mapped to the name they are renamed to) of each fsync, in call order."""
    events: list[str] = []
    original = os.fsync

    def spy(fd: int) -> None:
        events.append(_TMP.sub(r"/\1", os.readlink(f"/proc/self/fd/{fd}")))
        original(fd)

    os.fsync = spy
    try:
        yield events
    finally:
        os.fsync = original


def check_markers_follow_their_data(events: list[str], root: Path, *, expect: int) -> int:
    """For each marker `X.done.json` under root: every file of X's unit (X itself, the files of folder X, and
    files sharing X's stem, e.g. a shard's index or a chapter's page-store part) was fsynced before the marker,
    and so was its folder, after it. Returns the number of markers checked (at least `expect`)."""
    root = root.resolve()
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(MARKER_SUFFIX) and ".tmp-" not in str(p)]
    markers = sorted(root.rglob(f"*{MARKER_SUFFIX}"))
    for marker in markers:
        unit = marker.with_name(marker.name.removesuffix(MARKER_SUFFIX))
        stem = unit.name.split(".")[0]
        related = [f for f in files if f.name.split(".")[0] == stem or unit in f.parents]
        assert related, f"{marker}: no data files found for it"
        marker_at = max(i for i, path in enumerate(events) if path == str(marker))
        for data in related:
            synced = [i for i, path in enumerate(events[:marker_at]) if path == str(data)]
            assert synced, f"{data} was not fsynced before its marker {marker.name}"
            folder = str(unit.parent if unit in data.parents else data.parent)
            assert str(folder) in events[synced[-1] : marker_at], (
                f"{folder} not fsynced after {data.name}, before marker"
            )
    assert len(markers) >= expect, f"only {len(markers)} markers under {root}"
    return len(markers)

"""Checks a job makes before it starts Ray or writes anything, so a mistake costs a second and one line.

Each check raises `PreconditionError` with one line saying what is wrong, where, and what to do. The jobs call
them first (input root and layout, output folder, the previous stage's summary, the encoder's weights) and
`created_folder` removes an output folder a failed run created and left empty.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.core.errors import PreconditionError
from pipelines.core.layout import DataLayout

if TYPE_CHECKING:
    from pipelines.core.sources import ChapterEntry

STAGE_JOBS = {
    "ingest": "python -m jobs.ingest --input ROOT --output OUT",
    "retrieval": "python -m jobs.retrieval --data OUT",
    "screentone": "python -m jobs.screentone --data OUT",
    "shards": "python -m jobs.shards --data OUT",
}


def check_input_root(uri: str | os.PathLike) -> str:
    """The input root as workers should see it (absolute local path, or the URI); it must be a folder."""
    text = os.fspath(uri)
    if "://" not in text:
        path = Path(text).expanduser()
        if not path.exists():
            raise PreconditionError(f"--input {text}: no such folder")
        if not path.is_dir():
            raise PreconditionError(f"--input {text}: is a file, expected the folder holding <series>/<chapter>")
        return str(path.absolute())
    from pipelines.core.sources import InputRoot

    try:
        InputRoot(text)
    except NotADirectoryError:
        raise PreconditionError(f"--input {text}: not a folder on that filesystem") from None
    except (ImportError, ValueError) as exc:
        raise PreconditionError(f"--input {text}: cannot open this URI: {exc}") from None
    return text


def check_chapters(input_root: str) -> list[ChapterEntry]:
    """The chapters under the input root (`sources.list_chapters`, returned so the caller does not list them
    again); refuses an input with none in the expected layout (see `sources.layout_problem`)."""
    from pipelines.core.sources import layout_problem, list_chapters

    chapters = list_chapters(input_root)
    if not chapters:
        raise PreconditionError(f"--input {input_root}: {layout_problem(input_root)}")
    return chapters


def check_output_creatable(path: str | os.PathLike, flag: str = "--output") -> Path:
    """The output folder exists as a folder, or can be created (its nearest existing parent is a writable folder)."""
    output = Path(path).expanduser().absolute()
    if output.exists():
        if not output.is_dir():
            raise PreconditionError(f"{flag} {path}: is a file, expected a folder (existing or to create)")
        if not os.access(output, os.W_OK | os.X_OK):
            raise PreconditionError(f"{flag} {path}: folder is not writable")
        return output
    parent = output.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PreconditionError(f"{flag} {path}: cannot create it, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PreconditionError(f"{flag} {path}: cannot create it, {parent} is not writable")
    return output


def check_data_folder(data: str | os.PathLike) -> DataLayout:
    path = Path(data).expanduser()
    if not path.exists():
        raise PreconditionError(f"--data {data}: no such folder; run {STAGE_JOBS['ingest']} first")
    if not path.is_dir():
        raise PreconditionError(f"--data {data}: is a file, expected the data folder OUT of the ingestion job")
    return DataLayout.at(path.absolute())


def require_stage(data: str | os.PathLike, stage: str, *, needed_by: str) -> None:
    """The stage's summary (its completion marker) must exist and say complete."""
    from pipelines.core.storage import read_json

    layout = check_data_folder(data)
    summary = layout.summary(stage)
    command = "run " + STAGE_JOBS[stage].replace("OUT", str(data))  # the command that makes it
    if not summary.exists():
        raise PreconditionError(f"{needed_by} needs a finished {stage} stage in {data} (no {summary.name}): {command}")
    try:
        complete = read_json(summary).get("complete") is True
    except (OSError, ValueError) as exc:
        raise PreconditionError(f"{summary}: unreadable stage summary ({exc}); {command}") from None
    if not complete:
        raise PreconditionError(
            f"{needed_by} needs a complete {stage} stage in {data} ({summary.name} reports failed units): {command}"
        )


def check_encoder(spec: str) -> None:
    """The encoder spec resolves and its weights are on this machine (or downloadable), before any actor starts."""
    from pipelines.core.encoders import EncoderWeightsMissing, ensure_encoder_weights, resolve_encoder

    try:
        ensure_encoder_weights(resolve_encoder(spec))
    except EncoderWeightsMissing as exc:
        raise PreconditionError(str(exc)) from None
    except (ValueError, FileNotFoundError) as exc:
        raise PreconditionError(f"--encoder {spec}: {exc}") from None


@contextlib.contextmanager
def created_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Create `path` (and missing parents) for the block; if the block fails, remove the folders it created that
    are still empty, so a failed first run leaves no empty output folder behind."""
    folder = Path(path).absolute()
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for created in missing:  # deepest first
            with contextlib.suppress(OSError):
                created.rmdir()  # only succeeds when empty
        raise

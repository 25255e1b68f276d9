"""Checks of a training run's inputs that need no model: they run before any model loads, so a wrong path, size or
base folder costs a second, not a minute of loading, and its one line names what is wrong."""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.core.cli import JobArgumentParser
from pipelines.core.errors import UsageError


class TrainerArgumentParser(JobArgumentParser):
    """The trainers' parser: `JobArgumentParser` plus arguments files. ``@configs/icp/paper.args`` on the command
    line (also under ``accelerate launch``) reads the file's arguments in its place, shell-split, ``#`` comments
    allowed, several per line; arguments after it override the file's (argparse keeps the last value)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("fromfile_prefix_chars", "@")
        super().__init__(*args, **kwargs)

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        return shlex.split(arg_line, comments=True)


def add_icp_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """How both ICP trainers (SD1.5 and PixArt) draw their samples from the shards: tone weights, crops, mixing."""
    parser.add_argument(
        "--alpha_range", type=pair_arg(float), default=(0.0, 1.0), help="screenstyle tone weight LOW,HIGH"
    )
    parser.add_argument(
        "--crop_scale", type=pair_arg(float), default=(1.25, 2.0), help="crop side / frame side LOW,HIGH"
    )
    parser.add_argument(
        "--crop_aspect", type=pair_arg(float), default=(1.0, 1.0), help="crop aspect / frame's LOW,HIGH"
    )
    parser.add_argument("--shuffle_shards", type=int, default=16, help="shards mixed per group (0: all)")
    parser.add_argument("--dataloader_num_workers", type=int, default=2, help="DataLoader workers per process")


def add_safety_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags both trainers share for damaged inputs and a shared output folder."""
    parser.add_argument(
        "--max_bad_fraction",
        type=float,
        default=0.01,
        help="stop when more than this fraction of the samples read (and more than one) had to be skipped",
    )
    parser.add_argument(
        "--verify_shards", action="store_true", help="also check every shard's sha256 against its manifest"
    )
    parser.add_argument(
        "--skip_unreadable_checkpoints",
        action="store_true",
        help="with --resume_from_checkpoint latest: resume from the newest readable checkpoint (steps after it are "
        "lost) instead of stopping at an unreadable one",
    )
    parser.add_argument(
        "--force_unlock",
        "--force-unlock",
        action="store_true",
        help="take over --output_dir even though its lock names a run that may still be alive",
    )


def looks_like_path(value: str) -> bool:
    """A local path rather than a hub id ('name' or 'namespace/name'): absolute, relative with a dot or tilde, or
    with more than one separator."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value


def check_base_model(value: str, subfolders: Sequence[str], flag: str = "--pretrained_model_name_or_path") -> None:
    """A local base model must be a diffusers pipeline folder with the subfolders this trainer loads; a value that
    is no path and names no folder is left to the hub."""
    path = Path(value).expanduser()
    if not path.exists() and not looks_like_path(value):
        return
    if not path.is_dir():
        raise UsageError(f"{flag} {value}: no such folder (a local diffusers Stable Diffusion 1.5 folder is needed)")
    missing = [name for name in ("model_index.json", *subfolders) if not (path / name).exists()]
    if missing:
        raise UsageError(f"{flag} {value}: not a diffusers Stable Diffusion folder: it has no {', '.join(missing)}")


def check_vae_folder(value: str) -> None:
    path = Path(value).expanduser()
    if not (path / "config.json").is_file():
        raise UsageError(f"--vae {value}: not a diffusers AutoencoderKL folder (no config.json)")


def vae_factor(vae_folder: Path) -> int | None:
    """The VAE's downsampling factor from its config.json (None when it cannot be read without loading)."""
    try:
        channels = json.loads((vae_folder / "config.json").read_text())["block_out_channels"]
    except (OSError, ValueError, KeyError):
        return None
    return 2 ** (len(channels) - 1)


def check_resolution(
    resolution: tuple[int, int] | None, frame_sizes: Sequence[tuple[int, int]], factor: int | None, where: str
) -> None:
    """A training size must fit the data (at most the largest frame size) and the VAE (multiples of its factor)."""
    if resolution is None:
        return
    width, height = resolution
    if factor and (width % factor or height % factor):
        raise UsageError(f"--resolution {width}x{height}: must be multiples of the VAE's factor {factor}")
    if frame_sizes:
        largest = max(frame_sizes, key=lambda size: size[0] * size[1])
        if width > largest[0] or height > largest[1]:
            raise UsageError(
                f"--resolution {width}x{height} is larger than the data's frames ({largest[0]}x{largest[1]}, {where}): "
                f"training would only upscale them; use at most {largest[0]}x{largest[1]}"
            )


def pair_arg(kind: type) -> Any:
    """An argparse type for LOW,HIGH: a pair of `kind` values."""

    def parse(text: str) -> tuple:
        parts = text.split(",")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH")
        return tuple(kind(p) for p in parts)

    return parse

"""Reading state-dict files and comparing their keys and shapes, for the strict loaders of released layouts."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file or a torch pickle (.bin/.pt/.pth; tensors only, no code is run)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def read_tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a .safetensors file (header only) or a torch pickle (memory-mapped when possible)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: tuple(value.shape) for key, value in state.items()}


def compare_state_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise ValueError naming the first missing, the first unexpected and the first mis-shaped key (if any)."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    misshaped = [key for key in expected if key in found and tuple(found[key]) != tuple(expected[key])]
    problems = []
    if missing:
        problems.append(f"missing key {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        problems.append(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    if misshaped:
        key = misshaped[0]
        problems.append(
            f"key {key!r} has shape {tuple(found[key])}, expected {tuple(expected[key])} ({len(misshaped)} mis-shaped)"
        )
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.default)?\.weight$")


def read_lora_tensors(path: Path, prefixes: Sequence[str], model_name: str) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors keyed `<module>.lora_A.weight` / `.lora_B.weight`, whatever accepted spelling it uses:
    with or without peft's `.default` adapter name, optionally under one of `prefixes`. Any other key is an error
    naming it (a non-strict load would silently load nothing), and so is a file with no LoRA tensor."""
    normalised: dict[str, torch.Tensor] = {}
    for key, value in read_state_dict(path).items():
        name = key
        for prefix in prefixes:
            name = name.removeprefix(prefix)
        match = LORA_KEY.match(name)
        if match is None:
            raise ValueError(f"{path}: unexpected key {key!r} (not a LoRA A/B weight of a {model_name} module)")
        canonical = f"{match['module']}.lora_{match['side']}.weight"
        if canonical in normalised:
            raise ValueError(f"{path}: key {key!r} duplicates another spelling of {canonical!r}")
        normalised[canonical] = value
    if not normalised:
        raise ValueError(f"{path}: no LoRA tensors")
    return normalised

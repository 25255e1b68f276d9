"""What makes a training run reproducible across kills and ranks: every micro-batch's random generator is a pure
function of (seed, step, micro-batch, rank), and a digest of the trainable weights shows the ranks agree."""

from __future__ import annotations

import hashlib

import torch


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch: a pure function of (seed, step, micro-batch, rank)."""
    digest = hashlib.sha256(f"icp-step\x1f{seed}\x1f{step}\x1f{micro}\x1f{rank}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def trainable_digest(model: torch.nn.Module) -> str:
    """sha256 of the trainable parameters in name order: equal on every rank when gradients are synchronised."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode() + parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()

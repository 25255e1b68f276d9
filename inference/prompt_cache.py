"""Prompt embeddings computed once and cached beside the weights, so a run without classifier-free guidance
(guidance scale 1: one UNet pass per step, the released pipeline cannot run it) never loads its text encoder.

One file per (text encoder, prompt): ``<folder>/<key>.safetensors`` holding the tensor ``embeds`` (1 x tokens x
width, float32) and string metadata: ``format`` (`CACHE_FORMAT`), ``version``, ``prompt``, ``text_encoder`` (the
kind, e.g. "clip" for SD1.5's CLIP text model) and ``encoder_token`` (the name, size and modification time of the
encoder's and tokenizer's files). The key is a hash of kind, token and prompt, so another encoder or prompt never
reads a stale file. The default folder is ``prompt_embeds/`` inside the ICP weights folder (`--prompt-cache`
chooses another); its files are not part of the weights' identity.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipelines.core.storage import atomic_path, stable_hash

log = logging.getLogger(__name__)

CACHE_FORMAT = "colorflow-prompt-embeds"
CACHE_VERSION = "1"
PROMPT_CACHE_FOLDER = "prompt_embeds"


def prompt_cache_path(folder: str | Path, kind: str, encoder_token: str, prompt: str) -> Path:
    """Where the embedding of `prompt` by the text encoder named (`kind`, `encoder_token`) is cached."""
    return Path(folder) / f"{stable_hash([CACHE_FORMAT, CACHE_VERSION, kind, encoder_token, prompt], 20)}.safetensors"


def load_prompt_embeds(path: str | Path) -> torch.Tensor | None:
    """The cached embedding, or None when there is none (or it is not a cache file of this format)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
                return None
            return handle.get_tensor("embeds")
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: recompute it
        log.warning("%s: unreadable prompt cache (%s); recomputing it", path, exc)
        return None


def save_prompt_embeds(path: str | Path, embeds: torch.Tensor, *, prompt: str, kind: str, encoder_token: str) -> bool:
    """Write the cache file atomically; False (with a warning) when the folder is not writable."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "prompt": prompt,
        "text_encoder": kind,
        "encoder_token": encoder_token,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"embeds": embeds.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
    except OSError as exc:
        log.warning("%s: cannot write the prompt cache (%s); the text encoder will load on every run", path, exc)
        return False
    return True

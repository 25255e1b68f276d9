"""Cached text embeddings: a prompt and its negative (usually empty) prompt, encoded once, so the text encoder (T5-XXL
for PixArt, 4.8 B parameters; CLIP for SD1.5) is never loaded at training or sampling time.

File format (model-agnostic), two files side by side:

    <name>.safetensors   prompt_embeds (1, L, D), prompt_attention_mask (1, L) int64,
                         negative_prompt_embeds (1, L, D), negative_prompt_attention_mask (1, L)
    <name>.json          {"format": "colorflow-text-cache", "format_version": 1, "text_encoder": <folder or hub id>,
                          "text_encoder_class": ..., "prompt": ..., "negative_prompt": ..., "max_length": L,
                          "dtype": "float32", "embedding_dim": D, "attention_mask_used": bool,
                          "safetensors_sha256": ...}

Embeddings are the encoder's last hidden states over `max_length` padded tokens (120 for PixArt's T5, 77 for CLIP),
exactly as the pipelines encode them (the T5 encoder sees the attention mask, CLIP does not). The masks are stored
in both cases (CLIP's mask says which tokens are text; SD1.5 ignores it). The loader checks the sidecar's format,
the file's checksum and the shapes, and names the file on any mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.core.storage import atomic_path, atomic_write_json

TEXT_CACHE_FORMAT = "colorflow-text-cache"
TEXT_CACHE_VERSION = 1
TENSOR_NAMES = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MASKED_ENCODERS = ("t5", "umt5", "mt5")  # encoders whose pipelines pass the attention mask
T5_MAX_LENGTH = 120  # PixArt-alpha's max_sequence_length


@dataclass(frozen=True)
class TextCache:
    """Prompt and negative-prompt embeddings (1, L, D) with their (1, L) masks, and what made them."""

    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    negative_prompt_attention_mask: torch.Tensor
    meta: dict[str, Any]

    def to(self, device: torch.device | str) -> TextCache:
        """The same cache with its tensors on `device`."""
        tensors = {name: getattr(self, name).to(device) for name in TENSOR_NAMES}
        return TextCache(**tensors, meta=self.meta)

    def for_batch(self, batch: int, negative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds, mask) repeated to `batch` rows: the prompt's, or the negative prompt's."""
        embeds, mask = (
            (self.negative_prompt_embeds, self.negative_prompt_attention_mask)
            if negative
            else (self.prompt_embeds, self.prompt_attention_mask)
        )
        return embeds.expand(batch, -1, -1), mask.expand(batch, -1)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def encode_text(
    tokenizer: Any, text_encoder: Any, text: str, max_length: int, use_attention_mask: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, max_length, D) last hidden states and the (1, max_length) token mask of one text."""
    tokens = tokenizer(
        text, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True, return_tensors="pt"
    )
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device)
    with torch.no_grad():
        hidden = text_encoder(tokens.input_ids.to(device), attention_mask=mask if use_attention_mask else None)[0]
    return hidden, mask


def text_cache_from_encoder(
    tokenizer: Any,
    text_encoder: Any,
    prompt: str,
    negative_prompt: str = "",
    *,
    source: str,
    max_length: int | None = None,
    use_attention_mask: bool = False,
    dtype: str = "float32",
) -> TextCache:
    """A cache from a tokenizer and text encoder already in memory (a pipeline's own, say); `source` names them."""
    if dtype not in _DTYPES:
        raise ValueError(f"text cache: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    length = max_length or (T5_MAX_LENGTH if use_attention_mask else tokenizer.model_max_length)
    prompt_embeds, prompt_mask = encode_text(tokenizer, text_encoder, prompt, length, use_attention_mask)
    negative_embeds, negative_mask = encode_text(tokenizer, text_encoder, negative_prompt, length, use_attention_mask)
    meta = {
        "text_encoder": source,
        "text_encoder_class": type(text_encoder).__name__,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "max_length": length,
        "dtype": dtype,
        "embedding_dim": int(prompt_embeds.shape[-1]),
        "attention_mask_used": use_attention_mask,
    }
    cast = _DTYPES[dtype]
    return TextCache(
        prompt_embeds.to(cast).cpu(), prompt_mask.cpu(), negative_embeds.to(cast).cpu(), negative_mask.cpu(), meta
    )


def keyed_cache_path(folder: str | Path, encoder_token: str, prompt: str, negative_prompt: str = "") -> Path:
    """Where a run keeps the cache of (text encoder files, prompt, negative prompt): another encoder or prompt never
    reads a stale file. `encoder_token` names the encoder's files (e.g. their names, sizes and times)."""
    key = hashlib.sha256(
        json.dumps([TEXT_CACHE_FORMAT, TEXT_CACHE_VERSION, encoder_token, prompt, negative_prompt]).encode()
    ).hexdigest()[:20]
    return Path(folder) / f"{key}.safetensors"


def build_text_cache(
    model_dir: str | Path,
    prompt: str,
    negative_prompt: str = "",
    max_length: int | None = None,
    dtype: str = "float32",
) -> TextCache:
    """Encode `prompt` and `negative_prompt` with the tokenizer/ and text_encoder/ of a diffusers folder.

    `max_length` defaults to 120 for T5 encoders (PixArt's max_sequence_length) and to the tokenizer's own
    length otherwise (77 for CLIP)."""
    import transformers

    model_dir = Path(model_dir)
    if not (model_dir / "text_encoder").is_dir() or not (model_dir / "tokenizer").is_dir():
        raise FileNotFoundError(f"{model_dir}: no text_encoder/ and tokenizer/ folders")
    config = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    class_name = (config.get("architectures") or [""])[0]
    encoder_class = getattr(transformers, class_name, None)
    if encoder_class is None:
        raise ValueError(f"{model_dir}/text_encoder: unknown architecture {class_name!r}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir / "tokenizer")
    text_encoder = encoder_class.from_pretrained(model_dir / "text_encoder").eval()
    masked = config.get("model_type") in _MASKED_ENCODERS
    return text_cache_from_encoder(
        tokenizer,
        text_encoder,
        prompt,
        negative_prompt,
        source=str(model_dir),
        max_length=max_length,
        use_attention_mask=masked,
        dtype=dtype,
    )


def save_text_cache(cache: TextCache, path: str | Path) -> Path:
    """Write `path` (.safetensors) and its JSON sidecar (written last, so a cache is complete once its sidecar
    exists); returns the safetensors path."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(cache, name).contiguous() for name in TENSOR_NAMES}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    record = {
        "format": TEXT_CACHE_FORMAT,
        "format_version": TEXT_CACHE_VERSION,
        **cache.meta,
        "safetensors_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    atomic_write_json(_sidecar(path), record)
    return path


def load_text_cache(path: str | Path, device: torch.device | str = "cpu") -> TextCache:
    """Read a text cache (the .safetensors path or its .json sidecar), checked against the sidecar."""
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    sidecar = _sidecar(path)
    if not path.is_file() or not sidecar.is_file():
        raise FileNotFoundError(f"{path}: a text cache needs {path.name} and {sidecar.name}")
    record = json.loads(sidecar.read_text())
    if record.get("format") != TEXT_CACHE_FORMAT or record.get("format_version") != TEXT_CACHE_VERSION:
        raise ValueError(
            f"{sidecar}: format {record.get('format')!r} version {record.get('format_version')!r}, expected "
            f"{TEXT_CACHE_FORMAT!r} version {TEXT_CACHE_VERSION}"
        )
    if hashlib.sha256(path.read_bytes()).hexdigest() != record.get("safetensors_sha256"):
        raise ValueError(f"{path}: checksum differs from {sidecar.name} (the pair was not written together)")
    tensors = load_file(str(path), device=str(device))
    missing = [name for name in TENSOR_NAMES if name not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]!r}")
    length, dim = record["max_length"], record["embedding_dim"]
    for name in TENSOR_NAMES:
        expected = (1, length, dim) if name.endswith("embeds") else (1, length)
        if tuple(tensors[name].shape) != expected:
            raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {expected}")
    meta = {key: value for key, value in record.items() if key not in ("format", "format_version")}
    return TextCache(**{name: tensors[name] for name in TENSOR_NAMES}, meta=meta)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipelines.core.cli import JobArgumentParser

    parser = JobArgumentParser(
        prog="python -m model.text_cache",
        description="Encode a prompt and its negative prompt once and write them as a text cache.",
    )
    parser.add_argument("model_dir", type=Path, help="diffusers folder with tokenizer/ and text_encoder/")
    parser.add_argument("output", type=Path, help="the cache file (.safetensors; the .json sidecar goes beside it)")
    parser.add_argument("--prompt", default="manga", help="the prompt (the released inference uses 'manga')")
    parser.add_argument("--negative_prompt", default="", help="the negative prompt (PixArt's is empty)")
    parser.add_argument("--max_length", type=int, default=None, help="tokens (default: 120 for T5, else the model's)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="stored dtype")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = build_text_cache(args.model_dir, args.prompt, args.negative_prompt, args.max_length, args.dtype)
    path = save_text_cache(cache, args.output)
    print(f"text cache written to {path} ({cache.meta['max_length']} tokens x {cache.meta['embedding_dim']})")
    return 0


if __name__ == "__main__":
    from pipelines.core.cli import run_job

    raise SystemExit(run_job(main, prog="python -m model.text_cache"))

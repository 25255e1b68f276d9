"""A tiny random PixArt-alpha-shaped diffusers folder, so tests and demos run the line-art family without weights.

Same structure as `PixArt-alpha/PixArt-XL-2-1024-MS` (PixArtAlphaPipeline layout: transformer/, vae/, text_encoder/
(a T5 encoder), tokenizer/, scheduler/ with the shipped DPM-Solver multistep config, model_index.json), only narrow:
a 4-block transformer with 8 output channels (noise + variance) and the resolution/aspect micro-conditions, the
tiny SD1.5 VAE (PixArt-alpha uses the SD VAE), and a 2-layer T5 encoder whose T5 tokenizer is a Unigram model built
with the `tokenizers` package from a hand-written vocabulary (sentencepiece is not needed).

Also home to the real PixArt-XL-2-1024-MS transformer layout (`PIXART_XL_TRANSFORMER_CONFIG`) and its scheduler
(`pixart_scheduler`), so full-size random models of benches and tests are built the same way.
"""

from __future__ import annotations

import string
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from model.tiny import TINY_SEED, build_tiny_vae

TINY_T5_DIM = 32
PIXART_MAX_TOKENS = 120  # the released pipeline's max_sequence_length

# PixArt-XL-2-1024-MS's transformer/config.json (architecture keys), read-only: pass it as `**kwargs`.
PIXART_XL_TRANSFORMER_CONFIG: MappingProxyType[str, Any] = MappingProxyType(
    {
        "num_attention_heads": 16,
        "attention_head_dim": 72,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 28,
        "cross_attention_dim": 1152,
        "caption_channels": 4096,
        "sample_size": 128,
        "patch_size": 2,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "attention_bias": True,
    }
)
# PixArt-XL-2-1024-MS's scheduler/scheduler_config.json (DPM-Solver++ multistep over the linear DDPM betas).
PIXART_SCHEDULER_CONFIG: MappingProxyType[str, Any] = MappingProxyType(
    {
        "algorithm_type": "dpmsolver++",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "dynamic_thresholding_ratio": 0.995,
        "euler_at_final": False,
        "lower_order_final": True,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "solver_order": 2,
        "solver_type": "midpoint",
        "steps_offset": 0,
        "thresholding": False,
        "timestep_spacing": "linspace",
        "use_karras_sigmas": False,
        "use_lu_lambdas": False,
        "variance_type": None,
    }
)


def pixart_scheduler() -> DPMSolverMultistepScheduler:
    """The sampler PixArt-XL-2-1024-MS ships (and the released line-art pipeline uses)."""
    return DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG)


def _tiny_t5_vocabulary() -> list[tuple[str, float]]:
    """T5's special ids (<pad> 0, </s> 1, <unk> 2), the word-start marker, and a-z as word starts and as pieces."""
    vocabulary = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocabulary += [(f"\u2581{letter}", -3.0) for letter in string.ascii_lowercase]
    return vocabulary + [(letter, -4.0) for letter in string.ascii_lowercase]


def build_tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer over a Unigram model built with `tokenizers` (T5's pre-tokenizer and `</s>` post-processor):
    'manga' is 5 pieces plus </s>; no sentencepiece model file is involved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.Unigram(_tiny_t5_vocabulary(), unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5Tokenizer(tokenizer_object=tokenizer, extra_ids=0, model_max_length=PIXART_MAX_TOKENS)


def build_tiny_t5_encoder(vocab_size: int) -> T5EncoderModel:
    """T5 v1.1's encoder structure (gated GELU, relative attention), 2 layers, 32 wide."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=TINY_T5_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def build_tiny_pixart_transformer() -> PixArtTransformer2DModel:
    """PixArt-XL-2's structure (adaLN-single with size micro-conditions, caption projection, cross-attention,
    8 output channels), 4 blocks of 2 heads x 12 (the size embedders need a width divisible by 3), so a guider
    built from it has 2 blocks."""
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        cross_attention_dim=24,
        caption_channels=TINY_T5_DIM,
        sample_size=16,
        use_additional_conditions=True,
    )


def save_pixart_folder(
    folder: str | Path,
    *,
    vae: AutoencoderKL,
    transformer: PixArtTransformer2DModel,
    text_encoder: T5EncoderModel,
    tokenizer: T5Tokenizer,
) -> Path:
    """Write the models as a PixArtAlphaPipeline folder with PixArt's scheduler; returns the folder."""
    folder = Path(folder)
    PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=pixart_scheduler(),
    ).save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_pixart(folder: str | Path, seed: int = TINY_SEED) -> Path:
    """Write a tiny random PixArt-alpha-shaped pipeline folder; the same seed gives the same weights."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = build_tiny_pixart_transformer()
        vae = build_tiny_vae()
        text_encoder = build_tiny_t5_encoder(len(tokenizer))
    return save_pixart_folder(folder, vae=vae, transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    """`python -m model.tiny_pixart FOLDER`: write the tiny PixArt folder."""
    from pipelines.core.cli import JobArgumentParser

    parser = JobArgumentParser(
        prog="python -m model.tiny_pixart",
        description="Write a tiny random PixArt-alpha-shaped diffusers folder (no weights needed; demos and tests).",
    )
    parser.add_argument("folder", type=Path, help="where to write the folder (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=TINY_SEED, help="seed of the random weights")
    args = parser.parse_args(argv)
    build_tiny_pixart(args.folder, seed=args.seed)
    print(f"tiny PixArt-alpha-shaped folder written to {args.folder}")
    return 0


if __name__ == "__main__":
    from pipelines.core.cli import run_job

    raise SystemExit(run_job(main, prog="python -m model.tiny_pixart"))

"""Pin the RELEASED ColorFlow line-art code's outputs as small reference files (tests/reference/pixart_release/).

Not part of the project and never imported by it: it runs the released code itself, so it needs a scratch venv
outside the repository in which `import diffusers` is the release's vendored fork (TencentARC/ColorFlow
`diffusers/`, version 0.31.0.dev0), e.g.

    python3.11 -m venv /tmp/release-venv
    /tmp/release-venv/bin/pip install transformers==4.46.3 huggingface-hub==0.25.0 peft==0.13.2 accelerate==1.0.1 torch
    /tmp/release-venv/bin/pip install --no-deps -e <ColorFlow checkout>/diffusers
    /tmp/release-venv/bin/python bench/release_pixart_parity.py tests/reference/pixart_release

What it writes (tiny seeded modules, float32):
- `sketch/` a style folder as the release's code writes it: the guider's `save_pretrained(safe_serialization=False)`
  (config.json + diffusion_pytorch_model.bin with the after_proj alias) and `transformer_lora.bin` (the
  peft-wrapped transformer's LoRA tensors, `...lora_A.default.weight`), adapters and LoRA B made non-zero;
- `base/` the tiny base transformer, VAE (weights rounded to float16, stored as float16 safetensors to stay small)
  and the PixArt scheduler config;
- `forward.safetensors` inputs and outputs of one guided forward (the guider's 2 residual lists, the patched
  transformer's output with the control list);
- `sampler.safetensors` + `composite.png` + `mask.png`: `ColorFlowPixArtAlphaPipeline` (3 DPM-Solver steps, CFG 4.5,
  precomputed text embeddings, given initial latents, global RNG seeded for the VAE posteriors) -> final latents;
- `release.json`: versions, seeds and the error the release raises at guidance 1 (its mask sized for CFG only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, ColorGuiderPixArtModel, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from diffusers.pipelines.colorflow.pipeline_colorflow_pixart import ColorFlowPixArtAlphaPipeline
from peft import LoraConfig
from PIL import Image
from safetensors.torch import save_file

SEED = 25
POSTERIOR_SEED = 7
TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "proj", "linear"]
TARGETS += ["linear_1", "linear_2"]
TRANSFORMER = {
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 4,
    "cross_attention_dim": 24,
    "caption_channels": 32,
    "sample_size": 16,
    "use_additional_conditions": True,
}
VAE = {
    "block_out_channels": (4, 4, 4, 4),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 2,
    "sample_size": 64,
}
SCHEDULER = {
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "timestep_spacing": "linspace",
}
CANVAS = (96, 64)  # width, height of the composite (a 48x32 frame)
TOKENS = 10


def _round_to_half(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(parameter.half().float())


def main(out: Path) -> None:
    torch.manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    transformer = PixArtTransformer2DModel(**TRANSFORMER)
    vae = AutoencoderKL(**VAE)
    for module in (transformer, vae):
        _round_to_half(module)
    (out / "base").mkdir(exist_ok=True)
    for name, module in (("transformer", transformer), ("vae", vae)):
        folder = out / "base" / name
        module.save_pretrained(folder, safe_serialization=True)
        weights = {k: v.half() for k, v in module.state_dict().items()}
        save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    (out / "base" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")

    guider_config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    guider = ColorGuiderPixArtModel(**{**guider_config, "cond_channels": 9})
    with torch.no_grad():
        for adapter in guider.adapter_linear:  # the zero init would make every residual 0
            adapter.weight.normal_(0, 0.05)
            adapter.bias.normal_(0, 0.05)
    guider.save_pretrained(out / "sketch", safe_serialization=False)

    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=TARGETS))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0, 0.05)
    lora = {k: v for k, v in transformer.state_dict().items() if ".lora_" in k}
    torch.save(lora, out / "sketch" / "transformer_lora.bin")
    transformer.eval()
    guider.eval()

    # one guided forward: guider residuals, then the patched transformer with the control list
    latent_h, latent_w = CANVAS[1] // 8, CANVAS[0] // 8
    sample = torch.randn(2, 4, latent_h, latent_w)
    cond = torch.randn(2, 9, latent_h, latent_w)
    timestep = torch.tensor([999, 421])
    text = torch.randn(2, TOKENS, 32)
    text_mask = torch.ones(2, TOKENS, dtype=torch.int64)
    text_mask[1, 6:] = 0
    conditions = {
        "resolution": torch.tensor([[float(CANVAS[1]), float(CANVAS[0])]] * 2),
        "aspect_ratio": torch.tensor([[CANVAS[1] / CANVAS[0]]] * 2),
    }
    with torch.no_grad():
        controls = guider(torch.cat([sample, cond], 1), timestep=timestep, added_cond_kwargs=conditions)[0]
        output = transformer(
            sample,
            encoder_hidden_states=text,
            encoder_attention_mask=text_mask,
            timestep=timestep,
            added_cond_kwargs=conditions,
            control_list=controls,
            return_dict=False,
        )[0]
    forward = {"sample": sample, "cond": cond, "timestep": timestep, "text": text, "text_mask": text_mask}
    forward.update({f"residual_{i}": r.contiguous() for i, r in enumerate(controls)})
    forward.update({"output": output, **conditions})
    save_file(forward, str(out / "forward.safetensors"))

    # the released pipeline, 3 steps
    rng = np.random.default_rng(SEED)
    coarse = Image.fromarray(rng.integers(0, 256, (CANVAS[1] // 8, CANVAS[0] // 8, 3), dtype=np.uint8))
    composite = coarse.resize(CANVAS, Image.Resampling.BILINEAR)  # smooth, so the PNG stays small
    mask = np.zeros((CANVAS[1], CANVAS[0], 3), dtype=np.uint8)
    mask[CANVAS[1] // 4 : CANVAS[1] // 4 + CANVAS[1] // 2, CANVAS[0] // 4 : CANVAS[0] // 4 + CANVAS[0] // 2] = 255
    mask_image = Image.fromarray(mask)  # white centre, as the release's assets/mask.png
    composite.save(out / "composite.png")
    mask_image.save(out / "mask.png")
    pipeline = ColorFlowPixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=transformer,
        colorguider=guider,
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER),
    )
    pipeline.set_progress_bar_config(disable=True)
    prompt = torch.randn(1, TOKENS, 32)
    negative = torch.randn(1, TOKENS, 32)
    prompt_mask = torch.ones(1, TOKENS, dtype=torch.int64)
    prompt_mask[:, 4:] = 0
    negative_mask = torch.zeros(1, TOKENS, dtype=torch.int64)
    negative_mask[:, 0] = 1
    latents = torch.randn(1, 4, latent_h, latent_w)
    arguments = {
        "prompt": None,
        "negative_prompt": None,
        "prompt_embeds": prompt,
        "prompt_attention_mask": prompt_mask,
        "negative_prompt_embeds": negative,
        "negative_prompt_attention_mask": negative_mask,
        "num_inference_steps": 3,
        "latents": latents,
        "cond_image": composite,
        "cond_mask": mask_image,
        "output_type": "latent",
        "use_resolution_binning": False,
    }
    torch.manual_seed(POSTERIOR_SEED)  # the release draws the canvases' posterior samples from the global RNG
    final = pipeline(**arguments, guidance_scale=4.5).images
    save_file(
        {
            "prompt_embeds": prompt,
            "prompt_attention_mask": prompt_mask,
            "negative_prompt_embeds": negative,
            "negative_prompt_attention_mask": negative_mask,
            "latents": latents,
            "final_latents": final.contiguous(),
        },
        str(out / "sampler.safetensors"),
    )
    try:
        pipeline(**arguments, guidance_scale=1.0)
        guidance_one = None
    except RuntimeError as error:
        guidance_one = str(error).splitlines()[0]
    import diffusers
    import peft
    import transformers

    record = {
        "source": "github:TencentARC/ColorFlow (vendored diffusers 0.31.0.dev0), run by bench/release_pixart_parity.py",
        "versions": {
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "torch": torch.__version__,
        },
        "seed": SEED,
        "posterior_seed": POSTERIOR_SEED,
        "steps": 3,
        "guidance_scale": 4.5,
        "canvas": list(CANVAS),
        "release_error_at_guidance_1": guidance_one,
    }
    (out / "release.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

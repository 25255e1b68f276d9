"""ColorFlow models, one architecture per file, diffusers-style (`ModelMixin` + `ConfigMixin`, stock blocks).

ICP: `colorguider` (the Colorization Guider), `guided_unet` (residual injection into the stock SD1.5 UNet),
`lora` (the UNet LoRA), `timesteps` (eq. 5 sampler), `pipeline_icp` (sampling), `icp_weights` (exports and the
released `GraySD/` layout), `tiny` (a tiny random SD1.5-shaped folder for tests and the demo). GSRP: `gsrp_*`.
Importing the package is cheap: each module imports diffusers itself.
"""

import logging

# With the bnb extra installed, peft imports bitsandbytes, whose CPU backend warns at import that a 4-bit matmul
# kernel could not be fetched from the kernel hub. The project uses only its 8-bit AdamW: the warning is noise for
# every entry point that loads models (trainers, colorize, benches).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

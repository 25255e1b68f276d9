"""accelerate training scripts for ICP and GSRP; they read the WebDataset shards written by `pipelines/`."""

import logging

# With the bnb extra installed, peft imports bitsandbytes, whose CPU backend warns at import that a 4-bit matmul
# kernel could not be fetched from the kernel hub. The trainers use only its 8-bit AdamW: the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

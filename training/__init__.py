"""accelerate training scripts for ICP and GSRP; they read the WebDataset shards written by `pipelines/`."""

import model  # noqa: F401 - first, so its logging settings hold before any trainer imports peft

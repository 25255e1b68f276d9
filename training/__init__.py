"""accelerate training scripts for ICP and GSRP; they read the WebDataset shards written by `pipelines/`."""

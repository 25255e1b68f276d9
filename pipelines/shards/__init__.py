"""Stage 4: splits, the benchmark folder, the leakage check, and the WebDataset shards training reads.
`stage` drives it; `writer` writes the tars, `splits`, `leakage` and `benchmark` decide what goes where
(`leakage_vectors` reads the check's stored vectors, `leakage_state` keeps its state between runs)."""

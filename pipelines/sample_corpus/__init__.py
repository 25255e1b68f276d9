"""A generated manga corpus with known answers, for the demo and the tests only (never imported by a stage)."""

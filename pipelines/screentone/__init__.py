"""Stage 3: render the screentone ("screenstyle") version of every colour frame with a `screentone` renderer.
`stage` drives it."""

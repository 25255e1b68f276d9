"""Stage 2, the retrieval cache: embed patches of every kept page, build each frame's reference pool and record
its top-k retrievals with FAISS. `stage` drives it; `inspect` draws contact sheets of what it retrieved."""

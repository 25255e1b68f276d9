"""The driver's import-time heap, kept out of the cyclic garbage collector while a run is in progress.

A data job's driver holds the objects of everything it imported (torch, FAISS, Ray, pyarrow: about 450k objects),
and Python's full collection walks all of them: 0.15-0.3 s on the 2-core VM, which a rerun that adds one chapter
triggers about once in three runs (`bench/bench_driver.py`), as long as all the rest of the driver's work. Freezing
the heap at the start of a run (`gc.freeze`) leaves those objects alive and counted by reference as before, but
out of the collector's generations, so a collection walks only what the run allocated; the run ends by unfreezing
it. Cyclic garbage that was already there when a run started waits for a full collection outside a run: a process
that runs the pipeline again and again (the bench, the tests) holds a few hundred more objects per run, a job
process (one run) nothing.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


_depth = 0  # frozen_heap blocks open in this process (gc.get_freeze_count walks every frozen object: not asked)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze the heap for the block; inside a block that already froze it (a stage run by the pipeline), nothing."""
    global _depth
    if _depth == 0:
        gc.freeze()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()


def runs_with_frozen_heap(run: Callable[P, R]) -> Callable[P, R]:
    """`run` (a pipeline or stage entry point) called inside `frozen_heap`."""

    @functools.wraps(run)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with frozen_heap():
            return run(*args, **kwargs)

    return wrapper

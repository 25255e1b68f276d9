"""The driver's heap is frozen out of the cyclic collector while a run is in progress, and given back after it."""

from __future__ import annotations

import gc

import pytest

from pipelines.runtime.heap import frozen_heap, runs_with_frozen_heap


def test_a_run_freezes_the_heap_once_and_gives_it_back_even_when_it_fails() -> None:
    assert gc.get_freeze_count() == 0
    seen: list[int] = []

    @runs_with_frozen_heap
    def stage() -> None:
        seen.append(gc.get_freeze_count())
        with frozen_heap():  # a stage inside the pipeline's run: the outer freeze stays
            seen.append(gc.get_freeze_count())
        seen.append(gc.get_freeze_count())
        raise RuntimeError("a failed stage")

    with pytest.raises(RuntimeError, match="a failed stage"):
        stage()
    assert len(seen) == 3 and all(count > 0 for count in seen)  # frozen throughout, the nested block included
    assert gc.get_freeze_count() == 0


def test_garbage_made_inside_a_run_is_still_collected() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

    with frozen_heap():
        Node()
        assert gc.collect() >= 1

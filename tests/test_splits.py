"""Series-level splits: disjoint, seeded, stable when series are added, with small-corpus guarantees."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.shards.splits import (
    BENCH,
    REASON_MIN_TRAIN,
    REASON_MIN_VAL,
    TRAIN,
    VAL,
    SplitConfig,
    assign_splits,
    choose_bench_series,
    split_counts,
    split_of,
)


def _series(n: int) -> list[str]:
    return [f"series-{i:04d}" for i in range(n)]


def test_every_series_lands_in_exactly_one_split_with_the_requested_share() -> None:
    series = _series(2000)
    config = SplitConfig(val_fraction=0.1, seed=3)
    table = assign_splits(series, ["series-0007", "series-0011"], config)
    mapping = split_of(table)
    assert sorted(mapping) == series and table.num_rows == len(series)
    assert mapping["series-0007"] == BENCH and mapping["series-0011"] == BENCH
    counts = split_counts(table)
    assert counts[BENCH] == 2
    assert 0.08 * 1998 < counts[VAL] < 0.12 * 1998  # a hash draw per series: the share holds on large corpora
    assert counts[TRAIN] == 1998 - counts[VAL]


def test_adding_series_never_moves_the_existing_ones() -> None:
    config = SplitConfig(val_fraction=0.2, seed=1)
    before = split_of(assign_splits(_series(300), [], config))
    after = split_of(assign_splits(_series(600), [], config))
    assert all(after[s] == split for s, split in before.items())
    assert len({after[s] for s in _series(600)[300:]}) == 2  # new series are spread over both splits


def test_the_seed_changes_the_assignment_and_fixes_it() -> None:
    a = split_of(assign_splits(_series(200), [], SplitConfig(val_fraction=0.3, seed=1)))
    b = split_of(assign_splits(_series(200), [], SplitConfig(val_fraction=0.3, seed=1)))
    c = split_of(assign_splits(_series(200), [], SplitConfig(val_fraction=0.3, seed=2)))
    assert a == b and a != c


def test_small_corpora_get_at_least_one_validation_and_one_training_series() -> None:
    low = assign_splits(["a", "b"], [], SplitConfig(val_fraction=0.001, seed=0))
    assert sorted(split_of(low).values()) == [TRAIN, VAL]
    assert REASON_MIN_VAL in low.column("reason").to_pylist()
    high = assign_splits(["a", "b", "c"], [], SplitConfig(val_fraction=0.999, seed=0))
    assert split_counts(high)[TRAIN] == 1
    assert REASON_MIN_TRAIN in high.column("reason").to_pylist()
    single = split_of(assign_splits(["only"], [], SplitConfig(val_fraction=0.5)))
    assert single == {"only": TRAIN}
    none = split_of(assign_splits(_series(10), [], SplitConfig(val_fraction=0.0)))
    assert set(none.values()) == {TRAIN}


def test_benchmark_series_are_held_out_first_until_they_hold_enough_chapters() -> None:
    series = _series(40)
    eligible = {s: (3 if i % 2 == 0 else 0) for i, s in enumerate(series)}  # odd series have no eligible chapter
    config = SplitConfig(bench_chapters=7, bench_max_series_fraction=0.5, seed=5)
    bench = choose_bench_series(series, eligible, config)
    assert len(bench) == 3 and all(eligible[s] > 0 for s in bench)  # 3 + 3 + 3 >= 7
    assert bench == choose_bench_series(series, eligible, config)
    assert choose_bench_series(series + ["new-series"], eligible, config) == bench  # not an eligible series
    capped = choose_bench_series(series, eligible, SplitConfig(bench_chapters=100, bench_max_series_fraction=0.1))
    assert len(capped) == 4  # 10% of 40 series
    assert choose_bench_series(series, eligible, SplitConfig(bench_chapters=0)) == []


def test_benchmark_never_takes_the_series_training_and_validation_need() -> None:
    eligible = {"a": 5, "b": 5, "c": 5}
    bench = choose_bench_series(["a", "b", "c"], eligible, SplitConfig(bench_chapters=30, bench_max_series_fraction=1))
    assert len(bench) == 1  # two series stay for training and validation
    assert choose_bench_series(["a"], {"a": 5}, SplitConfig()) == []


def test_explicit_benchmark_series_are_checked() -> None:
    config = SplitConfig(bench_series=("b",))
    assert choose_bench_series(["a", "b", "c"], {}, config) == ["b"]
    with pytest.raises(ValueError, match="not in the corpus"):
        choose_bench_series(["a"], {}, SplitConfig(bench_series=("zz",)))
    with pytest.raises(ValueError, match="not in the corpus"):
        assign_splits(["a"], ["zz"], SplitConfig())


def test_a_series_listed_in_two_splits_is_refused() -> None:
    table = pa.table({"series": ["a", "a"], "split": [TRAIN, VAL], "reason": ["hash", "hash"]})
    with pytest.raises(ValueError, match="two splits"):
        split_of(table)


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_bad_fractions_are_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        SplitConfig(val_fraction=fraction)

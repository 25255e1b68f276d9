"""Train / validation / benchmark split by series: no series ever contributes to two splits.

A series' split comes from a seeded hash of its name, not from its position in a list, so adding series to a
corpus never moves the series already assigned (the only exceptions are the small-corpus guarantees below,
which can move at most the one series they promoted). Order of decisions:

1. Benchmark series are held out first. Series with at least one chapter eligible for the benchmark are taken
   in the order of their hash until they hold `bench_chapters` eligible chapters, capped at
   `bench_max_series_fraction` of all series (at least one) and never leaving fewer than two other series
   (one when the corpus has only two). An explicit list of benchmark series replaces this rule.
2. Every other series goes to validation when its hash falls below `val_fraction`, else to training.
3. Guarantees for small corpora: at least one non-benchmark series is in training (the one with the largest
   hash), and with `val_fraction > 0` and at least two of them, at least one is in validation (the smallest).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pyarrow as pa

from pipelines.core.schemas import SPLITS, table_from_rows
from pipelines.core.seeding import unit_hash

TRAIN, VAL, BENCH = "train", "val", "bench"
SPLIT_NAMES = (TRAIN, VAL, BENCH)

REASON_HASH = "hash"
REASON_BENCH = "bench: held out first"
REASON_BENCH_EXPLICIT = "bench: listed explicitly"
REASON_MIN_VAL = "guarantee: at least one validation series"
REASON_MIN_TRAIN = "guarantee: at least one training series"


def hash_order(items: Iterable[str], seed: int, salt: str) -> list[str]:
    """Items sorted by their seeded hash (ties, impossible in practice, broken by name)."""
    return sorted(set(items), key=lambda item: (unit_hash(seed, salt, item), item))


@dataclass(frozen=True)
class SplitConfig:
    val_fraction: float = 0.05
    seed: int = 0
    bench_chapters: int = 30  # eligible chapters the benchmark series must hold together
    bench_max_series_fraction: float = 0.1
    bench_series: tuple[str, ...] | None = None  # explicit benchmark series; replaces the hash rule

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.bench_max_series_fraction <= 1.0:
            raise ValueError(f"bench_max_series_fraction must lie in [0, 1], got {self.bench_max_series_fraction}")
        if self.bench_chapters < 0:
            raise ValueError(f"bench_chapters must be >= 0, got {self.bench_chapters}")


def choose_bench_series(
    all_series: Iterable[str], eligible_chapters: Mapping[str, int], config: SplitConfig
) -> list[str]:
    """The series held out for the benchmark (sorted by name).

    `eligible_chapters` maps a series to its number of chapters that qualify for the benchmark.
    """
    all_series = sorted(set(all_series))
    if config.bench_series is not None:
        unknown = sorted(set(config.bench_series) - set(all_series))
        if unknown:
            raise ValueError(f"benchmark series {unknown} are not in the corpus ({len(all_series)} series)")
        return sorted(set(config.bench_series))
    if config.bench_chapters == 0 or len(all_series) < 2:
        return []
    min_others = 2 if len(all_series) >= 3 else 1
    cap = min(max(1, int(config.bench_max_series_fraction * len(all_series))), len(all_series) - min_others)
    chosen: list[str] = []
    held = 0
    candidates = [s for s in hash_order(eligible_chapters, config.seed, "bench") if eligible_chapters[s] > 0]
    for series in candidates:
        if held >= config.bench_chapters or len(chosen) >= cap:
            break
        if series not in all_series:
            raise ValueError(f"series {series!r} has eligible benchmark chapters but is not in the corpus")
        chosen.append(series)
        held += eligible_chapters[series]
    return sorted(chosen)


def assign_splits(all_series: Iterable[str], bench_series: Iterable[str], config: SplitConfig) -> pa.Table:
    """One row per series (sorted by name): its split and why (SPLITS)."""
    all_series = sorted(set(all_series))
    bench = set(bench_series)
    unknown = bench - set(all_series)
    if unknown:
        raise ValueError(f"benchmark series {sorted(unknown)} are not in the corpus")
    split: dict[str, str] = {}
    reason: dict[str, str] = {}
    bench_reason = REASON_BENCH_EXPLICIT if config.bench_series is not None else REASON_BENCH
    for series in bench:
        split[series], reason[series] = BENCH, bench_reason
    others = [s for s in all_series if s not in bench]
    draw = {s: unit_hash(config.seed, "val", s) for s in others}
    for series in others:
        split[series] = VAL if draw[series] < config.val_fraction else TRAIN
        reason[series] = REASON_HASH
    by_draw = sorted(others, key=lambda s: (draw[s], s))
    if config.val_fraction > 0 and len(others) >= 2 and not any(split[s] == VAL for s in others):
        split[by_draw[0]], reason[by_draw[0]] = VAL, REASON_MIN_VAL
    if others and not any(split[s] == TRAIN for s in others):
        split[by_draw[-1]], reason[by_draw[-1]] = TRAIN, REASON_MIN_TRAIN
    rows = [{"series": s, "split": split[s], "reason": reason[s]} for s in all_series]
    return table_from_rows(rows, SPLITS)


def split_of(splits: pa.Table) -> dict[str, str]:
    """series -> split, checking that no series is listed twice (the invariant every consumer relies on)."""
    series = splits.column("series").to_pylist()
    names = splits.column("split").to_pylist()
    mapping: dict[str, str] = {}
    for s, name in zip(series, names, strict=True):
        if s in mapping and mapping[s] != name:
            raise ValueError(f"series {s!r} is in two splits: {mapping[s]!r} and {name!r}")
        if name not in SPLIT_NAMES:
            raise ValueError(f"series {s!r} has unknown split {name!r}; expected one of {SPLIT_NAMES}")
        mapping[s] = name
    return mapping


def split_counts(splits: pa.Table) -> dict[str, int]:
    mapping = split_of(splits)
    return {name: sum(1 for v in mapping.values() if v == name) for name in SPLIT_NAMES}


def freeze_splits(previous: pa.Table, fresh: pa.Table, config: SplitConfig) -> pa.Table:
    """Splits of a dataset that exists: every series keeps its previous split; a new series takes its fresh split,
    except the benchmark, which is frozen once written (a new series goes to validation or training by its hash)."""
    split_of(previous)  # checks the stored table
    before = {row["series"]: row for row in previous.to_pylist()}
    rows = []
    for row in fresh.to_pylist():
        series = row["series"]
        if series in before:
            row = before[series]  # byte-identical rows: a rerun rewrites the same table
        elif row["split"] == BENCH:
            split = VAL if unit_hash(config.seed, "val", series) < config.val_fraction else TRAIN
            row = {"series": series, "split": split, "reason": REASON_HASH}
        rows.append(row)
    return table_from_rows(rows, SPLITS)

"""Which partitions matter: rank the adapters by their single-adapter runs and pick subsets.

Each adapter fine-tuned alone on a task (method `adapter`, one run per seed) gets a score,
the mean over seeds of the task's main metric on one split (dev by default; the paper's
appendix A.4 ranked by test, which `rank_by: test` reproduces at the price of choosing on
the test set). Subsets of adapters for MoP are then given by rule (`top: n`, `bottom: n`)
or as a list of partition ids (`partitions: [...]`).

The ranking is one total order, by score and then by partition id (of equal scores the
lower id ranks higher); `top: n` takes its first n partitions and `bottom: n` its last n,
so the two groups never overlap while n <= K / 2 and a selection never depends on file
order. The selection is written as JSON, the file the workflow's MoP-subset jobs read to
know which adapters to load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from mop.errors import MopError
from mop.io import write_json

RANK_SPLITS = ("train", "dev", "test")


def rank_partitions(runs: pl.DataFrame, k: int, rank_by: str = "dev") -> pl.DataFrame:
    """Partitions 0..k-1, best first: mean, std and number of seeds of the `rank_by` metric.

    `runs` holds the single-adapter runs of one task, model, KG and partitioning (as
    `mop.report.load_runs` reads them). Every partition must have at least one run.
    """
    if rank_by not in RANK_SPLITS:
        raise MopError(f"analysis.rank_by: {rank_by!r} is not one of {', '.join(RANK_SPLITS)}")
    runs = runs.filter(pl.col("method") == "adapter")
    setups = runs.select("task", "model", "kg", "k").unique()
    if setups.height > 1:
        raise MopError(
            "subsets: the single-adapter runs mix several setups (task, model, KG, K): "
            + "; ".join(" ".join(map(str, r)) for r in setups.iter_rows())
        )
    if runs[rank_by].null_count():
        raise MopError(f"subsets: some single-adapter runs have no {rank_by} metric")
    missing = sorted(set(range(k)) - set(runs["partition"].to_list()))
    if missing:
        raise MopError(f"subsets: no single-adapter run for partition(s) {missing} of K = {k}")
    extra = sorted(p for p in set(runs["partition"].to_list()) if not 0 <= p < k)
    if extra:
        raise MopError(f"subsets: single-adapter runs for partition(s) {extra} outside K = {k}")
    return (
        runs.group_by("partition")
        .agg(
            pl.col(rank_by).mean().alias("mean"),
            pl.col(rank_by).std().fill_null(0.0).alias("std"),
            pl.len().alias("n"),
        )
        .sort(["mean", "partition"], descending=[True, False])
    )


def select(ranking: pl.DataFrame, rule: Mapping[str, Any], k: int, name: str = "") -> list[int]:
    """The partition ids (ascending) of one subset rule: `top`, `bottom` or `partitions`."""
    where = f"analysis.subsets.{name}" if name else "analysis.subsets"
    if len(rule) != 1:
        raise MopError(f"config key {where}: give exactly one of top, bottom, partitions")
    [(how, value)] = rule.items()
    if how == "partitions":
        ids = [int(p) for p in value]
        bad = [p for p in ids if not 0 <= p < k]
        if bad or not ids or len(set(ids)) != len(ids):
            raise MopError(
                f"config key {where}.partitions: {list(value)} must be distinct ids in 0..{k - 1}"
            )
        return sorted(ids)
    if how not in ("top", "bottom"):
        raise MopError(f"config key {where}: {how!r} is not one of top, bottom, partitions")
    n = int(value)
    if not 1 <= n <= k:
        raise MopError(f"config key {where}.{how}: {n} is not between 1 and K = {k}")
    order = ranking["partition"]
    return sorted((order.head(n) if how == "top" else order.tail(n)).to_list())


def describe(rule: Mapping[str, Any]) -> str:
    """`top 10`, `bottom 10` or `list`."""
    return "list" if "partitions" in rule else " ".join(map(str, next(iter(rule.items()))))


def needs_ranking(subsets: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether any subset is given by rule (and so needs the single-adapter runs)."""
    return any("top" in r or "bottom" in r for r in subsets.values())


def select_subsets(
    runs: pl.DataFrame,
    subsets: Mapping[str, Mapping[str, Any]],
    k: int,
    rank_by: str = "dev",
) -> dict[str, Any]:
    """The ranking (if the runs are given) and every subset's partitions, as one record."""
    ranking = rank_partitions(runs, k, rank_by) if runs.height else None
    if ranking is None and needs_ranking(subsets):
        raise MopError("subsets: top / bottom need the single-adapter runs (none given)")
    first = runs.row(0, named=True) if runs.height else {}
    return {
        **{key: first.get(key) for key in ("task", "model", "kg", "metric")},
        "k": k,
        "rank_by": rank_by,
        "ranking": ranking.to_dicts() if ranking is not None else [],
        "subsets": {
            name: {"rule": describe(rule), "partitions": select(ranking, rule, k, name)}
            for name, rule in subsets.items()
        },
    }


def write_selection(
    runs: pl.DataFrame,
    subsets: Mapping[str, Mapping[str, Any]],
    k: int,
    out: str | Path,
    rank_by: str = "dev",
) -> dict[str, Any]:
    """`select_subsets`, written atomically as JSON."""
    record = select_subsets(runs, subsets, k, rank_by)
    write_json(record, out)
    return record


def adapter_paths(selection: Mapping[str, Any], subset: str, adapters: Sequence[str]) -> list[str]:
    """The adapter folders (of all K, in partition order) that a subset loads."""
    if subset not in selection["subsets"]:
        raise MopError(f"subsets: no subset {subset!r} in the selection")
    return [adapters[p] for p in selection["subsets"][subset]["partitions"]]

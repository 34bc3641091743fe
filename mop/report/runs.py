"""Finished runs as one table: each run's identity from its folder, its main metric."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from mop.io import read_json
from mop.plan import Run

SCHEMA = {
    "task": pl.String,
    "model": pl.String,
    "method": pl.String,
    "mixture": pl.String,
    "kg": pl.String,
    "k": pl.Int64,
    "scheme": pl.String,
    "partition": pl.Int64,
    "subset": pl.String,
    "seed": pl.Int64,
    "metric": pl.String,
    "train": pl.Float64,
    "dev": pl.Float64,
    "test": pl.Float64,
    "routing": pl.Float64,  # mixtures: share of test inputs routed to the true / linked partition
    "entropy": pl.Float64,  # mixtures: mean entropy (nats) of the test inputs' weights
    "inside": pl.Float64,  # KG probe: share of test facts inside one partition of the run's K
    "linked": pl.Float64,  # routed mixtures: share of test inputs linked to a partition
    "top_link": pl.Float64,  # routed, KG probe: share of linked test inputs whose top link is true
    "unlinked": pl.Float64,  # routed: the main metric on the test inputs without a link
    "folder": pl.String,
}


def load_runs(metric_files: Sequence[str | Path]) -> pl.DataFrame:
    """One row per fine-tuning run: its identity (read from its folder by the results
    grammar, mop.plan), the train/dev/test value of its main metric and, for mixtures, the
    routing diagnostics of its test split (routing to the true partition where the task
    knows it, the KG probe, else to the linked one)."""
    rows = []
    for path in metric_files:
        path = Path(path)
        run = Run.parse(path)
        m = read_json(path)
        main = m["main_metric"]
        rows.append(
            {
                "task": run.task,
                "model": run.model,
                "method": run.method,
                "mixture": run.mixture or "",
                "kg": run.kg or "",
                "k": run.k,
                "scheme": run.scheme or "",
                "partition": run.part,
                "subset": run.subset or "",
                "seed": run.seed,
                "metric": main,
                "train": m.get(f"train_{main}"),
                "dev": m[f"dev_{main}"],
                "test": m[f"test_{main}"],
                "routing": m.get("test_routing_true", m.get("test_routing_linked")),
                "entropy": m.get("test_mixture_entropy"),
                "inside": m.get("test_facts_inside"),
                "linked": m.get("test_linked_share"),
                "top_link": m.get("test_top_link_true"),
                "unlinked": m.get(f"test_unlinked_{main}"),
                "folder": str(path.parent),
            }
        )
    return pl.DataFrame(rows, schema=SCHEMA)

"""The analysis tables (paper Tables 7-8 and Figure 2 as a table): each partition's
adapter fine-tuned alone, and MoP over subsets of the adapters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from mop.io import read_json
from mop.report.table import Cell, Table, split_values


def _setup_label(model: str, kg: str, k: int | None) -> str:
    return f"{model} / {kg} / {k}"


def _cell(values: np.ndarray, base: np.ndarray | None = None) -> Cell | str:
    return Cell(values, base) if values.size else "-"


def _splits(runs: pl.DataFrame, base: np.ndarray | None, **match: object) -> list[Cell | str]:
    """train / dev / test cells of the matching runs; the test cell is marked against base."""
    return [
        _cell(split_values(runs, split, **match), base if split == "test" else None)
        for split in ("train", "dev", "test")
    ]


def table_single_adapters(runs: pl.DataFrame) -> Table:
    """Figure 2 as a table: each partition's adapter fine-tuned alone, per task and setup,
    sorted by mean test metric (ties by partition), under the base model's row."""
    single = runs.filter(pl.col("method") == "adapter")
    table = Table(
        "single_adapters",
        "Each sub-graph's adapter fine-tuned alone with the base model (method adapter), "
        "sorted by mean test metric. Metric x 100, mean ± std over seeds (a value alone: "
        "one run); ↑: mean above the base model's; †: two-sided Welch t-test against the "
        "base model's runs, p < 0.05.",
        ["Task", "Model / KG / K", "Sub-graph", "dev", "test"],
    )
    setups = single.select("task", "model", "kg", "k").unique().sort(["task", "model", "kg", "k"])
    for task, model, kg, k in setups.iter_rows():
        label = _setup_label(model, kg, k)
        base = {
            split: split_values(runs, split, task=task, model=model, method="base")
            for split in ("dev", "test")
        }
        if base["test"].size:
            table.rows.append([task, label, "base model", _cell(base["dev"]), _cell(base["test"])])
        group = single.filter(
            (pl.col("task") == task)
            & (pl.col("model") == model)
            & (pl.col("kg") == kg)
            & (pl.col("k") == k)
        )
        order = (
            group.group_by("partition")
            .agg(pl.col("test").mean())
            .sort(["test", "partition"], descending=[True, False])["partition"]
        )
        for part in order.to_list():
            table.rows.append(
                [
                    task,
                    label,
                    str(part),
                    *[
                        _cell(split_values(group, split, partition=part), base[split])
                        for split in ("dev", "test")
                    ],
                ]
            )
    return table


def table_subsets(runs: pl.DataFrame, selection_files: Sequence[str | Path]) -> Table:
    """Tables 7 and 8: each adapter alone (train/dev/test), ranked as the subsets were
    chosen, then MoP over each subset, MoP over all K adapters and the base model."""
    tasks = set()
    table = Table("subsets", "", ["Model / KG / K", "Adapters", "Subsets", "train", "dev", "test"])
    for path in selection_files:
        sel = read_json(path)
        task, model, kg, k = sel["task"], sel["model"], sel["kg"], int(sel["k"])
        tasks.add(task)
        label = _setup_label(model, kg, k)
        here = runs.filter(
            (pl.col("task") == task)
            & (pl.col("model") == model)
            & ((pl.col("kg") == kg) & (pl.col("k") == k) | (pl.col("method") == "base"))
        )
        base = split_values(here, "test", method="base")
        member = {
            p: [name for name, s in sel["subsets"].items() if p in s["partitions"]]
            for p in range(k)
        }

        ranked = [r["partition"] for r in sel["ranking"]] or list(range(k))
        for part in ranked:
            table.rows.append(
                [
                    label,
                    str(part),
                    ", ".join(member[part]) or "-",
                    *_splits(here, base, method="adapter", partition=part),
                ]
            )
        for name, s in sel["subsets"].items():
            parts = ", ".join(map(str, s["partitions"]))
            table.rows.append(
                [
                    label,
                    f"MoP over {name} ({s['rule']}: {parts})",
                    name,
                    *_splits(here, base, method="mop", subset=name),
                ]
            )
        table.rows.append(
            [label, f"MoP over all {k}", "-", *_splits(here, base, method="mop", subset="")]
        )
        if base.size:
            table.rows.append([label, "base model", "-", *_splits(here, None, method="base")])
    ranks = sorted({read_json(p)["rank_by"] for p in selection_files})
    table.caption = (
        f"{', '.join(sorted(tasks))}: each sub-graph's adapter fine-tuned alone, ranked by its "
        f"mean {'/'.join(ranks)} metric (best first), and MoP over subsets of the adapters "
        "chosen by that ranking or listed, over all K adapters, and the base model. Main "
        "metric x 100, mean ± std over seeds (a value alone: one run); ↑ / †: test mean "
        "above the base model's / two-sided Welch t-test against it, p < 0.05."
    )
    return table

"""The paper's tables from finished runs: Table 1 (main), 2 (KGs), 3 (shuffled
partitions), 4 (number of partitions), 6 (mixtures) and the probe's shortcut baselines.
The analysis tables (single adapters, subsets: Tables 7-8) are in
mop.report.analysis_tables, importable from here too."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from mop.errors import MopError
from mop.io import read_json
from mop.plan import Run
from mop.report.analysis_tables import table_single_adapters, table_subsets
from mop.report.table import MARKS, Cell, CountTable, Table, values

__all__ = [
    "METHOD_LABELS",
    "METHOD_ORDER",
    "MIXTURE_COLUMNS",
    "PARTITION_KEYS",
    "SHUFFLE_CAPTION",
    "finding",
    "partition_rows",
    "setup_label",
    "table_k",
    "table_kgs",
    "table_main",
    "table_mixtures",
    "table_probe_baselines",
    "table_shuffle",
    "table_single_adapters",
    "table_subsets",
]

METHOD_LABELS = {
    "mop": "+ MoP",
    "oracle": "+ oracle adapter",
    "adapter": "+ adapter",
    "zeroshot": "adapter zero-shot",
}
METHOD_ORDER = {"mop": 0, "adapter": 1, "oracle": 2, "zeroshot": 3}


def setup_label(method: str, kg: str, mixture: str, several_mixtures: bool) -> str:
    """Row label of a non-base setup, e.g. `+ MoP (kg)` or `+ oracle adapter (kg)`."""
    label = METHOD_LABELS.get(method, f"+ {method}")
    if method == "mop" and several_mixtures:
        return f"{label} ({kg}, {mixture})"
    return f"{label} ({kg})"


def table_main(runs: pl.DataFrame) -> Table:
    """Table 1: base models, then base model + MoP per KG (and mixture), and any control
    setups (oracle adapter, adapter zero-shot), x tasks."""
    tasks = sorted(runs["task"].unique().to_list())
    others = runs.filter(pl.col("method") != "base")
    several = others.filter(pl.col("method") == "mop")["mixture"].n_unique() > 1
    seeds = sorted(runs["seed"].unique().to_list())
    table = Table("main", f"{MARKS} Seeds: {', '.join(map(str, seeds))}.", ["Model", *tasks])
    for model in sorted(runs["model"].unique().to_list()):
        base = {t: values(runs, model=model, method="base", task=t) for t in tasks}
        table.rows.append([model, *[Cell(base[t]) if base[t].size else "-" for t in tasks]])
        setups = (
            others.filter(pl.col("model") == model)
            .select("method", "kg", "mixture", "k", "scheme")
            .unique()
            .with_columns(order=pl.col("method").replace_strict(METHOD_ORDER, default=9))
            .sort(["order", "kg", "mixture", "k", "scheme"])
        )
        places = setups.select("k", "scheme").unique().height > 1
        for method, kg, mixture, k, scheme, _ in setups.iter_rows():
            label = setup_label(method, kg, mixture, several)
            if places:  # several partitionings: say which one
                label = f"{label[:-1]}, K={k} {scheme})"
            row: list[str | Cell] = [label]
            for t in tasks:
                v = values(
                    others,
                    model=model,
                    task=t,
                    method=method,
                    kg=kg,
                    mixture=mixture,
                    k=k,
                    scheme=scheme,
                )
                row.append(Cell(v, base[t]) if v.size else "-")
                if v.size and base[t].size and method in ("mop", "oracle"):
                    table.findings.append(finding(t, model, label, Cell(v, base[t])))
            table.rows.append(row)
    table.bold_best()
    return table


def finding(task: str, model: str, label: str, cell: Cell) -> str:
    """One plain sentence on whether a setup beats its base model on a task."""
    base = float(cell.base.mean())
    p = cell.p_value
    if cell.dagger:
        verdict = "a significant gain"
    elif p is not None and p < 0.05:
        verdict = "a significant loss"
    else:
        verdict = "no significant difference"
    p_text = f"Welch p = {p:.2g}" if p is not None else "too few seeds for a test"
    return (
        f"{task}, {model} {label}: {cell.mean:.2f} vs {base:.2f} for the base model "
        f"({cell.mean - base:+.2f} points, {p_text}): {verdict}."
    )


def table_probe_baselines(baseline_files: Sequence[str | Path]) -> Table:
    """The KG probe's shortcut baselines (accuracy x 100 on dev and test)."""
    table = Table(
        "probe_baselines",
        "KG probe: answers that use no knowledge of the "
        "(disease, phenotype) pair; thresholds chosen on dev. Swapped-pair negatives "
        "make every prior on one name alone score 50.",
        ["Baseline", "dev", "test"],
    )
    for path in baseline_files:
        for name, acc in read_json(path).items():
            table.rows.append(
                [name, f"{acc['dev_accuracy'] * 100:.2f}", f"{acc['test_accuracy'] * 100:.2f}"]
            )
    return table


def table_kgs(stats_files: Sequence[str | Path]) -> Table:
    """Table 2: entities, relations and triples per KG."""
    table = Table(
        "kg_stats",
        "Statistics of the knowledge graphs.",
        ["KG", "# Entities", "# Relations", "# Triples"],
    )
    for path in stats_files:
        s = read_json(path)
        table.rows.append(
            [
                Run.parse(path).kg,
                f"{s['entities']:,}",
                f"{s['relations']:,}",
                f"{s['triples']:,}",
            ]
        )
    return table


def table_k(runs: pl.DataFrame, partition_stats: Sequence[str | Path]) -> Table:
    """Table 4: MoP's task metric per number of partitions (average entities per
    partition), marked against the base model, and where the KG probe ran, beside it the
    oracle adapter at that K, the share of test facts inside one partition of that K, and
    how MoP routes: the share of test inputs whose largest weight is the partition (of that
    K) holding their fact, and the weights' entropy against ln K."""
    import math

    sizes = {}
    for path in partition_stats:
        s = read_json(path)
        sizes[(Run.parse(path).kg, s["k"])] = s["entities_mean"]
    mop = runs.filter((pl.col("method") == "mop") & (pl.col("scheme") == "metis"))
    oracle = runs.filter((pl.col("method") == "oracle") & (pl.col("scheme") == "metis"))
    tasks = sorted(mop["task"].unique().to_list())
    probe = oracle.height > 0
    extra = ["Oracle (probe)", "Facts inside (%)", "Routing (%)", "Entropy (ln K)"]
    table = Table(
        "partitions_k",
        "MoP (METIS partitions) over the number of sub-graphs. Oracle: each probe question "
        "through the adapter trained on its fact at that K (cut facts: its disease's "
        "adapter); facts inside: test facts inside one partition of that K; routing: test "
        "inputs whose largest mixture weight (averaged over layers and tokens) is that "
        "partition, of the facts inside; entropy of the weights in nats (uniform: ln K). " + MARKS,
        ["Model / KG / mixture", "# Sub-graphs (avg. # entities)", *tasks, *(extra * probe)],
    )

    def mean(frame: pl.DataFrame, column: str, scale: float = 1.0, digits: int = 1) -> str:
        v = frame[column].drop_nulls()
        return f"{scale * v.mean():.{digits}f}" if v.len() else "-"

    for (model, kg, mixture), group in mop.group_by(
        ["model", "kg", "mixture"], maintain_order=True
    ):
        base = {t: values(runs, model=model, method="base", task=t) for t in tasks}
        for k in sorted(group["k"].unique().to_list()):
            avg = sizes.get((kg, k))
            label = f"{k} ({avg:,.0f})" if avg is not None else str(k)
            cells = [Cell(values(group, task=t, k=k), base[t]) for t in tasks]
            row: list[str | Cell] = [
                f"{model} / {kg} / {mixture}",
                label,
                *[c if c.values.size else "-" for c in cells],
            ]
            if probe:
                own = group.filter((pl.col("k") == k) & (pl.col("task") == "probe"))
                orc = values(oracle, model=model, kg=kg, k=k, task="probe")
                row += [
                    Cell(orc, base.get("probe")) if orc.size else "-",
                    mean(own, "inside", 100),
                    mean(own, "routing", 100),
                    f"{mean(own, 'entropy', digits=2)} ({math.log(k):.2f})",
                ]
            table.rows.append(row)
    table.bold_best(first=2)
    return table


MIXTURE_COLUMNS = ("Routing", "Entropy", "Linked", "Top link true", "Unlinked")


def table_mixtures(runs: pl.DataFrame) -> Table:
    """Table 6: the mixture variants (and their hyperparameters) x tasks, with how each
    routes: the share of test inputs whose largest weight (averaged over layers and
    tokens) is the true partition (KG probe) or the linked one, and the weights' entropy."""
    mop = runs.filter((pl.col("method") == "mop") & (pl.col("scheme") == "metis"))
    tasks = sorted(mop["task"].unique().to_list())
    table = Table(
        "mixtures",
        "Mixture layers compared. Routing: share of test inputs whose largest mixture weight "
        "is the true partition (KG probe) or the linked one (other tasks), mean over the runs "
        "x 100; entropy: of those weights, in nats (uniform over K: ln K). Linked: test "
        "inputs with a link (routed mixtures), top link true: of those, whose largest link "
        "is the true partition (KG probe); unlinked: the main metric x 100 on the test "
        "inputs without a link. " + MARKS,
        ["Model / KG / K", "Mixture", *tasks, *MIXTURE_COLUMNS],
    )
    for (model, kg, k), group in mop.group_by(["model", "kg", "k"], maintain_order=True):
        for mixture in sorted(group["mixture"].unique().to_list()):
            base = {t: values(runs, model=model, method="base", task=t) for t in tasks}
            cells = [Cell(values(group, task=t, mixture=mixture), base[t]) for t in tasks]
            own = group.filter(pl.col("mixture") == mixture)
            routing, entropy = own["routing"].drop_nulls(), own["entropy"].drop_nulls()
            table.rows.append(
                [
                    f"{model} / {kg} / {k}",
                    mixture,
                    *[c if c.values.size else "-" for c in cells],
                    f"{100 * routing.mean():.1f}" if routing.len() else "-",
                    f"{entropy.mean():.3f}" if entropy.len() else "-",
                    *[
                        f"{100 * v.mean():.1f}" if (v := own[c].drop_nulls()).len() else "-"
                        for c in ("linked", "top_link")
                    ],
                    f"{100 * u.mean():.2f}" if (u := own["unlinked"].drop_nulls()).len() else "-",
                ]
            )
    table.bold_best(first=2)
    return table


SHUFFLE_CAPTION = (
    "Training triples (head and tail in the same partition) of METIS partitions whose "
    "entities are shuffled at the given rate (paper section 3.6); in brackets the share of "
    "the rate-0 (METIS) count. Rate 100%: a random partition with the METIS partition sizes."
)
PARTITION_KEYS = ("k", "shuffle", "triples", "triples_retained")


def partition_rows(stats_files: Sequence[str | Path]) -> pl.DataFrame:
    """One row per partition stats file: kg, k, shuffle, triples, triples_retained, share.

    The KG name comes from the file's folder (`partition/<kg>/k<K>-<scheme>/stats.json`);
    `share` is the retained count in percent of the same KG and K's rate-0 count. Rows
    keep the order of `stats_files`, which also orders the table's columns.
    """
    rows = []
    for f in stats_files:
        if not Path(f).is_file():
            raise MopError(f"{f}: file not found")
        s = read_json(f)
        missing = [key for key in PARTITION_KEYS if key not in s]
        if missing:
            raise MopError(f"{f}: not a partition stats file (no {', '.join(missing)})")
        rows.append({"kg": Run.parse(f).kg, **{key: s[key] for key in PARTITION_KEYS}})
    schema = {
        "kg": pl.String,
        "k": pl.Int64,
        "shuffle": pl.Float64,
        "triples": pl.Int64,
        "triples_retained": pl.Int64,
    }
    df = pl.DataFrame(rows, schema=schema).unique(["kg", "k", "shuffle"], maintain_order=True)
    base = df.filter(pl.col("shuffle") == 0).select("kg", "k", base="triples_retained")
    return (
        df.join(base, on=["kg", "k"], how="left", maintain_order="left")
        .with_columns(share=100 * pl.col("triples_retained") / pl.col("base"))
        .drop("base")
    )


def table_shuffle(stats_files: Sequence[str | Path]) -> CountTable:
    """Table 3: retained triples per shuffle rate (rows) and KG (columns; and K if several),
    cells "count (share of the rate-0 count %)"."""
    rows = partition_rows(stats_files)
    columns = rows.select("kg", "k").unique(maintain_order=True).rows()
    several_k = len({k for _, k in columns}) > 1
    ks = ", ".join(str(k) for k in sorted({k for _, k in columns}))
    table = CountTable(
        "shuffle",
        f"{SHUFFLE_CAPTION} K = {ks}.",
        ["Shuffle rate", *[f"{kg} (K = {k})" if several_k else kg for kg, k in columns]],
        numbers=rows,
    )
    for rate in sorted(set(rows["shuffle"].to_list())):
        cells = [f"{rate * 100:g}%"]
        for kg, k in columns:
            hit = rows.filter(
                (pl.col("kg") == kg) & (pl.col("k") == k) & (pl.col("shuffle") == rate)
            )
            if hit.height == 0:
                cells.append("-")
                continue
            r = hit.row(0, named=True)
            share = "-" if r["share"] is None else f"{r['share']:.1f}%"
            cells.append(f"{r['triples_retained']:,} ({share})")
        table.rows.append(cells)
    return table

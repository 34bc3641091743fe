"""Results tables from the runs on disk, laid out like the paper's Table 1.

Every fine-tuning run folder holds `run.json` (its tags: task, model, method, KG, K,
mixture, seed) and `metrics.json`; the report reads only those, so it can be rebuilt at
any time and never depends on the tracking server.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats

from mop.errors import MopError
from mop.io import atomic_path, read_json, require_file

RUN_COLUMNS = [
    "task",
    "model",
    "method",
    "mixture",
    "kg",
    "k",
    "scheme",
    "seed",
    "metric",
    "dev",
    "test",
]


def collect_runs(results: str | Path) -> pl.DataFrame:
    """One row per finished fine-tuning run (test and dev value of the task's main metric)."""
    rows = []
    for run_file in sorted(Path(results, "finetune").rglob("run.json")):
        metrics_file = run_file.with_name("metrics.json")
        if not metrics_file.is_file():
            continue
        tags = read_json(run_file)["tags"]
        m = read_json(metrics_file)
        main = m["main_metric"]
        rows.append(
            {
                "task": tags["task"],
                "model": tags["model"],
                "method": tags["method"],
                "mixture": tags.get("mixture", ""),
                "kg": tags.get("kg", ""),
                "k": int(tags["k"]) if tags.get("k") else None,
                "scheme": tags.get("scheme", ""),
                "seed": int(tags["seed"]),
                "metric": main,
                "dev": m[f"dev_{main}"],
                "test": m[f"test_{main}"],
            }
        )
    schema = {
        "task": pl.String,
        "model": pl.String,
        "method": pl.String,
        "mixture": pl.String,
        "kg": pl.String,
        "k": pl.Int64,
        "scheme": pl.String,
        "seed": pl.Int64,
        "metric": pl.String,
        "dev": pl.Float64,
        "test": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema)


def row_label(model: str, method: str, kg: str, mixture: str, mixtures: int) -> str:
    if method == "base":
        return model
    mix = f", {mixture}" if mixtures > 1 else ""
    return f"+ MoP ({kg}{mix})" if method == "mop" else f"+ {method} ({kg})"


def summarise(runs: pl.DataFrame) -> pl.DataFrame:
    """Mean, std (sample, ddof=1) and n of the test metric per (model, setup, task), with
    the two-sided Welch t-test p-value against the same model's base runs."""
    groups = runs.group_by(
        ["task", "model", "method", "mixture", "kg", "k", "scheme"], maintain_order=True
    ).agg(pl.col("test"), pl.col("seed"))
    rows = []
    for g in groups.iter_rows(named=True):
        values = np.asarray(g["test"], dtype=float) * 100
        base = (
            runs.filter(
                (pl.col("task") == g["task"])
                & (pl.col("model") == g["model"])
                & (pl.col("method") == "base")
            )["test"].to_numpy()
            * 100
        )
        p = None
        if g["method"] != "base" and len(values) > 1 and len(base) > 1:
            p = float(stats.ttest_ind(values, base, equal_var=False).pvalue)
        rows.append(
            {
                **{k: g[k] for k in ("task", "model", "method", "mixture", "kg", "k", "scheme")},
                "n": len(values),
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "base_mean": float(base.mean()) if len(base) else None,
                "p_value": p,
            }
        )
    return pl.DataFrame(rows)


def format_cell(mean: float, std: float, n: int, base_mean: float | None, p: float | None) -> str:
    up = " ↑" if base_mean is not None and p is not None and mean > base_mean else ""
    dagger = "†" if p is not None and p < 0.05 and mean > (base_mean or 0) else ""
    return f"{mean:.2f}{dagger} ± {std:.2f}{up} (n={n})"


def main_table(summary: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    tasks = sorted(summary["task"].unique().to_list())
    mixtures = summary.filter(pl.col("method") == "mop")["mixture"].n_unique()
    order = summary.select("model", "method", "kg", "mixture").unique(maintain_order=True)
    order = order.with_columns(is_base=pl.col("method") != "base").sort(
        ["model", "is_base", "kg", "mixture"]
    )
    header = ["Model", *tasks]
    body = []
    for r in order.iter_rows(named=True):
        cells = [row_label(r["model"], r["method"], r["kg"], r["mixture"], mixtures)]
        for task in tasks:
            hit = summary.filter(
                (pl.col("task") == task)
                & (pl.col("model") == r["model"])
                & (pl.col("method") == r["method"])
                & (pl.col("kg") == r["kg"])
                & (pl.col("mixture") == r["mixture"])
            )
            if hit.height == 0:
                cells.append("-")
            else:
                h = hit.row(0, named=True)
                cells.append(format_cell(h["mean"], h["std"], h["n"], h["base_mean"], h["p_value"]))
        body.append(cells)
    return header, body


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def write_main_table(results: str | Path, out_dir: str | Path) -> Path:
    """Write `main.md` (Table 1 layout) and `main.csv` (one row per setup, raw numbers)."""
    runs = collect_runs(results)
    out = Path(out_dir)
    summary = summarise(runs) if runs.height else pl.DataFrame()
    with atomic_path(out / "main.csv") as tmp:
        summary.write_csv(tmp)
    note = (
        "Test metric x 100, mean ± std over seeds (n = number of seeds). ↑: mean above the "
        "base model's; †: two-sided Welch t-test against the base model's runs, p < 0.05.\n"
    )
    header, body = main_table(summary) if runs.height else (["Model"], [])
    with atomic_path(out / "main.md") as tmp:
        tmp.write_text("# Results\n\n" + to_markdown(header, body) + "\n" + note)
    return out / "main.md"


# Table 3: training triples kept under controlled shuffling.

TABLE3_NOTE = (
    "Triples whose head and tail fall into the same partition (the triples adapters train "
    "on), for METIS partitions whose entities are shuffled at the given rate (paper section "
    "3.6); in brackets the share of the rate-0 (METIS) count. Rate 100%: a random partition "
    "with the METIS partition sizes."
)


PARTITION_KEYS = ("k", "shuffle", "triples", "triples_retained")


def partition_rows(stats_files: list[str | Path]) -> pl.DataFrame:
    """One row per partition stats file: kg, k, shuffle, triples, triples_retained, share.

    The KG name is the folder two levels up (`partition/<kg>/k<K>-<scheme>/stats.json`);
    `share` is the retained count as a percentage of the same KG and K's rate-0 count.
    Rows keep the order of `stats_files`, which also orders the table's columns.
    """
    rows = []
    for f in stats_files:
        s = read_json(require_file(f, "partition stats"))
        missing = [key for key in PARTITION_KEYS if key not in s]
        if missing:
            raise MopError(f"{f}: not a partition stats file (no {', '.join(missing)})")
        rows.append({"kg": Path(f).parent.parent.name, **{key: s[key] for key in PARTITION_KEYS}})
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


def retained_table(rows: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Table 3's layout: a row per shuffle rate, a column per KG (and K, if several)."""
    columns = rows.select("kg", "k").unique(maintain_order=True).rows()
    several_k = len({k for _, k in columns}) > 1
    header = ["Shuffle rate"] + [f"{kg} (K = {k})" if several_k else kg for kg, k in columns]
    body = []
    for rate in sorted(rows["shuffle"].unique().to_list()):
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
        body.append(cells)
    return header, body


LATEX_ESCAPES = str.maketrans(
    {
        "\\": r"\textbackslash{}",
        "%": r"\%",
        "_": r"\_",
        "&": r"\&",
        "#": r"\#",
        "$": r"\$",
        "{": r"\{",
        "}": r"\}",
    }
)


def latex_tabular(header: list[str], body: list[list[str]], caption: str, label: str) -> str:
    """A booktabs table (needs `\\usepackage{booktabs}`), LaTeX specials escaped."""

    def esc(text: str) -> str:
        return text.translate(LATEX_ESCAPES)

    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(esc(h) for h in header) + r" \\",
        r"\midrule",
        *(" & ".join(esc(c) for c in row) + r" \\" for row in body),
        r"\bottomrule",
        r"\end{tabular}",
        rf"\caption{{{esc(caption)}}}",
        rf"\label{{{label}}}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def write_retained_table(stats_files: list[str | Path], out_dir: str | Path) -> Path:
    """Write `table3.md`, `table3.csv` (one row per KG, K and rate) and `table3.tex`."""
    rows = partition_rows(stats_files)
    out = Path(out_dir)
    ks = sorted(set(rows["k"].to_list()))
    note = f"{TABLE3_NOTE} K = {', '.join(map(str, ks))}."
    header, body = retained_table(rows)
    with atomic_path(out / "table3.csv") as tmp:
        rows.write_csv(tmp)
    with atomic_path(out / "table3.md") as tmp:
        tmp.write_text(
            "# Training triples under controlled shuffling\n\n"
            + to_markdown(header, body)
            + "\n"
            + note
            + "\n"
        )
    with atomic_path(out / "table3.tex") as tmp:
        tmp.write_text(latex_tabular(header, body, note, "tab:shuffled-triples"))
    return out / "table3.md"

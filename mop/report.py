"""The paper's tables and figures from the runs on disk.

Every fine-tuning run folder holds `run.json` (its tags: task, model, method, KG, K,
scheme, mixture, seed) and `metrics.json`; adapters hold `metrics.json` with their
knowledge-probe scores; KGs and partitions hold `stats.json`. The report reads only those
files (the rules pass the exact list), so it can be rebuilt at any time and never depends
on the tracking server.

Tables are written as Markdown, CSV (the same layout with numeric columns) and LaTeX;
figures as PNG and PDF.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats

from mop.errors import MopError
from mop.io import atomic_path, read_json

SETUP = ["task", "model", "method", "mixture", "kg", "k", "scheme"]


# ----------------------------------------------------------------------------- runs


def load_runs(metric_files: Sequence[str | Path]) -> pl.DataFrame:
    """One row per fine-tuning run: its tags and the dev/test value of its main metric."""
    rows = []
    for path in metric_files:
        path = Path(path)
        tags = read_json(path.with_name("run.json"))["tags"]
        m = read_json(path)
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
                "partition": int(tags["partition"]) if tags.get("partition") else None,
                "subset": tags.get("subset", ""),
                "seed": int(tags["seed"]),
                "metric": main,
                "train": m.get(f"train_{main}"),
                "dev": m[f"dev_{main}"],
                "test": m[f"test_{main}"],
                "folder": str(path.parent),
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
        "partition": pl.Int64,
        "subset": pl.String,
        "seed": pl.Int64,
        "metric": pl.String,
        "train": pl.Float64,
        "dev": pl.Float64,
        "test": pl.Float64,
        "folder": pl.String,
    }
    return pl.DataFrame(rows, schema=schema)


def shuffle_rate(scheme: str) -> float:
    return 0.0 if scheme in ("metis", "") else float(scheme.removeprefix("shuffle"))


# ----------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """mean ± std over n seeds (x100), with the paper's marks against the base model."""

    values: np.ndarray
    base: np.ndarray | None = None
    bold: bool = False

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def std(self) -> float:
        return float(self.values.std(ddof=1)) if self.values.size > 1 else 0.0

    @property
    def p_value(self) -> float | None:
        """Two-sided Welch t-test against the base model's runs."""
        if self.base is None or self.values.size < 2 or self.base.size < 2:
            return None
        return float(stats.ttest_ind(self.values, self.base, equal_var=False).pvalue)

    @property
    def up(self) -> bool:
        return self.base is not None and self.base.size > 0 and self.mean > self.base.mean()

    @property
    def dagger(self) -> bool:
        p = self.p_value
        return self.up and p is not None and p < 0.05

    def _text(self, dagger: str, pm: str, up: str) -> str:
        """One run has no spread: its cell shows the value alone, not a misleading ± 0."""
        spread = f"{pm}{self.std:.2f}" if self.values.size > 1 else ""
        return f"{self.mean:.2f}{dagger if self.dagger else ''}{spread}{up if self.up else ''}"

    def markdown(self) -> str:
        text = self._text("†", " ± ", " ↑")
        return f"**{text}**" if self.bold else text

    def latex(self) -> str:
        text = self._text(r"$^\dagger$", r" $\pm$ ", r" $\uparrow$")
        return rf"\textbf{{{text}}}" if self.bold else text


@dataclass
class Table:
    """A results table: a header, rows of strings or cells, and a caption."""

    name: str
    caption: str
    header: list[str]
    rows: list[list[str | Cell]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    def bold_best(self, first: int = 1) -> None:
        """Bold the highest mean of every cell column (ties all bold)."""
        for j in range(first, len(self.header)):
            cells = [r[j] for r in self.rows if isinstance(r[j], Cell)]
            if cells:
                best = max(c.mean for c in cells)
                for c in cells:
                    c.bold = np.isclose(c.mean, best)

    def markdown(self) -> str:
        def fmt(x: str | Cell) -> str:
            return x.markdown() if isinstance(x, Cell) else x

        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in self.rows]
        found = "".join(f"- {f}\n" for f in self.findings)
        return "\n".join(lines) + "\n\n" + self.caption + "\n" + (f"\n{found}" if found else "")

    def latex(self) -> str:
        def esc(text: str) -> str:
            for a, b in (
                ("\\", r"\textbackslash{}"),
                ("&", r"\&"),
                ("%", r"\%"),
                ("_", r"\_"),
                ("#", r"\#"),
                ("±", r"$\pm$"),
            ):
                text = text.replace(a, b)
            return text

        def fmt(x: str | Cell) -> str:
            return x.latex() if isinstance(x, Cell) else esc(x)

        cols = "l" + "c" * (len(self.header) - 1)
        body = [" & ".join(esc(h) for h in self.header) + r" \\", r"\midrule"]
        body += [" & ".join(fmt(x) for x in row) + r" \\" for row in self.rows]
        return (
            "\n".join(
                [
                    r"\begin{table}[t]",
                    r"\centering",
                    rf"\begin{{tabular}}{{{cols}}}",
                    r"\toprule",
                    *body,
                    r"\bottomrule",
                    r"\end{tabular}",
                    rf"\caption{{{esc(self.caption)}}}",
                    rf"\label{{tab:{self.name}}}",
                    r"\end{table}",
                ]
            )
            + "\n"
        )

    def frame(self) -> pl.DataFrame:
        """The same layout with numbers: a cell column becomes _mean, _std, _n, _p columns."""
        data: dict[str, list] = {}
        for j, h in enumerate(self.header):
            column = [r[j] for r in self.rows]
            if any(isinstance(x, Cell) for x in column):
                data[f"{h}_mean"] = [x.mean if isinstance(x, Cell) else None for x in column]
                data[f"{h}_std"] = [x.std if isinstance(x, Cell) else None for x in column]
                data[f"{h}_n"] = [x.values.size if isinstance(x, Cell) else None for x in column]
                data[f"{h}_p"] = [x.p_value if isinstance(x, Cell) else None for x in column]
            else:
                data[h] = column
        return pl.DataFrame(data, strict=False)

    def write(self, out_dir: str | Path, stem: str | None = None) -> list[Path]:
        out = Path(out_dir)
        stem = stem or self.name
        paths = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.tex"]
        with atomic_path(paths[0]) as tmp:
            tmp.write_text(self.markdown())
        with atomic_path(paths[1]) as tmp:
            self.frame().write_csv(tmp)
        with atomic_path(paths[2]) as tmp:
            tmp.write_text(self.latex())
        return paths


MARKS = (
    "Test metric x 100, mean ± std over seeds (a value alone: one run). "
    "↑: mean above the base model's; "
    "†: two-sided Welch t-test against the base model's runs, p < 0.05; "
    "bold: best in the column."
)


def _values(runs: pl.DataFrame, **match: object) -> np.ndarray:
    return _split_values(runs, "test", **match)


def _split_values(runs: pl.DataFrame, split: str, **match: object) -> np.ndarray:
    """One split's main metric x 100 of the runs matching every given tag."""
    sel = runs
    for key, value in match.items():
        sel = sel.filter(pl.col(key).is_null() if value is None else pl.col(key) == value)
    return sel[split].drop_nulls().to_numpy() * 100


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


# ----------------------------------------------------------------------------- tables


def table_main(runs: pl.DataFrame) -> Table:
    """Table 1: base models, then base model + MoP per KG (and mixture), and any control
    setups (oracle adapter, adapter zero-shot), x tasks."""
    tasks = sorted(runs["task"].unique().to_list())
    others = runs.filter(pl.col("method") != "base")
    several = others.filter(pl.col("method") == "mop")["mixture"].n_unique() > 1
    seeds = sorted(runs["seed"].unique().to_list())
    table = Table("main", f"{MARKS} Seeds: {', '.join(map(str, seeds))}.", ["Model", *tasks])
    for model in sorted(runs["model"].unique().to_list()):
        base = {t: _values(runs, model=model, method="base", task=t) for t in tasks}
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
                v = _values(
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
                Path(path).parent.name,
                f"{s['entities']:,}",
                f"{s['relations']:,}",
                f"{s['triples']:,}",
            ]
        )
    return table


def table_k(runs: pl.DataFrame, partition_stats: Sequence[str | Path]) -> Table:
    """Table 4: MoP's task metric per number of partitions (average entities per partition)."""
    sizes = {}
    for path in partition_stats:
        s = read_json(path)
        sizes[(Path(path).parent.parent.name, s["k"])] = s["entities_mean"]
    mop = runs.filter((pl.col("method") == "mop") & (pl.col("scheme") == "metis"))
    tasks = sorted(mop["task"].unique().to_list())
    table = Table(
        "partitions_k",
        "MoP (METIS partitions) over the number of sub-graphs. " + MARKS,
        ["Model / KG", "# Sub-graphs (avg. # entities)", *tasks],
    )
    for (model, kg, mixture), group in mop.group_by(
        ["model", "kg", "mixture"], maintain_order=True
    ):
        for k in sorted(group["k"].unique().to_list()):
            avg = sizes.get((kg, k))
            label = f"{k} ({avg:,.0f})" if avg is not None else str(k)
            cells = [Cell(_values(group, task=t, k=k)) for t in tasks]
            table.rows.append(
                [
                    f"{model} / {kg} / {mixture}",
                    label,
                    *[c if c.values.size else "-" for c in cells],
                ]
            )
    table.bold_best(first=2)
    return table


def table_mixtures(runs: pl.DataFrame) -> Table:
    """Table 6: the mixture variants (and their hyperparameters) x tasks."""
    mop = runs.filter((pl.col("method") == "mop") & (pl.col("scheme") == "metis"))
    tasks = sorted(mop["task"].unique().to_list())
    table = Table(
        "mixtures", "Mixture layers compared. " + MARKS, ["Model / KG / K", "Mixture", *tasks]
    )
    for (model, kg, k), group in mop.group_by(["model", "kg", "k"], maintain_order=True):
        for mixture in sorted(group["mixture"].unique().to_list()):
            base = {t: _values(runs, model=model, method="base", task=t) for t in tasks}
            cells = [Cell(_values(group, task=t, mixture=mixture), base[t]) for t in tasks]
            table.rows.append(
                [f"{model} / {kg} / {k}", mixture, *[c if c.values.size else "-" for c in cells]]
            )
    table.bold_best(first=2)
    return table


def _setup_label(model: str, kg: str, k: int | None) -> str:
    return f"{model} / {kg} / {k}"


def _cell(values: np.ndarray, base: np.ndarray | None = None) -> Cell | str:
    return Cell(values, base) if values.size else "-"


def _splits(runs: pl.DataFrame, base: np.ndarray | None, **match: object) -> list[Cell | str]:
    """train / dev / test cells of the matching runs; the test cell is marked against base."""
    return [
        _cell(_split_values(runs, split, **match), base if split == "test" else None)
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
            split: _split_values(runs, split, task=task, model=model, method="base")
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
                        _cell(_split_values(group, split, partition=part), base[split])
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
        base = _split_values(here, "test", method="base")
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


# ----------------------------------------------------------------------------- figures


def _figure_paths(out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    return out.with_suffix(".png"), out.with_suffix(".pdf")


def _save(fig, out: str | Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = _figure_paths(out)
    for path in paths:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix[1:], dpi=150, bbox_inches="tight")
    plt.close(fig)
    return list(paths)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_adapters(
    adapter_metrics: Sequence[str | Path], out: str | Path, single_runs: pl.DataFrame | None = None
) -> list[Path]:
    """Figure 2: per-partition adapter quality (knowledge-probe hits@10, sorted), and the
    task metric of each adapter fine-tuned alone where those runs exist."""
    plt = _pyplot()
    rows = []
    for path in adapter_metrics:
        p = Path(path)
        m = read_json(p)
        rows.append(
            {
                "group": f"{p.parents[3].name} {p.parents[2].name} {p.parents[1].name}",
                "partition": int(p.parent.name.removeprefix("p")),
                "hits10": m["probe"]["train"]["hits_at_10"] * 100,
                "entities": m["entities"],
            }
        )
    frame = pl.DataFrame(rows)
    groups = frame["group"].unique(maintain_order=True).to_list()
    panels = len(groups) + (1 if single_runs is not None and single_runs.height else 0)
    fig, axes = plt.subplots(
        panels,
        1,
        figsize=(max(6, 0.4 * frame.height / len(groups) + 3), 3.2 * panels),
        squeeze=False,
    )
    for ax, group in zip(axes[:, 0], groups, strict=False):
        g = frame.filter(pl.col("group") == group).sort("hits10", descending=True)
        ax.bar([str(x) for x in g["partition"]], g["hits10"], color="tab:blue")
        ax.set_xlabel("Sub-graph (adapter), sorted")
        ax.set_ylabel("Entity prediction hits@10 (%)")
        ax.set_title(f"Adapter knowledge per partition: {group}")
        ax.set_ylim(0, 100)
    if panels > len(groups):
        ax = axes[-1, 0]
        per = (
            single_runs.with_columns(
                setup=pl.concat_str(
                    "task", "model", "kg", pl.col("k").cast(pl.String), separator=" / "
                )
            )
            .group_by(["setup", "partition"])
            .agg(pl.col("test").mean().alias("m"), pl.col("test").std().alias("s"))
            .sort(["setup", "m", "partition"], descending=[False, True, False])
        )
        for setup, g in per.group_by("setup", maintain_order=True):
            ax.errorbar(
                [str(x) for x in g["partition"]],
                g["m"] * 100,
                yerr=g["s"].fill_null(0) * 100,
                fmt="o",
                capsize=3,
                label=setup[0],
            )
        ax.set_xlabel("Sub-graph (adapter), sorted by mean test metric")
        ax.set_ylabel("Test metric (%)")
        ax.set_title("Each adapter fine-tuned alone (mean ± std over seeds)")
        ax.legend()
    fig.tight_layout()
    return _save(fig, out)


def figure_shuffle(runs: pl.DataFrame, out: str | Path) -> list[Path]:
    """Figure 3: MoP's task metric against the shuffle rate, mean with a ±std band."""
    plt = _pyplot()
    mop = runs.filter(pl.col("method") == "mop").with_columns(
        rate=pl.col("scheme").map_elements(shuffle_rate, return_dtype=pl.Float64)
    )
    tasks = sorted(mop["task"].unique().to_list())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for (model, kg), g in mop.filter(pl.col("task") == task).group_by(
            ["model", "kg"], maintain_order=True
        ):
            agg = g.group_by("rate").agg(
                (pl.col("test").mean() * 100).alias("m"),
                (pl.col("test").std().fill_null(0) * 100).alias("s"),
            )
            agg = agg.sort("rate")
            x, m, s = agg["rate"].to_numpy() * 100, agg["m"].to_numpy(), agg["s"].to_numpy()
            ax.plot(x, m, marker="o", label=f"{model} / {kg}")
            ax.fill_between(x, m - s, m + s, alpha=0.25)
        ax.set_xlabel("Shuffled entities (%)")
        ax.set_ylabel("Test metric (%)")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def _sample_questions(mixture_file: str | Path, n: int, seed: int) -> pl.DataFrame:
    """n test questions of a mixture file, picked with a seed, in file order."""
    frame = pl.read_parquet(mixture_file)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(frame.height, size=min(n, frame.height), replace=False))
    return frame[pick.tolist()]


def _question_text(fig, labels: list[str], texts: Sequence[str]) -> None:
    questions = "\n".join(
        f"{lab}  {textwrap.shorten(q, 110)}" for lab, q in zip(labels, texts, strict=True)
    )
    fig.text(0.01, -0.02, questions, va="top", ha="left", fontsize=8, family="monospace")


def figure_mixture(
    mixture_file: str | Path, out: str | Path, n: int = 6, seed: int = 0
) -> list[Path]:
    """Figure 4: final-layer [CLS] mixture weights over the adapters for test questions,
    with the questions printed under the heatmap."""
    plt = _pyplot()
    frame = _sample_questions(mixture_file, n, seed)
    weights = np.array(frame["weights"].to_list())
    labels = [f"Q{i + 1}" for i in range(frame.height)]
    fig_h = 1.0 + 0.45 * frame.height + 0.3 * frame.height
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * weights.shape[1] + 2), fig_h))
    im = ax.imshow(weights, aspect="auto", cmap="viridis", vmin=0)
    ax.set_yticks(range(frame.height), labels)
    ax.set_xticks(range(weights.shape[1]), [str(i) for i in range(weights.shape[1])])
    ax.set_xlabel("Sub-graph (adapter)")
    ax.set_ylabel("Question")
    ax.set_title("Mixture weight of [CLS] at the last layer")
    fig.colorbar(im, ax=ax, fraction=0.03)
    _question_text(fig, labels, frame["text"].to_list())
    return _save(fig, out)


def figure_topics(
    terms_csv: str | Path,
    groups_csv: str | Path,
    out: str | Path,
    mixture_file: str | Path | None = None,
    n: int = 6,
    seed: int = 0,
) -> list[Path]:
    """Figure 4's top: a word cloud per k-means group of partitions (summed TF-IDF scores of
    its partitions' top terms); with a mixture file, the mixture-weight heatmap below, its
    sub-graphs ordered by group so a question's weights line up with the topics."""
    from mop.topics import group_frequencies, wordcloud_image

    plt = _pyplot()
    terms = pl.read_csv(terms_csv, schema_overrides={"term": pl.String})
    groups = pl.read_csv(groups_csv).sort(["group", "partition"])
    freqs = group_frequencies(terms, groups)
    n_groups = int(groups["group"].max()) + 1
    cols = min(n_groups, 3)
    cloud_rows = -(-n_groups // cols)
    frame = _sample_questions(mixture_file, n, seed) if mixture_file else None
    heat_h = 0.75 * frame.height + 1.2 if frame is not None else 0
    fig = plt.figure(figsize=(4.2 * cols, 2.6 * cloud_rows + heat_h))
    grid = fig.add_gridspec(
        cloud_rows + (frame is not None),
        cols,
        height_ratios=[2.6] * cloud_rows + ([heat_h] if frame is not None else []),
    )
    for g in range(n_groups):
        ax = fig.add_subplot(grid[g // cols, g % cols])
        members = groups.filter(pl.col("group") == g)["partition"].to_list()
        if freqs.get(g):
            ax.imshow(wordcloud_image(freqs[g], seed), interpolation="bilinear")
        else:
            ax.text(0.5, 0.5, "(no terms)", ha="center", va="center")
        ax.set_axis_off()
        noun = "sub-graph" if len(members) == 1 else "sub-graphs"
        ax.set_title(f"Group {g}: {noun} {', '.join(map(str, members))}", fontsize=9)
    if frame is not None:
        order = groups["partition"].to_list()
        weights = np.array(frame["weights"].to_list())
        if weights.shape[1] != len(order):
            raise MopError(
                f"{mixture_file}: {weights.shape[1]} mixture weights per question, but "
                f"{groups_csv} has {len(order)} partitions"
            )
        ax = fig.add_subplot(grid[-1, :])
        im = ax.imshow(weights[:, order], aspect="auto", cmap="viridis", vmin=0)
        labels = [f"Q{i + 1}" for i in range(frame.height)]
        ax.set_yticks(range(frame.height), labels)
        ax.set_xticks(range(len(order)), [str(p) for p in order])
        bounds = np.flatnonzero(np.diff(groups["group"].to_numpy())) + 0.5
        for x in bounds:
            ax.axvline(x, color="white", linewidth=2)
        ax.set_xlabel("Sub-graph (adapter), ordered by group")
        ax.set_ylabel("Question")
        ax.set_title("Mixture weight of [CLS] at the last layer")
        fig.colorbar(im, ax=ax, fraction=0.03)
        _question_text(fig, labels, frame["text"].to_list())
    fig.tight_layout()
    return _save(fig, out)


# ----------------------------------------------------------------------------- Table 3

SHUFFLE_CAPTION = (
    "Training triples (head and tail in the same partition) of METIS partitions whose "
    "entities are shuffled at the given rate (paper section 3.6); in brackets the share of "
    "the rate-0 (METIS) count. Rate 100%: a random partition with the METIS partition sizes."
)
PARTITION_KEYS = ("k", "shuffle", "triples", "triples_retained")


def partition_rows(stats_files: Sequence[str | Path]) -> pl.DataFrame:
    """One row per partition stats file: kg, k, shuffle, triples, triples_retained, share.

    The KG name is the folder two levels up (`partition/<kg>/k<K>-<scheme>/stats.json`);
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


@dataclass
class CountTable(Table):
    """A table of formatted counts whose CSV holds the raw numbers, one row per setup."""

    numbers: pl.DataFrame = field(default_factory=pl.DataFrame)

    def frame(self) -> pl.DataFrame:
        return self.numbers


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

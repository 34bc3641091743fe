"""The paper's figures from finished runs: Figure 2 (adapters), 3 (shuffle rates), 4
(mixture weights, with the partitions' topics as word clouds); PNG and PDF."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from mop.errors import MopError
from mop.io import atomic_path, read_json
from mop.plan import Run, scheme_rate


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
        run = Run.parse(path)
        m = read_json(path)
        rows.append(
            {
                "group": f"{run.kg} k{run.k}-{run.scheme} {run.model}",
                "partition": run.part,
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
        rate=pl.col("scheme").map_elements(scheme_rate, return_dtype=pl.Float64)
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
    with the questions printed under the heatmap; a circle marks each question's true
    partition (KG probe) and a cross its linked one (routed mixtures)."""
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
    rows = np.arange(frame.height)
    marks = []
    if "partition" in frame.columns:
        ax.scatter(
            frame["partition"],
            rows,
            marker="o",
            s=140,
            facecolors="none",
            edgecolors="red",
            linewidths=1.5,
            label="true partition",
        )
        marks.append("partition")
    if "linked" in frame.columns and (frame["linked"] >= 0).any():
        linked = frame["linked"].to_numpy()
        ax.scatter(
            linked[linked >= 0],
            rows[linked >= 0],
            marker="x",
            s=60,
            c="white",
            linewidths=1.5,
            label="linked partition",
        )
        marks.append("linked")
    if marks:
        ax.legend(loc="upper left", bbox_to_anchor=(1.12, 1.0), fontsize=8, frameon=False)
    fig.colorbar(im, ax=ax, fraction=0.03)
    _question_text(fig, labels, frame["text"].to_list())
    return _save(fig, out)


def wordcloud_image(
    frequencies: Mapping[str, float], seed: int = 0, width: int = 480, height: int = 280
) -> np.ndarray:
    """An RGB word cloud (the `wordcloud` package), laid out with a fixed seed."""
    from wordcloud import WordCloud

    cloud = WordCloud(
        width=width,
        height=height,
        background_color="white",
        colormap="viridis",
        max_words=40,
        random_state=seed,
    )
    return cloud.generate_from_frequencies(dict(frequencies)).to_array()


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
    from mop.topics import group_frequencies

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

"""Every table and figure of the report, in one registry that the CLI and the workflow read.

An entry says what a report is called (`mop report <name>`), where it is written (a path
under results/ without suffix, which may hold wildcards), which files it reads (from the
run grid, mop.plan.Plan), for which wildcard values the config has data for it, its
caption in `snakemake --report`, and how it is built. `workflow/rules/report.smk` makes
one rule per entry; adding a table or a figure is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mop.plan import Plan, Run
from mop.report import analysis_tables, figures, tables
from mop.report.runs import load_runs

Files = dict[str, list[str]]
SUFFIXES = {"table": (".md", ".csv", ".tex"), "figure": (".png", ".pdf")}


@dataclass(frozen=True)
class Report:
    name: str
    target: str  # under results/, no suffix; wildcards in braces
    kind: str  # table | figure
    args: tuple[str, ...]  # the inputs it reads, each a `mop report` option
    inputs: Callable[[Plan, dict[str, str]], Files]
    wanted: Callable[[Plan], list[dict[str, str]]]  # wildcard values the config asks for
    build: Callable[[Files, Path], list[Path]]  # (inputs, output stem) -> files written
    caption: str  # workflow/report/<caption>.rst

    @property
    def category(self) -> str:
        """Its section in `snakemake --report`."""
        if self.target.startswith("topics/"):
            return "Partition topics"
        return "Tables" if self.kind == "table" else "Figures"

    def files(self, results: str, **wildcards: str) -> list[str]:
        stem = (
            f"{results}/{self.target}".format(**wildcards)
            if wildcards
            else (f"{results}/{self.target}")
        )
        return [f"{stem}{suffix}" for suffix in SUFFIXES[self.kind]]

    def targets(self, plan: Plan) -> list[str]:
        """The files of this report the config asks for (none without data for it)."""
        return [f for values in self.wanted(plan) for f in self.files(plan.results, **values)]


def _table(make: Callable[[Files], tables.Table]) -> Callable[[Files, Path], list[Path]]:
    return lambda files, out: make(files).write(out.parent, out.name)


def _one(flag: bool) -> list[dict[str, str]]:
    return [{}] if flag else []


def _mop(plan: Plan) -> bool:
    return bool(plan.ft["tasks"]) and "mop" in plan.ft["methods"]


def _topics_files(plan: Plan, run: Run) -> Files:
    return {"terms": [plan.path(run, "terms.csv")], "groups": [plan.path(run, "groups.csv")]}


REPORTS = {
    r.name: r
    for r in [
        Report(
            "table1",
            "tables/main",
            "table",
            ("runs",),
            lambda p, w: {"runs": p.metrics(p.finetune_runs())},
            lambda p: _one(bool(p.ft["tasks"])),
            _table(lambda f: tables.table_main(load_runs(f["runs"]))),
            "table1",
        ),
        Report(
            "table2",
            "tables/table2_kgs",
            "table",
            ("stats",),
            lambda p, w: {
                "stats": [p.path(Run("kg", kg=kg), "stats.json") for kg in p.config["kgs"]]
            },
            lambda p: [{}],
            _table(lambda f: tables.table_kgs(f["stats"])),
            "table2",
        ),
        Report(
            "table3",
            "tables/table3_shuffle",
            "table",
            ("stats",),
            lambda p, w: {"stats": [p.path(r, "stats.json") for r in p.partitions()]},
            lambda p: _one(len(p.schemes()) > 1),
            _table(lambda f: tables.table_shuffle(f["stats"])),
            "table3",
        ),
        Report(
            "table4",
            "tables/table4_partitions",
            "table",
            ("runs", "stats"),
            lambda p, w: {
                "runs": p.metrics(p.base_runs() + p.mop_runs(ks=p.ks()) + p.oracle_runs(p.ks())),
                "stats": [p.path(r, "stats.json") for r in p.partitions(["metis"])],
            },
            lambda p: _one(_mop(p) and p.ft["partition_experiments"]),
            _table(lambda f: tables.table_k(load_runs(f["runs"]), f["stats"])),
            "table4",
        ),
        Report(
            "table6",
            "tables/table6_mixtures",
            "table",
            ("runs",),
            lambda p, w: {"runs": p.metrics(p.base_runs() + p.mop_runs())},
            lambda p: _one(_mop(p) and len(p.ft["mixtures"]) > 1),
            _table(lambda f: tables.table_mixtures(load_runs(f["runs"]))),
            "table6",
        ),
        Report(
            "probe-baselines",
            "tables/probe_baselines",
            "table",
            ("stats",),
            lambda p, w: {
                "stats": [
                    p.path(r, "baselines.json")
                    for r in p.probe_control_runs()
                    if r.kind == "zeroshot"
                ]
            },
            lambda p: _one(any(r.kind == "zeroshot" for r in p.probe_control_runs())),
            _table(lambda f: tables.table_probe_baselines(f["stats"])),
            "probe",
        ),
        Report(
            "figure2",
            "figures/figure2_adapters",
            "figure",
            ("adapters", "single"),
            lambda p, w: {
                "adapters": p.metrics(p.adapter_runs()),
                "single": p.metrics(p.single_runs()),
            },
            lambda p: _one(_mop(p) or (bool(p.ft["tasks"]) and p.an["single_adapters"])),
            lambda f, out: figures.figure_adapters(
                f["adapters"], out, load_runs(f["single"]) if f["single"] else None
            ),
            "figure2",
        ),
        Report(
            "figure3",
            "figures/figure3_shuffle",
            "figure",
            ("runs",),
            lambda p, w: {"runs": p.metrics(p.mop_runs(schemes=p.schemes()))},
            lambda p: _one(_mop(p) and p.ft["partition_experiments"] and len(p.schemes()) > 1),
            lambda f, out: figures.figure_shuffle(load_runs(f["runs"]), out),
            "figure3",
        ),
        Report(
            "figure4",
            "figures/figure4_mixture",
            "figure",
            ("mixture",),
            lambda p, w: {"mixture": p.first_mixture_file()},
            lambda p: _one(_mop(p)),
            lambda f, out: figures.figure_mixture(f["mixture"][0], out),
            "figure4",
        ),
        Report(
            "single-adapters",
            "tables/single_adapters",
            "table",
            ("runs",),
            lambda p, w: {"runs": p.metrics(p.single_runs() + p.analysis_base_runs())},
            lambda p: _one(p.an["single_adapters"]),
            _table(lambda f: analysis_tables.table_single_adapters(load_runs(f["runs"]))),
            "single_adapters",
        ),
        Report(
            "subsets",
            "tables/subsets_{task}",
            "table",
            ("runs", "selections"),
            lambda p, w: {
                "selections": [p.path(r, "subsets.json") for r in p.selections(w["task"])],
                "runs": p.metrics(
                    p.single_runs(w["task"])
                    + p.subset_runs(w["task"])
                    + p.analysis_base_runs(w["task"])
                ),
            },
            lambda p: [{"task": t} for t in p.analysis_tasks()] if p.an["subsets"] else [],
            lambda f, out: analysis_tables.table_subsets(
                load_runs(f["runs"]), f["selections"]
            ).write(out.parent, out.name),
            "subsets",
        ),
        Report(
            "wordclouds",
            "topics/{kg}/k{k}-{scheme}/wordclouds",
            "figure",
            ("terms", "groups"),
            lambda p, w: _topics_files(
                p, Run("topics", kg=w["kg"], k=int(w["k"]), scheme=w["scheme"])
            ),
            lambda p: [{"kg": r.kg, "k": str(r.k), "scheme": r.scheme} for r in p.topics()],
            lambda f, out: figures.figure_topics(f["terms"][0], f["groups"][0], out, seed=0),
            "topics",
        ),
        Report(
            "figure-topics",
            "figures/figure4_topics",
            "figure",
            ("terms", "groups", "mixture"),
            lambda p, w: _topics_files(p, p.topics()[0]) | {"mixture": p.first_mixture_file()},
            lambda p: _one(bool(p.topics()) and _mop(p)),
            lambda f, out: figures.figure_topics(
                f["terms"][0], f["groups"][0], out, f["mixture"][0]
            ),
            "figure4_topics",
        ),
    ]
}
INPUTS = sorted({a for r in REPORTS.values() for a in r.args})


def report_targets(plan: Plan) -> list[str]:
    """Every report file the config has data for."""
    return [f for r in REPORTS.values() for f in r.targets(plan)]

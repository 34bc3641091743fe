"""The run grid: the runs a config asks for.

`Plan` turns a validated config into the grid: which partitions, adapters and fine-tuning
runs exist (`Run` records of the results grammar, mop.layout) and what files the final
target needs. Per stage, exactly the options one job reads come from its base,
`JobOptions` (mop.job_options). The grammar's names are importable from here too.
"""

from __future__ import annotations

from mop.job_options import TRAINING_KEYS, JobOptions
from mop.layout import (
    LAYOUTS,
    METHODS,
    MIXTURE,
    MIXTURE_KEYS,
    NAME,
    SCHEME,
    STAGES,
    TASKS,
    WILDCARDS,
    Run,
    log_pattern,
    mixture_keys,
    mixture_of,
    pattern,
    routed,
    scheme_name,
    scheme_rate,
)

__all__ = [
    "LAYOUTS",
    "METHODS",
    "MIXTURE",
    "MIXTURE_KEYS",
    "NAME",
    "SCHEME",
    "STAGES",
    "TASKS",
    "TRAINING_KEYS",
    "WILDCARDS",
    "JobOptions",
    "Plan",
    "Run",
    "log_pattern",
    "mixture_keys",
    "mixture_of",
    "pattern",
    "routed",
    "scheme_name",
    "scheme_rate",
]


class Plan(JobOptions):
    """The grid a validated config asks for; each job's own options come from JobOptions."""

    # ------------------------------------------------------------------ the grid

    def schemes(self) -> list[str]:
        """`metis` and one `shuffle<rate>` per nonzero rate in partition.shuffle."""
        rates = self.config["partition"]["shuffle"]
        return list(dict.fromkeys(["metis", *map(scheme_name, rates)]))

    def ks(self) -> list[int]:
        return list(dict.fromkeys(self.config["partition"]["k"]))

    def kgs(self) -> list[str]:
        """KGs whose adapters MoP runs use."""
        return self.ft.get("kgs") or list(self.config["kgs"])

    def partitions(self, schemes: list[str] | None = None) -> list[Run]:
        return [
            Run("partition", kg=kg, k=k, scheme=scheme)
            for kg in self.config["kgs"]
            for k in self.ks()
            for scheme in schemes or self.schemes()
        ]

    def adapters(self, kg: str, k: int, scheme: str, model: str) -> list[Run]:
        return [
            Run("adapter", kg=kg, k=int(k), scheme=scheme, model=model, part=i)
            for i in range(int(k))
        ]

    def base_runs(self, tasks: list[str] | None = None, seeds: list[int] | None = None):
        if "base" not in self.ft["methods"]:
            return []
        return [
            Run("base", task=task, model=model, seed=seed)
            for task in tasks or self.ft["tasks"]
            for model in self.config["base_models"]
            for seed in seeds or self.seeds(task)
        ]

    def mop_runs(
        self,
        ks: list[int] | None = None,
        schemes: list[str] | tuple[str, ...] = ("metis",),
        mixtures: list[str] | None = None,
    ) -> list[Run]:
        if "mop" not in self.ft["methods"]:
            return []
        return [
            Run("mop", task=task, model=model, mixture=mix, kg=kg, k=k, scheme=scheme, seed=s)
            for task in self.ft["tasks"]
            for model in self.config["base_models"]
            for kg in self.kgs()
            for k in ks or [self.ft["k"]]
            for scheme in schemes
            for mix in mixtures or self.ft["mixtures"]
            for s in self.seeds(task)
        ]

    def partition_experiment_runs(self) -> list[Run]:
        """MoP for every K with METIS (Table 4, with the KG probe's oracle per K) and every
        scheme at finetune.k (Figure 3)."""
        if not self.ft["partition_experiments"]:
            return []
        runs = self.mop_runs(ks=self.ks()) + self.mop_runs(schemes=self.schemes())
        return runs + self.oracle_runs(self.ks())

    def oracle_runs(self, ks: list[int]) -> list[Run]:
        """The KG probe's oracle adapter (each question through the adapter trained on its
        fact) on the probe's KG at each K."""
        probe = self.config["tasks"].get("probe")
        if "probe" not in self.ft["tasks"] or probe is None or "oracle" not in self.ft["methods"]:
            return []
        return [
            Run("oracle", task="probe", model=model, seed=s, kg=probe["kg"], k=k, scheme="metis")
            for model in self.config["base_models"]
            for k in ks
            for s in self.seeds("probe")
        ]

    def probe_control_runs(self) -> list[Run]:
        """The KG probe's controls on its own KG and partitioning: the oracle adapter
        (fine-tuned) and the adapter zero-shot (one deterministic run)."""
        probe = self.config["tasks"].get("probe")
        if "probe" not in self.ft["tasks"] or probe is None:
            return []
        out = self.oracle_runs([probe["k"]])
        if probe.get("controls"):
            where = {"kg": probe["kg"], "k": probe["k"], "scheme": "metis"}
            out += [
                Run("zeroshot", task="probe", model=model, seed=0, **where)
                for model in self.config["base_models"]
            ]
        return out

    def finetune_runs(self) -> list[Run]:
        return self.base_runs() + self.mop_runs() + self.probe_control_runs()

    def adapter_runs(self, k: int | None = None) -> list[Run]:
        """The adapters MoP uses (Figure 2)."""
        return [
            run
            for kg in self.kgs()
            for model in self.config["base_models"]
            for run in self.adapters(kg, k or self.ft["k"], "metis", model)
        ]

    # ------------------------------------------------------------------ analysis

    def analysis_tasks(self) -> list[str]:
        return self.an["tasks"] or self.ft["tasks"]

    def analysis_seeds(self, task: str) -> list[int]:
        return self.an["seeds"] or self.seeds(task)

    def analysis_mixture(self) -> str:
        return self.an["mixture"] or self.ft["mixtures"][0]

    def analysis_setups(self, task: str | None = None) -> list[tuple[str, str, str]]:
        """(task, model, kg) of the analysis runs, on the partitioning MoP uses."""
        return [
            (t, model, kg)
            for t in ([task] if task else self.analysis_tasks())
            for model in self.config["base_models"]
            for kg in self.kgs()
        ]

    def single_runs(
        self, task: str | None = None, model: str | None = None, kg: str | None = None
    ) -> list[Run]:
        """Every run of one adapter alone (per partition and seed)."""
        if not self.an["single_adapters"]:
            return []
        return [
            Run("single", task=t, model=m, kg=g, k=self.ft["k"], scheme="metis", part=p, seed=s)
            for t, m, g in self.analysis_setups(task)
            if model in (None, m) and kg in (None, g)
            for p in range(self.ft["k"])
            for s in self.analysis_seeds(t)
        ]

    def selections(self, task: str | None = None) -> list[Run]:
        if not self.an["subsets"]:
            return []
        return [
            Run("selection", task=t, model=m, kg=g, k=self.ft["k"], scheme="metis")
            for t, m, g in self.analysis_setups(task)
        ]

    def subset_runs(self, task: str | None = None) -> list[Run]:
        """MoP over each subset, and over all K adapters with the same mixture and seeds."""
        if not self.an["subsets"]:
            return []
        mix, k = self.analysis_mixture(), self.ft["k"]
        out = []
        for t, m, g in self.analysis_setups(task):
            for s in self.analysis_seeds(t):
                where = {"task": t, "model": m, "mixture": mix, "kg": g, "k": k, "seed": s}
                out += [
                    Run("subset", scheme="metis", subset=n, **where) for n in self.an["subsets"]
                ]
                out.append(Run("mop", scheme="metis", **where))
        return out

    def analysis_base_runs(self, task: str | None = None) -> list[Run]:
        return [
            run
            for t in ([task] if task else self.analysis_tasks())
            for run in self.base_runs([t], self.analysis_seeds(t))
        ]

    def topics(self) -> list[Run]:
        if "topics" not in self.an:
            return []
        return [Run("topics", kg=kg, k=self.ft["k"], scheme="metis") for kg in self.kgs()]

    # ------------------------------------------------------------------ what `all` needs

    def metrics(self, runs: list[Run]) -> list[str]:
        return [self.path(run, "metrics.json") for run in runs]

    def first_mixture_file(self) -> list[str]:
        """The mixture weights of the first MoP setup's first seed (Figure 4)."""
        runs = self.mop_runs()
        return [self.path(runs[0], "mixture.parquet")] if runs else []

    def final_outputs(self) -> list[str]:
        """Every run and partition the config asks for (the tables come from the report
        registry, mop.report.registry)."""
        runs = self.finetune_runs() + self.partition_experiment_runs()
        return [
            *self.metrics(runs),
            *[self.path(p, "stats.json") for p in self.partitions()],
        ]

"""The run grid: one grammar for every output folder, and the runs a config asks for.

Every stage writes to one folder whose path names what it holds. `LAYOUTS` is the only
place those paths are spelled: the workflow's rules take their wildcard patterns from it
(`pattern`), the command line and the tracker read a run's identity back from its folder
(`Run.parse`: tags and run names), and the report reads the same records. A Snakemake
wildcard constraint and a schema name pattern come from `WILDCARDS`.

`Plan` turns a validated config into the grid: which partitions, adapters and fine-tuning
runs exist (`Run` records), what files the final target needs, and, per stage, exactly
the options one job reads (its Snakemake params: a job reruns when, and only when, one
of them changes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mop.errors import MopError

NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
TASKS = ("probe", "hoc", "pubmedqa", "bioasq7b", "bioasq8b", "mednli", "medqa")
_NUMBER = r"[0-9]*\.?[0-9]+"
MIXTURE = (
    rf"(softmax|gumbel(-t{_NUMBER})?|moe(-k[0-9]+)?)"
    rf"(-routed(-w{_NUMBER})?)?(-prior(-p{_NUMBER})?)?(-bm25)?"
)
SCHEME = r"metis|shuffle[0-9.]+"

# What each field of a path may hold: Snakemake's wildcard constraints and the parser's.
WILDCARDS = {
    "kg": NAME,
    "model": NAME,
    "tokenizer": NAME,
    "subset": NAME,
    "k": r"\d+",
    "part": r"\d+",
    "seed": r"\d+",
    "length": r"\d+",
    "fold": r"\d+",
    "scheme": SCHEME,
    "mixture": MIXTURE,
    "task": "|".join(TASKS),
}

# Every folder of the results tree, relative to the results root.
LAYOUTS = {
    "kg": "kg/{kg}",
    "partition": "partition/{kg}/k{k}-{scheme}",
    "tokens": "tokens/{kg}/{model}.parquet",
    "adapter": "adapters/{kg}/k{k}-{scheme}/{model}/p{part}",
    "task": "tasks/{task}",
    "download": "downloads/{task}",  # only its log: the file goes to the task's data path
    "encoded": "encoded/{task}/{tokenizer}/len{length}",
    "base": "finetune/{task}/{model}/base/seed{seed}",
    "single": "finetune/{task}/{model}/adapter/{kg}/k{k}-{scheme}/p{part}/seed{seed}",
    "mop": "finetune/{task}/{model}/mop-{mixture}/{kg}/k{k}-{scheme}/seed{seed}",
    "subset": "finetune/{task}/{model}/mop-{mixture}/{kg}/k{k}-{scheme}/subset-{subset}/seed{seed}",
    "oracle": "finetune/{task}/{model}/oracle/{kg}/k{k}-{scheme}/seed{seed}",
    "zeroshot": "finetune/{task}/{model}/zeroshot/{kg}/k{k}-{scheme}/seed{seed}",
    "links": "links/{task}/{kg}/k{k}-{scheme}",
    "selection": "analysis/{task}/{model}/{kg}/k{k}-{scheme}",
    "topics": "topics/{kg}/k{k}-{scheme}",
}
# The method a fine-tuning run's kind stands for (its tag and its `mop finetune --method`).
METHODS = {
    "base": "base",
    "single": "adapter",
    "mop": "mop",
    "subset": "mop",
    "oracle": "oracle",
    "zeroshot": "zeroshot",
}
STAGES = {"adapter": "pretrain", **{kind: "finetune" for kind in METHODS}}


def _regex(layout: str) -> re.Pattern:
    out, last = [], 0
    for m in re.finditer(r"\{(\w+)\}", layout):
        out.append(re.escape(layout[last : m.start()]))
        out.append(f"(?P<{m[1]}>{WILDCARDS[m[1]]})")
        last = m.end()
    out.append(re.escape(layout[last:]))
    return re.compile(r"(?:^|/)" + "".join(out) + r"(?:/.+)?$")


_PARSERS = {kind: _regex(layout) for kind, layout in LAYOUTS.items()}
_INTS = ("k", "part", "seed", "length", "fold")


@dataclass(frozen=True)
class Run:
    """One record of the grid: a kind of folder (a key of LAYOUTS) and its fields."""

    kind: str
    kg: str | None = None
    k: int | None = None
    scheme: str | None = None
    model: str | None = None
    part: int | None = None
    task: str | None = None
    mixture: str | None = None
    subset: str | None = None
    seed: int | None = None
    tokenizer: str | None = None
    length: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise MopError(f"unknown kind of run {self.kind!r}")

    @property
    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "kind"}

    @property
    def method(self) -> str | None:
        return METHODS.get(self.kind)

    @property
    def stage(self) -> str:
        return STAGES.get(self.kind, self.kind)

    def folder(self, results: str | Path = "results") -> str:
        """The run's folder: `<results>/<layout>`."""
        try:
            return f"{results}/{LAYOUTS[self.kind].format(**self.fields)}"
        except (KeyError, ValueError) as exc:
            raise MopError(f"{self}: cannot name its folder ({exc})") from exc

    def file(self, name: str, results: str | Path = "results") -> str:
        return f"{self.folder(results)}/{name}"

    def log(self, results: str | Path = "results") -> str:
        """Its job's log: the folder's path under `<results>/logs`, as a .log file."""
        return f"{results}/logs/{LAYOUTS[self.kind].format(**self.fields)}.log"

    @classmethod
    def parse(cls, path: str | Path) -> Run:
        """The record of a run folder, or of a file below it; anything else is an error.

        The layout that explains the most of the path wins (the earliest match), so a
        KG named like a stage cannot be mistaken for that stage."""
        text = str(path).rstrip("/")
        found = [(m.start(), kind, m) for kind, p in _PARSERS.items() if (m := p.search(text))]
        if not found:
            raise MopError(f"{path}: not a folder of the results layout (see mop.plan.LAYOUTS)")
        _, kind, m = min(found, key=lambda x: x[0])
        return cls(kind, **{k: int(v) if k in _INTS else v for k, v in m.groupdict().items()})

    @classmethod
    def of(cls, kind: str, wildcards: Any) -> Run:
        """The record of a Snakemake job of this kind, from its wildcards."""
        names = {f.name for f in fields(cls)} - {"kind"}
        return cls(
            kind,
            **{k: int(v) if k in _INTS else v for k, v in dict(wildcards).items() if k in names},
        )

    @staticmethod
    def root(path: str | Path) -> str:
        """The results root a run folder lies in (`results` for `results/kg/x`)."""
        text = str(path).rstrip("/")
        found = [m.start() for p in _PARSERS.values() if (m := p.search(text))]
        if not found:
            raise MopError(f"{path}: not a folder of the results layout (see mop.plan.LAYOUTS)")
        return text[: min(found)] or "."

    def tags(self) -> dict[str, str]:
        """MLflow tags: the stage, the method and every field that is set."""
        out = {"stage": self.stage}
        if self.method:
            out["method"] = self.method
        for key, value in self.fields.items():
            if value is not None:
                out["partition" if key == "part" else key] = str(value)
        return out

    def name(self) -> str:
        """A human name: the stage, then the folder's path parts."""
        parts = LAYOUTS[self.kind].format(**self.fields).split("/")
        return " ".join([self.stage, *parts[1:]])


def pattern(kind: str, name: str = "", results: str = "results") -> str:
    """The Snakemake wildcard pattern of a kind of folder, or of a file in it."""
    path = f"{results}/{LAYOUTS[kind]}"
    return f"{path}/{name}" if name else path


def log_pattern(kind: str, results: str = "results") -> str:
    return f"{results}/logs/{LAYOUTS[kind]}.log"


def scheme_name(rate: float) -> str:
    """The partition scheme's folder and wildcard name: `metis`, or `shuffle<rate>`.

    The rate is written as Python's shortest round-trip repr (0.1 -> shuffle0.1, 1 ->
    shuffle1.0), so the name parses back to exactly the configured rate.
    """
    rate = float(rate)
    return "metis" if rate == 0 else f"shuffle{rate!r}"


def scheme_rate(scheme: str) -> float:
    """The shuffle rate of a scheme name (the inverse of `scheme_name`)."""
    if not re.fullmatch(SCHEME, scheme):
        raise MopError(f"partition scheme {scheme!r} is not metis or shuffle<rate>")
    return 0.0 if scheme == "metis" else float(scheme.removeprefix("shuffle"))


def mixture_of(name: str) -> str:
    """A mixture name as it appears in a run folder (`mop-<mixture>`)."""
    bm25_alone = name.endswith("-bm25") and not routed(name)
    if not re.fullmatch(MIXTURE, name) or bm25_alone:
        raise MopError(
            f"mixture {name!r} is not softmax, gumbel[-t<tau>] or moe[-k<top k>], "
            "optionally followed by -routed[-w<weight>] and / or -prior[-p<weight>], then "
            "optionally -bm25 (routes from the BM25 partition router instead of the entity linker)"
        )
    return name


def routed(mixture: str | None) -> bool:
    """Whether runs of this mixture read the task's links (`-routed`, `-prior`)."""
    return bool(mixture) and bool(
        re.search(rf"-(routed(-w{_NUMBER})?|prior(-p{_NUMBER})?)(-bm25)?$", mixture)
    )


# Keys of `finetune` (and `tasks.<task>.finetune`) that one fine-tuning run reads, by method.
TRAINING_KEYS = (
    "epochs",
    "batch_size",
    "grad_accum",
    "max_length",
    "lr",
    "weight_decay",
    "warmup",
    "patience",
    "dropout",
    "pooling",
    "head",
    "max_grad_norm",
    "eval_batch_size",
    "eval_train",
    "checkpoint_every",
    "save_model",
)
# The mixture settings a MoP run reads, by what its mixture name asks for.
MIXTURE_KEYS = {
    "all": ("fusion_reg",),
    "gumbel": ("gumbel_tau",),
    "moe": ("moe_top_k", "moe_importance", "moe_load"),
    "routed": ("route_loss",),
    "prior": ("route_prior",),
}


def mixture_keys(mixture: str) -> list[str]:
    """The `finetune` keys one mixture reads: a softmax run does not read the MoE keys."""
    mixture_of(mixture)
    parts = {"all", *mixture.split("-")}
    own = {  # -w<weight> and -p<weight>: the name's own weights
        key
        for key, tag in (("route_loss", "w"), ("route_prior", "p"))
        if any(re.fullmatch(rf"{tag}{_NUMBER}", p) for p in parts)
    }
    return [k for part, keys in MIXTURE_KEYS.items() if part in parts for k in keys if k not in own]


class Plan:
    """The grid a validated config asks for, and each job's own options."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.ft = config["finetune"]

    @property
    def results(self) -> str:
        return self.config["results"]

    @property
    def an(self) -> dict[str, Any]:
        """The `analysis` section, read when asked: the checks build a Plan from a config's
        finetune and tasks sections alone."""
        return self.config["analysis"]

    def job_environment(self, environ: Mapping[str, str], python: str) -> dict[str, str]:
        """What the workflow exports to its jobs (local or SLURM, which passes it on).

        Where training runs and which MLflow experiment runs go to travel here, never as
        params: changing them reruns nothing. PATH gets `python`'s bin folder first, so the
        rules' `mop` command is found when Snakemake was started as `.venv/bin/snakemake`
        without activating the venv."""
        rt, tracking = self.config["runtime"], self.config["tracking"]
        bin_dir, path = os.path.dirname(python), environ.get("PATH", "")
        if path.split(os.pathsep)[0] != bin_dir:
            path = os.pathsep.join([bin_dir, path]) if path else bin_dir
        return {
            "PATH": path,
            "MOP_EXPERIMENT": self.config["experiment"],
            "MOP_DEVICE": rt["device"],
            "MOP_PRECISION": rt["precision"],
            "MOP_COMPILE": "1" if rt["compile"] else "0",
            "MOP_LOG_MODELS": "1" if tracking["log_models"] else "0",
            "MOP_SYSTEM_METRICS": str(tracking["system_metrics"]),
        }

    # ------------------------------------------------------------------ names and options

    def path(self, run: Run, name: str = "") -> str:
        return run.file(name, self.results) if name else run.folder(self.results)

    def training(self, task: str) -> dict[str, Any]:
        """The `finetune` section with the task's own settings (`tasks.<task>.finetune`)."""
        own = self.config["tasks"].get(task, {}).get("finetune", {})
        return {**self.ft, **own}

    def seeds(self, task: str) -> list[int]:
        return list(self.training(task)["seeds"])

    def model_entries(self, model: str) -> dict[str, Any]:
        """The `models` entries one job needs: the model's and, for a random test model,
        its tokenizer's alias."""
        models = self.config["models"]
        out = {model: models[model]}
        if "random" in models[model]:
            tok = models[model]["tokenizer"]
            out[tok] = models[tok]
        return out

    def tokenizer(self, model: str) -> str:
        entry = self.config["models"][model]
        return entry["tokenizer"] if "random" in entry else model

    def kg_options(self, kg: str) -> dict[str, Any]:
        return self.config["kgs"][kg]

    def partition_options(self) -> dict[str, Any]:
        """What one partition job reads: the K and the scheme come from its folder."""
        return {k: v for k, v in self.config["partition"].items() if k not in ("k", "shuffle")}

    def tokenize_options(self) -> dict[str, Any]:
        p = self.config["pretrain"]
        return {"max_length": p["max_length"], "bidirectional": p["bidirectional"]}

    def pretrain_options(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in self.config["pretrain"].items()
            if k not in ("max_length", "bidirectional")
        }

    def task_data_options(self, task: str) -> dict[str, Any]:
        """A task's prepare step reads its data settings, not its training settings."""
        return {
            k: v
            for k, v in self.config["tasks"].get(task, {}).items()
            if k not in ("finetune", "controls", "download", "url", "sha256")
        }

    def downloads(self) -> dict[str, dict[str, str]]:
        """The tasks to download (`tasks.<name>.download: true`): file, url, sha256, and
        where the file goes."""
        from mop.download import source

        out = {}
        for task in self.ft["tasks"]:
            options = self.config["tasks"].get(task, {})
            if options.get("download"):
                src = source(task, options)
                out[task] = src | {"out": str(Path(options["path"]) / src["file"])}
        return out

    def finetune_options(self, run: Run) -> dict[str, Any]:
        """Exactly the training settings a fine-tuning run reads: the base model's learning
        rate and the rest for every method; the adapters' rate where there are adapters;
        the fusion's rate and the mixture settings for MoP."""
        settings = self.training(run.task)
        keys = list(TRAINING_KEYS)
        if run.kind != "base":
            keys.append("lr_adapters")
        if run.method == "mop":
            keys += ["lr_fusion", *mixture_keys(run.mixture)]
        keys.append("lr_head")
        return {k: settings[k] for k in keys}

    def task_folder(self, task: str, seed: int | str) -> str:
        """The prepared data one run reads: fold `seed` of cross-validated tasks."""
        from mop.tasks import get_task

        root = self.path(Run("task", task=task))
        return f"{root}/fold{seed}" if get_task(task).folds else root

    def encoded(self, task: str, model: str) -> Run:
        length = self.training(task)["max_length"]
        return Run("encoded", task=task, tokenizer=self.tokenizer(model), length=length)

    def encoded_folder(self, task: str, model: str, seed: int | str) -> str:
        """The tokens one run reads (fold `seed` of cross-validated tasks)."""
        from mop.tasks import get_task

        root = self.path(self.encoded(task, model))
        return f"{root}/fold{seed}" if get_task(task).folds else root

    def resource(self, stage: str, key: str) -> Any:
        """resources.<stage>.<key>, else resources.default.<key>, else the built-in."""
        sections = self.config["resources"]
        builtin = {"threads": 1, "mem_mb": 4000, "runtime": 120}
        for section in (sections.get(stage, {}), sections.get("default", {}), builtin):
            if key in section:
                return section[key]
        return None

    def resources(self, stage: str) -> dict[str, Any]:
        """A stage's job resources in the SLURM plugin's names (`gpu`, `gpu_model`,
        `cpus_per_gpu`, slurm_*). Only the training stages can ask for GPUs. Resources are
        never params: changing them reruns nothing."""
        keys = ["mem_mb", "runtime", "slurm_partition", "slurm_account", "slurm_extra"]
        if stage in ("pretrain", "finetune") and self.resource(stage, "gpus"):
            keys += ["gpus", "gpu_model", "cpus_per_gpu"]
        out = {k: self.resource(stage, k) for k in keys if self.resource(stage, k) is not None}
        if "gpus" in out:
            out["gpu"] = out.pop("gpus")
        return out

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

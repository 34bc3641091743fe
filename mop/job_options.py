"""What each job of the workflow reads: its options (its Snakemake params, so a job
reruns when, and only when, one of them changes), its resources and its environment.
`mop.plan.Plan` adds the grid of runs on top."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mop.layout import Run, mixture_keys

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


class JobOptions:
    """A validated config read per job: the options, resources and environment of each."""

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

# Config validation (before any job starts) and the small wildcard -> path helpers.
import json
from pathlib import Path

from mop.config import (
    preflight,
    task_data_options,
    task_run_dir,
    task_seeds,
    task_training,
    validate_config,
)
from mop.errors import MopError
from mop.tasks import DATA_TASKS, data_files, get_task

try:
    validate_config(config)
    if workflow.is_main_process:
        preflight(config)
except MopError as exc:
    raise WorkflowError(f"mop: {exc}") from None

R = config["results"]
FT = config["finetune"]


wildcard_constraints:
    kg=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    model=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    k=r"\d+",
    scheme=r"metis|shuffle[0-9.]+",
    part=r"\d+",
    seed=r"\d+",
    mixture=r"softmax|gumbel|moe",
    task=r"probe|hoc|pubmedqa|bioasq7b|bioasq8b|mednli|medqa",


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


def models_json():
    return as_json(config["models"])


RESOURCE_DEFAULTS = {"threads": 1, "mem_mb": 4000, "runtime": 120, "gpus": 0}


def res(stage, key):
    """A resource of a stage: resources.<stage>, then resources.default, then built-ins."""
    sections = config["resources"]
    for section in (sections.get(stage, {}), sections.get("default", {}), RESOURCE_DEFAULTS):
        if key in section:
            return section[key]
    return None


def shuffle_rate(scheme):
    return 0.0 if scheme == "metis" else float(scheme.removeprefix("shuffle"))


def adapter_dirs(kg, k, scheme, model):
    return [
        f"{R}/adapters/{kg}/k{k}-{scheme}/{model}/p{i}/adapter" for i in range(int(k))
    ]


def tags(**kw):
    return as_json(kw)


def task_options(task):
    """Training settings of a task's runs: `finetune` overridden by `tasks.<task>.finetune`."""
    return as_json(task_training(config, task))


def task_files(task):
    """The official data files a task's prepare step reads."""
    return [str(p) for p in data_files(task, task_data_options(config, task))]


def task_dir(task, seed):
    return task_run_dir(config, task, seed)


def finetune_outputs():
    out = []
    for task in FT["tasks"]:
        for model in config["base_models"]:
            for seed in task_seeds(config, task):
                if "base" in FT["methods"]:
                    out.append(f"{R}/finetune/{task}/{model}/base/seed{seed}/metrics.json")
                if "mop" in FT["methods"]:
                    for kg in FT.get("kgs") or list(config["kgs"]):
                        for mixture in FT["mixtures"]:
                            out.append(
                                f"{R}/finetune/{task}/{model}/mop-{mixture}/{kg}/"
                                f"k{FT['k']}-metis/seed{seed}/metrics.json"
                            )
    return out


def final_outputs():
    return [f"{R}/tables/main.md", *finetune_outputs()]

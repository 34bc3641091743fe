# Config validation (before any job starts) and the small wildcard -> path helpers.
import json
from pathlib import Path

from mop.config import preflight, validate_config
from mop.errors import MopError
from mop.partition import scheme_name, scheme_rate

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
    task=r"probe",


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
    return scheme_rate(scheme)


def partition_schemes():
    """`metis` and one `shuffle<rate>` per nonzero rate in partition.shuffle."""
    return list(dict.fromkeys(["metis", *map(scheme_name, config["partition"]["shuffle"])]))


def partition_stats():
    """Every KG x K x scheme's stats.json: the partitions the config asks for."""
    return [
        f"{R}/partition/{kg}/k{k}-{scheme}/stats.json"
        for kg in config["kgs"]
        for k in dict.fromkeys(config["partition"]["k"])
        for scheme in partition_schemes()
    ]


def mop_setups():
    """(K, scheme) pairs MoP is fine-tuned with: finetune.k with METIS and, with
    finetune.partition_experiments, every K with METIS (Table 4) and every shuffle
    scheme at finetune.k (Figure 3)."""
    setups = [(FT["k"], "metis")]
    if FT["partition_experiments"]:
        setups += [(k, "metis") for k in config["partition"]["k"]]
        setups += [(FT["k"], scheme) for scheme in partition_schemes()]
    return list(dict.fromkeys(setups))


def adapter_dirs(kg, k, scheme, model):
    return [
        f"{R}/adapters/{kg}/k{k}-{scheme}/{model}/p{i}/adapter" for i in range(int(k))
    ]


def tags(**kw):
    return as_json(kw)


def finetune_outputs():
    out = []
    for task in FT["tasks"]:
        for model in config["base_models"]:
            for seed in FT["seeds"]:
                if "base" in FT["methods"]:
                    out.append(f"{R}/finetune/{task}/{model}/base/seed{seed}/metrics.json")
                if "mop" in FT["methods"]:
                    for kg in FT.get("kgs") or list(config["kgs"]):
                        for mixture in FT["mixtures"]:
                            for k, scheme in mop_setups():
                                out.append(
                                    f"{R}/finetune/{task}/{model}/mop-{mixture}/{kg}/"
                                    f"k{k}-{scheme}/seed{seed}/metrics.json"
                                )
    return out


def partition_outputs():
    """Every partition's stats and, when the config shuffles, the Table 3 files."""
    tables = [f"{R}/tables/table3.{ext}" for ext in ("md", "csv", "tex")]
    return [*partition_stats(), *(tables if len(partition_schemes()) > 1 else [])]


def final_outputs():
    return [f"{R}/tables/main.md", *finetune_outputs(), *partition_outputs()]

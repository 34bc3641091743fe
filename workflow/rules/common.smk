# Config validation (before any job starts) and the small wildcard -> path helpers.
import json
import os
import sys
import time
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
from mop.partition import scheme_name, scheme_rate
from mop.tasks import DATA_TASKS, data_files, get_task

# Snakemake merges --configfile into config/config.yaml; a whole config must replace it.
if (
    config.get("standalone")
    and workflow.overwrite_configfiles
    and "config/config.yaml" in workflow.configfiles
    and not workflow.config_settings.replace_workflow_config
):
    raise WorkflowError(
        "mop: config key standalone: this config is a whole config; add "
        "--replace-workflow-config so that config/config.yaml is not merged into it"
    )

# A dry run shows the DAG without the data (missing inputs become warnings); a real run
# stops before any job when input data is missing.
DRY_RUN = workflow.output_settings.dryrun
try:
    validate_config(config)
    if workflow.is_main_process:
        for warning in preflight(config, missing_ok=DRY_RUN):
            print(f"mop: warning (a real run stops here): {warning}", file=sys.stderr)
except MopError as exc:
    raise WorkflowError(f"mop: {exc}") from None

# One id per workflow invocation: MLflow groups the jobs' runs under a parent run.
# Jobs (local or SLURM, which exports the environment) inherit it.
if workflow.is_main_process:
    os.environ.setdefault("MOP_INVOCATION", time.strftime("%Y%m%d-%H%M%S"))

R = config["results"]
FT = config["finetune"]
AN = config["analysis"]


wildcard_constraints:
    kg=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    model=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    k=r"\d+",
    scheme=r"metis|shuffle[0-9.]+",
    part=r"\d+",
    seed=r"\d+",
    mixture=r"softmax|gumbel(-t[0-9]*\.?[0-9]+)?|moe(-k[0-9]+)?",
    task=r"probe|hoc|pubmedqa|bioasq7b|bioasq8b|mednli|medqa",


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


def models_json():
    return as_json(config["models"])


RESOURCE_DEFAULTS = {"threads": 1, "mem_mb": 4000, "runtime": 120, "gpus": 0}


SLURM_KEYS = ("slurm_partition", "slurm_account", "slurm_extra")
GPU_STAGES = ("pretrain", "finetune")
RT = config["runtime"]


def res(stage, key):
    """A resource of a stage: resources.<stage>, then resources.default, then built-ins."""
    sections = config["resources"]
    for section in (sections.get(stage, {}), sections.get("default", {}), RESOURCE_DEFAULTS):
        if key in section:
            return section[key]
    return None


def stage_resources(stage):
    """Resources of a stage's jobs in the SLURM plugin's names (`gpu`, `gpu_model`,
    `cpus_per_gpu`, slurm_*). Only the training stages can ask for GPUs."""
    out = {"mem_mb": res(stage, "mem_mb"), "runtime": res(stage, "runtime")}
    if stage in GPU_STAGES and res(stage, "gpus"):
        out["gpu"] = res(stage, "gpus")
        for key in ("gpu_model", "cpus_per_gpu"):
            if res(stage, key) is not None:
                out[key] = res(stage, key)
    out.update({k: res(stage, k) for k in SLURM_KEYS if res(stage, k) is not None})
    return out


def shuffle_rate(scheme):
    return scheme_rate(scheme)


def partition_options():
    """The partition settings one job uses; the K and shuffle lists only add jobs, so
    growing them reruns nothing that exists."""
    return as_json({k: v for k, v in config["partition"].items() if k not in ("k", "shuffle")})


def partition_schemes():
    """`metis` and one `shuffle<rate>` per nonzero rate in partition.shuffle."""
    return list(dict.fromkeys(["metis", *map(scheme_name, config["partition"]["shuffle"])]))


def partition_stats(schemes=None):
    """stats.json of every KG x K x scheme partition the config asks for."""
    return [
        f"{R}/partition/{kg}/k{k}-{scheme}/stats.json"
        for kg in config["kgs"]
        for k in dict.fromkeys(config["partition"]["k"])
        for scheme in (schemes or partition_schemes())
    ]


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
    """The official data files a task's prepare step reads (those present, in a dry run)."""
    files = data_files(task, task_data_options(config, task))
    return [str(p) for p in files if not DRY_RUN or p.is_file()]


def task_dir(task, seed):
    return task_run_dir(config, task, seed)


def tokenizer_of(model):
    """The alias whose tokenizer a model uses (random test models borrow one)."""
    entry = config["models"][model]
    return entry["tokenizer"] if "random" in entry else model


def encoded_root(task, model):
    """The tokens of a task's splits for a model's tokenizer at the task's max_length."""
    length = task_training(config, task)["max_length"]
    return f"{R}/encoded/{task}/{tokenizer_of(model)}/len{length}"


def encoded_dir(task, model, seed):
    """The tokens one run reads (fold `seed` of cross-validated tasks)."""
    return task_run_dir(config, task, seed).replace(f"{R}/tasks/{task}", encoded_root(task, model))


# Where training and inference run: flags of every training job, never params, so that
# moving a run between CPU and GPU does not rerun it.
RUNTIME = f"--device {RT['device']} --precision {RT['precision']}" + (
    " --compile" if RT["compile"] else ""
)


def mop_kgs():
    return FT.get("kgs") or list(config["kgs"])


def base_metrics():
    """metrics.json of every base-model run."""
    if "base" not in FT["methods"]:
        return []
    return [
        f"{R}/finetune/{task}/{model}/base/seed{seed}/metrics.json"
        for task in FT["tasks"]
        for model in config["base_models"]
        for seed in task_seeds(config, task)
    ]


def mop_metrics(ks=None, schemes=("metis",), mixtures=None):
    """metrics.json of MoP runs for the given K values, partition schemes and mixtures."""
    if "mop" not in FT["methods"]:
        return []
    return [
        f"{R}/finetune/{task}/{model}/mop-{mixture}/{kg}/k{k}-{scheme}/seed{seed}/metrics.json"
        for task in FT["tasks"]
        for model in config["base_models"]
        for kg in mop_kgs()
        for k in (ks or [FT["k"]])
        for scheme in schemes
        for mixture in (mixtures or FT["mixtures"])
        for seed in task_seeds(config, task)
    ]


def partition_experiment_metrics():
    """With finetune.partition_experiments: MoP runs for every K with METIS (Table 4) and
    for every shuffle scheme at finetune.k (Figure 3)."""
    if not FT["partition_experiments"]:
        return []
    return mop_metrics(ks=list(dict.fromkeys(config["partition"]["k"]))) + mop_metrics(
        schemes=partition_schemes()
    )


def probe_control_metrics():
    """The KG probe's controls: the oracle adapter (fine-tuned) and the adapter zero-shot,
    on the probe's own KG and partitioning."""
    probe = config["tasks"].get("probe")
    if "probe" not in FT["tasks"] or probe is None:
        return []
    out = []
    for model in config["base_models"]:
        where = f"{probe['kg']}/k{probe['k']}-metis"
        if "oracle" in FT["methods"]:
            out += [f"{R}/finetune/probe/{model}/oracle/{where}/seed{seed}/metrics.json"
                    for seed in task_seeds(config, "probe")]
        if probe.get("controls"):
            out.append(f"{R}/finetune/probe/{model}/zeroshot/{where}/seed0/metrics.json")
    return out


def finetune_outputs():
    return base_metrics() + mop_metrics() + probe_control_metrics()


def adapter_metrics(k=None):
    return [
        f"{R}/adapters/{kg}/k{k or FT['k']}-metis/{model}/p{i}/metrics.json"
        for kg in mop_kgs()
        for model in config["base_models"]
        for i in range(int(k or FT["k"]))
    ]


def first_mixture_file():
    """The mixture weights of the first MoP setup's first seed (Figure 4)."""
    if not FT["tasks"] or "mop" not in FT["methods"]:
        return []
    task, model, kg = FT["tasks"][0], config["base_models"][0], mop_kgs()[0]
    return (f"{R}/finetune/{task}/{model}/mop-{FT['mixtures'][0]}/{kg}/k{FT['k']}-metis/"
            f"seed{task_seeds(config, task)[0]}/mixture.parquet")


# Which partitions matter (analysis): single adapters, adapter subsets, partition topics.


def analysis_tasks():
    return AN["tasks"] or FT["tasks"]


def analysis_seeds(task):
    return AN["seeds"] or task_seeds(config, task)


def analysis_mixture():
    return AN["mixture"] or FT["mixtures"][0]


def analysis_setups(task=None):
    """(task, model, kg) of the analysis runs, on the partitioning MoP uses (finetune.k)."""
    return [
        (t, model, kg)
        for t in ([task] if task else analysis_tasks())
        for model in config["base_models"]
        for kg in mop_kgs()
    ]


def single_adapter_metrics(task=None):
    """metrics.json of every run of one adapter alone (per partition and seed)."""
    if not AN["single_adapters"]:
        return []
    return [
        f"{R}/finetune/{t}/{model}/adapter/{kg}/k{FT['k']}-metis/p{part}/seed{seed}/metrics.json"
        for t, model, kg in analysis_setups(task)
        for part in range(FT["k"])
        for seed in analysis_seeds(t)
    ]


def subset_selections(task=None):
    """The selection (ranking and subsets) of each analysis setup."""
    if not AN["subsets"]:
        return []
    return [
        f"{R}/analysis/{t}/{model}/{kg}/k{FT['k']}-metis/subsets.json"
        for t, model, kg in analysis_setups(task)
    ]


def subset_metrics(task=None):
    """metrics.json of the MoP runs over each subset, and over all K adapters (same mixture)."""
    if not AN["subsets"]:
        return []
    mix = analysis_mixture()
    return [
        f"{R}/finetune/{t}/{model}/mop-{mix}/{kg}/k{FT['k']}-metis/{sub}seed{seed}/metrics.json"
        for t, model, kg in analysis_setups(task)
        for sub in [*(f"subset-{name}/" for name in AN["subsets"]), ""]
        for seed in analysis_seeds(t)
    ]


def analysis_base_metrics(task=None):
    """The base model's runs beside the analysis runs (same seeds), if base is run."""
    if "base" not in FT["methods"]:
        return []
    return [
        f"{R}/finetune/{t}/{model}/base/seed{seed}/metrics.json"
        for t in ([task] if task else analysis_tasks())
        for model in config["base_models"]
        for seed in analysis_seeds(t)
    ]


def single_runs_of(w):
    """The single-adapter runs one selection ranks."""
    return [
        p
        for p in single_adapter_metrics(w.task)
        if f"/{w.model}/adapter/{w.kg}/k{w.k}-metis/" in p
    ]


def subset_adapter_dirs(w):
    """The adapter folders of one subset, read from its setup's selection (a checkpoint)."""
    from mop.io import read_json
    from mop.subsets import adapter_paths

    selection = checkpoints.select_subsets.get(task=w.task, model=w.model, kg=w.kg, k=w.k)
    return adapter_paths(
        read_json(selection.output[0]), w.subset, adapter_dirs(w.kg, w.k, "metis", w.model)
    )


def subset_partitions(w):
    """The partition ids of one subset, comma-separated (a run tag)."""
    return ",".join(str(Path(d).parent.name).removeprefix("p") for d in subset_adapter_dirs(w))


def topics_dir(kg):
    return f"{R}/topics/{kg}/k{FT['k']}-metis"


def analysis_outputs():
    """Tables and figures of the analysis sections the config asks for."""
    out = []
    if AN["single_adapters"]:
        out.append(f"{R}/tables/single_adapters.md")
    if AN["subsets"]:
        out += [f"{R}/tables/subsets_{task}.md" for task in analysis_tasks()]
    if "topics" in AN:
        out += [f"{topics_dir(kg)}/wordclouds.png" for kg in mop_kgs()]
        if "mop" in FT["methods"]:
            out.append(f"{R}/figures/figure4_topics.png")
    return out


def report_outputs():
    """Tables and figures the config has data for."""
    out = [f"{R}/tables/table2_kgs.md"]
    if not FT["tasks"]:
        return out
    out.append(f"{R}/tables/main.md")
    if "mop" in FT["methods"]:
        out += [f"{R}/figures/figure2_adapters.png", f"{R}/figures/figure4_mixture.png"]
        if len(FT["mixtures"]) > 1:
            out.append(f"{R}/tables/table6_mixtures.md")
        if FT["partition_experiments"]:
            out.append(f"{R}/tables/table4_partitions.md")
            if len(partition_schemes()) > 1:
                out.append(f"{R}/figures/figure3_shuffle.png")
    elif AN["single_adapters"]:
        out.append(f"{R}/figures/figure2_adapters.png")
    if len(partition_schemes()) > 1:
        out.append(f"{R}/tables/table3_shuffle.md")
    if any("/zeroshot/" in p for p in probe_control_metrics()):
        out.append(f"{R}/tables/probe_baselines.md")
    return out + analysis_outputs()


def final_outputs():
    return [
        *report_outputs(),
        f"{R}/report/run.json",
        *finetune_outputs(),
        *partition_experiment_metrics(),
        *partition_stats(),
    ]

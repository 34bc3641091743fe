# Config validation (before any job starts), the run grid, and small input functions.
# Paths, the grid and each job's options live in mop.plan; this file only wires them in.
import json
import os
import shlex
import sys
import time

from mop.config import preflight, validate_config
from mop.errors import MopError
from mop.plan import WILDCARDS, Plan, Run, log_pattern, pattern, routed
from mop.report.registry import REPORTS, report_targets
from mop.tasks import data_files, get_task

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

PLAN = Plan(config)
R = PLAN.results

# Runtime, experiment and PATH reach every job through the environment (mop.plan). One id
# per invocation groups the jobs' runs under a parent run.
os.environ.update(PLAN.job_environment(os.environ, sys.executable))
if workflow.is_main_process:
    os.environ.setdefault("MOP_INVOCATION", time.strftime("%Y%m%d-%H%M%S"))


wildcard_constraints:
    **WILDCARDS,


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


def models_json(w):
    """The `models` entries a job of model `w.model` (or tokenizer `w.tokenizer`) needs."""
    return as_json(PLAN.model_entries(w.get("model") or w.get("tokenizer")))


def adapter_files(w, scheme=None):
    runs = PLAN.adapters(w.kg, w.k, scheme or w.scheme, w.model)
    return [PLAN.path(r, "adapter/adapter.safetensors") for r in runs]


def subset_adapter_files(w):
    """The adapters of one subset, read from its setup's selection (a checkpoint)."""
    from mop.io import read_json
    from mop.subsets import adapter_paths

    selection = checkpoints.select_subsets.get(
        task=w.task, model=w.model, kg=w.kg, k=w.k, scheme="metis"
    )
    return adapter_paths(read_json(selection.output[0]), w.subset, adapter_files(w, "metis"))


def folders(files):
    """The folders of adapter files (`.../p<i>/adapter/adapter.safetensors` -> `.../adapter`)."""
    return " ".join(os.path.dirname(f) for f in files)


def task_files(task):
    """The official data files a task's prepare step reads (those present, in a dry run)."""
    files = data_files(task, PLAN.task_data_options(task))
    fetched = task in PLAN.downloads()
    return [str(p) for p in files if not DRY_RUN or fetched or p.is_file()]


def files_in(kind, *names):
    """Output files of a rule: names in the folder of a kind of run (mop.plan.LAYOUTS)."""
    return [pattern(kind, name, R) for name in names]


FINETUNE = ["metrics.json", "predictions.parquet"]


def finetune_inputs(w):
    """Every run reads its task's splits and their tokens for its model's tokenizer; a
    routed mixture also reads the task's links to its KG partitions, and a run with
    adapters on a task that knows its facts (KG probe) the partitioning they came from."""
    out = {
        "task": PLAN.path(Run("task", task=w.task), "summary.json"),
        "encoded": PLAN.path(PLAN.encoded(w.task, w.model), "encoding.json"),
    }
    if routed(w.get("mixture")):
        out["links"] = PLAN.path(Run.of("links", w), "links.parquet")
    if "k" in w.keys() and get_task(w.task).facts:
        out["membership"] = PLAN.path(Run.of("partition", w), "membership.parquet")
    return out

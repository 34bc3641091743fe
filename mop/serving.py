"""Fine-tuned models in MLflow: a `pyfunc` model per exported run, registered per task and
base model, with aliases that point at the best run by dev metric.

With `tracking.log_models: true` (or `mop track sync --log-models`), every finished
fine-tuning run that saved its weights is exported (`mop export`, into `<run>/export`),
logged to its MLflow run as a pyfunc model whose artifact is that export, and registered
as a version of `mop-<task>-<model>`. Aliases: `best` and `best-<method>` (`best-base`,
`best-mop-softmax`, ...), chosen by the dev value of the task's main metric:

- a task with one dev split (all but PubMedQA): the version with the highest dev value;
- a task whose dev split is a cross-validation fold chosen by the seed (PubMedQA: seed i
  selects on fold i), where dev values of different folds are not comparable: `best` is
  in the method with the highest mean dev over its runs, and within a method the run
  furthest above its fold's mean (over every registered run of that fold);
  `best-fold<i>` is the highest dev value on fold i.
`mlflow.pyfunc.load_model("models:/mop-probe-minilm-l6@best")` then predicts a pandas
DataFrame with the task's input columns (text_a, text_b, candidate, choices).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from mop.io import read_json
from mop.plan import Run
from mop.tasks import get_task

MODEL_TAG = "mop.model_version"
ARTIFACT = "model"


class MopModel(mlflow.pyfunc.PythonModel):
    """A `mop export` folder behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        from mop.export import load

        self.model = load(
            context.artifacts["export"],
            device=os.environ.get("MOP_DEVICE", "cpu"),
            precision=os.environ.get("MOP_PRECISION"),  # unset: the run's own
        )

    # Unannotated on purpose: MLflow reads type hints here as an input schema.
    def predict(self, context, model_input, params=None):
        import polars as pl

        frame = (
            pl.from_pandas(model_input)
            if not isinstance(model_input, pl.DataFrame)
            else model_input
        )
        if "text_b" not in frame.columns:
            frame = frame.with_columns(text_b=pl.lit(None, dtype=pl.String))
        return self.model.predict(frame)


def registered_name(run: Run) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"mop-{run.task}-{run.model}")


def method_label(run: Run) -> str:
    return f"mop-{run.mixture}" if run.kind == "mop" else run.kind


def log_model(uri: str, run_id: str, run_dir: Path) -> tuple[str, int]:
    """Export `run_dir` (once), log it to MLflow run `run_id` and register a version;
    return (registered name, version)."""
    import mlflow

    from mop.export import export_run

    export = run_dir / "export"
    weights = run_dir / "model.safetensors"
    if not (export / "mop.json").is_file() or (
        (export / "mop.json").stat().st_mtime < weights.stat().st_mtime
    ):
        export_run(run_dir, export)
    name = registered_name(Run.parse(run_dir))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT,
            python_model=MopModel(),
            artifacts={"export": str(export)},
            registered_model_name=name,
            # The mop package travels with the model; its pinned dependencies are the
            # environment MLflow would build to serve it.
            code_paths=[str(Path(__file__).parent)],
            pip_requirements=[r for r in metadata.requires("mop") or [] if "extra ==" not in r],
        )
    version = int(info.registered_model_version)
    mlflow.MlflowClient(uri).set_tag(run_id, MODEL_TAG, str(version))
    return name, version


@dataclass(frozen=True)
class Logged:
    """A registered version and what the alias rule reads of its run."""

    version: int
    dev: float  # the dev value of the task's main metric
    method: str  # method label: base, mop-softmax, ...
    fold: int | None = None  # the dev fold it selected on, where the fold follows the seed


def pick_aliases(versions: list[Logged]) -> dict[str, int]:
    """alias -> version by the rule of the module docstring."""

    def clean(alias: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "_", alias)

    methods = sorted({v.method for v in versions})
    if all(v.fold is None for v in versions):

        def merit(v: Logged) -> float:
            return v.dev

        best_method = max(methods, key=lambda m: max(v.dev for v in versions if v.method == m))
        aliases: dict[str, int] = {}
    else:
        folds = {f: [v.dev for v in versions if v.fold == f] for f in {v.fold for v in versions}}

        def merit(v: Logged) -> float:
            return v.dev - float(np.mean(folds[v.fold]))

        def mean_dev(m: str) -> float:
            return float(np.mean([v.dev for v in versions if v.method == m]))

        best_method = max(methods, key=mean_dev)
        aliases = {
            clean(f"best-fold{f}"): max(
                (v for v in versions if v.fold == f), key=lambda v: v.dev
            ).version
            for f in sorted(folds)
        }
    for m in methods:
        aliases[clean(f"best-{m}")] = max((v for v in versions if v.method == m), key=merit).version
    aliases["best"] = aliases[clean(f"best-{best_method}")]
    return aliases


def set_aliases(client: Any, logged: dict[str, list[Logged]]) -> dict[str, str]:
    """Point the aliases of each registered model (`pick_aliases`) at their versions;
    return `name@alias` -> version."""
    out = {}
    for name, versions in logged.items():
        for alias, version in pick_aliases(versions).items():
            client.set_registered_model_alias(name, alias, str(version))
            out[f"{name}@{alias}"] = str(version)
    return out


def dev_score(run_dir: Path) -> float:
    m = read_json(run_dir / "metrics.json")
    return float(m[f"dev_{m['main_metric']}"])


def sync_models(results_dir: Path, uri: str) -> int:
    """Log and register the model of every fine-tuning run that saved one (once each),
    then set the registered models' aliases; return how many versions there are."""
    from mlflow.tracking import MlflowClient

    from mop.export import exportable
    from mop.tracking import KEY_TAG, RUN_FILE, store_lock

    client = MlflowClient(tracking_uri=uri)
    logged: dict[str, list[Logged]] = {}
    for model in sorted(results_dir.rglob("finetune/**/model.json")):
        run_dir = model.parent
        if not (run_dir / RUN_FILE).is_file() or not exportable(read_json(model)["method"]):
            continue
        record = read_json(run_dir / RUN_FILE)
        with store_lock(uri):
            exp = client.get_experiment_by_name(record["experiment"])
            found = client.search_runs(
                [exp.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{record['key']}'"
            )
        if not found:
            continue
        run = found[0]
        version = run.data.tags.get(MODEL_TAG)
        with store_lock(uri):
            if version is None:
                name, number = log_model(uri, run.info.run_id, run_dir)
            else:
                name, number = registered_name(Run.parse(run_dir)), int(version)
        parsed = Run.parse(run_dir)
        fold = parsed.seed if get_task(parsed.task).folds else None
        logged.setdefault(name, []).append(
            Logged(number, dev_score(run_dir), method_label(parsed), fold)
        )
    with store_lock(uri):
        set_aliases(client, logged)
    return sum(len(v) for v in logged.values())

"""Run tracking: every job writes its run to disk first and mirrors it to MLflow.

A job's `Tracker` keeps params, tags and metric histories and writes them as `run.json`
next to the job's outputs when the job ends; only then is the record copied to MLflow.
So a tracking server that is down never costs a result: the job still finishes, and
`mop track sync` (which the report rule runs) logs every record MLflow does not hold
yet. Each record carries a key (its output folder) and a content hash; a run already in
MLflow with the same key and hash is left alone, an older one with that key is replaced,
so nothing is logged twice.

The default store is sqlite at `results/mlflow.db` (MLflow 3.17 refuses a plain file
store); `MLFLOW_TRACKING_URI` overrides it. Writes to a sqlite store are serialised with
a file lock, since K jobs finish at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mop.io import read_json, write_json

RUN_FILE = "run.json"
KEY_TAG = "mop.run_key"
INVOCATION_TAG = "mop.invocation"
INVOCATION_ENV = "MOP_INVOCATION"
EXPERIMENT_ENV = "MOP_EXPERIMENT"
LOG_MODELS_ENV = "MOP_LOG_MODELS"
PARENT_TAG = "mop.parent_of"
HASH_TAG = "mop.record_hash"
TAG_NAMES = (
    "stage",
    "kg",
    "k",
    "scheme",
    "model",
    "task",
    "method",
    "mixture",
    "seed",
    "partition",
)


def default_tracking_uri(results_dir: str | Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params ("a.b.c": "value"), values as strings."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


class Tracker:
    """Collects one job's params, tags and metrics; `finish()` writes and mirrors them."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        experiment: str,
        run_name: str,
        tags: Mapping[str, Any],
        params: Mapping[str, Any],
        results_dir: str | Path = "results",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.results_dir = Path(results_dir)
        self.record: dict[str, Any] = {
            "key": str(self.out_dir.resolve().relative_to(self.results_dir.resolve()))
            if self.out_dir.resolve().is_relative_to(self.results_dir.resolve())
            else str(self.out_dir),
            "experiment": experiment,
            "run_name": run_name,
            "tags": {k: str(v) for k, v in tags.items()}
            | (
                {INVOCATION_TAG: os.environ[INVOCATION_ENV]}
                if os.environ.get(INVOCATION_ENV)
                else {}
            ),
            "params": flatten(params),
            "metrics": [],
            "artifacts": [],
            "inputs": [],
            "start_ms": int(time.time() * 1000),
        }
        self._watcher: SystemWatcher | None = None

    @classmethod
    def for_run(
        cls,
        out_dir: str | Path,
        params: Mapping[str, Any],
        experiment: str | None = None,
        **tags: Any,
    ) -> Tracker:
        """The tracker of a run folder: name, tags and results root read from its path
        (mop.plan's grammar); the experiment from `MOP_EXPERIMENT` unless given."""
        from mop.plan import Run

        run = Run.parse(out_dir)
        return cls(
            out_dir,
            experiment=experiment or os.environ.get(EXPERIMENT_ENV) or "mop",
            run_name=run.name(),
            tags=run.tags() | tags,
            params=params,
            results_dir=Run.root(out_dir),
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self.record["metrics"].append([key, float(value), int(step), now])

    def log_artifact(self, path: str | Path) -> None:
        self.record["artifacts"].append(str(Path(path).resolve()))

    def log_input(self, path: str | Path, name: str, context: str) -> None:
        """A dataset the run read (lineage in MLflow: name, digest, source, schema)."""
        self.record["inputs"].append(dataset_record(path, name, context))

    def watch_system(self, interval: float = 10.0) -> None:
        """Sample CPU, memory (and GPU memory) every `interval` seconds until `finish`, as
        MLflow's system metrics (`system/...`)."""
        if self._watcher is None:
            self._watcher = SystemWatcher(self, interval)
            self._watcher.start()

    def finish(self, status: str = "FINISHED") -> Path:
        if self._watcher is not None:
            self._watcher.stop()
        self.record["status"] = status
        self.record["end_ms"] = int(time.time() * 1000)
        path = self.out_dir / RUN_FILE
        write_json(self.record, path)
        try_sync(path, default_tracking_uri(self.results_dir), self.results_dir)
        return path


class SystemWatcher(threading.Thread):
    """A daemon thread that logs system metrics into a Tracker's record."""

    def __init__(self, tracker: Tracker, interval: float):
        super().__init__(daemon=True)
        self.tracker, self.interval = tracker, interval
        self.done = threading.Event()
        self.step = 0

    def sample(self) -> None:
        import psutil

        mem = psutil.virtual_memory()
        metrics = {
            "system/cpu_utilization_percentage": psutil.cpu_percent(),
            "system/system_memory_usage_megabytes": (mem.total - mem.available) / 2**20,
            "system/system_memory_usage_percentage": mem.percent,
            "system/process_memory_rss_megabytes": psutil.Process().memory_info().rss / 2**20,
        }
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                used = torch.cuda.memory_reserved(i) / 2**20
                metrics[f"system/gpu_{i}_memory_usage_megabytes"] = used
        self.tracker.log_metrics(metrics, self.step)
        self.step += 1

    def run(self) -> None:
        import psutil

        psutil.cpu_percent()  # the first call only sets the reference point
        while not self.done.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)
        self.sample()


def dataset_record(path: str | Path, name: str, context: str) -> dict[str, Any]:
    """What MLflow's dataset lineage holds of a file: name, digest, source and, for a
    Parquet table, its columns."""
    from mop.checkpoint import file_digest

    path = Path(path).resolve()
    schema = ""
    if path.suffix == ".parquet":
        import polars as pl

        cols = pl.read_parquet_schema(path)
        schema = json.dumps(
            {"mlflow_colspec": [{"name": c, "type": str(t)} for c, t in cols.items()]}
        )
    return {
        "name": name,
        "digest": file_digest(path)[:16],
        "source": path.as_uri(),
        "schema": schema,
        "context": context,
    }


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _experiment_id(client: Any, name: str, results_dir: Path, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (results_dir.resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _parent_run(client: Any, exp_id: str, invocation: str) -> str:
    """The run that groups one workflow invocation's jobs (created on first use)."""
    found = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{invocation}'")
    if found:
        return found[0].info.run_id
    run = client.create_run(
        exp_id,
        tags={PARENT_TAG: invocation, "stage": "workflow"},
        run_name=f"workflow {invocation}",
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def sync_record(path: str | Path, uri: str, results_dir: str | Path = "results") -> str:
    """Copy one run record into MLflow unless it is there already; return what happened."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    record = read_json(path)
    digest = record_hash(record)
    with store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment_id(client, record["experiment"], Path(results_dir), uri)
        existing = client.search_runs(
            [exp_id], filter_string=f"tags.`{KEY_TAG}` = '{record['key']}'"
        )
        if any(r.data.tags.get(HASH_TAG) == digest for r in existing):
            return "present"
        for run in existing:
            client.delete_run(run.info.run_id)
        tags = record["tags"] | {KEY_TAG: record["key"], HASH_TAG: digest}
        if record["tags"].get(INVOCATION_TAG):
            tags["mlflow.parentRunId"] = _parent_run(client, exp_id, record["tags"][INVOCATION_TAG])
        run = client.create_run(
            exp_id, start_time=record["start_ms"], tags=tags, run_name=record["run_name"]
        )
        run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in record["params"].items()]
        metrics = [Metric(k, v, ts, step) for k, v, step, ts in record["metrics"]]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        if record.get("inputs"):
            client.log_inputs(run_id, datasets=[_dataset_input(d) for d in record["inputs"]])
        for artifact in record["artifacts"]:
            if Path(artifact).is_file():
                client.log_artifact(run_id, artifact)
            elif Path(artifact).is_dir():
                client.log_artifacts(run_id, artifact, Path(artifact).name)
        client.set_tag(run_id, "mlflow.runName", record["run_name"])
        client.set_terminated(run_id, record.get("status", "FINISHED"), record.get("end_ms"))
        return "logged" if not existing else "replaced"


def _dataset_input(d: Mapping[str, str]) -> Any:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=d["name"],
        digest=d["digest"],
        source_type="local",
        source=json.dumps({"uri": d["source"]}),
        schema=d["schema"] or None,
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", d["context"])])


def try_sync(path: str | Path, uri: str, results_dir: str | Path = "results") -> bool:
    """Mirror a record to MLflow; on any failure say so on stderr and carry on."""
    try:
        sync_record(path, uri, results_dir)
        return True
    except Exception as exc:  # the tracking server is optional at job time
        print(
            f"mop: MLflow at {uri} not reachable ({type(exc).__name__}: {exc}); "
            f"run kept in {path}, log it later with `mop track sync`",
            file=sys.stderr,
        )
        return False


def sync_all(results_dir: str | Path, uri: str | None = None) -> dict[str, int]:
    """Log every run record under `results_dir` that MLflow lacks (idempotent)."""
    results_dir = Path(results_dir)
    uri = uri or default_tracking_uri(results_dir)
    counts: dict[str, int] = {}
    for path in sorted(results_dir.rglob(RUN_FILE)):
        outcome = sync_record(path, uri, results_dir)
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def log_models_wanted(flag: bool | None = None) -> bool:
    """Whether to log the fine-tuned models: the flag, else $MOP_LOG_MODELS = 1."""
    return flag if flag is not None else os.environ.get(LOG_MODELS_ENV) == "1"

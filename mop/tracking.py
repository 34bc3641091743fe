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
            "start_ms": int(time.time() * 1000),
        }

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

    def finish(self, status: str = "FINISHED") -> Path:
        self.record["status"] = status
        self.record["end_ms"] = int(time.time() * 1000)
        path = self.out_dir / RUN_FILE
        write_json(self.record, path)
        try_sync(path, default_tracking_uri(self.results_dir), self.results_dir)
        return path


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
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
    with _store_lock(uri):
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
        for artifact in record["artifacts"]:
            if Path(artifact).is_file():
                client.log_artifact(run_id, artifact)
            elif Path(artifact).is_dir():
                client.log_artifacts(run_id, artifact, Path(artifact).name)
        client.set_tag(run_id, "mlflow.runName", record["run_name"])
        client.set_terminated(run_id, record.get("status", "FINISHED"), record.get("end_ms"))
        return "logged" if not existing else "replaced"


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

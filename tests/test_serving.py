"""MLflow holds the fine-tuned models (pyfunc, registered, aliased), the datasets a run
read and its system metrics: tested against a real `mlflow server`."""

from __future__ import annotations

import shutil
import time

import numpy as np
import polars as pl
import pytest
import yaml

from mop.tracking import Tracker
from tests.conftest import snakemake


def test_system_metrics_and_inputs_go_into_the_record(tmp_path, small_kg):
    track = Tracker(tmp_path / "run", experiment="e", run_name="r", tags={}, params={})
    track.log_input(small_kg / "triples.parquet", "kg-triples", "knowledge graph")
    track.watch_system(0.05)

    def sampled() -> int:
        return sum(m[0] == "system/cpu_utilization_percentage" for m in track.record["metrics"])

    deadline = time.time() + 30  # a loaded CI machine may hold the thread back a while
    while sampled() < 2 and time.time() < deadline:
        time.sleep(0.05)
    path = track.finish()
    record = yaml.safe_load(path.read_text())
    names = {m[0] for m in record["metrics"]}
    assert {"system/cpu_utilization_percentage", "system/process_memory_rss_megabytes"} <= names
    steps = [m[2] for m in record["metrics"] if m[0] == "system/cpu_utilization_percentage"]
    assert len(steps) >= 3 and steps == sorted(steps)
    (dataset,) = record["inputs"]
    assert dataset["name"] == "kg-triples" and dataset["context"] == "knowledge graph"
    assert dataset["source"].startswith("file://") and len(dataset["digest"]) == 16
    assert '"name": "head"' in dataset["schema"]


@pytest.mark.slow
def test_registered_models_load_by_alias_and_predict_the_same(
    finished_run, mlflow_server, tmp_path
):
    import mlflow
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    shutil.copytree(finished_run, work, symlinks=True)
    extra = tmp_path / "models.yaml"
    extra.write_text(
        yaml.safe_dump(
            {
                "experiment": "mop-serving",
                # an oracle run saves weights too, but has no model for new inputs
                "finetune": {"save_model": True, "methods": ["base", "mop", "oracle"]},
                "tracking": {"log_models": True},
            }
        )
    )
    result = snakemake(
        work,
        "--configfile",
        str(work / "config" / "config.yaml"),
        str(extra),
        tracking_uri=mlflow_server,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    best = client.get_model_version_by_alias("mop-probe-tiny", "best")
    assert client.get_model_version_by_alias("mop-probe-tiny", "best-base").version
    assert client.get_model_version_by_alias("mop-probe-tiny", "best-mop-softmax").version
    assert "best-oracle" not in client.get_registered_model("mop-probe-tiny").aliases
    run = client.get_run(best.run_id)
    folder = work / "results" / run.data.tags["mop.run_key"]
    # the alias points at the highest dev metric among the registered runs
    versions = client.search_model_versions("name = 'mop-probe-tiny'")
    devs = {v.version: client.get_run(v.run_id).data.metrics["dev_accuracy"] for v in versions}
    assert devs[best.version] == max(devs.values()) and len(devs) >= 6
    # lineage and system metrics of that run
    inputs = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert {"probe-train", "probe-dev", "probe-test"} <= inputs
    assert "system/cpu_utilization_percentage" in run.data.metrics

    # a MoP run's card names its knowledge graph (the best run may be a base run)
    mop_run = client.get_run(
        client.get_model_version_by_alias("mop-probe-tiny", "best-mop-softmax").run_id
    )
    card = work / "results" / mop_run.data.tags["mop.run_key"] / "export" / "README.md"
    card = card.read_text()
    assert "## Knowledge graph" in card and "KG `hpo-tiny` (hpo)" in card
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/mop-probe-tiny@best")
    test = pl.read_parquet(work / "results" / "tasks" / "probe" / "test.parquet")
    probs = model.predict(test.select("text_a", "text_b").to_pandas())
    expected = pl.read_parquet(folder / "predictions.parquet").filter(pl.col("split") == "test")
    np.testing.assert_allclose(probs, np.array(expected["prob"].to_list()), atol=1e-6)


def test_aliases_compare_pubmedqa_runs_only_within_their_fold():
    """Seed i of PubMedQA trains and selects on fold i: dev values of different folds are
    not comparable, so `best` must not just be the easiest fold's run."""
    from mop.serving import Logged, pick_aliases

    versions = [
        Logged(1, 0.90, "base", fold=0),
        Logged(2, 0.60, "base", fold=1),
        Logged(3, 0.95, "mop-softmax", fold=0),  # the highest dev value: an easy fold
        Logged(4, 0.50, "mop-softmax", fold=1),
    ]
    aliases = pick_aliases(versions)
    # base has the better mean over folds (0.75 vs 0.725); its fold-1 run is 0.05 above
    # fold 1's mean, its fold-0 run 0.025 below fold 0's
    assert aliases["best"] == aliases["best-base"] == 2
    assert aliases["best-mop-softmax"] == 3  # +0.025 on fold 0 beats -0.05 on fold 1
    assert aliases["best-fold0"] == 3 and aliases["best-fold1"] == 2
    # one shared dev split: the highest dev value, as before
    same = [Logged(v.version, v.dev, v.method) for v in versions]
    assert pick_aliases(same) == {"best-base": 1, "best-mop-softmax": 3, "best": 3}

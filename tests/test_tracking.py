from mlflow.tracking import MlflowClient

from mop.io import read_json
from mop.tracking import KEY_TAG, Tracker, sync_all


def _run(results, name, loss=1.0):
    t = Tracker(
        results / "pretrain" / name,
        experiment="exp",
        run_name=name,
        tags={"stage": "pretrain", "partition": name},
        params={"pretrain": {"lr": 0.001}},
        results_dir=results,
    )
    for step in range(3):
        t.log_metrics({"loss": loss - 0.1 * step}, step)
    return t


def test_runs_survive_a_dead_server_and_are_logged_once_later(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens here
    path = _run(results, "p0").finish()
    record = read_json(path)
    assert [m[0] for m in record["metrics"]] == ["loss"] * 3
    assert record["params"] == {"pretrain.lr": "0.001"}

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _run(results, "p1").finish()  # logged at once
    assert sync_all(results, uri) == {"logged": 1, "present": 1}
    assert sync_all(results, uri) == {"present": 2}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags[KEY_TAG] for r in runs) == ["pretrain/p0", "pretrain/p1"]
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert runs[0].data.tags["stage"] == "pretrain"

    _run(results, "p0", loss=2.0).finish()  # a rerun replaces its old run
    assert sync_all(results, uri) == {"present": 2}
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    p0 = next(r for r in runs if r.data.tags[KEY_TAG] == "pretrain/p0")
    assert p0.data.metrics["loss"] == 2.0 - 0.2

"""Faults a long workflow meets: killed writers, bad data in one job, a tracking server down."""

import shutil
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from mop.io import read_json
from mop.tracking import sync_all
from tests.conftest import corrupt_checkpoint, snakemake, tiny_workdir

pytestmark = pytest.mark.slow

WRITER = """
import sys, numpy as np, polars as pl
from safetensors.torch import save_file
import torch
from mop.io import write_parquet, atomic_path
frame = pl.DataFrame({"x": np.arange(3_000_000), "y": np.random.default_rng(0).random(3_000_000)})
tensor = {"w": torch.randn(1000, 1000)}
print("ready", flush=True)
while True:
    write_parquet(frame, sys.argv[1] + "/table.parquet")
    with atomic_path(sys.argv[1] + "/weights.safetensors") as tmp:
        save_file(tensor, str(tmp))
"""


def test_killed_writers_never_leave_a_truncated_output(tmp_path):
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 1.5)))
        proc.kill()
        proc.wait()
        if (tmp_path / "table.parquet").exists():
            assert pl.read_parquet(tmp_path / "table.parquet").height == 3_000_000
        if (tmp_path / "weights.safetensors").exists():
            assert load_file(tmp_path / "weights.safetensors")["w"].shape == (1000, 1000)
    assert (tmp_path / "table.parquet").exists()


def test_a_job_failing_on_bad_data_keeps_the_rest_and_the_rerun_does_only_what_is_missing(
    tmp_path,
):
    work = tiny_workdir(tmp_path / "run")
    bad = work / "results" / "adapters" / "hpo-tiny" / "k2-metis" / "tiny" / "p1" / "checkpoint"
    corrupt_checkpoint(bad)
    result = snakemake(work, "--keep-going")
    assert result.returncode != 0
    log = "results/logs/adapters/hpo-tiny/k2-metis/tiny/p1.log"
    assert "Error in rule pretrain" in result.stderr and log in result.stderr
    assert "checkpoint is unreadable" in (work / log).read_text()
    r = work / "results"
    assert (r / "adapters/hpo-tiny/k2-metis/tiny/p0/adapter/adapter.safetensors").is_file()
    assert not (r / "adapters/hpo-tiny/k2-metis/tiny/p1/adapter").exists()
    assert (r / "finetune/probe/tiny/base/seed1/metrics.json").is_file()
    before = (r / "adapters/hpo-tiny/k2-metis/tiny/p0/adapter/adapter.safetensors").stat().st_mtime

    # The fix: remove the bad checkpoint. The rerun does only the missing work.
    shutil.rmtree(bad)
    plan = snakemake(work, "-n", "--quiet", "rules")
    todo = {
        line.split()[0]: int(line.split()[1])
        for line in plan.stdout.splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    }
    assert todo.get("pretrain") == 1 and todo.get("finetune_mop") == 4
    for done in ("kg", "partition", "tokenize", "task_probe", "finetune_base"):
        assert done not in todo, plan.stdout
    result = snakemake(work)
    assert result.returncode == 0, result.stderr[-3000:]
    after = (r / "adapters/hpo-tiny/k2-metis/tiny/p0/adapter/adapter.safetensors").stat().st_mtime
    assert after == before


def test_tracking_server_down_loses_nothing_and_logs_each_run_once(tmp_path, mlflow_server):
    work = tiny_workdir(tmp_path / "run")
    config = work / "config" / "config.yaml"
    config.write_text(config.read_text().replace("experiment: mop-test", "experiment: mop-offline"))
    target = "results/finetune/probe/tiny/base/seed0/metrics.json"
    result = snakemake(work, target, tracking_uri="http://127.0.0.1:9")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (work / "results/logs/finetune/probe/tiny/base/seed0.log").read_text()
    assert "not reachable" in log and "mop track sync" in log
    record = read_json(work / "results/finetune/probe/tiny/base/seed0/run.json")
    assert {m[0] for m in record["metrics"]} >= {"train_loss", "dev_accuracy", "test_accuracy"}

    # the kg job's run and the fine-tuning run, each logged once
    assert sync_all(work / "results", mlflow_server) == {"logged": 2}
    assert sync_all(work / "results", mlflow_server) == {"present": 2}
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("mop-offline")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["finetune", "kg", "workflow"]
    runs = [r for r in runs if r.data.tags["stage"] == "finetune"]
    assert [r.info.run_name for r in runs] == ["finetune probe tiny base seed0"]
    assert (
        runs[0].data.metrics["test_accuracy"]
        == read_json(work / "results/finetune/probe/tiny/base/seed0/metrics.json")["test_accuracy"]
    )

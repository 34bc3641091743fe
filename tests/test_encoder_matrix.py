"""The encoder matrix: every family the `adapters` library wraps, and a RoBERTa folder as
a user would bring one (issue 23), through the tiny workflow from KG to table in ONE
Snakemake run (`.test/config-encoders`: one seed, tiny sizes), then per family: the table
row, an export loaded in a fresh process predicting what the run predicted, and a killed
fine-tuning job resuming to the run's result."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from mop.export import export_run
from mop.io import read_json
from tests.conftest import REPO, kill_at_checkpoint, snakemake
from tests.encoder_kit import FAMILY_TOKENIZERS

pytestmark = pytest.mark.slow  # run in CI like every test; marked as minutes long

ALIASES = [*FAMILY_TOKENIZERS, "roberta-folder"]
WITH_SEGMENTS = {"bert", "electra", "albert"}
MOP = "hpo-tiny/k2-metis/seed0"
RUNS = ["base/seed0"] + [
    f"mop-{m}/{MOP}" for m in ("softmax", "gumbel-t0.5", "moe", "softmax-routed")
]
EXPORTED = f"mop-moe/{MOP}"  # the export checks: MoE carries weights fusion has not
RESUMED = f"mop-gumbel-t0.5/{MOP}"  # the resume check: Gumbel noise must replay too


@pytest.fixture(scope="session")
def encoder_run(tmp_path_factory, encoder_root) -> Path:
    """The matrix config's whole DAG, run once per session; its wall time in wall.json."""
    work = tmp_path_factory.mktemp("encoder-matrix")
    (work / "config").mkdir()
    shutil.copy(REPO / ".test" / "config-encoders" / "config.yaml", work / "config")
    shutil.copytree(encoder_root / "encoders", work / "encoders")
    start = time.perf_counter()
    result = snakemake(work, "--printshellcmds")
    assert result.returncode == 0, result.stderr[-5000:]
    (work / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    (work / "snakemake.out").write_text(result.stdout + result.stderr)
    return work


def _run_dir(work: Path, alias: str, run: str) -> Path:
    return work / "results" / "finetune" / "probe" / alias / run


@pytest.mark.parametrize("alias", ALIASES)
def test_every_family_runs_the_tiny_workflow_to_its_table(alias, encoder_run):
    results = encoder_run / "results"
    for run in RUNS:
        m = read_json(_run_dir(encoder_run, alias, run) / "metrics.json")
        assert 0.0 <= m["test_accuracy"] <= 1.0 and m["steps"] == 8, run
    for part in (0, 1):
        probe = read_json(
            results / "adapters" / MOP.rsplit("/", 1)[0] / alias / f"p{part}" / "metrics.json"
        )
        assert probe["probe"]["train"]["examples"] > 0 and probe["final_loss"] > 0
    tokens = pl.read_parquet(results / "tokens" / "hpo-tiny" / f"{alias}.parquet")
    assert ("token_type_ids" in tokens.columns) == (alias in WITH_SEGMENTS)
    main = (results / "tables" / "main.md").read_text()
    assert any(f"| {alias} " in line or f"| {alias}|" in line for line in main.splitlines()), main


@pytest.fixture(scope="session")
def exported(encoder_run, tmp_path_factory) -> dict[str, dict]:
    """Every family's MoE run exported, then loaded and asked for the test split's
    predictions in ONE fresh process (`mop.load`); alias -> {ids, probs, run's probs}."""
    out = tmp_path_factory.mktemp("exports")
    with contextlib.chdir(encoder_run):  # the configs' folders are relative to the workflow
        for alias in ALIASES:
            export_run(_run_dir(encoder_run, alias, EXPORTED), out / alias)
    test = pl.read_parquet(encoder_run / "results" / "tasks" / "probe" / "test.parquet")
    test.select("id", "text_a", "text_b", "candidate").write_parquet(out / "test.parquet")
    script = (
        "import json, sys, polars as pl, mop\n"
        "frame = pl.read_parquet(sys.argv[1] + '/test.parquet')\n"
        "out = {a: mop.load(sys.argv[1] + '/' + a).predict(frame).tolist() for a in sys.argv[2:]}\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(out), *ALIASES],
        capture_output=True,
        text=True,
        cwd=encoder_run,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    probs = json.loads(result.stdout.splitlines()[-1])
    return {a: {"ids": test["id"].cast(pl.String).to_list(), "probs": probs[a]} for a in ALIASES}


@pytest.mark.parametrize("alias", ALIASES)
def test_an_export_of_every_family_predicts_what_the_run_predicted(alias, exported, encoder_run):
    frame = pl.read_parquet(_run_dir(encoder_run, alias, EXPORTED) / "predictions.parquet")
    test = frame.filter(pl.col("split") == "test")
    order = {i: n for n, i in enumerate(test["id"].cast(pl.String).to_list())}
    expected = np.array(test["prob"].to_list())
    got = np.array(exported[alias]["probs"])[[order[i] for i in exported[alias]["ids"]]]
    assert got.shape == expected.shape == (16, 2)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def _job_command(encoder_run: Path, alias: str, run: str) -> list[str]:
    """The `mop finetune` command Snakemake ran for a run (from --printshellcmds)."""
    out = f"results/finetune/probe/{alias}/{run}"
    log = (encoder_run / "snakemake.out").read_text()
    line = next(x for x in log.splitlines() if "mop finetune" in x and f"--out {out} " in x)
    return shlex.split(line[line.index("mop finetune") :].split(" 2> ")[0])


@pytest.mark.parametrize("alias", ALIASES)
def test_a_killed_fine_tuning_job_of_every_family_resumes_to_the_runs_result(
    alias, encoder_run, tmp_path
):
    """The job's own command, checkpointing every step, stopped by SIGTERM after its first
    checkpoint and started again, ends with the run's weights and predictions."""
    cmd = _job_command(encoder_run, alias, RESUMED)
    opts = cmd.index("--options") + 1
    cmd[opts] = json.dumps(json.loads(cmd[opts]) | {"checkpoint_every": 1})
    out = tmp_path / "results" / "finetune" / "probe" / alias / RESUMED
    cmd[cmd.index("--out") + 1] = str(out)
    cmd = [str(Path(sys.executable).parent / "mop"), *cmd[1:]]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.Popen(
        cmd, cwd=encoder_run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    kill_at_checkpoint(proc, out / "checkpoint", signal.SIGTERM)
    assert proc.returncode == 143 and not (out / "metrics.json").exists()
    result = subprocess.run(cmd, cwd=encoder_run, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "resuming from step" in result.stderr, result.stderr[-3000:]
    run = _run_dir(encoder_run, alias, RESUMED)
    assert pl.read_parquet(out / "predictions.parquet").equals(
        pl.read_parquet(run / "predictions.parquet")
    )
    a, b = load_file(out / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)

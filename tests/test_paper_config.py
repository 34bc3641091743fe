"""config/paper.yaml: the paper's whole grid as a Snakemake dry run, and its data checks."""

import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "tasks"
PAPER = REPO / "config" / "paper.yaml"


def dry_run(workdir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "-p",
            "-s",
            str(REPO / "workflow" / "Snakefile"),
            "-d",
            str(workdir),
            "--configfile",
            str(PAPER),
            "--cores",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
    )


def place_task_data(workdir: Path) -> None:
    """The fixtures where paper.yaml looks for the six datasets (no KG, no model weights)."""
    tasks = workdir / "data" / "tasks"
    for name, fixture in [
        ("hoc", "hoc"),
        ("pubmedqa", "pubmedqa"),
        ("bioasq7b", "bioasq7b"),
        ("bioasq8b", "bioasq7b"),
        ("mednli", "mednli"),
        ("medqa", "medqa"),
    ]:
        shutil.copytree(FIXTURES / fixture, tasks / name)
    # The UMLS release folder must exist for the pre-flight check; the dry run reads no file.
    (workdir / "data" / "umls" / "2020AB" / "META").mkdir(parents=True)


def test_dry_run_lists_the_papers_jobs(tmp_path):
    place_task_data(tmp_path)
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = collections.Counter(re.findall(r"^rule (\w+):", result.stdout, flags=re.M))
    config = yaml.safe_load(PAPER.read_text())
    models, kgs, k = len(config["base_models"]), len(config["kgs"]), config["partition"]["k"][0]
    runs = sum(len(t["finetune"]["seeds"]) for t in config["tasks"].values())
    assert (models, kgs, k, runs) == (3, 2, 20, 5 + 10 + 10 + 10 + 3 + 3)
    assert jobs == {
        "kg": kgs,
        "partition": kgs * 6,  # METIS and the five shuffle rates of Table 3
        "tokenize": kgs * models,
        "pretrain": kgs * models * k,
        "task_data": 5,  # hoc, bioasq7b, bioasq8b, mednli, medqa
        "task_pubmedqa": 1,  # writes the 10 folds
        "encode": 6 * models,  # each task's tokens once per tokenizer, for every run
        "finetune_base": models * runs,
        "finetune_mop": models * runs * kgs,
        "table_main": 1,  # Table 1
        "table_kgs": 1,  # Table 2
        "table_shuffle": 1,  # Table 3
        "figure_adapters": 1,  # Figure 2
        "figure_mixture": 1,  # Figure 4
        "publish": 1,  # the MLflow report run
        "all": 1,
    }
    assert sum(jobs.values()) == 540
    # GPUs go to the training jobs only, never to a CPU stage
    blocks = re.findall(r"^rule (\w+):\n(.*?)(?=^\S)", result.stdout, flags=re.M | re.S)
    gpu = collections.Counter(name for name, body in blocks if "gpu=1" in body)
    assert gpu == {
        "pretrain": jobs["pretrain"],
        "finetune_base": jobs["finetune_base"],
        "finetune_mop": jobs["finetune_mop"],
    }
    # per-task settings reach the jobs; PubMedQA run i reads fold i
    commands = [
        c for c in result.stdout.splitlines() if c.startswith("Shell command: mop finetune")
    ]
    assert len(commands) == models * runs * (1 + kgs)
    pqa = [c for c in commands if "--task pubmedqa" in c and "--method mop" in c]
    assert len(pqa) == models * kgs * 10
    for c in pqa:
        seed = re.search(r"--seed (\d+)", c)[1]
        assert f"--task-dir results/tasks/pubmedqa/fold{seed} " in c
        assert '"batch_size": 8' in c and '"max_length": 512' in c
        assert re.search(rf"--encoded results/encoded/pubmedqa/\w+/len512/fold{seed} ", c)
        assert "--device auto --precision auto" in c
    hoc = [c for c in commands if "--task hoc" in c]
    assert all('"lr": 2e-05' in c and '"batch_size": 32' in c for c in hoc)
    assert all(" --task-dir results/tasks/hoc " in c for c in hoc)


def test_missing_dataset_stops_before_any_job(tmp_path):
    (tmp_path / "data" / "umls" / "2020AB" / "META").mkdir(parents=True)
    result = dry_run(tmp_path)
    assert result.returncode != 0
    err = result.stderr + result.stdout
    assert "config key tasks.hoc.path: data/tasks/hoc/train.tsv not found" in err
    assert "PhysioNet" in err and "BLURB" in err
    assert not (tmp_path / "results").exists()

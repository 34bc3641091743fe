"""config/paper.yaml: the paper's whole grid as a Snakemake dry run, and its data checks."""

import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, without_venv

FIXTURES = REPO / "tests" / "fixtures" / "tasks"
PAPER = REPO / "config" / "paper.yaml"


def dry_run(workdir: Path, dry: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PATH"] = without_venv(env["PATH"])
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            *(["-n"] if dry else []),
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
        "report_table1": 1,  # Table 1
        "report_table2": 1,  # Table 2
        "report_table3": 1,  # Table 3
        "report_figure2": 1,  # Figure 2
        "report_figure4": 1,  # Figure 4
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
    pqa = [c for c in commands if re.search(r"--out results/finetune/pubmedqa/\w+/mop-", c)]
    assert len(pqa) == models * kgs * 10
    for c in pqa:
        seed = re.search(r"/seed(\d+) ", c)[1]
        assert f"--task-dir results/tasks/pubmedqa/fold{seed} " in c
        assert '"batch_size": 8' in c and '"max_length": 512' in c
        assert re.search(rf"--encoded results/encoded/pubmedqa/\w+/len512/fold{seed} ", c)
        # each job gets only what it reads: its model's entry, no grid or tracking keys
        assert '"seeds"' not in c and '"tasks"' not in c and "experiment" not in c
        assert c.count('"hub"') == 1
    hoc = [c for c in commands if "--out results/finetune/hoc/" in c]
    assert all('"lr": 2e-05' in c and '"batch_size": 32' in c for c in hoc)
    assert all(" --task-dir results/tasks/hoc " in c for c in hoc)
    base = [c for c in hoc if "/base/seed" in c]
    assert base and all('"lr_fusion"' not in c and '"lr_adapters"' not in c for c in base)
    # the original implementation's heads and loss, as the config's header says
    assert all('"pooling": "pooler"' in c for c in commands)
    mop = [c for c in commands if "/mop-" in c]
    assert mop and all('"fusion_reg": false' in c for c in mop)
    pretrain = [
        c for c in result.stdout.splitlines() if c.startswith("Shell command: mop pretrain")
    ]
    assert len(pretrain) == jobs["pretrain"]
    assert all('"pooling": "pooler"' in c and '"dropout": 0.1' in c for c in pretrain)


def test_missing_dataset_stops_a_real_run_before_any_job(tmp_path):
    (tmp_path / "data" / "umls" / "2020AB" / "META").mkdir(parents=True)
    result = dry_run(tmp_path, dry=False)
    assert result.returncode != 0
    err = result.stderr + result.stdout
    assert "config key tasks.hoc.path: data/tasks/hoc/train.tsv not found" in err
    assert "PhysioNet" in err and "BLURB" in err
    assert not (tmp_path / "results").exists()


def test_a_dry_run_needs_no_data_and_lists_what_is_missing(tmp_path):
    """A fresh clone: no UMLS release, no dataset. The dry run shows the whole DAG and
    warns about every missing input."""
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = collections.Counter(re.findall(r"^rule (\w+):", result.stdout, flags=re.M))
    assert sum(jobs.values()) == 540
    warnings = [x for x in result.stderr.splitlines() if x.startswith("mop: warning")]
    assert len(warnings) == 2 + 6  # two KG release folders, six datasets
    assert any("kgs.sfull.path: data/umls/2020AB/META does not exist" in w for w in warnings)
    assert any("tasks.mednli.path" in w and "PhysioNet" in w for w in warnings)
    assert not (tmp_path / "results").exists()


def test_plan_estimates_jobs_and_gpu_hours_without_the_data(tmp_path):
    import json

    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "mop"),
            "plan",
            "--estimate",
            str(PAPER),
            "--workdir",
            str(tmp_path),
            "--gpu",
            "h100",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)
    assert plan["total_jobs"] == 540 and plan["jobs"]["finetune_mop"] == 246
    assert plan["card"] == "h100" and plan["mfu"] == 0.3
    hours = plan["gpu_hours"]
    assert set(hours) == {"pretrain", "finetune_base", "finetune_mop"}
    # MoP runs carry 20 adapters and a fusion per layer: dearer than the base model's
    assert hours["finetune_mop"] > 2 * hours["finetune_base"] > 0 and hours["pretrain"] > 0
    assert plan["total_gpu_hours"] == pytest.approx(sum(hours.values()), abs=0.05)
    assert any("kgs.sfull.path" in w for w in plan["warnings"])
    assert any("paper Table 2" in a for a in plan["assumptions"])
    # the same grid on a slower card costs more hours, in proportion to the peaks
    slower = subprocess.run([*result.args[:-2], "a100", "--json"], capture_output=True, text=True)
    ratio = json.loads(slower.stdout)["total_gpu_hours"] / plan["total_gpu_hours"]
    assert ratio == pytest.approx(989 / 312, rel=0.01)

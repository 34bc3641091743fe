"""The workflow on a real SLURM cluster: required in CI (.ci/run starts a local one)."""

import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mop.io import read_json
from tests.conftest import REPO, checkpoint_step, require_tool, snakemake, tiny_workdir
from tests.test_pretrain import _pretrain_cmd

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster() -> None:
    require_tool("sbatch")
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if state.returncode != 0 or not {"idle", "mix", "alloc"} & set(state.stdout.split()):
        pytest.fail(f"SLURM is installed but no node is up: {state.stdout} {state.stderr}")


def _outputs(run: Path) -> dict[str, object]:
    """Every metric file and adapter tensor of a run, keyed by path inside results/."""
    out: dict[str, object] = {}
    r = run / "results"
    for path in sorted(r.glob("finetune/**/metrics.json")):
        m = read_json(path)
        out[str(path.relative_to(r))] = {
            k: v for k, v in m.items() if k.startswith(("train_acc", "dev_acc", "test_acc"))
        }
    for path in sorted(r.glob("adapters/**/adapter.safetensors")):
        out[str(path.relative_to(r))] = load_file(path)
    for path in sorted(r.glob("adapters/**/metrics.json")):
        out[str(path.relative_to(r))] = read_json(path)["probe"]
    return out


def test_workflow_through_sbatch_equals_a_local_run(cluster, finished_run, tmp_path):
    work = tiny_workdir(tmp_path / "slurm")
    result = snakemake(
        work, "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm-local")
    )
    assert result.returncode == 0, result.stderr[-5000:]
    logs = work / ".snakemake" / "slurm_logs"
    submitted = {p.parts[len(logs.parts)] for p in logs.rglob("*.log")}
    # every rule but the target `all` ran as a SLURM job
    assert submitted == {
        f"rule_{r}"
        for r in (
            "kg",
            "partition",
            "tokenize",
            "pretrain",
            "task_probe",
            "encode",
            "finetune_base",
            "finetune_mop",
            "report_table1",
            "report_table2",
            "report_table3",
            "report_table6",
            "report_figure2",
            "report_figure4",
            "finetune_adapter",
            "select_subsets",
            "finetune_subset",
            "report_single_adapters",
            "report_subsets",
            "topics",
            "report_figure_topics",
            "report_wordclouds",
            "publish",
        )
    }
    assert len(list((logs / "rule_pretrain").rglob("*.log"))) == 2
    assert len(list((logs / "rule_finetune_mop").rglob("*.log"))) == 4
    assert len(list((logs / "rule_finetune_adapter").rglob("*.log"))) == 2
    local, slurm = _outputs(finished_run), _outputs(work)
    assert local.keys() == slurm.keys() and len(local) > 0
    for key, value in local.items():
        if (
            isinstance(value, dict)
            and value
            and isinstance(next(iter(value.values())), torch.Tensor)
        ):
            for name, tensor in value.items():
                torch.testing.assert_close(tensor, slurm[key][name], rtol=0, atol=0)
        else:
            assert value == slurm[key], key


def _sbatch(cmd: list[str], log: Path) -> str:
    import shlex

    wrapped = " ".join(shlex.quote(c) for c in cmd)
    job = subprocess.run(
        ["sbatch", "--parsable", "-o", str(log), "-c", "1", "--mem", "2000", "--wrap", wrapped],
        capture_output=True,
        text=True,
        check=True,
    )
    return job.stdout.strip().split(";")[0]


ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL"}


def _job(job: str) -> dict[str, str] | None:
    """The job's record from `scontrol show job` ({} while slurmctld does not answer, None once
    the record is purged). squeue is no use here: a busy controller makes it print nothing,
    which reads the same as a job that has left the queue."""
    q = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    if q.returncode != 0:
        return None if "Invalid job id" in q.stderr else {}
    return dict(f.split("=", 1) for f in q.stdout.split() if "=" in f)


def _wait_gone(job: str, timeout: float = 300) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = _job(job)
        if record is None or record.get("JobState") in ENDED:
            return record or {}
        time.sleep(0.5)
    raise TimeoutError(f"SLURM job {job} still running: {_job(job)}")


def test_scancelled_pretraining_resumes_to_the_uninterrupted_result(
    cluster, small_kg, small_partition, small_tokens, models, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = "results/adapters/g/k3-metis/tiny/p0"  # the folder names the partition
    full, killed = tmp_path / "full" / run, tmp_path / "killed" / run
    subprocess.run(
        _pretrain_cmd(small_kg, small_partition, small_tokens, full, models),
        check=True,
        capture_output=True,
    )
    job = _sbatch(
        _pretrain_cmd(small_kg, small_partition, small_tokens, killed, models),
        tmp_path / "first.log",
    )
    deadline = time.time() + 240
    while checkpoint_step(killed / "checkpoint") is None and time.time() < deadline:
        time.sleep(0.01)
    subprocess.run(["scancel", job], check=True)
    _wait_gone(job)
    step = checkpoint_step(killed / "checkpoint")
    assert step is not None and not (killed / "adapter").exists(), (
        tmp_path / "first.log"
    ).read_text()
    job = _sbatch(
        _pretrain_cmd(small_kg, small_partition, small_tokens, killed, models),
        tmp_path / "second.log",
    )
    _wait_gone(job)
    log = (tmp_path / "second.log").read_text()
    assert f"resuming from step {step}" in log, log
    a = load_file(full / "adapter" / "adapter.safetensors")
    b = load_file(killed / "adapter" / "adapter.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_requeued_fine_tuning_resumes_from_its_checkpoint(
    cluster, small_kg, small_partition, tiny_adapters, models, tmp_path, monkeypatch
):
    """`--requeue` (the profile's `slurm-requeue: true`): SLURM stops the job (SIGTERM, so
    it checkpoints), puts it back in the queue and starts the same command again, which
    resumes and ends with the uninterrupted run's outputs."""
    from mop.tasks.probe import prepare
    from tests.test_finetune import RUN, _finetune_cmd, _same_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    task = tmp_path / "probe"
    prepare(small_kg, small_partition, task, max_questions={"train": 96, "dev": 40, "test": 40})
    options = {"epochs": 6, "batch_size": 2, "checkpoint_every": 20}
    full, requeued = tmp_path / "full", tmp_path / "requeued"
    subprocess.run(
        _finetune_cmd(task, tiny_adapters, full, models, **options), check=True, capture_output=True
    )
    import shlex

    log = tmp_path / "job.log"
    wrapped = " ".join(
        shlex.quote(c) for c in _finetune_cmd(task, tiny_adapters, requeued, models, **options)
    )
    job = (
        subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--requeue",
                "--open-mode=append",
                "-o",
                str(log),
                "-c",
                "1",
                "--mem",
                "2000",
                "--wrap",
                wrapped,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .split(";")[0]
    )
    deadline = time.time() + 240
    folder = requeued / RUN.folder("results")
    while checkpoint_step(folder / "checkpoint") is None and time.time() < deadline:
        time.sleep(0.01)
    subprocess.run(["scontrol", "requeue", job], check=True)
    # SLURM holds a requeued job back for a while (BeginTime); let it start sooner, but not
    # within the second it was killed in: slurmd refuses a launch whose credential is not
    # newer than the kill ("Job N already killed, do not launch batch job"), by the second.
    while time.time() < deadline:
        record = _job(job) or {}
        if record.get("JobState") == "PENDING" and record.get("Restarts", "0") != "0":
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
            break
        time.sleep(0.2)
    record = _wait_gone(job)
    text = log.read_text()
    state = {k: record.get(k) for k in ("JobState", "Restarts", "ExitCode", "Reason")}
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, text[-3000:])
    assert "DUE TO JOB REQUEUE" in text and "stopped by SIGTERM" in text, text[-3000:]
    assert "resuming from step" in text, text[-3000:]
    _same_run(full, requeued)

"""The benchmarks' code paths run; nothing here asserts a speed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable)
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)


def test_finetune_gpu_refuses_to_run_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = run(sys.executable, "-m", "benchmarks.finetune_gpu", "--smoke")
    assert result.returncode != 0
    assert "sees no CUDA device" in result.stderr


def test_gpu_check_runs_the_benchmarks_that_exist():
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    named = set(re.findall(r"benchmarks/(\w+)\.py", script))
    assert named == {"finetune_gpu", "pretrain_throughput"}
    assert all((REPO / "benchmarks" / f"{n}.py").is_file() for n in named)


def test_gpu_check_stops_clearly_without_a_gpu():
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is present: the script would run the whole check")
    result = run("bash", "benchmarks/gpu_check.sh", timeout=60)
    assert result.returncode == 1
    assert "gpu_check: FAILED: nvidia-smi not found" in result.stderr


BENCHMARKS = sorted(
    p.stem for p in (REPO / "benchmarks").glob("*.py") if '__name__ == "__main__"' in p.read_text()
)


def test_every_benchmark_is_smoke_tested():
    """A new benchmark cannot be forgotten: each runnable script is in SMOKE_CHECKS."""
    assert sorted(SMOKE_CHECKS) == BENCHMARKS


def _mfu(line, precisions):
    """Model FLOPs over the machine's own matmul rate, per precision: measured, not 0."""
    for p in precisions:
        assert line["matmul_gflop_per_s"][p] > 0 and line["model_gflop_per_s"][p] > 0
        mfu = line["mfu" if p == "fp32" else "mfu_bf16"]
        ratio = line["model_gflop_per_s"][p] / line["matmul_gflop_per_s"][p]
        assert mfu == pytest.approx(ratio, rel=0.15, abs=0.01)  # of rounded figures


def _precisions():
    import torch

    from mop.runtime import bf16_supported

    return ["fp32", "bf16"] if bf16_supported(torch.device("cpu")) else ["fp32"]


def _pretrain(line, tmp):
    assert line["examples"] == 64 and line["batch_size"] == 16
    assert line["ours_examples_per_s"] > 0 and line["baseline_examples_per_s"] > 0
    _mfu(line, _precisions())
    assert ("bf16_speedup" in line) == ("bf16" in _precisions())


def _finetune_cpu(line, tmp):
    assert line["examples"] == 9 and line["max_length"] == 64
    assert set(line["examples_per_s"]) == {*_precisions(), "original"}
    assert all(r > 0 for r in line["examples_per_s"].values())
    assert 0 < line["mean_tokens"] <= 64
    _mfu(line, _precisions())
    auto = _precisions()[-1]  # bf16 where the CPU has it natively
    assert line["auto_precision"] == auto
    fp32_rate = line["model_gflop_per_s"][auto] / line["matmul_gflop_per_s"]["fp32"]
    assert line["auto_of_fp32_rate"] == pytest.approx(fp32_rate, rel=0.15, abs=0.01)
    # the same data and initial weights on every side: losses of one model, not three
    losses = list(line["mean_loss"].values())
    assert max(losses) - min(losses) < 0.05


def _finetune_gpu(line, tmp):
    """The GPU benchmark's code path on the CPU: the tiny model, both precisions' curves."""
    assert line["card"].startswith("none") and line["peak_mfu"] is None
    assert line["seq_len"] == 64 and line["steps"] == 4
    assert "2 SeqBn adapters" in line["model"] and "softmax fusion" in line["model"]
    assert line["runtime"]["precision"] == "bf16"
    for key in ("examples_per_s", "train_gflop_per_token", "achieved_tflops", "mfu"):
        assert line[key] > 0, key
    curve = line["bf16_vs_fp32"]
    assert len(curve["loss_fp32"]) == len(curve["loss_bf16"]) == 5
    assert curve["loss_fp32"] != curve["loss_bf16"]  # two precisions, not one run twice
    assert curve["passed"] and curve["last10_rel_diff"] <= curve["tolerance"] == 2e-2


def _partition(line, tmp):
    assert (line["entities"], line["k"]) == (2000, 4)
    assert line["job_wall_s"] > 0 and 0 < line["retained_share"] <= 1
    assert line["metis_s"] > 0 and line["targets_met"] is None  # targets: SFull size only


def _kg(line, tmp):
    assert line["mrrel_rows"] == 20_000
    assert line["sfull"]["triples"] > 0 and line["s20rel"]["relations"] == 20


def _synthetic(line, tmp):
    assert (line["entities"], line["triples"]) == (2000, 12000)
    assert (tmp / "kg" / "triples.parquet").is_file()


def _workflow(line, tmp):
    assert list(line["stages"]) == [
        "kg",
        "partition",
        "tokenize",
        "pretrain",
        "task",
        "link",
        "encode",
    ]
    for name, stage in line["stages"].items():
        assert stage["wall_s"] > 0 and stage["cpu_s"] > 0, name
        assert stage["peak_rss_mb"] > 50 and stage["output_mb"] > 0, name
    assert line["peak_rss_mb"] == max(s["peak_rss_mb"] for s in line["stages"].values())
    assert line["graph"]["k"] == 4 and line["tokens"] == line["graph"]["triples"]
    head = line["head"]
    assert head["entities"] == line["pretrained_partition"]["entities"] and head["steps"] == 2
    assert head["head_mb"] > 0 and head["probe_examples"] == 20
    assert line["linking"]["inputs"] == 80 and line["linking"]["names"] > 1000
    assert line["targets_met"] is None  # targets: the full sizes only


SMOKE_CHECKS = {
    "pretrain_throughput": ([], _pretrain),
    "finetune_cpu": ([], _finetune_cpu),
    "finetune_gpu": (["--device", "cpu"], _finetune_gpu),
    "partition_scale": ([], _partition),
    "kg_umls": ([], _kg),
    "synthetic_graph": (["--out", "{tmp}/kg"], _synthetic),
    "workflow_scale": ([], _workflow),
}


@pytest.mark.parametrize("name", sorted(SMOKE_CHECKS))
def test_benchmark_smoke_size_runs_the_same_code_path(name, tmp_path):
    extra, check = SMOKE_CHECKS[name]
    args = [a.format(tmp=tmp_path) for a in extra]
    result = run(sys.executable, "-m", f"benchmarks.{name}", "--smoke", *args, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["smoke"] is True
    check(line, tmp_path)


def test_workflow_scale_smoke_runs_the_all_umls_path(tmp_path):
    """The all-UMLS size builds its graph as a triples table (`mop kg`, source triples)."""
    args = ["--smoke", "--size", "all-umls", "--workdir", str(tmp_path)]
    result = run(sys.executable, "-m", "benchmarks.workflow_scale", *args, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["size"] == "all-umls" and line["smoke"] is True
    _workflow(line, tmp_path)
    assert line["graph"]["triples"] == 12000
    kg = json.loads((tmp_path / "inputs.json").read_text())["kg_options"]
    assert kg["source"] == "triples"


def test_workflow_scale_targets_and_totals_count_only_the_stages_that_ran():
    from benchmarks.workflow_scale import SIZES, targets, totals

    def stage(wall, rss, **extra):
        return {"wall_s": wall, "cpu_s": wall / 2, "peak_rss_mb": rss, "output_mb": 1.0, **extra}

    stages = {
        "kg": stage(30, 1200),
        "tokenize": stage(119, 4097),  # over 4 GB
        "pretrain": stage(500, 2000),  # training: no SFull target
        "link": stage(61, 600),  # over 60 s
        "encode": stage(10, 30000, killed_over_mb=20000),
        "task": {"skipped": "no partition output"},
    }
    assert targets(SIZES["sfull"], stages, smoke=False) == {
        "kg": True,
        "tokenize": False,
        "link": False,
        "encode": False,
        "task": False,
    }
    met = targets(SIZES["all-umls"], stages, smoke=False)
    assert met == {
        "kg": True,
        "tokenize": True,
        "pretrain": True,
        "link": True,
        "encode": False,
        "task": False,
    }
    assert targets(SIZES["sfull"], stages, smoke=True) is None
    assert totals(stages) == {"wall_s": 720, "cpu_s": 360, "peak_rss_mb": 30000, "output_mb": 5.0}

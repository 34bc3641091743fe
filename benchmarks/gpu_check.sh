#!/usr/bin/env bash
# Check a GPU machine end to end; run from the repository root:
#
#     benchmarks/gpu_check.sh                       # PYTHON defaults to .venv/bin/python
#     PYTHON=/opt/venv/bin/python benchmarks/gpu_check.sh
#
# 1. lists the GPUs (nvidia-smi -L) and checks that torch sees CUDA;
# 2. runs the tests marked cuda (tests/test_cuda.py and the fine-tuning ones);
# 3. runs the tiny test workflow (.test/config/config.yaml in a temporary working folder,
#    as tests/conftest.py's tiny_workdir + snakemake do) with runtime.device cuda, and
#    checks that every fine-tuning (and pretraining) metrics.json reports a cuda device;
# 4. runs benchmarks/finetune_gpu.py and benchmarks/pretrain_throughput.py.
# Every JSON line is printed again at the end. Any failure stops the script with a
# non-zero status and a line saying what failed. CORES (default 4) is snakemake's --cores.
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
CORES=${CORES:-4}

fail() {
    echo "gpu_check: FAILED: $*" >&2
    exit 1
}

[[ -f workflow/Snakefile && -d benchmarks ]] ||
    fail "run me from the repository root (no workflow/Snakefile in $PWD)"
command -v "$PYTHON" >/dev/null 2>&1 ||
    fail "no python at $PYTHON (make test creates .venv; or set PYTHON=...)"
"$PYTHON" -c 'import mop' 2>/dev/null || fail "$PYTHON cannot import mop (pip install -e .)"

echo "== GPUs"
command -v nvidia-smi >/dev/null 2>&1 ||
    fail "nvidia-smi not found: no NVIDIA driver here, this is not a GPU machine"
nvidia-smi -L || fail "nvidia-smi -L failed: the NVIDIA driver sees no usable GPU"
"$PYTHON" - <<'EOF' || fail "torch sees no CUDA device (a CPU-only torch build, or CUDA_VISIBLE_DEVICES hides the GPUs)"
import sys

import torch

if not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}): no CUDA device")
    sys.exit(1)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}")
EOF

echo "== tests marked cuda"
HF_HUB_OFFLINE=1 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests ||
    fail "a test marked cuda failed"

work=$(mktemp -d "${TMPDIR:-/tmp}/mop-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
bindir=$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')

echo "== tiny workflow on cuda (log: $work/snakemake.log)"
mkdir -p "$work/run/config"
cp .test/config/config.yaml "$work/run/config/config.yaml"
if ! env -u MLFLOW_TRACKING_URI -u MOP_INVOCATION HF_HUB_OFFLINE=1 PATH="$bindir:$PATH" \
    "$PYTHON" -m snakemake -s workflow/Snakefile -d "$work/run" --cores "$CORES" \
    --config 'runtime={"device": "cuda"}' >"$work/snakemake.log" 2>&1; then
    tail -n 60 "$work/snakemake.log" >&2
    fail "the tiny workflow failed on cuda (last lines above)"
fi
tail -n 3 "$work/snakemake.log"
"$PYTHON" - "$work/run/results" <<'EOF' || fail "the workflow's metrics do not report a cuda device"
import json
import sys
from pathlib import Path

results = Path(sys.argv[1])
folders = {"finetune": "finetune", "pretrain": "adapters"}  # results/<folder>/**/metrics.json
checked = dict.fromkeys(folders, 0)
bad, seen = [], []
for stage, folder in folders.items():
    for path in sorted((results / folder).glob("**/metrics.json")):
        runtime = json.loads(path.read_text()).get("runtime")
        if runtime is None:
            continue  # a job that trains nothing
        checked[stage] += 1
        seen.append((path, runtime))
        if not str(runtime.get("device", "")).startswith("cuda"):
            bad.append(f"{path}: runtime {runtime}")
if checked["finetune"] == 0 or checked["pretrain"] == 0:
    print(f"no fine-tuning or no pretraining metrics.json with a runtime under {results}")
    sys.exit(1)
if bad:
    print("not on cuda:\n  " + "\n  ".join(bad))
    sys.exit(1)
example, runtime = seen[0]
print(
    f"ok: {checked['finetune']} fine-tuning and {checked['pretrain']} pretraining runs on cuda "
    f"(e.g. {example.relative_to(results)}: {json.dumps(runtime)})"
)
EOF

echo "== benchmarks/finetune_gpu.py"
"$PYTHON" -m benchmarks.finetune_gpu 2>&1 | tee "$work/finetune.log" ||
    fail "benchmarks/finetune_gpu.py failed"

echo "== benchmarks/pretrain_throughput.py"
"$PYTHON" -m benchmarks.pretrain_throughput 2>&1 | tee "$work/pretrain.log" ||
    fail "benchmarks/pretrain_throughput.py failed"

echo "== JSON lines"
grep -h '^{' "$work/finetune.log" "$work/pretrain.log" || fail "a benchmark printed no JSON line"
echo "gpu_check: all checks passed"

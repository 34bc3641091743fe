"""The tiny workflow gives the numbers it gave before the grid refactor (issue 15).

`tests/fixtures/tiny_reference.json` holds the tiny `.test` workflow's results as recorded
before the refactor: every fine-tuning run's metrics and loss curve, every adapter's
knowledge probe, the partitions' retained triples and every table. The same run now must
give the same numbers, up to the last bits of fp32 sums (which differ between CPUs).
Record again (only when a change is meant to alter results) with
`python -m tests.test_reference RESULTS_DIR`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mop.io import read_json

REFERENCE = Path(__file__).parent / "fixtures" / "tiny_reference.json"


def tiny_outputs(results: Path) -> dict[str, object]:
    """The numbers of a finished tiny workflow, keyed by their path under results/."""
    out: dict[str, object] = {}
    for path in sorted(results.glob("finetune/**/metrics.json")):
        m = read_json(path)
        keep = {k: v for k, v in m.items() if k.split("_")[0] in ("train", "dev", "test")}
        keep |= {k: m[k] for k in ("best_epoch", "epochs_run", "steps") if k in m}
        if "history" in m:
            keep["history"] = [
                {k: v for k, v in h.items() if k != "examples_per_s"} for h in m["history"]
            ]
        keep.pop("train_seconds", None)
        out[str(path.relative_to(results))] = keep
    for path in sorted(results.glob("adapters/**/metrics.json")):
        m = read_json(path)
        out[str(path.relative_to(results))] = {
            "probe": m["probe"],
            "losses": [p["loss"] for p in m["loss_curve"]],
        }
    for path in sorted(results.glob("partition/**/stats.json")):
        m = read_json(path)
        out[str(path.relative_to(results))] = {
            k: m[k] for k in ("triples_retained", "triples_retained_share") if k in m
        }
    for path in sorted(results.glob("tables/*.csv")):
        out[str(path.relative_to(results))] = path.read_text()
    return out


def _close(a: object, b: object, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        # fp32 sums differ in their last bits between CPUs (AVX2, AVX-512, AMX kernels);
        # a change of behaviour moves a loss or a probe far more than this
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_the_tiny_workflow_gives_the_recorded_numbers(finished_run):
    expected = json.loads(REFERENCE.read_text())
    found = tiny_outputs(finished_run / "results")
    assert sorted(found) == sorted(expected)
    for key in expected:
        _close(expected[key], found[key], key)


if __name__ == "__main__":
    outputs = tiny_outputs(Path(sys.argv[1]))
    REFERENCE.write_text(json.dumps(outputs, indent=1, sort_keys=True) + "\n")
    print(f"{len(outputs)} entries -> {REFERENCE}")

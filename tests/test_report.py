import polars as pl
import pytest

from mop.io import write_json
from mop.report import collect_runs, summarise, write_main_table


def _fake_run(results, method, seed, test, **tags):
    out = results / "finetune" / "probe" / "m" / method / f"seed{seed}"
    write_json(
        {"tags": {"task": "probe", "model": "m", "method": method, "seed": seed, **tags}},
        out / "run.json",
    )
    write_json(
        {"main_metric": "accuracy", "dev_accuracy": test, "test_accuracy": test},
        out / "metrics.json",
    )


def test_table_cells_from_hand_computed_values(tmp_path):
    for seed, (b, m) in enumerate([(0.50, 0.60), (0.52, 0.62), (0.54, 0.64)]):
        _fake_run(tmp_path, "base", seed, b)
        _fake_run(
            tmp_path, "mop-softmax", seed, m, mixture="softmax", kg="g", k="4", scheme="metis"
        )
    # the mop rows are tagged method=mop
    for f in (tmp_path / "finetune").rglob("run.json"):
        if "mop-softmax" in str(f):
            text = f.read_text().replace('"mop-softmax"', '"mop"')
            f.write_text(text)
    runs = collect_runs(tmp_path)
    assert runs.height == 6
    summary = summarise(runs)
    mop = summary.filter(pl.col("method") == "mop").row(0, named=True)
    assert mop["mean"] == pytest.approx(62.0) and mop["std"] == pytest.approx(2.0)
    # Welch t = 10 / sqrt(4/3 + 4/3) = 6.1237 with 4 degrees of freedom: p = 0.00360
    assert mop["p_value"] == pytest.approx(0.0036022, rel=1e-4)
    write_main_table(tmp_path, tmp_path / "tables")
    md = (tmp_path / "tables" / "main.md").read_text()
    assert "| m | 52.00 ± 2.00 (n=3) |" in md
    assert "| + MoP (g) | 62.00† ± 2.00 ↑ (n=3) |" in md
    csv = pl.read_csv(tmp_path / "tables" / "main.csv")
    assert csv.height == 2 and set(csv["n"]) == {3}

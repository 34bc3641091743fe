import json

import numpy as np
import polars as pl
import pytest

from mop.io import write_json
from mop.plan import Run
from mop.report import load_runs
from mop.report.figures import figure_adapters, figure_mixture, figure_shuffle
from mop.report.tables import table_k, table_kgs, table_main, table_mixtures


def _run(root, test, kind, **fields):
    """A finished run's metrics in its folder of the results layout (its identity)."""
    out = root / Run(kind, task="probe", model="m", **fields).folder("results")
    write_json(
        {
            "main_metric": "accuracy",
            "dev_accuracy": test,
            "test_accuracy": test,
            "train_accuracy": 1.0,
        },
        out / "metrics.json",
    )
    return out / "metrics.json"


@pytest.fixture
def runs(tmp_path):
    files = []
    for seed, (b, m, g) in enumerate([(0.50, 0.60, 0.49), (0.52, 0.62, 0.52), (0.54, 0.64, 0.55)]):
        files.append(_run(tmp_path, b, "base", seed=seed))
        mop = {"kg": "g", "k": 4, "scheme": "metis", "seed": seed}
        files.append(_run(tmp_path, m, "mop", mixture="softmax", **mop))
        files.append(_run(tmp_path, g, "mop", mixture="gumbel-t0.5", **mop))
    return load_runs(files)


def test_table1_cells_from_hand_computed_values(runs, tmp_path):
    table = table_main(runs)
    md = table.markdown()
    # base: 50, 52, 54 -> 52.00 ± 2.00; softmax: 60, 62, 64 -> 62.00 ± 2.00, Welch
    # t = 10 / sqrt(4/3 + 4/3) = 6.1237, df = 4 -> p = 0.0036 (dagger), best in column (bold)
    assert "| m | 52.00 ± 2.00 |" in md
    assert "| + MoP (g, softmax) | **62.00† ± 2.00 ↑** |" in md
    # gumbel: 49, 52, 55 -> 52.00 ± 3.00: not above the base mean -> no arrow, no dagger
    assert "| + MoP (g, gumbel-t0.5) | 52.00 ± 3.00 |" in md
    soft = table.rows[2][1]
    assert soft.p_value == pytest.approx(0.0036022, rel=1e-4)
    tex = table.latex()
    assert r"\textbf{62.00$^\dagger$ $\pm$ 2.00 $\uparrow$}" in tex
    assert r"\begin{tabular}{lc}" in tex
    paths = table.write(tmp_path / "tables", "main")
    csv = pl.read_csv(paths[1])
    assert csv["Model"].to_list() == ["m", "+ MoP (g, gumbel-t0.5)", "+ MoP (g, softmax)"]
    assert csv["probe_mean"].to_list() == pytest.approx([52.0, 52.0, 62.0])
    assert csv["probe_n"].to_list() == [3, 3, 3]


def test_a_single_run_shows_no_spread():
    from mop.report import Cell

    one = Cell(np.array([92.45]), base=np.array([59.0, 60.0]))
    assert one.markdown() == "92.45 ↑"
    assert one.p_value is None and not one.dagger
    assert Cell(np.array([70.0, 70.0])).markdown() == "70.00 ± 0.00"


def test_table6_and_table4(runs, tmp_path):
    t6 = table_mixtures(runs)
    assert [r[1] for r in t6.rows] == ["gumbel-t0.5", "softmax"]
    assert t6.rows[1][2].bold and not t6.rows[0][2].bold
    write_json(
        {"k": 4, "entities_mean": 690.4}, tmp_path / "partition" / "g" / "k4-metis" / "stats.json"
    )
    t4 = table_k(runs, [tmp_path / "partition" / "g" / "k4-metis" / "stats.json"])
    assert t4.rows[0][1] == "4 (690)"


def test_table2_from_stats(tmp_path):
    write_json(
        {"entities": 302332, "relations": 229, "triples": 4129726},
        tmp_path / "kg" / "SFull" / "stats.json",
    )
    md = table_kgs([tmp_path / "kg" / "SFull" / "stats.json"]).markdown()
    assert "| SFull | 302,332 | 229 | 4,129,726 |" in md


def test_figures_from_fixture_data(tmp_path, runs):
    adapters = []
    for part, hits in enumerate([0.4, 0.7, 0.55]):
        path = tmp_path / "adapters" / "g" / "k3-metis" / "m" / f"p{part}" / "metrics.json"
        write_json({"entities": 10, "probe": {"train": {"hits_at_10": hits}}}, path)
        adapters.append(path)
    out = figure_adapters(adapters, tmp_path / "fig" / "figure2")
    assert [p.suffix for p in out] == [".png", ".pdf"]
    assert out[0].read_bytes().startswith(b"\x89PNG")
    mix = tmp_path / "mixture.parquet"
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(3), size=8).astype(np.float32)
    pl.DataFrame(
        {
            "id": [str(i) for i in range(8)],
            "weights": w.tolist(),
            "text": [f"Is phenotype {i} a feature of disease {i}?" for i in range(8)],
        }
    ).write_parquet(mix)
    out = figure_mixture(mix, tmp_path / "fig" / "figure4", n=6)
    assert out[1].read_bytes().startswith(b"%PDF") and out[0].stat().st_size > 10_000
    shuffled = runs.filter(pl.col("method") == "mop").with_columns(
        scheme=pl.when(pl.col("mixture") == "softmax")
        .then(pl.lit("metis"))
        .otherwise(pl.lit("shuffle1.0"))
    )
    out = figure_shuffle(shuffled, tmp_path / "fig" / "figure3")
    assert out[0].stat().st_size > 10_000


def test_findings_state_each_comparison_plainly(runs):
    md = table_main(runs).markdown()
    assert (
        "- probe, m + MoP (g, softmax): 62.00 vs 52.00 for the base model (+10.00 points, "
        "Welch p = 0.0036): a significant gain."
    ) in md
    assert "+ MoP (g, gumbel-t0.5): 52.00 vs 52.00 for the base model (+0.00 points" in md
    assert "no significant difference." in md


def test_table4_gives_each_k_its_oracle_and_routing_against_its_own_partitions(tmp_path):
    """A K sweep separates the mixture failing to route from facts a finer K cut: per K
    the oracle at that K, the share of facts inside, routing and entropy against ln K."""
    files = []
    for seed, (b, m4, m20, o4, o20) in enumerate(
        [(0.50, 0.60, 0.52, 0.70, 0.66), (0.52, 0.62, 0.54, 0.72, 0.68)]
    ):
        files.append(_run(tmp_path, b, "base", seed=seed))
        for k, m, o, inside, routing, entropy in (
            (4, m4, o4, 1.0, 0.9, 1.2),
            (20, m20, o20, 0.6, 0.25, 2.9),
        ):
            where = {"kg": "g", "k": k, "scheme": "metis", "seed": seed}
            path = _run(tmp_path, m, "mop", mixture="softmax", **where)
            metrics = json.loads(path.read_text())
            metrics |= {
                "test_routing_true": routing,
                "test_facts_inside": inside,
                "test_mixture_entropy": entropy,
            }
            write_json(metrics, path)
            files.append(path)
            files.append(_run(tmp_path, o, "oracle", **where))
    runs = load_runs(files)
    t4 = table_k(runs, [])
    assert t4.header[-4:] == ["Oracle (probe)", "Facts inside (%)", "Routing (%)", "Entropy (ln K)"]
    k4, k20 = t4.rows
    assert k4[1] == "4" and k20[1] == "20"
    assert k4[2].mean == pytest.approx(61.0) and k4[2].base.mean() == pytest.approx(51.0)
    assert k4[3].mean == pytest.approx(71.0) and k20[3].mean == pytest.approx(67.0)
    assert k20[4:] == ["60.0", "25.0", "2.90 (3.00)"]
    assert k4[4:] == ["100.0", "90.0", "1.20 (1.39)"]

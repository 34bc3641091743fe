import re
from collections import Counter

import numpy as np
import polars as pl
import pytest
import yaml

from benchmarks.synthetic_graph import SyntheticSpec, synthetic_graph
from mop.config import preflight, validate_config
from mop.errors import MopError
from mop.io import read_json, write_json
from mop.kg import write_kg
from mop.kg.hpo import load_hpo
from mop.partition import (
    entity_graph,
    metis_partition,
    partition_graph,
    run_partition,
    shuffle_membership,
)
from mop.plan import scheme_name, scheme_rate
from mop.report.tables import partition_rows, table_shuffle
from tests.conftest import REPO


def planted_graph(n_comm=4, size=50, p_in=0.2, p_out=0.005, seed=0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_comm * size
    comm = np.repeat(np.arange(n_comm), size)
    h, t = np.triu_indices(n, 1)
    p = np.where(comm[h] == comm[t], p_in, p_out)
    keep = rng.random(h.size) < p
    return pl.DataFrame(
        {"head": h[keep], "relation": np.zeros(keep.sum(), dtype=np.int32), "tail": t[keep]}
    ).cast(pl.Int32)


def members(part) -> np.ndarray:
    m = part.membership.sort("entity")
    assert m["entity"].to_list() == list(range(m.height))
    return m["partition"].to_numpy()


@pytest.mark.parametrize(("k", "ufactor"), [(4, 30), (7, 30), (5, 100)])
def test_every_entity_in_exactly_one_partition_and_sizes_balanced(k, ufactor):
    triples = planted_graph(n_comm=6, size=40, seed=k)
    part = partition_graph(triples, 240, k, ufactor=ufactor)
    m = part.membership
    assert m.height == 240 and m["entity"].n_unique() == 240
    assert m["partition"].min() >= 0 and m["partition"].max() < k
    sizes = np.bincount(m["partition"].to_numpy(), minlength=k)
    assert sizes.sum() == 240
    # METIS' tolerance: the largest part is at most (1 + ufactor/1000) x the mean, up to
    # rounding to whole entities.
    assert sizes.max() <= np.ceil((1 + ufactor / 1000) * 240 / k)
    assert part.stats["entities_per_partition"] == sizes.tolist()
    assert part.stats["imbalance"] == pytest.approx(sizes.max() / sizes.mean())
    # Local indices enumerate each partition's entities from 0, in entity-id order.
    for p, group in m.group_by("partition"):
        assert group.sort("entity")["local"].to_list() == list(range(group.height)), p


def test_retained_triples_and_cut_equal_a_brute_force_count():
    triples = planted_graph(seed=1)
    loop = pl.DataFrame({"head": [5], "relation": [2], "tail": [5]}, schema=triples.schema)
    twice = triples.head(30).with_columns(relation=pl.lit(1, pl.Int32))
    triples = pl.concat([triples, twice, loop])
    part = partition_graph(triples, 200, 4)
    member = members(part)
    rows = list(triples.select("head", "tail").iter_rows())
    brute = sum(member[h] == member[t] for h, t in rows)
    assert part.stats["triples_retained"] == brute == part.triples.height
    assert part.stats["triples_retained_share"] == pytest.approx(brute / len(rows))
    assert all(
        member[h] == p == member[t]
        for p, h, t in part.triples.select("partition", "head", "tail").iter_rows()
    )
    per_part = Counter(int(member[h]) for h, t in rows if member[h] == member[t])
    assert part.stats["triples_per_partition"] == [per_part[p] for p in range(4)]
    pairs = {(min(h, t), max(h, t)) for h, t in rows if h != t}
    assert part.stats["entity_pairs"] == len(pairs)
    assert part.stats["edge_cut"] == sum(member[a] != member[b] for a, b in pairs)
    # The retained triples keep the KG's order.
    kept = [r for r in triples.iter_rows() if member[r[0]] == member[r[2]]]
    assert list(part.triples.select("head", "relation", "tail").iter_rows()) == kept


def test_same_seed_same_partition():
    triples = planted_graph(seed=2)
    a = partition_graph(triples, 200, 4, seed=5)
    b = partition_graph(triples, 200, 4, seed=5)
    assert a.membership.equals(b.membership) and a.triples.equals(b.triples)
    assert a.stats == b.stats
    sa = partition_graph(triples, 200, 4, seed=5, shuffle=0.4).membership
    sb = partition_graph(triples, 200, 4, seed=5, shuffle=0.4).membership
    assert sa.equals(sb)


def test_shuffle_rate_zero_is_metis_and_rate_one_a_size_preserving_random_partition():
    triples = planted_graph(n_comm=8, size=60, p_in=0.3, p_out=0.002, seed=3)
    n, k = 480, 8
    metis = partition_graph(triples, n, k, seed=1)
    zero = partition_graph(triples, n, k, seed=1, shuffle=0.0)
    assert zero.membership.equals(metis.membership) and zero.stats == metis.stats
    base = members(metis)
    full = members(partition_graph(triples, n, k, seed=1, shuffle=1.0))
    assert np.array_equal(np.bincount(full, minlength=k), np.bincount(base, minlength=k))
    # Rate 1 relabels every entity by one uniform permutation: over many seeds each entity
    # lands in partition g with probability size_g / n, whatever METIS said.
    draws = np.stack([shuffle_membership(base, 1.0, seed=s) for s in range(300)])
    hits = (draws == base[0]).mean(axis=0)
    assert hits.mean() == pytest.approx(np.bincount(base)[base[0]] / n, abs=0.01)
    # Its retained share is the random expectation sum_g s_g (s_g - 1) / (n (n - 1)).
    s = np.bincount(base).astype(float)
    expected = (s * (s - 1)).sum() / (n * (n - 1))
    h, t = triples["head"].to_numpy(), triples["tail"].to_numpy()
    kept = np.array([(d[h] == d[t]).mean() for d in draws[:100]])
    assert kept.mean() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("rate", [0.1, 0.4, 0.8])
def test_shuffle_moves_about_rate_of_the_entities_and_keeps_sizes(rate):
    base = np.repeat(np.arange(20, dtype=np.int32), 500)
    moved = shuffle_membership(base, rate, seed=9)
    assert np.array_equal(np.bincount(moved), np.bincount(base))
    # A chosen entity keeps its label with probability ~ 1/20 here.
    assert (moved != base).mean() == pytest.approx(rate * 19 / 20, abs=0.02)
    with pytest.raises(MopError, match=r"shuffle rate 1\.5 is not within"):
        shuffle_membership(base, 1.5, seed=0)


def test_metis_keeps_far_more_than_random_on_planted_communities():
    triples = planted_graph(n_comm=10, size=40, p_in=0.25, p_out=0.002, seed=4)
    metis = partition_graph(triples, 400, 10, seed=1)
    rand = partition_graph(triples, 400, 10, seed=1, shuffle=1.0)
    assert metis.stats["triples_retained_share"] > 0.8
    assert metis.stats["triples_retained"] > 6 * rand.stats["triples_retained"]


def test_weighted_ablation_counts_triples_per_pair_and_keeps_heavy_pairs():
    base = planted_graph(seed=0, p_out=0.0)
    rng = np.random.default_rng(100)
    # Six cross-community pairs with 40 triples each (40 relations between them).
    a, b = rng.integers(0, 50, 6), rng.integers(50, 100, 6)
    heavy = pl.DataFrame(
        {
            "head": np.repeat(a, 40),
            "relation": np.tile(np.arange(1, 41), 6),
            "tail": np.repeat(b, 40),
        }
    )
    triples = pl.concat([base, heavy.cast(pl.Int32)])
    adj = entity_graph(triples, 200, weighted=True)
    counts = Counter((min(h, t), max(h, t)) for h, _, t in triples.iter_rows())
    got = {(i, j): int(adj[i, j]) for i, j in zip(*adj.nonzero(), strict=True) if i < j}
    assert got == dict(counts)
    assert set(entity_graph(triples, 200).data) == {True}
    plain = partition_graph(triples, 200, 4, seed=1)
    weighted = partition_graph(triples, 200, 4, seed=1, weighted=True)
    assert weighted.stats["weighted"] is True and plain.stats["weighted"] is False
    # Unweighted METIS follows the communities and cuts the heavy pairs; weighted METIS
    # keeps them whole, retaining more triples at the price of more cut pairs.
    assert plain.stats["edge_cut"] <= len(set(zip(a, b, strict=True)))
    assert weighted.stats["triples_retained"] > plain.stats["triples_retained"] + 100
    assert weighted.stats["edge_cut"] > plain.stats["edge_cut"]


def test_k_larger_than_entities_is_refused():
    with pytest.raises(MopError, match="K = 500 is not between 1 and the number of entities"):
        partition_graph(planted_graph(), 200, 500)


def test_entities_without_triples_are_placed_and_counted():
    triples = planted_graph(n_comm=2, size=20, seed=4)
    # Entity 40 has only a self loop; 41-44 have no triple at all.
    loop = pl.DataFrame({"head": [40], "relation": [0], "tail": [40]}, schema=triples.schema)
    triples = pl.concat([triples, loop])
    part = partition_graph(triples, 45, 2)
    st = part.stats
    member = members(part)
    in_triples = set(triples["head"]) | set(triples["tail"])
    isolated = [e for e in range(45) if e not in in_triples]
    assert st["entities_without_triples"] == len(isolated) >= 4
    assert st["entities_without_triples_per_partition"] == [
        sum(member[e] == p for e in isolated) for p in range(2)
    ]
    assert "balance" in st["entities_without_triples_placement"]
    kept = set(part.triples["head"]) | set(part.triples["tail"])
    assert 40 in kept
    assert st["entities_without_triple_in_partition"] == 45 - len(kept)
    assert sum(st["entities_per_partition"]) == 45


def test_run_partition_writes_the_stage_outputs(tmp_path):
    kg = synthetic_graph(SyntheticSpec(entities=600, triples=5000, relations=5, seed=2))
    write_kg(kg, tmp_path / "kg")
    stats = run_partition(tmp_path / "kg", tmp_path / "out", 5, seed=3, shuffle=0.2)
    assert read_json(tmp_path / "out" / "stats.json") == stats
    assert stats["shuffle"] == 0.2 and stats["seed"] == 3
    m = pl.read_parquet(tmp_path / "out" / "membership.parquet")
    t = pl.read_parquet(tmp_path / "out" / "triples.parquet")
    assert m.schema == {"entity": pl.Int32, "partition": pl.Int32, "local": pl.Int32}
    assert t.schema == {
        "partition": pl.Int32,
        "head": pl.Int32,
        "relation": pl.Int32,
        "tail": pl.Int32,
    }
    assert t.height == stats["triples_retained"]
    again = partition_graph(kg.triples, 600, 5, seed=3, shuffle=0.2)
    assert again.membership.equals(m) and again.triples.equals(t)


def test_triples_pointing_outside_the_entities_are_refused(tmp_path):
    kg = synthetic_graph(SyntheticSpec(entities=300, triples=2000, relations=3, seed=0))
    write_kg(kg, tmp_path / "kg")
    bad = kg.triples.with_columns(tail=pl.when(pl.col("tail") == 7).then(300).otherwise("tail"))
    bad.write_parquet(tmp_path / "kg" / "triples.parquet")
    with pytest.raises(MopError, match=r"triples.parquet: column tail holds ids outside 0\.\.299"):
        run_partition(tmp_path / "kg", tmp_path / "out", 3)
    assert not (tmp_path / "out").exists()


def test_scheme_names_round_trip():
    assert [scheme_name(r) for r in (0, 0.0, 0.1, 1, 0.25)] == [
        "metis",
        "metis",
        "shuffle0.1",
        "shuffle1.0",
        "shuffle0.25",
    ]
    for r in (0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 0.333):
        assert scheme_rate(scheme_name(r)) == r


def test_synthetic_graph_shape():
    spec = SyntheticSpec(entities=3000, triples=40_000, relations=12, seed=1)
    kg = synthetic_graph(spec)
    assert (kg.num_entities, kg.relations.height, kg.triples.height) == (3000, 12, 40_000)
    t = kg.triples
    assert t.unique().height == t.height
    assert t.filter(pl.col("head") == pl.col("tail")).height == 0
    assert t.equals(t.sort(["head", "relation", "tail"]))
    assert synthetic_graph(spec).triples.equals(t)
    assert not synthetic_graph(SyntheticSpec(**{**spec.__dict__, "seed": 2})).triples.equals(t)
    # Heavy tail: hubs with many times the median degree.
    degree = np.bincount(np.concatenate([t["head"].to_numpy(), t["tail"].to_numpy()]))
    assert degree.max() > 20 * np.median(degree)
    # Community structure: METIS keeps several times what a random partition keeps.
    metis = partition_graph(t, 3000, 10, seed=1)
    rand = partition_graph(t, 3000, 10, seed=1, shuffle=1.0)
    assert metis.stats["triples_retained"] > 4 * rand.stats["triples_retained"]


# The paper's Table 3 (SFull, S20Rel; K = 20) as partition stats files.
PAPER_TABLE3 = {
    "SFull": [2_830_674, 1_619_278, 1_302_096, 805_802, 289_886, 250_914],
    "S20Rel": [1_225_708, 990_417, 789_220, 479_807, 156_374, 114_695],
}
RATES = [0.0, 0.1, 0.2, 0.4, 0.8, 1.0]


def test_table3_writer_reproduces_the_papers_table(tmp_path):
    files = []
    for kg, counts in PAPER_TABLE3.items():
        for rate, count in zip(RATES, counts, strict=True):
            f = tmp_path / "partition" / kg / f"k20-{scheme_name(rate)}" / "stats.json"
            write_json(
                {"k": 20, "shuffle": rate, "triples": 4_129_726, "triples_retained": count}, f
            )
            files.append(f)
    table_shuffle(files).write(tmp_path / "tables", "table3_shuffle")
    md = (tmp_path / "tables" / "table3_shuffle.md").read_text()
    assert "| Shuffle rate | SFull | S20Rel |" in md
    for row in [
        "| 0% | 2,830,674 (100.0%) | 1,225,708 (100.0%) |",
        "| 10% | 1,619,278 (57.2%) | 990,417 (80.8%) |",
        "| 20% | 1,302,096 (46.0%) | 789,220 (64.4%) |",
        "| 40% | 805,802 (28.5%) | 479,807 (39.1%) |",
        "| 80% | 289,886 (10.2%) | 156,374 (12.8%) |",
        "| 100% | 250,914 (8.9%) | 114,695 (9.4%) |",
    ]:
        assert row in md
    csv = pl.read_csv(tmp_path / "tables" / "table3_shuffle.csv")
    assert csv.height == 12
    top = csv.filter((pl.col("kg") == "SFull") & (pl.col("shuffle") == 1.0)).row(0, named=True)
    assert top["triples_retained"] == 250_914
    assert top["share"] == pytest.approx(100 * 250_914 / 2_830_674)
    tex = (tmp_path / "tables" / "table3_shuffle.tex").read_text()
    assert r"Shuffle rate & SFull & S20Rel \\" in tex
    assert r"100\% & 250,914 (8.9\%) & 114,695 (9.4\%) \\" in tex
    assert tex.count(r"\\") == 1 + 6


def test_table3_labels_columns_by_k_when_there_are_several(tmp_path):
    files = []
    for k, counts in ((5, (90, 30)), (20, (60, 5))):
        for rate, count in zip((0.0, 1.0), counts, strict=True):
            f = tmp_path / "partition" / "hpo" / f"k{k}-{scheme_name(rate)}" / "stats.json"
            write_json({"k": k, "shuffle": rate, "triples": 100, "triples_retained": count}, f)
            files.append(f)
    rows = partition_rows(files)
    assert rows["share"].to_list() == pytest.approx([100.0, 100 * 30 / 90, 100.0, 100 * 5 / 60])
    md = table_shuffle(files).markdown()
    assert "| Shuffle rate | hpo (K = 5) | hpo (K = 20) |" in md
    assert "| 100% | 30 (33.3%) | 5 (8.3%) |" in md


def test_table3_refuses_a_file_that_is_not_partition_stats(tmp_path):
    f = tmp_path / "kg" / "k2-metis" / "stats.json"
    write_json({"entities": 3}, f)
    with pytest.raises(MopError, match=r"stats.json: not a partition stats file"):
        table_shuffle([f])
    with pytest.raises(MopError, match=r"nope/stats.json: file not found"):
        table_shuffle([tmp_path / "nope" / "stats.json"])


def test_workflow_dry_run_expands_every_k_and_shuffle_scheme(tmp_path):
    from tests.test_workflow import snakemake

    (tmp_path / "config").mkdir()
    text = (REPO / ".test" / "config" / "config.yaml").read_text()
    text = text.replace(
        "partition:\n  k: [2]\n", "partition:\n  k: [2, 3]\n  shuffle: [0, 0.5, 1]\n"
    )
    text = text.replace("  k: 2\n  mixtures:", "  k: 2\n  partition_experiments: true\n  mixtures:")
    (tmp_path / "config" / "config.yaml").write_text(text)
    result = snakemake(tmp_path, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    built = set(re.findall(r"results/partition/hpo-tiny/(k\d+-[\w.]+)/stats\.json", out))
    assert built == {f"k{k}-{s}" for k in (2, 3) for s in ("metis", "shuffle0.5", "shuffle1.0")}
    for rule in ("report_table3", "report_table4", "report_figure3"):
        assert f"rule {rule}:" in out
    finetuned = set(re.findall(r"mop-softmax/hpo-tiny/(k\d+-[\w.]+)/seed\d+/metrics\.json", out))
    # Table 4: every K with METIS; Figure 3: every shuffle rate at finetune.k.
    assert finetuned == {"k2-metis", "k3-metis", "k2-shuffle0.5", "k2-shuffle1.0"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["partition"].update(shuffle=[0.0, 0.00001]),
            r"config key partition.shuffle: rate 1e-05 is too small to name a scheme",
        ),
        (
            lambda c: c["finetune"].update(methods=["base"], partition_experiments=True),
            r"config key finetune.partition_experiments: .* need mop in finetune.methods",
        ),
        (
            lambda c: c["partition"].update(k=[4, 20]) or c["finetune"].update(k=10),
            r"config key finetune.k: 10 is not one of partition.k \[4, 20\]",
        ),
    ],
)
def test_preflight_checks_k_and_shuffle_lists(change, message, tmp_path):
    config = validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    config["results"] = str(tmp_path)
    assert config["partition"]["shuffle"] == [0.0]
    assert config["finetune"]["partition_experiments"] is False
    change(config)
    with pytest.raises(MopError, match=message):
        preflight(config)


def test_shuffle_rates_default_to_the_papers():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    del config["partition"]["shuffle"]
    assert validate_config(config)["partition"]["shuffle"] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0]


def test_whole_hpo_metis_keeps_five_times_random():
    kg, _ = load_hpo(diseases="all", genes=True, terms="all")
    metis = partition_graph(kg.triples, kg.num_entities, 20, seed=1)
    rand = partition_graph(kg.triples, kg.num_entities, 20, seed=1, shuffle=1.0)
    ratio = metis.stats["triples_retained"] / rand.stats["triples_retained"]
    assert ratio >= 5, ratio


def test_metis_is_k_way_for_small_k_too():
    """pymetis would bisect recursively for K <= 8; the paper's METIS is k-way for every K."""
    import pymetis

    adj = entity_graph(planted_graph(n_comm=4, size=60, p_in=0.1, p_out=0.03, seed=3), 240)
    idx = pymetis.zero_copy_dtype()
    graph = pymetis.CSRAdjacency(adj.indptr.astype(idx), adj.indices.astype(idx))
    options = pymetis.Options(seed=1, ufactor=30)
    kway = np.asarray(pymetis.part_graph(4, graph, options=options, recursive=False)[1])
    bisect = np.asarray(pymetis.part_graph(4, graph, options=options, recursive=True)[1])
    assert not np.array_equal(kway, bisect)  # the two methods differ on this graph
    ours, _ = metis_partition(adj, 4, seed=1)
    np.testing.assert_array_equal(ours, kway)
    asked, _ = metis_partition(adj, 4, seed=1, recursive=True)
    np.testing.assert_array_equal(asked, bisect)

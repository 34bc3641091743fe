import polars as pl

from mop.kg import read_kg
from mop.tasks.probe import build_probe


def test_probe_splits_by_disease_with_balanced_swapped_negatives(small_kg, small_partition):
    splits = build_probe(small_kg, small_partition, seed=0)
    kg = read_kg(small_kg)
    rel = kg.relations.filter(pl.col("name") == "has phenotype")["id"][0]
    facts = set(kg.triples.filter(pl.col("relation") == rel).select("head", "tail").iter_rows())
    member = dict(
        pl.read_parquet(small_partition / "membership.parquet")
        .select("entity", "partition")
        .iter_rows()
    )
    diseases = {s: set(f["disease"]) for s, f in splits.items()}
    assert not diseases["train"] & diseases["test"]
    assert not diseases["train"] & diseases["dev"]
    assert not diseases["dev"] & diseases["test"]
    for frame in splits.values():
        assert frame["label"].mean() == 0.5
        for d, p, label, part in frame.select(
            "disease", "phenotype", "label", "partition"
        ).iter_rows():
            assert ((d, p) in facts) == bool(label)
            assert member[d] == member[p] == part  # every fact is inside one partition
        # Each disease and each phenotype is asked once "yes" and once "no" per pair, so
        # answering from the disease or the phenotype alone scores exactly 0.5.
        for col in ("disease", "phenotype"):
            rate = frame.group_by(col).agg(pl.col("label").mean().alias("r"))
            prior = frame.join(rate, on=col)
            assert prior["r"].eq(0.5).all()


def test_probe_is_seeded_and_capped(small_kg, small_partition):
    a = build_probe(small_kg, small_partition, seed=1, max_questions={"train": 40})
    b = build_probe(small_kg, small_partition, seed=1, max_questions={"train": 40})
    assert a["train"].equals(b["train"])
    assert a["train"].height == 40
    assert a["test"]["text_a"][0].startswith("Is ")


def test_pair_format_keeps_the_tail_as_candidate(small_kg, small_partition):
    q = build_probe(small_kg, small_partition, seed=0, format="question")
    p = build_probe(small_kg, small_partition, seed=0, format="pair")
    names = read_kg(small_kg).entities["name"].to_list()
    row = p["test"].row(0, named=True)
    assert row["text_a"] == names[row["disease"]] and row["text_b"] == "has phenotype"
    assert row["candidate"] == names[row["phenotype"]]
    assert q["test"]["candidate"].equals(p["test"]["candidate"])
    assert q["test"]["text_b"].is_null().all()


def test_controls_zero_shot_and_shortcut_baselines(
    small_kg, small_partition, tiny_spec, tiny_adapters, tmp_path
):
    import numpy as np

    from mop.probe_controls import best_threshold, shortcut_baselines, zero_shot
    from mop.tasks.probe import prepare

    assert best_threshold(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 1, 0, 1])) == 0.375
    task = tmp_path / "probe"
    prepare(small_kg, small_partition, task, seed=0)
    m = zero_shot(
        tiny_spec,
        task,
        small_kg,
        small_partition,
        [d.parent for d in tiny_adapters],
        tmp_path / "zs",
    )
    preds = pl.read_parquet(tmp_path / "zs" / "predictions.parquet")
    test = preds.filter(pl.col("split") == "test")
    acc = ((test["score"] > m["threshold"]).cast(pl.Int64) == test["label"]).mean()
    assert acc == m["test_accuracy"]
    assert test["score"].n_unique() > test.height // 2  # real per-question scores
    base = shortcut_baselines(tiny_spec, task, small_kg, tmp_path / "baselines.json")
    # Swapped pairs: each test phenotype and disease is once "yes" and once "no", so the
    # priors learned on the training split cannot beat a coin on test.
    for name in (
        "majority class",
        "disease prior (train yes rate)",
        "phenotype prior (train yes rate)",
        "phenotype annotations in the KG",
    ):
        assert base[name]["test_accuracy"] == 0.5, name
    assert set(base) == {
        "majority class",
        "phenotype prior (train yes rate)",
        "disease prior (train yes rate)",
        "phenotype annotations in the KG",
        "name similarity (base encoder)",
    }

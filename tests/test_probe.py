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

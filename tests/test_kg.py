import polars as pl
import pytest

from mop.errors import MopError
from mop.kg import from_keyed, read_kg, read_stats
from mop.kg.hpo import HAS_PHENOTYPE, load_hpo


def _triples_by_name(kg):
    names = kg.entities.select(pl.col("id"), pl.col("name"), pl.col("key"))
    rels = kg.relations.rename({"id": "relation", "name": "rel"})
    return (
        kg.triples.join(names.rename({"id": "head", "name": "h", "key": "hk"}), on="head")
        .join(names.rename({"id": "tail", "name": "t", "key": "tk"}), on="tail")
        .join(rels, on="relation")
    )


def test_hpo_sample_has_named_entities_and_directed_relations(small_kg):
    kg = read_kg(small_kg)
    stats = read_stats(small_kg)
    assert stats["entities"] == kg.entities.height
    assert stats["triples"] == kg.triples.height
    assert stats["meta"]["hpo_version"] == "2025-01-16"
    assert stats["meta"]["diseases"] == 60
    named = _triples_by_name(kg)
    has_pheno = named.filter(pl.col("rel") == HAS_PHENOTYPE)
    # "has phenotype" goes from a disease to an HPO term, never the other way round.
    assert has_pheno["hk"].str.contains("^(OMIM|ORPHA|DECIPHER):").all()
    assert has_pheno["tk"].str.starts_with("HP:").all()
    is_a = named.filter(pl.col("rel") == "is a")
    assert is_a.height > 0 and is_a["hk"].str.starts_with("HP:").all()
    assert kg.entities["name"].str.len_chars().min() > 0
    assert kg.triples.unique().height == kg.triples.height


def test_whole_hpo_graph_matches_the_package_files():
    kg, meta = load_hpo(diseases="all", genes=True, terms="all")
    stats = kg.stats()
    assert stats["entities"] == meta["terms"] + meta["diseases"] + meta["genes"]
    assert meta["terms"] == 19034  # live terms of hp.obo 2025-01-16
    assert stats["triples_per_relation"]["is a"] == 23392
    named = _triples_by_name(kg)
    # A known edge, in the documented direction: child "is a" parent.
    edge = named.filter((pl.col("hk") == "HP:0000002") & (pl.col("rel") == "is a"))
    assert edge["tk"].to_list() == ["HP:0001507"]
    assert edge["t"].to_list() == ["Growth abnormality"]


def test_sampling_is_seeded():
    a, _ = load_hpo(diseases=20, seed=7)
    b, _ = load_hpo(diseases=20, seed=7)
    c, _ = load_hpo(diseases=20, seed=8)
    assert a.entities.equals(b.entities) and a.triples.equals(b.triples)
    assert not a.entities.equals(c.entities)


def test_equal_names_stay_distinct_entities_and_duplicates_collapse():
    ents = pl.DataFrame({"key": ["C1", "C2", "C3"], "name": ["cold", "cold", "virus"]})
    triples = pl.DataFrame(
        {"head": ["C1", "C1", "C2"], "relation": ["caused by"] * 3, "tail": ["C3", "C3", "C3"]}
    )
    kg = from_keyed(ents, triples)
    assert kg.entities.height == 3
    assert kg.triples.height == 2


@pytest.mark.parametrize(
    ("ents", "triples", "message"),
    [
        (
            {"key": ["a"], "name": ["x"]},
            {"head": ["a"], "relation": ["r"], "tail": ["b"]},
            "unknown entity 'b'",
        ),
        (
            {"key": ["a", "b"], "name": ["x", " "]},
            {"head": ["a"], "relation": ["r"], "tail": ["b"]},
            "entity 'b' has an empty name",
        ),
        (
            {"key": ["a", "a"], "name": ["x", "y"]},
            {"head": ["a"], "relation": ["r"], "tail": ["a"]},
            "entity key 'a' appears more than once",
        ),
    ],
)
def test_bad_graphs_are_refused_with_one_clear_message(ents, triples, message):
    with pytest.raises(MopError, match=message):
        from_keyed(pl.DataFrame(ents), pl.DataFrame(triples), source="fixture.tsv")

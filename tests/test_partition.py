import numpy as np
import polars as pl
import pytest

from mop.errors import MopError
from mop.kg.hpo import load_hpo
from mop.partition import partition_graph, shuffle_membership


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


def test_every_entity_in_exactly_one_partition_and_sizes_balanced():
    triples = planted_graph()
    part = partition_graph(triples, 200, 4, ufactor=30)
    m = part.membership
    assert m["entity"].sort().to_list() == list(range(200))
    sizes = np.bincount(m["partition"].to_numpy(), minlength=4)
    assert sizes.sum() == 200
    assert sizes.max() <= 1.03 * 200 / 4 + 1
    assert part.stats["entities_per_partition"] == sizes.tolist()
    # Local indices enumerate each partition's entities from 0.
    for _, group in m.group_by("partition"):
        assert sorted(group["local"].to_list()) == list(range(group.height))


def test_retained_triples_equal_a_brute_force_count():
    triples = planted_graph(seed=1)
    part = partition_graph(triples, 200, 4)
    member = dict(
        zip(
            *part.membership.select("entity", "partition").to_dict(as_series=False).values(),
            strict=True,
        )
    )
    brute = sum(
        member[h] == member[t] for h, t in zip(triples["head"], triples["tail"], strict=True)
    )
    assert part.stats["triples_retained"] == brute == part.triples.height
    assert all(
        member[h] == p == member[t]
        for p, h, t in part.triples.select("partition", "head", "tail").iter_rows()
    )
    assert sum(part.stats["triples_per_partition"]) == brute


def test_same_seed_same_partition():
    triples = planted_graph(seed=2)
    a = partition_graph(triples, 200, 4, seed=5).membership
    b = partition_graph(triples, 200, 4, seed=5).membership
    assert a.equals(b)


def test_shuffle_rates():
    triples = planted_graph(seed=3)
    metis = partition_graph(triples, 200, 4, seed=1)
    zero = partition_graph(triples, 200, 4, seed=1, shuffle=0.0)
    assert zero.membership.equals(metis.membership)
    full = partition_graph(triples, 200, 4, seed=1, shuffle=1.0)
    assert full.stats["entities_per_partition"] == metis.stats["entities_per_partition"]
    base = metis.membership["partition"].to_numpy()
    moved = shuffle_membership(base, 0.4, seed=9)
    assert np.array_equal(np.bincount(moved), np.bincount(base))
    changed = (moved != base).mean()
    assert 0.2 < changed <= 0.4
    # On planted communities METIS keeps far more triples than a random partition.
    assert metis.stats["triples_retained"] > 3 * full.stats["triples_retained"]


def test_k_larger_than_entities_is_refused():
    with pytest.raises(MopError, match="K = 500 is not between 1 and the number of entities"):
        partition_graph(planted_graph(), 200, 500)


def test_isolated_entities_are_counted():
    triples = planted_graph(n_comm=2, size=20, seed=4)
    part = partition_graph(triples, 45, 2)  # 5 entities have no triple at all
    assert part.stats["entities_without_triples"] >= 5
    assert part.membership.height == 45


def test_whole_hpo_metis_keeps_five_times_random():
    kg, _ = load_hpo(diseases="all", genes=True, terms="all")
    metis = partition_graph(kg.triples, kg.num_entities, 20, seed=1)
    rand = partition_graph(kg.triples, kg.num_entities, 20, seed=1, shuffle=1.0)
    ratio = metis.stats["triples_retained"] / rand.stats["triples_retained"]
    assert ratio >= 5, ratio

"""Partition a knowledge graph's entities into K sub-graphs with METIS.

The entity graph has one undirected, unweighted edge per pair of entities linked by any
triple (duplicates collapsed, self loops dropped), as in Cluster-GCN and the original MoP
code. METIS k-way minimises the edge cut under a balance constraint; a triple survives
into partition g only when its head and tail both lie in g. Entities without any triple
still get a partition (METIS balances them in) and are counted in the stats.

The controlled shuffle of the paper's section 3.6 keeps the METIS partition sizes and
permutes the labels of a seeded random fraction of the entities among themselves: rate 0
is METIS, rate 1 a size-preserving random partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pymetis
import scipy.sparse as sp

from mop.errors import MopError
from mop.io import write_json, write_parquet
from mop.kg import read_kg

MEMBERSHIP_SCHEMA = {"entity": pl.Int32, "partition": pl.Int32, "local": pl.Int32}


def entity_graph(triples: pl.DataFrame, num_entities: int, weighted: bool = False) -> sp.csr_array:
    """Symmetric CSR adjacency of the entity graph; values count triples per entity pair."""
    h = triples["head"].to_numpy().astype(np.int32)
    t = triples["tail"].to_numpy().astype(np.int32)
    keep = h != t
    h, t = h[keep], t[keep]
    rows = np.concatenate([h, t])
    cols = np.concatenate([t, h])
    # int32 values add up duplicate pairs (edge weights); bool values collapse them.
    vals = np.ones(rows.size, dtype=np.int32 if weighted else np.bool_)
    adj = sp.csr_array((vals, (rows, cols)), shape=(num_entities, num_entities))
    adj.sum_duplicates()
    return adj


def metis_partition(
    adj: sp.csr_array, k: int, seed: int = 1, ufactor: int = 30, weighted: bool = False
) -> tuple[np.ndarray, int]:
    """Run METIS k-way on the adjacency; return (membership per entity, edge cut).

    ufactor is METIS's load imbalance tolerance in thousandths (30 -> max part 1.03 x
    mean). With `weighted`, the number of triples between two entities is the edge weight.
    """
    n = adj.shape[0]
    if k < 1 or k > n:
        raise MopError(f"partition: K = {k} is not between 1 and the number of entities ({n})")
    if k == 1:
        return np.zeros(n, dtype=np.int32), 0
    options = pymetis.Options(seed=seed, ufactor=ufactor)
    graph = pymetis.CSRAdjacency(adj.indptr.astype(np.int32), adj.indices.astype(np.int32))
    eweights = adj.data.astype(np.int32) if weighted else None
    cut, parts = pymetis.part_graph(k, graph, eweights=eweights, options=options)
    return np.asarray(parts, dtype=np.int32), int(cut)


def shuffle_membership(membership: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Permute the partition labels of a seeded random `rate` share of the entities.

    Partition sizes are unchanged. Some chosen entities draw their own label back, as in
    any random permutation, so the share that actually moves is a little below `rate`.
    """
    if not 0.0 <= rate <= 1.0:
        raise MopError(f"partition: shuffle rate {rate} is not within [0, 1]")
    rng = np.random.default_rng(seed)
    out = membership.copy()
    m = round(rate * membership.size)
    chosen = rng.choice(membership.size, size=m, replace=False)
    out[chosen] = out[rng.permutation(chosen)]
    return out


def retained_mask(triples: pl.DataFrame, membership: np.ndarray) -> np.ndarray:
    return membership[triples["head"].to_numpy()] == membership[triples["tail"].to_numpy()]


def edge_cut(adj: sp.csr_array, membership: np.ndarray) -> int:
    """Undirected entity pairs whose two ends lie in different partitions."""
    coo = adj.tocoo()
    upper = coo.row < coo.col
    return int((membership[coo.row[upper]] != membership[coo.col[upper]]).sum())


@dataclass(frozen=True)
class Partition:
    membership: pl.DataFrame  # entity, partition, local (index within its partition)
    triples: pl.DataFrame  # partition, head, relation, tail (only retained triples)
    stats: dict


def partition_graph(
    triples: pl.DataFrame,
    num_entities: int,
    k: int,
    *,
    seed: int = 1,
    ufactor: int = 30,
    weighted: bool = False,
    shuffle: float = 0.0,
    given: np.ndarray | None = None,
) -> Partition:
    """METIS (then the optional controlled shuffle) and everything later stages need.

    given: a membership to use instead of METIS (e.g. the authors' `partition_K.txt`).
    """
    adj = entity_graph(triples, num_entities, weighted)
    if given is None:
        membership, _ = metis_partition(adj, k, seed=seed, ufactor=ufactor, weighted=weighted)
    else:
        membership = np.asarray(given, dtype=np.int32)
    if shuffle > 0:
        membership = shuffle_membership(membership, shuffle, seed)
    keep = retained_mask(triples, membership)
    kept = triples.filter(pl.Series(keep)).with_columns(
        partition=pl.Series(membership[triples["head"].to_numpy()[keep]], dtype=pl.Int32)
    )
    sizes = np.bincount(membership, minlength=k)
    if (sizes == 0).any():
        raise MopError(
            f"partition: K = {k} left partition {int(np.argmin(sizes))} empty; use a smaller K"
        )
    member_df = pl.DataFrame(
        {"entity": np.arange(num_entities, dtype=np.int32), "partition": membership}
    ).with_columns(local=pl.int_range(pl.len(), dtype=pl.Int32).over("partition"))
    touched = np.zeros(num_entities, dtype=bool)
    touched[kept["head"].to_numpy()] = True
    touched[kept["tail"].to_numpy()] = True
    degree = np.diff(adj.indptr)
    triples_per_part = np.bincount(kept["partition"].to_numpy(), minlength=k)
    stats = {
        "k": k,
        "seed": seed,
        "ufactor": ufactor,
        "weighted": weighted,
        "shuffle": shuffle,
        "entities": num_entities,
        "entities_per_partition": sizes.tolist(),
        "entities_min": int(sizes.min()),
        "entities_mean": float(sizes.mean()),
        "entities_max": int(sizes.max()),
        "imbalance": float(sizes.max() / sizes.mean()),
        "triples": triples.height,
        "triples_retained": int(keep.sum()),
        "triples_retained_share": float(keep.mean()) if triples.height else 0.0,
        "triples_per_partition": triples_per_part.tolist(),
        "edge_cut": edge_cut(adj, membership),
        "entities_without_triples": int((degree == 0).sum()),
        "entities_without_triple_in_partition": int((~touched).sum()),
    }
    return Partition(
        member_df,
        kept.select("partition", "head", "relation", "tail").sort(
            ["partition", "head", "relation", "tail"]
        ),
        stats,
    )


def write_partition(part: Partition, out_dir: str | Path) -> None:
    out = Path(out_dir)
    write_parquet(part.membership, out / "membership.parquet")
    write_parquet(part.triples, out / "triples.parquet")
    write_json(part.stats, out / "stats.json")


def run_partition(
    kg_dir: str | Path,
    out_dir: str | Path,
    k: int,
    *,
    seed: int = 1,
    ufactor: int = 30,
    weighted: bool = False,
    shuffle: float = 0.0,
    given: str | Path | None = None,
) -> dict:
    """The partition stage: read a KG folder, write membership, triples and stats.

    given: an OpenKE folder whose `partition_<k>.txt` replaces METIS.
    """
    kg = read_kg(kg_dir)
    membership = None
    if given is not None:
        from mop.kg.openke import import_partition

        membership = import_partition(given, k, kg_dir)
        if (membership < 0).any():
            raise MopError(
                f"{Path(given) / f'partition_{k}.txt'}: {(membership < 0).sum()} entities "
                f"of {kg_dir} are in no partition"
            )
    part = partition_graph(
        kg.triples,
        kg.num_entities,
        k,
        seed=seed,
        ufactor=ufactor,
        weighted=weighted,
        shuffle=shuffle,
        given=membership,
    )
    write_partition(part, out_dir)
    return part.stats

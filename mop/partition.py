"""Partition a knowledge graph's entities into K sub-graphs with METIS.

The entity graph has one undirected edge per pair of entities linked by any triple
(duplicates collapsed, self loops dropped), as in Cluster-GCN and the original MoP code;
with `weighted`, the edge weight is the number of triples between the two entities (an
ablation). METIS k-way minimises the edge cut under a balance constraint; a triple
survives into partition g only when its head and tail both lie in g.

Entities without any triple are isolated vertices to METIS: they cut nothing wherever
they go, so METIS uses them to balance the partition sizes. Each keeps a row in its
partition's entity head but is never a training target; the stats count them.

The controlled shuffle of the paper's section 3.6 keeps the METIS partition sizes and
permutes the labels of a seeded random fraction of the entities among themselves: rate 0
is METIS, rate 1 a size-preserving random partition.

The stage is built for SFull scale (300k entities, 4M triples) and beyond: everything
around the METIS call is vectorised (scipy / numpy / polars) and works on int32 ids; only
the arrays handed to METIS use its index width (`pymetis.zero_copy_dtype()`), so METIS
reads them without another copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pymetis
import scipy.sparse as sp

from mop.errors import MopError
from mop.io import write_json, write_parquet
from mop.kg import TRIPLE_SCHEMA, read_table

ISOLATED_PLACEMENT = (
    "isolated vertices to METIS: placed where they balance partition sizes; each keeps a "
    "row in its partition's entity head but is never a training target"
)

MEMBERSHIP_SCHEMA = {"entity": pl.Int32, "partition": pl.Int32, "local": pl.Int32}


def read_membership(partition_dir: str | Path) -> np.ndarray:
    """Each entity's partition, indexed by entity id."""
    table = read_table(Path(partition_dir) / "membership.parquet", MEMBERSHIP_SCHEMA)
    return table.sort("entity")["partition"].to_numpy()


def fact_partitions(heads: np.ndarray, tails: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """The partition holding each fact (head, tail): the one both ends belong to, -1 where
    the partitioning cut the fact (its ends lie in two partitions, no adapter saw it)."""
    ph, pt = membership[heads], membership[tails]
    return np.where(ph == pt, ph, -1).astype(np.int32)


def entity_graph(triples: pl.DataFrame, num_entities: int, weighted: bool = False) -> sp.csr_array:
    """Symmetric CSR adjacency of the entity graph, sorted indices, no duplicates.

    Values are the number of triples per entity pair with `weighted`, else all True.
    Built as A + A^T from the head -> tail matrix A, assembled column by column: in a KG
    sorted by head (as the `kg` stage writes them) each column's rows arrive sorted, so
    every step is a linear pass and nothing is sorted (unsorted input is sorted, still
    correct, just slower).
    """
    h = triples["head"].to_numpy()
    t = triples["tail"].to_numpy()
    keep = h != t
    # int32 values add up duplicate pairs (edge weights); bool values collapse them.
    vals = np.ones(int(np.count_nonzero(keep)), dtype=np.int32 if weighted else np.bool_)
    a = sp.csc_array((vals, (h[keep], t[keep])), shape=(num_entities, num_entities))
    return a.tocsr() + a.T


def metis_partition(
    adj: sp.csr_array,
    k: int,
    seed: int = 1,
    ufactor: int = 30,
    weighted: bool = False,
    recursive: bool = False,
) -> tuple[np.ndarray, int]:
    """Run METIS k-way on the adjacency; return (membership per entity, edge cut).

    ufactor is METIS's load imbalance tolerance in thousandths (30 -> max part 1.03 x
    mean). With `weighted`, the number of triples between two entities is the edge weight
    and the returned cut is weighted too. K-way is asked for explicitly, for every K, as
    the paper and the original code use it: pymetis itself switches to recursive bisection
    when K <= 8 unless told not to; `recursive` asks for bisection.
    """
    n = adj.shape[0]
    if k < 1 or k > n:
        raise MopError(f"partition: K = {k} is not between 1 and the number of entities ({n})")
    if k == 1:
        return np.zeros(n, dtype=np.int32), 0
    idx = pymetis.zero_copy_dtype()
    graph = pymetis.CSRAdjacency(adj.indptr.astype(idx), adj.indices.astype(idx))
    eweights = adj.data.astype(idx) if weighted else None
    options = pymetis.Options(seed=seed, ufactor=ufactor)
    cut, parts = pymetis.part_graph(
        k, graph, eweights=eweights, options=options, recursive=recursive
    )
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


def edge_cut(adj: sp.csr_array, membership: np.ndarray) -> tuple[int, np.ndarray]:
    """Undirected entity pairs cut by the partition, and which entities have a neighbour
    in their own partition.

    One pass over the adjacency serves both: an entity with no neighbour inside its
    partition has no retained triple there (but for a self loop).
    """
    degree = np.diff(adj.indptr)
    same = np.repeat(membership, degree) == membership[adj.indices]
    cut = (adj.nnz - int(np.count_nonzero(same))) // 2
    has_inside = np.zeros(membership.size, dtype=bool)
    # reduceat sums [start_i, start_i+1) for consecutive starts: empty rows are left out.
    starts = adj.indptr[:-1][degree > 0]
    if starts.size:
        has_inside[degree > 0] = np.logical_or.reduceat(same, starts)
    return cut, has_inside


def local_index(membership: np.ndarray) -> np.ndarray:
    """Each entity's rank among the entities of its partition, in entity-id order."""
    order = np.argsort(membership, kind="stable")
    sizes = np.bincount(membership)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    local = np.empty(membership.size, dtype=np.int32)
    local[order] = np.arange(membership.size, dtype=np.int32) - starts[membership[order]]
    return local


@dataclass(frozen=True)
class Partition:
    membership: pl.DataFrame  # entity, partition, local (index within its partition)
    triples: pl.DataFrame  # partition, head, relation, tail (only retained, in KG order)
    stats: dict


def partition_stats(
    triples: pl.DataFrame, adj: sp.csr_array, membership: np.ndarray, keep: np.ndarray, k: int
) -> dict:
    """Sizes, retained triples, edge cut and entities without triples of a partition;
    `keep` marks the triples whose head and tail share a partition."""
    n = membership.size
    sizes = np.bincount(membership, minlength=k)
    h = triples["head"].to_numpy()
    t = triples["tail"].to_numpy()
    cut, neighbour_inside = edge_cut(adj, membership)
    with_loop = np.zeros(n, dtype=bool)
    with_loop[h[h == t]] = True
    has_triple = (np.diff(adj.indptr) > 0) | with_loop
    has_kept = neighbour_inside | with_loop
    retained = int(np.count_nonzero(keep))
    pairs = adj.nnz // 2
    return {
        "entities": n,
        "entities_per_partition": sizes.tolist(),
        "entities_min": int(sizes.min()),
        "entities_mean": float(sizes.mean()),
        "entities_max": int(sizes.max()),
        "imbalance": float(sizes.max() / sizes.mean()),
        "triples": triples.height,
        "triples_retained": retained,
        "triples_retained_share": retained / triples.height if triples.height else 0.0,
        "triples_per_partition": np.bincount(membership[h][keep], minlength=k).tolist(),
        "entity_pairs": pairs,
        "edge_cut": cut,
        "edge_cut_share": cut / pairs if pairs else 0.0,
        "entities_without_triples": int(n - np.count_nonzero(has_triple)),
        "entities_without_triples_per_partition": np.bincount(
            membership[~has_triple], minlength=k
        ).tolist(),
        "entities_without_triples_placement": ISOLATED_PLACEMENT,
        "entities_without_triple_in_partition": int(n - np.count_nonzero(has_kept)),
    }


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
    recursive: bool = False,
) -> Partition:
    """METIS (then the optional controlled shuffle) and everything later stages need.

    The retained triples keep the KG's order (sorted by head, relation, tail for every KG
    the `kg` stage writes); readers select a partition's rows by the `partition` column.

    given: a membership to use instead of METIS (e.g. the authors' `partition_K.txt`).
    """
    n = num_entities
    adj = entity_graph(triples, n, weighted)
    if given is None:
        membership, _ = metis_partition(
            adj, k, seed=seed, ufactor=ufactor, weighted=weighted, recursive=recursive
        )
    else:
        membership = np.asarray(given, dtype=np.int32)
    if shuffle > 0:
        membership = shuffle_membership(membership, shuffle, seed)
    sizes = np.bincount(membership, minlength=k)
    if (sizes == 0).any():
        raise MopError(
            f"partition: K = {k} left partition {int(np.argmin(sizes))} empty; use a smaller K"
        )
    part_of_head = membership[triples["head"].to_numpy()]
    keep = part_of_head == membership[triples["tail"].to_numpy()]
    kept = (
        triples.with_columns(partition=pl.Series(part_of_head, dtype=pl.Int32))
        .filter(pl.Series(keep))
        .select("partition", "head", "relation", "tail")
    )
    member_df = pl.DataFrame(
        {
            "entity": np.arange(n, dtype=np.int32),
            "partition": membership,
            "local": local_index(membership),
        }
    )
    settings = {"k": k, "seed": seed, "ufactor": ufactor, "weighted": weighted, "shuffle": shuffle}
    stats = settings | partition_stats(triples, adj, membership, keep, k)
    return Partition(member_df, kept, stats)


def write_partition(part: Partition, out_dir: str | Path) -> None:
    out = Path(out_dir)
    write_parquet(part.membership, out / "membership.parquet")
    # LZ4 without column statistics writes SFull's ~3M retained triples in half the time
    # of the zstd default, for a file a fifth larger.
    write_parquet(part.triples, out / "triples.parquet", compression="lz4", statistics=False)
    write_json(part.stats, out / "stats.json")


def read_graph(kg_dir: str | Path) -> tuple[pl.DataFrame, int]:
    """The triples and the entity count of a KG folder (names are not read: not needed).

    Entity ids out of range would make METIS read out of bounds; they are refused here.
    """
    d = Path(kg_dir)
    triples_file = d / "triples.parquet"
    triples = read_table(triples_file, TRIPLE_SCHEMA).select(list(TRIPLE_SCHEMA))
    entities = d / "entities.parquet"
    if not entities.is_file():
        raise MopError(f"{entities}: file not found")
    try:
        n = pq.read_metadata(entities).num_rows
    except (OSError, ValueError) as exc:
        raise MopError(f"{entities}: not a readable Parquet file ({exc})") from exc
    for col in ("head", "tail"):
        ids = triples[col]
        if ids.null_count() or (triples.height and (ids.min() < 0 or ids.max() >= n)):
            raise MopError(
                f"{triples_file}: column {col} holds ids outside 0..{n - 1} "
                f"(the entities in {entities.name})"
            )
    return triples.cast(pl.Int32), n


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
    recursive: bool = False,
) -> dict:
    """The partition stage: read a KG folder, write membership, triples and stats.

    given: an OpenKE folder whose `partition_<k>.txt` replaces METIS.
    """
    triples, n = read_graph(kg_dir)
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
        triples,
        n,
        k,
        seed=seed,
        ufactor=ufactor,
        weighted=weighted,
        shuffle=shuffle,
        given=membership,
        recursive=recursive,
    )
    write_partition(part, out_dir)
    return part.stats

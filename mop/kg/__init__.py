"""Knowledge graphs as three tables: entities, relations and triples.

Every source (the embedded HPO graph, UMLS, SNOMED CT RF2, OBO, plain triples) ends in a
`KnowledgeGraph`, written as `entities.parquet` (id, key, name), `relations.parquet`
(id, name) and `triples.parquet` (head, relation, tail) with integer ids, plus
`stats.json` (the paper's Table 2 figures and the source's metadata) and
`relation_frequency.csv`. Later stages only ever read these files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from mop.errors import MopError
from mop.io import atomic_path, read_json, write_json, write_parquet

ENTITY_SCHEMA = {"id": pl.Int32, "key": pl.String, "name": pl.String}
SYNONYM_SCHEMA = {"entity": pl.Int32, "name": pl.String}
RELATION_SCHEMA = {"id": pl.Int32, "name": pl.String}
TRIPLE_SCHEMA = {"head": pl.Int32, "relation": pl.Int32, "tail": pl.Int32}
RELATION_FREQUENCY = "relation_frequency.csv"
DENSE_CODES = 1 << 26


@dataclass(frozen=True)
class KnowledgeGraph:
    """Entities (id, key, name), relations (id, name) and triples (head, relation, tail).

    `key` is the source's own identifier (a CUI, an HPO id, a SNOMED concept id): two
    entities may share a name but never a key. Ids are dense, starting at 0.
    """

    entities: pl.DataFrame
    relations: pl.DataFrame
    triples: pl.DataFrame
    # other names of entities (entity, name), where the source has them (HPO, OBO):
    # questions that name entities as real text does (the KG probe's `wording`)
    synonyms: pl.DataFrame | None = None

    @property
    def num_entities(self) -> int:
        return self.entities.height

    def stats(self) -> dict:
        """The paper's Table 2 figures plus triples per relation (most frequent first)."""
        freq = (
            self.triples.group_by("relation")
            .len()
            .join(self.relations, left_on="relation", right_on="id")
            .sort(["len", "name"], descending=[True, False])
        )
        return {
            "entities": self.entities.height,
            "relations": self.relations.height,
            "triples": self.triples.height,
            "triples_per_relation": {r["name"]: r["len"] for r in freq.iter_rows(named=True)},
        }


def from_keyed(
    entities: pl.DataFrame, triples: pl.DataFrame, *, source: str = "knowledge graph"
) -> KnowledgeGraph:
    """Build a graph from entity keys and names and triples over keys and relation names.

    `entities` has columns key, name; `triples` has head, relation, tail as strings (head
    and tail are entity keys, relation is the relation's display name). Duplicate triples
    are dropped; ids are assigned in sorted key / name order so that the same input always
    gives the same ids. A triple whose head or tail is not an entity, or an entity with an
    empty name, is an error naming `source`.
    """
    entities = entities.select(pl.col("key").cast(pl.String), pl.col("name").cast(pl.String))
    dup = entities.filter(pl.col("key").is_duplicated())
    if dup.height:
        raise MopError(f"{source}: entity key {dup['key'][0]!r} appears more than once")
    empty = entities.filter(pl.col("name").is_null() | (pl.col("name").str.strip_chars() == ""))
    if empty.height:
        raise MopError(f"{source}: entity {empty['key'][0]!r} has an empty name")
    entities = entities.sort("key").with_row_index("id").with_columns(pl.col("id").cast(pl.Int32))
    relations = (
        triples.select(pl.col("relation").cast(pl.String).alias("name"))
        .unique()
        .sort("name")
        .with_row_index("id")
        .with_columns(pl.col("id").cast(pl.Int32))
    )
    ids = entities.select("key", "id")
    triples = (
        triples.join(ids.rename({"key": "head", "id": "h"}), on="head", how="left")
        .join(ids.rename({"key": "tail", "id": "t"}), on="tail", how="left")
        .join(relations.rename({"name": "relation", "id": "r"}), on="relation", how="left")
    )
    unknown = triples.filter(pl.col("h").is_null() | pl.col("t").is_null())
    if unknown.height:
        row = unknown.row(0, named=True)
        missing = row["head"] if row["h"] is None else row["tail"]
        raise MopError(
            f"{source}: triple ({row['head']}, {row['relation']}, {row['tail']}) "
            f"refers to unknown entity {missing!r}"
        )
    triples = (
        triples.select(
            pl.col("h").alias("head"), pl.col("r").alias("relation"), pl.col("t").alias("tail")
        )
        .unique()
        .sort(["head", "relation", "tail"])
    )
    return KnowledgeGraph(
        entities.select(list(ENTITY_SCHEMA)), relations.select(list(RELATION_SCHEMA)), triples
    )


def with_synonyms(kg: KnowledgeGraph, keyed: pl.DataFrame) -> KnowledgeGraph:
    """`kg` with the other names of its entities from `keyed` (columns key, synonyms: a
    list of names per key); keys not in the graph are left out."""
    synonyms = (
        keyed.select("key", "synonyms")
        .explode("synonyms")
        .drop_nulls()
        .join(kg.entities.select("key", "id"), on="key")
        .select(pl.col("id").alias("entity"), pl.col("synonyms").alias("name"))
        .unique()
        .sort(["entity", "name"])
    )
    return replace(kg, synonyms=synonyms)


def with_inverses(kg: KnowledgeGraph, pairs: dict[str, str], key: str) -> KnowledgeGraph:
    """`kg` whose relations table has an `inverse` column (the id of the relation that is
    its inverse, null where none) from `pairs` (relation name -> its inverse's name, one
    direction is enough; a relation may be its own inverse). A name that is not a relation
    of the graph, or a relation given two inverses, is an error naming `key`."""
    ids = dict(zip(kg.relations["name"].to_list(), kg.relations["id"].to_list(), strict=True))
    inverse: dict[int, int] = {}
    for a, b in pairs.items():
        for name in (a, b):
            if name not in ids:
                raise MopError(
                    f"config key {key}: {name!r} is not a relation of the graph "
                    f"(it has: {', '.join(sorted(ids))})"
                )
        for x, y in ((ids[a], ids[b]), (ids[b], ids[a])):
            if inverse.setdefault(x, y) != y:
                raise MopError(f"config key {key}: {a!r} is given two different inverses")
    relations = kg.relations.with_columns(
        inverse=pl.col("id").replace_strict(inverse, default=None, return_dtype=pl.Int32)
    )
    return replace(kg, relations=relations)


class CodeIndex:
    """Entity ids by integer code: an array lookup when codes are small enough (CUIs: a
    table of tens of MB beats any search), else a hash join."""

    def __init__(self, entities: pl.DataFrame) -> None:
        codes = entities["code"].to_numpy()
        self.mapping = entities.select("code", "id")
        self.lookup: np.ndarray | None = None
        if codes.size > 0 and codes.min() >= 0 and codes.max() < DENSE_CODES:
            self.lookup = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
            self.lookup[codes] = np.arange(codes.size)

    def ids(self, triples: pl.DataFrame, column: str, source: str) -> np.ndarray:
        """The ids of a triples column of codes; an unknown code is an error naming it."""
        values = triples[column].cast(pl.Int64)
        if self.lookup is not None:
            arr = values.to_numpy()
            inside = (arr >= 0) & (arr < self.lookup.size)
            found = np.full(arr.size, -1, dtype=np.int64)
            found[inside] = self.lookup[arr[inside]]
        else:
            found = (
                values.to_frame("code")
                .join(self.mapping, on="code", how="left", maintain_order="left")["id"]
                .fill_null(-1)
                .to_numpy()
                .astype(np.int64)
            )
        if (found < 0).any():
            row = triples.row(int(np.argmax(found < 0)), named=True)
            raise MopError(
                f"{source}: triple ({row['head']}, {row['relation']}, {row['tail']}) "
                f"refers to unknown entity {row[column]!r}"
            )
        return found


def unique_triples(
    heads: np.ndarray, rels: np.ndarray, tails: np.ndarray, n_entities: int, n_relations: int
) -> pl.DataFrame:
    """Distinct (head, relation, tail) id triples, sorted; deduplicated as packed 63-bit
    integers where the ids fit, which keeps tens of millions of rows to little memory."""
    e_bits = max(1, int(n_entities).bit_length())
    r_bits = max(1, int(n_relations).bit_length())
    if 2 * e_bits + r_bits > 63:
        return (
            pl.DataFrame({"head": heads, "relation": rels, "tail": tails})
            .cast(pl.Int32)
            .unique()
            .sort(["head", "relation", "tail"])
        )
    packed = pl.Series((heads << (e_bits + r_bits)) | (rels << e_bits) | tails)
    packed = packed.unique().sort().to_numpy()
    return pl.DataFrame(
        {
            "head": (packed >> (e_bits + r_bits)).astype(np.int32),
            "relation": ((packed >> e_bits) & ((1 << r_bits) - 1)).astype(np.int32),
            "tail": (packed & ((1 << e_bits) - 1)).astype(np.int32),
        }
    )


def from_coded(
    entities: pl.DataFrame, triples: pl.DataFrame, *, source: str = "knowledge graph"
) -> KnowledgeGraph:
    """`from_keyed` for sources whose entities carry an integer code: the same tables, faster.

    `entities` has columns code (integer, unique), key, name; `triples` has head and tail
    as codes and relation as names. Ids follow sorted keys and names exactly as in
    `from_keyed`, but triples are mapped with an array lookup (or a hash join) and deduplicated as
    packed integers, which keeps tens of millions of rows to seconds and little memory.
    """
    entities = entities.select(
        pl.col("code").cast(pl.Int64), pl.col("key").cast(pl.String), pl.col("name")
    )
    dup = entities.filter(pl.col("key").is_duplicated() | pl.col("code").is_duplicated())
    if dup.height:
        raise MopError(f"{source}: entity key {dup['key'][0]!r} appears more than once")
    empty = entities.filter(pl.col("name").is_null() | (pl.col("name").str.strip_chars() == ""))
    if empty.height:
        raise MopError(f"{source}: entity {empty['key'][0]!r} has an empty name")
    entities = entities.sort("key").with_row_index("id").with_columns(pl.col("id").cast(pl.Int32))
    index = CodeIndex(entities)
    relations = (
        triples.select(pl.col("relation").cast(pl.String).alias("name"))
        .unique()
        .sort("name")
        .with_row_index("id")
        .with_columns(pl.col("id").cast(pl.Int32))
    )
    heads, tails = index.ids(triples, "head", source), index.ids(triples, "tail", source)
    rels = (
        triples.select(pl.col("relation").cast(pl.String))
        .join(
            relations.rename({"name": "relation"}), on="relation", how="left", maintain_order="left"
        )["id"]
        .to_numpy()
        .astype(np.int64)
    )
    out = unique_triples(heads, rels, tails, entities.height, relations.height)
    return KnowledgeGraph(
        entities.select(list(ENTITY_SCHEMA)), relations.select(list(RELATION_SCHEMA)), out
    )


def relation_frequency(kg: KnowledgeGraph) -> pl.DataFrame:
    """Triples per relation (most frequent first), with their share and distinct heads/tails."""
    return (
        kg.triples.group_by("relation")
        .agg(
            pl.len().alias("triples"),
            pl.col("head").n_unique().alias("heads"),
            pl.col("tail").n_unique().alias("tails"),
        )
        .join(kg.relations.rename({"id": "relation"}), on="relation")
        .with_columns((pl.col("triples") / kg.triples.height).round(6).alias("share"))
        .sort(["triples", "name"], descending=[True, False])
        .select(pl.col("name").alias("relation"), "triples", "share", "heads", "tails")
    )


def write_kg(kg: KnowledgeGraph, out_dir: str | Path, meta: dict | None = None) -> dict:
    """Write the three tables, `relation_frequency.csv` and stats.json (with `meta`).

    Everything is computed and checked before the first file is written, and each file
    is written atomically, so a failure leaves no half-written table behind.
    """
    out = Path(out_dir)
    if kg.triples.height == 0:
        raise MopError(f"{out}: the knowledge graph has no triples after filtering")
    stats = kg.stats() | {"meta": meta or {}}
    freq = relation_frequency(kg)
    write_parquet(kg.entities, out / "entities.parquet")
    write_parquet(kg.relations, out / "relations.parquet")
    write_parquet(kg.triples, out / "triples.parquet")
    if kg.synonyms is not None:
        write_parquet(kg.synonyms.select(list(SYNONYM_SCHEMA)), out / "synonyms.parquet")
    with atomic_path(out / RELATION_FREQUENCY) as tmp:
        freq.write_csv(tmp)
    write_json(stats, out / "stats.json")
    return stats


def read_table(path: str | Path, columns: dict[str, pl.DataType] | None = None) -> pl.DataFrame:
    """Read one of our Parquet tables; a missing or unreadable file, or a missing column,
    is a MopError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MopError(f"{path}: file not found")
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.ComputeError, OSError) as exc:
        raise MopError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in (columns or {}) if c not in frame.columns]
    if missing:
        raise MopError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def read_kg(kg_dir: str | Path) -> KnowledgeGraph:
    d = Path(kg_dir)
    synonyms = d / "synonyms.parquet"
    return KnowledgeGraph(
        read_table(d / "entities.parquet", ENTITY_SCHEMA),
        read_table(d / "relations.parquet", RELATION_SCHEMA),
        read_table(d / "triples.parquet", TRIPLE_SCHEMA),
        read_table(synonyms, SYNONYM_SCHEMA) if synonyms.is_file() else None,
    )


def read_stats(kg_dir: str | Path) -> dict:
    return read_json(Path(kg_dir) / "stats.json")

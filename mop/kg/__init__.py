"""Knowledge graphs as three tables: entities, relations and triples.

Every source (the embedded HPO graph, UMLS, SNOMED CT RF2, OBO, plain triples) ends in a
`KnowledgeGraph`, written as `entities.parquet` (id, key, name), `relations.parquet`
(id, name) and `triples.parquet` (head, relation, tail) with integer ids, plus
`stats.json`. Later stages only ever read these files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from mop.errors import MopError
from mop.io import read_json, write_json, write_parquet

ENTITY_SCHEMA = {"id": pl.Int32, "key": pl.String, "name": pl.String}
RELATION_SCHEMA = {"id": pl.Int32, "name": pl.String}
TRIPLE_SCHEMA = {"head": pl.Int32, "relation": pl.Int32, "tail": pl.Int32}


@dataclass(frozen=True)
class KnowledgeGraph:
    """Entities (id, key, name), relations (id, name) and triples (head, relation, tail).

    `key` is the source's own identifier (a CUI, an HPO id, a SNOMED concept id): two
    entities may share a name but never a key. Ids are dense, starting at 0.
    """

    entities: pl.DataFrame
    relations: pl.DataFrame
    triples: pl.DataFrame

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


def write_kg(kg: KnowledgeGraph, out_dir: str | Path, meta: dict | None = None) -> dict:
    """Write the three tables and stats.json (with `meta`, e.g. the source's version)."""
    out = Path(out_dir)
    if kg.triples.height == 0:
        raise MopError(f"{out}: the knowledge graph has no triples after filtering")
    stats = kg.stats() | {"meta": meta or {}}
    write_parquet(kg.entities, out / "entities.parquet")
    write_parquet(kg.relations, out / "relations.parquet")
    write_parquet(kg.triples, out / "triples.parquet")
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
    return KnowledgeGraph(
        read_table(d / "entities.parquet", ENTITY_SCHEMA),
        read_table(d / "relations.parquet", RELATION_SCHEMA),
        read_table(d / "triples.parquet", TRIPLE_SCHEMA),
    )


def read_stats(kg_dir: str | Path) -> dict:
    return read_json(Path(kg_dir) / "stats.json")

"""A partition's training examples, selected from the shared tokens table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from mop.batching import Sequences
from mop.errors import MopError
from mop.io import require_file
from mop.kg import KnowledgeGraph, read_kg, read_table
from mop.partition import MEMBERSHIP_SCHEMA


@dataclass(frozen=True)
class PartitionData:
    """A partition's examples: token sequences, local target labels and query groups."""

    seqs: Sequences
    labels: np.ndarray  # local index of the target entity within the partition
    query: np.ndarray  # examples with the same input share a query id (for filtered ranks)
    entities: pl.DataFrame  # entity, local, name (the head's rows, in local order)
    heldout: np.ndarray  # bool: held out of training for the knowledge probe

    @property
    def num_entities(self) -> int:
        return self.entities.height


def canonical_facts(
    heads: np.ndarray, relations: np.ndarray, tails: np.ndarray, kg: KnowledgeGraph
) -> np.ndarray:
    """A dense fact index per triple in which a triple (h, r, t) and its inverse
    (t, inverse(r), h) share one index (the relations table's `inverse` column; without
    it every triple is its own fact). Indices follow the sorted canonical triples."""
    inverse = np.full(int(kg.relations["id"].max()) + 1, -1, dtype=np.int64)
    if "inverse" in kg.relations.columns:
        known = kg.relations.filter(pl.col("inverse").is_not_null())
        inverse[known["id"].to_numpy()] = known["inverse"].to_numpy()
    h, r, t = (np.asarray(a, dtype=np.int64) for a in (heads, relations, tails))
    inv = inverse[r]
    flip = (inv >= 0) & ((t < h) | ((t == h) & (inv < r)))
    canon = np.stack([np.where(flip, t, h), np.where(flip, inv, r), np.where(flip, h, t)], 1)
    return np.unique(canon, axis=0, return_inverse=True)[1].reshape(-1)


def load_partition_data(
    tokens_path: str | Path,
    partition_dir: str | Path,
    kg_dir: str | Path,
    part: int,
    *,
    heldout_share: float = 0.0,
    seed: int = 0,
) -> PartitionData:
    """Select partition `part`'s examples from the shared tokens table."""
    members = read_table(Path(partition_dir) / "membership.parquet", MEMBERSHIP_SCHEMA).filter(
        pl.col("partition") == part
    )
    require_file(tokens_path, "tokens table")
    if members.height == 0:
        raise MopError(f"{partition_dir}: partition {part} does not exist or is empty")
    ids = members["entity"].implode()
    try:
        df = (
            pl.scan_parquet(tokens_path)
            .filter(pl.col("head").is_in(ids) & pl.col("tail").is_in(ids))
            .collect()
        )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise MopError(f"{tokens_path}: not a readable tokens table ({exc})") from exc
    df = df.join(
        members.select(pl.col("entity").alias("target"), pl.col("local").alias("label")),
        on="target",
    ).sort(["direction", "head", "relation", "tail"])
    if df.height == 0:
        raise MopError(f"{partition_dir}: partition {part} has no triples to train on")
    query = (
        df.select(
            pl.struct(
                "direction",
                pl.when(pl.col("direction") == 0).then("head").otherwise("tail"),
                "relation",
            ).rank("dense")
            - 1
        )
        .to_series()
        .to_numpy()
    )
    kg = read_kg(kg_dir)
    names = kg.entities.select(pl.col("id").alias("entity"), "name")
    entities = members.select("entity", "local").join(names, on="entity").sort("local")
    heldout = np.zeros(df.height, dtype=bool)
    if heldout_share > 0:
        # Hold out facts, not examples: both directions of a triple (with bidirectional)
        # go together, and so do a triple and its inverse (t, inverse(r), h), so that a
        # held-out fact is never answered by looking up its other half in training.
        fact = canonical_facts(
            df["head"].to_numpy(), df["relation"].to_numpy(), df["tail"].to_numpy(), kg
        )
        rng = np.random.default_rng(seed)
        heldout = (rng.random(int(fact.max()) + 1) < heldout_share)[fact]
    types = df["token_type_ids"] if "token_type_ids" in df.columns else None
    return PartitionData(
        Sequences.from_series(df["input_ids"], types),
        df["label"].to_numpy().astype(np.int64),
        query.astype(np.int64),
        entities,
        heldout,
    )

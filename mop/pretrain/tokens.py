"""The KG as entity-prediction examples, tokenized once per (KG, model).

`tokenize_kg` writes `tokens.parquet`, shared by all K partition jobs: entity and relation
names are tokenized once each and laid out by the tokenizer's own pair template
(`mop.pairs`: `[CLS] h [SEP] r [SEP]` for BERT, `<s> h </s></s> r </s>` for RoBERTa), so
SNOMED-size graphs tokenize in seconds and the examples are the tokens fine-tuning gives
the same pair. The two names are a sentence pair: for models with segments the relation
(or, backwards, the entity) is segment 1, as in the fine-tuning of pair tasks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from mop.errors import MopError
from mop.io import atomic_path
from mop.kg import read_kg
from mop.models import ModelSpec, encoder_config, load_tokenizer, uses_token_types
from mop.pairs import PairTemplate, pair_template

MAX_RELATION_TOKENS = 16


# ----------------------------------------------------------------------------- tokenization


def _name_ids(tokenizer: Any, names: list[str]) -> list[list[int]]:
    return tokenizer(names, add_special_tokens=False)["input_ids"]


def tokenize_kg(
    kg_dir: str | Path,
    spec: ModelSpec,
    out_path: str | Path,
    *,
    max_length: int = 64,
    bidirectional: bool = False,
    chunk_triples: int = 1_000_000,
) -> int:
    """Write the entity-prediction examples of every triple of a KG; return their number.

    Columns: direction (0: (h, r) -> t, 1: (r, t) -> h), head, relation, tail, target (the
    entity to predict), input_ids (the two names laid out by the tokenizer's own pair
    template: mop.pairs) and, for models with segments, token_type_ids (the template's).
    Names are truncated so that every example fits `max_length` tokens: the relation to 16
    tokens, then the entity name. Rows are ordered by (direction, head, relation, tail) and
    written `chunk_triples` triples at a time (one Parquet row group each), so memory stays
    bounded on graphs of all-UMLS size.
    """
    kg = read_kg(kg_dir)
    tok = load_tokenizer(spec)
    template = pair_template(tok)
    ent_ids = _name_ids(tok, kg.entities["name"].to_list())
    rel_ids = [ids[:MAX_RELATION_TOKENS] for ids in _name_ids(tok, kg.relations["name"].to_list())]
    ents = pl.DataFrame(
        {"entity": kg.entities["id"], "e_ids": ent_ids},
        schema={"entity": pl.Int32, "e_ids": pl.List(pl.Int32)},
    )
    rels = pl.DataFrame(
        {"relation": kg.relations["id"], "r_ids": rel_ids},
        schema={"relation": pl.Int32, "r_ids": pl.List(pl.Int32)},
    )
    columns = ["direction", "head", "relation", "tail", "target", "input_ids"]
    if uses_token_types(encoder_config(spec)):
        columns.append("token_type_ids")
    if kg.triples.height == 0:
        raise MopError(f"{kg_dir}: the knowledge graph has no triples to tokenize")
    triples = kg.triples.sort(["head", "relation", "tail"])
    directions = [0, 1] if bidirectional else [0]
    frames = (
        _examples(chunk, direction, ents, rels, template, max_length).select(columns)
        for direction in directions
        for chunk in triples.iter_slices(chunk_triples)
    )
    with atomic_path(out_path) as tmp:
        return _write_row_groups(frames, tmp)


def _examples(
    triples: pl.DataFrame,
    direction: int,
    ents: pl.DataFrame,
    rels: pl.DataFrame,
    template: PairTemplate,
    max_length: int,
) -> pl.DataFrame:
    """The examples of some triples in one direction, in the triples' order: the anchor
    entity's name cut so that the pair fits `max_length`, then the pair's token columns."""
    anchor, target = ("head", "tail") if direction == 0 else ("tail", "head")
    df = (
        triples.join(ents.rename({"entity": anchor}), on=anchor, maintain_order="left")
        .join(rels, on="relation", maintain_order="left")
        .with_columns(
            room=(max_length - template.specials - pl.col("r_ids").list.len()).cast(pl.Int32),
            direction=pl.lit(direction, dtype=pl.Int8),
            target=pl.col(target),
        )
        .with_columns(e_ids=pl.col("e_ids").list.head(pl.col("room")))
    )
    first, second = ("e_ids", "r_ids") if direction == 0 else ("r_ids", "e_ids")
    return _pair_columns(df, template, first, second)


def _write_row_groups(frames: Iterator[pl.DataFrame], path: Path) -> int:
    """Write frames of one schema as the row groups of one Parquet file; return the rows."""
    writer, rows = None, 0
    try:
        for frame in frames:
            table = frame.to_arrow()
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


def _pair_columns(
    df: pl.DataFrame, template: PairTemplate, first: str, second: str
) -> pl.DataFrame:
    """input_ids and token_type_ids of the pairs (first, second) of two token-id columns."""

    def ids(values: list[int]) -> pl.Expr:
        return pl.lit(pl.Series([values], dtype=pl.List(pl.Int32)))

    parts = [len(template.prefix), pl.col(first).list.len(), len(template.middle)]
    parts += [pl.col(second).list.len(), len(template.suffix)]
    return df.with_columns(
        input_ids=pl.concat_list(
            ids(template.prefix), first, ids(template.middle), second, ids(template.suffix)
        ),
        token_type_ids=pl.concat_list(
            [
                pl.lit(t, dtype=pl.Int8).repeat_by(n)
                for t, n in zip(template.types, parts, strict=True)
            ]
        ),
    )

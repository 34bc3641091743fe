"""The KG as entity-prediction examples, tokenized once per (KG, tokenizer).

`tokenize_kg` writes `tokens.parquet`, shared by all K partition jobs: entity and relation
names are tokenized once each and concatenated, so SNOMED-size graphs tokenize in seconds.
The two names are a sentence pair: the relation (or, backwards, the entity) is segment 1,
as in the fine-tuning of pair tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from mop.io import atomic_path
from mop.kg import read_kg
from mop.models import ModelSpec, load_tokenizer

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
) -> int:
    """Write the entity-prediction examples of every triple of a KG; return their number.

    Columns: direction (0: (h, r) -> t, 1: (r, t) -> h), head, relation, tail, target (the
    entity to predict), input_ids and token_type_ids (0 up to the first [SEP], 1 after).
    Names are truncated so that every example fits `max_length` tokens: the relation to 16
    tokens, then the entity name.
    """
    kg = read_kg(kg_dir)
    tok = load_tokenizer(spec)
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
    cls, sep = tok.cls_token_id, tok.sep_token_id
    frames = []
    directions = [(0, "head", "tail")] + ([(1, "tail", "head")] if bidirectional else [])
    for direction, anchor, target in directions:
        df = (
            kg.triples.join(ents.rename({"entity": anchor}), on=anchor)
            .join(rels, on="relation")
            .with_columns(
                room=(max_length - 3 - pl.col("r_ids").list.len()).cast(pl.Int32),
                direction=pl.lit(direction, dtype=pl.Int8),
                target=pl.col(target),
            )
            .with_columns(e_ids=pl.col("e_ids").list.head(pl.col("room")))
        )
        first, second = ("e_ids", "r_ids") if direction == 0 else ("r_ids", "e_ids")
        df = df.with_columns(
            input_ids=pl.concat_list(
                pl.lit([cls], dtype=pl.List(pl.Int32)),
                first,
                pl.lit([sep], dtype=pl.List(pl.Int32)),
                second,
                pl.lit([sep], dtype=pl.List(pl.Int32)),
            ),
            first_len=pl.col(first).list.len() + 2,
            second_len=pl.col(second).list.len() + 1,
        )
        df = df.with_columns(
            token_type_ids=pl.concat_list(
                pl.lit(0, dtype=pl.Int8).repeat_by(pl.col("first_len")),
                pl.lit(1, dtype=pl.Int8).repeat_by(pl.col("second_len")),
            )
        )
        frames.append(
            df.select(
                "direction", "head", "relation", "tail", "target", "input_ids", "token_type_ids"
            )
        )
    out = pl.concat(frames).sort(["direction", "head", "relation", "tail"])
    with atomic_path(out_path) as tmp:
        out.write_parquet(tmp)
    return out.height

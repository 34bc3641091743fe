"""OBO ontologies (HPO, GO, MONDO, ...) read with the `fastobo` parser.

Terms become entities keyed by their OBO id and named by their `name:` clause; `is_a`
clauses become the relation "is a" (child -> parent) and `relationship:` clauses become
relations named after their typedef (its `name:` when the file defines one, else the id
with `_` -> space). Obsolete terms and edges to terms outside the file are left out, and
counted in the returned `meta`.
"""

from __future__ import annotations

from pathlib import Path

import fastobo
import polars as pl

from mop.errors import MopError
from mop.kg import KnowledgeGraph, from_keyed, with_synonyms

IS_A = "is a"


def read_obo_terms(path: str | Path) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Return (terms: key, name, synonyms), (edges: head, relation, tail over keys) and
    counts."""
    path = Path(path)
    if not path.is_file():
        raise MopError(f"{path}: OBO file not found")
    try:
        doc = fastobo.load(str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError) as exc:
        raise MopError(f"{path}: not a valid OBO file: {exc}") from exc
    typedef_names: dict[str, str] = {}
    keys: list[str] = []
    names: list[str] = []
    synonyms: list[list[str]] = []
    edges: list[tuple[str, str, str]] = []
    obsolete = 0
    for frame in doc:
        kind = type(frame).__name__
        if kind == "TypedefFrame":
            for clause in frame:
                if type(clause).__name__ == "NameClause":
                    typedef_names[str(frame.id)] = str(clause.name)
            continue
        if kind != "TermFrame":
            continue
        key, name, term_edges, is_obsolete = str(frame.id), None, [], False
        term_synonyms: list[str] = []
        for clause in frame:
            ckind = type(clause).__name__
            if ckind == "NameClause":
                name = str(clause.name)
            elif ckind == "SynonymClause":
                term_synonyms.append(str(clause.synonym.desc))
            elif ckind == "IsAClause":
                term_edges.append((key, IS_A, str(clause.term)))
            elif ckind == "RelationshipClause":
                term_edges.append((key, str(clause.typedef), str(clause.term)))
            elif ckind == "IsObsoleteClause" and clause.obsolete:
                is_obsolete = True
        if is_obsolete:
            obsolete += 1
            continue
        if not name or not name.strip():
            raise MopError(f"{path}: term {key} has no name")
        keys.append(key)
        names.append(name)
        synonyms.append(term_synonyms)
        edges.extend(term_edges)
    terms = pl.DataFrame(
        {"key": keys, "name": names, "synonyms": synonyms},
        schema={"key": pl.String, "name": pl.String, "synonyms": pl.List(pl.String)},
    )
    edge_df = pl.DataFrame(
        edges, schema={"head": pl.String, "relation": pl.String, "tail": pl.String}, orient="row"
    ).with_columns(
        pl.col("relation").replace_strict(
            typedef_names, default=pl.col("relation").str.replace_all("_", " ")
        )
    )
    live = set(keys)
    dangling = edge_df.filter(~pl.col("tail").is_in(live))
    edge_df = edge_df.filter(pl.col("tail").is_in(live))
    meta = {"obsolete_terms": obsolete, "edges_to_missing_terms": dangling.height}
    return terms, edge_df, meta


def load_obo(
    path: str | Path, *, relations: list[str] | None = None, key: str = "kgs.*"
) -> tuple[KnowledgeGraph, dict]:
    """Any OBO ontology as a graph: live terms, "is a" and `relationship:` edges.

    relations: keep only these relations (by name, e.g. ["is a", "part of"]); a listed
    relation that the file does not have is an error naming the config key.
    """
    terms, edges, meta = read_obo_terms(path)
    available = sorted(edges["relation"].unique().to_list())
    if relations:
        missing = [r for r in relations if r not in available]
        if missing:
            raise MopError(
                f"config key {key}.relations: relation {missing[0]!r} does not occur in "
                f"{path} (it has: {', '.join(available)})"
            )
        edges = edges.filter(pl.col("relation").is_in(relations))
    if edges.height == 0:
        raise MopError(f"{path}: no is_a or relationship edges between live terms")
    kg = with_synonyms(from_keyed(terms, edges, source=str(path)), terms)
    return kg, {"source": "obo", "path": str(path), "relations_available": available, **meta}

"""What each partition is about: TF-IDF terms of its entity names and k-means groups.

As in the paper's case study (Figure 4), every partition becomes one document, the names
of its entities; TF-IDF (scikit-learn) over those K documents gives each partition's most
characteristic terms, and k-means on the partitions' TF-IDF vectors groups similar
partitions (six groups of 20 in the paper). A word cloud per group, drawn from the summed
term scores of its partitions, shows a reader which topics each adapter holds.

Tokens are words of two or more letters (no digits), lower-cased, without English stop
words; scikit-learn's defaults otherwise: smoothed idf = ln((1 + K) / (1 + df)) + 1 and
each partition's vector scaled to unit length, so scores compare within a partition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import TfidfVectorizer

from mop.errors import MopError
from mop.io import atomic_path
from mop.kg import ENTITY_SCHEMA, read_table
from mop.partition import MEMBERSHIP_SCHEMA

TOKEN_PATTERN = r"(?u)\b[^\W\d_]{2,}\b"


def partition_documents(kg_dir: str | Path, partition_dir: str | Path) -> pl.DataFrame:
    """One document per partition 0..K-1: its entity names (by entity id, one per line),
    with its number of entities."""
    entities = read_table(Path(kg_dir) / "entities.parquet", ENTITY_SCHEMA)
    members = read_table(Path(partition_dir) / "membership.parquet", MEMBERSHIP_SCHEMA)
    joined = members.join(
        entities.select(pl.col("id").alias("entity"), "name"), on="entity", how="left"
    )
    if joined["name"].null_count():
        raise MopError(
            f"{partition_dir}/membership.parquet: entities missing from {kg_dir}/entities.parquet"
        )
    docs = (
        joined.sort("entity")
        .group_by("partition")
        .agg(pl.col("name").str.join("\n").alias("document"), pl.len().alias("entities"))
    )
    every = pl.DataFrame({"partition": range(int(members["partition"].max()) + 1)})
    return (
        every.with_columns(pl.col("partition").cast(pl.Int32))
        .join(docs, on="partition", how="left")
        .with_columns(pl.col("document").fill_null(""), pl.col("entities").fill_null(0))
        .with_columns(pl.col("partition").cast(pl.Int64), pl.col("entities").cast(pl.Int64))
    )


def tfidf(documents: list[str]) -> tuple[Any, np.ndarray]:
    """The (K x vocabulary) TF-IDF matrix of the documents and its vocabulary."""
    vectorizer = TfidfVectorizer(lowercase=True, stop_words="english", token_pattern=TOKEN_PATTERN)
    try:
        matrix = vectorizer.fit_transform(documents)
    except ValueError as exc:  # every document empty or only stop words
        raise MopError(f"topics: the entity names hold no terms ({exc})") from exc
    return matrix, vectorizer.get_feature_names_out()


def top_terms(matrix: Any, vocabulary: np.ndarray, n: int) -> pl.DataFrame:
    """Per partition its n highest-scoring terms (ties by term): partition, term, score."""
    rows = []
    dense = matrix.toarray()
    for part, scores in enumerate(dense):
        nonzero = np.flatnonzero(scores > 0)
        order = sorted(nonzero, key=lambda j: (-scores[j], vocabulary[j]))[:n]
        rows += [
            {"partition": part, "term": str(vocabulary[j]), "score": float(scores[j])}
            for j in order
        ]
    schema = {"partition": pl.Int64, "term": pl.String, "score": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


def group_partitions(matrix: Any, groups: int, seed: int = 0) -> np.ndarray:
    """k-means groups of the partitions' TF-IDF vectors (at most K groups).

    Groups are numbered by their lowest partition id, so the numbering does not depend on
    k-means' arbitrary cluster labels.
    """
    k = matrix.shape[0]
    g = max(1, min(groups, k))
    labels = KMeans(n_clusters=g, n_init=10, random_state=seed).fit_predict(matrix)
    first = {}
    for part, label in enumerate(labels):
        first.setdefault(int(label), part)
    renumber = {label: i for i, label in enumerate(sorted(first, key=first.get))}
    return np.array([renumber[int(x)] for x in labels], dtype=np.int64)


def group_frequencies(terms: pl.DataFrame, groups: pl.DataFrame) -> dict[int, dict[str, float]]:
    """Per group, each term's summed score over the group's partitions (word-cloud sizes)."""
    summed = (
        terms.join(groups.select("partition", "group"), on="partition")
        .group_by("group", "term")
        .agg(pl.col("score").sum())
        .sort(["group", "score", "term"], descending=[False, True, False])
    )
    out: dict[int, dict[str, float]] = {}
    for g, term, score in summed.iter_rows():
        out.setdefault(int(g), {})[term] = float(score)
    return out


def run_topics(
    kg_dir: str | Path,
    partition_dir: str | Path,
    out_dir: str | Path,
    *,
    groups: int = 6,
    terms: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Write terms.csv (partition, term, score) and groups.csv (partition, group,
    entities); the report draws them (word clouds, Figure 4's top)."""
    docs = partition_documents(kg_dir, partition_dir)
    matrix, vocabulary = tfidf(docs["document"].to_list())
    table = top_terms(matrix, vocabulary, terms)
    labels = group_partitions(matrix, groups, seed)
    grouped = docs.select("partition", pl.Series("group", labels), "entities")
    out = Path(out_dir)
    with atomic_path(out / "terms.csv") as tmp:
        table.write_csv(tmp)
    with atomic_path(out / "groups.csv") as tmp:
        grouped.write_csv(tmp)
    return {
        "partitions": docs.height,
        "groups": int(labels.max()) + 1,
        "vocabulary": len(vocabulary),
    }

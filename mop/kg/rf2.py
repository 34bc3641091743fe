"""SNOMED CT release (RF2 snapshot) -> a knowledge graph of active concepts.

Files are found anywhere under `path` by their RF2 names (several matches of one kind,
e.g. an edition and its extension, are read together):
`sct2_Concept_Snapshot*.txt`, `sct2_Description_Snapshot*.txt`,
`sct2_Relationship_Snapshot*.txt` and `der2_cRefset_LanguageSnapshot*.txt`.

- A component counts when its latest row (by effectiveTime; a snapshot has one) is
  active; inactive concepts, descriptions, relationships and language refset members
  are left out.
- A concept's name is its synonym marked preferred in the language refset
  (`language_refset`, US English by default): the US preferred term. A concept without
  one falls back to its preferred fully specified name (counted in the metadata).
- Triples are the active relationships whose characteristic type is in
  `characteristic_types` (inferred by default): sourceId --typeId--> destinationId, the
  source being the concept the relationship defines. The relation is named by the
  type concept's preferred term ("Is a", "Finding site", ...).
- An active relationship that points to an inactive or unknown concept, or a concept
  without any name, is an error naming the file and line: consistent releases have none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from mop.errors import MopError
from mop.kg import KnowledgeGraph, from_coded
from mop.kg.delimited import check_delimited

US_ENGLISH = "900000000000509007"
PREFERRED = "900000000000548007"
SYNONYM = "900000000000013009"
FSN = "900000000000003001"
INFERRED = "900000000000011006"
IS_A = "116680003"

FILES = {
    "concept": (
        "sct2_Concept_Snapshot*.txt",
        "id effectiveTime active moduleId definitionStatusId",
    ),
    "description": (
        "sct2_Description_Snapshot*.txt",
        "id effectiveTime active moduleId conceptId languageCode typeId term caseSignificanceId",
    ),
    "relationship": (
        "sct2_Relationship_Snapshot*.txt",
        "id effectiveTime active moduleId sourceId destinationId relationshipGroup typeId "
        "characteristicTypeId modifierId",
    ),
    "language": (
        "der2_cRefset_LanguageSnapshot*.txt",
        "id effectiveTime active moduleId refsetId referencedComponentId acceptabilityId",
    ),
}


def find_files(root: str | Path, kind: str) -> list[Path]:
    pattern, _ = FILES[kind]
    root = Path(root)
    if not root.is_dir():
        raise MopError(f"{root}: SNOMED CT release folder not found")
    found = sorted(root.rglob(pattern))
    if not found:
        raise MopError(f"{root}: no SNOMED CT RF2 file matching {pattern}")
    return found


def scan_rf2(paths: list[Path], kind: str) -> pl.LazyFrame:
    """Check each file line by line and its header, then scan them as one lazy table.

    Only the latest row per id is kept (a no-op on a snapshot), and `line` holds each
    row's line number for error messages.
    """
    columns = FILES[kind][1].split()
    frames = []
    for path in paths:
        check_delimited(path, fields=len(columns), sep="\t", trailing=False)
        with path.open(encoding="utf-8") as fh:
            header = fh.readline().rstrip("\r\n").split("\t")
        if header != columns:
            raise MopError(f"{path}:1: expected the RF2 header {' '.join(columns)}")
        frames.append(
            pl.scan_csv(
                path,
                separator="\t",
                quote_char=None,
                schema=dict.fromkeys(columns, pl.String),
                empty_string_is_null=False,
            )
            .with_row_index("line", offset=2)
            .with_columns(file=pl.lit(str(path)))
        )
    return (
        pl.concat(frames)
        .sort("effectiveTime", maintain_order=True)
        .unique("id", keep="last", maintain_order=True)
    )


def _sctid(df: pl.DataFrame, column: str) -> pl.Series:
    """A column of SCTIDs as Int64, or a MopError naming the first bad line."""
    ids = df[column].cast(pl.Int64, strict=False)
    if ids.null_count():
        row = df.filter(ids.is_null()).row(0, named=True)
        raise MopError(f"{row['file']}:{row['line']}: {column} {row[column]!r} is not an SCTID")
    return ids


def concept_names(
    descriptions: pl.DataFrame, language: pl.DataFrame, refset: str
) -> tuple[pl.DataFrame, int]:
    """(conceptId, name) from preferred synonyms, else preferred FSNs; how many used FSNs."""
    preferred = language.filter(
        (pl.col("active") == "1")
        & (pl.col("refsetId") == refset)
        & (pl.col("acceptabilityId") == PREFERRED)
    ).select(pl.col("referencedComponentId").alias("id"))
    named = (
        descriptions.filter(pl.col("active") == "1")
        .filter(pl.col("typeId").is_in([SYNONYM, FSN]))
        .join(preferred, on="id", how="semi")
        .with_columns(rank=pl.when(pl.col("typeId") == SYNONYM).then(0).otherwise(1))
    )
    empty = named.filter(pl.col("term").str.strip_chars() == "")
    if empty.height:
        row = empty.row(0, named=True)
        raise MopError(f"{row['file']}:{row['line']}: the term of description {row['id']} is empty")
    chosen = named.sort(["conceptId", "rank", "id"]).unique(
        "conceptId", keep="first", maintain_order=True
    )
    return chosen.select("conceptId", name="term"), int((chosen["rank"] == 1).sum())


def check_concepts(
    rels: pl.DataFrame, concepts: pl.DataFrame, names: pl.DataFrame, language_refset: str
) -> None:
    """Every concept a relationship names (source, destination, type) is active and has a
    name; the first that is not is an error naming its file and line."""
    active = set(concepts.filter(pl.col("active") == "1")["id"].to_list())
    named = set(names["conceptId"].to_list())
    for column in ("sourceId", "destinationId", "typeId"):
        bad = rels.filter(~pl.col(column).is_in(active))
        if bad.height:
            row = bad.row(0, named=True)
            raise MopError(
                f"{row['file']}:{row['line']}: {column} {row[column]} is not an active concept"
            )
        bad = rels.filter(~pl.col(column).is_in(named))
        if bad.height:
            row = bad.row(0, named=True)
            raise MopError(
                f"{row['file']}:{row['line']}: concept {row[column]} has no preferred term "
                f"in language refset {language_refset}"
            )


def choose_relations(
    rels: pl.DataFrame,
    type_names: dict[str, str],
    relations: Sequence[str] | None,
    top_relations: int | None,
    key: str,
    rel_file: Path,
) -> pl.DataFrame:
    """The relationships of the relations asked for: those named (by type name, any case,
    or type concept id), the `top_relations` most frequent, or all."""
    freq = rels.group_by("relation").len().sort(["len", "relation"], descending=[True, False])
    if relations:
        by_id = {str(t): n for t, n in type_names.items()}
        lookup = {n.lower(): n for n in freq["relation"]} | {t: n for t, n in by_id.items()}
        chosen = []
        for item in relations:
            name = lookup.get(str(item).lower()) or lookup.get(str(item))
            if name is None:
                raise MopError(
                    f"config key {key}.relations: relation {item!r} does not occur in "
                    f"{rel_file} after filtering"
                )
            chosen.append(name)
        return rels.filter(pl.col("relation").is_in(chosen))
    if top_relations is not None:
        return rels.filter(pl.col("relation").is_in(freq["relation"].head(top_relations).implode()))
    return rels


def load_rf2(
    path: str | Path,
    *,
    language_refset: str | int = US_ENGLISH,
    characteristic_types: Sequence[str | int] = (INFERRED,),
    relations: Sequence[str] | None = None,
    top_relations: int | None = None,
    key: str = "kgs.*",
) -> tuple[KnowledgeGraph, dict[str, Any]]:
    """Build the graph of a SNOMED CT RF2 snapshot; see the module docstring.

    relations: keep only these relations (type names or type concept ids);
    top_relations: keep the N relations with the most triples.
    """
    if relations and top_relations is not None:
        raise MopError(f"config key {key}: set either relations or top_relations, not both")
    concepts = scan_rf2(find_files(path, "concept"), "concept").collect()
    descriptions = scan_rf2(find_files(path, "description"), "description").collect()
    language = scan_rf2(find_files(path, "language"), "language").collect()
    rel_files = find_files(path, "relationship")
    rels = (
        scan_rf2(rel_files, "relationship")
        .filter(pl.col("active") == "1")
        .filter(pl.col("characteristicTypeId").is_in([str(c) for c in characteristic_types]))
        .select("file", "line", "sourceId", "typeId", "destinationId")
        .collect()
    )
    meta: dict[str, Any] = {
        "source": "rf2",
        "path": str(path),
        "language_refset": str(language_refset),
        "characteristic_types": [str(c) for c in characteristic_types],
        "concepts_active": int((concepts["active"] == "1").sum()),
        "concepts_inactive": int((concepts["active"] != "1").sum()),
    }
    if rels.height == 0:
        raise MopError(
            f"{rel_files[0]}: no active relationships of characteristic type "
            f"{meta['characteristic_types']}"
        )
    names, fsn_used = concept_names(descriptions, language, str(language_refset))
    meta["names_from_fsn"] = fsn_used
    check_concepts(rels, concepts, names, str(language_refset))
    type_names = dict(
        names.filter(pl.col("conceptId").is_in(rels["typeId"].unique().implode())).iter_rows()
    )
    rels = rels.with_columns(relation=pl.col("typeId").replace_strict(type_names))
    meta["relations_available"] = rels["relation"].n_unique()
    rels = choose_relations(rels, type_names, relations, top_relations, key, rel_files[0])
    rels = rels.with_columns(
        head=_sctid(rels, "sourceId"), tail=_sctid(rels, "destinationId")
    ).select("head", "relation", "tail")
    used = pl.concat([rels["head"], rels["tail"]]).unique().cast(pl.String).implode()
    entities = names.filter(pl.col("conceptId").is_in(used)).select(
        code=pl.col("conceptId").cast(pl.Int64), key="conceptId", name="name"
    )
    kg = from_coded(entities, rels, source=str(rel_files[0]))
    meta["duplicate_rows"] = rels.height - kg.triples.height
    return kg, meta

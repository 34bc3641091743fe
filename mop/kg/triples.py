"""Plain triples files (TSV, CSV or Parquet) -> a knowledge graph.

Two layouts:
- names only: each row holds head, relation and tail names; an entity is its name (the
  key is the name too), so equal names are one entity;
- ids plus name tables: head and tail are entity ids, named by an `entities` table
  (columns key or id, and name); relation ids may likewise be named by a `relations`
  table. Ids keep entities with equal names apart.

Column names are configurable (`columns: {head, relation, tail}`); a file without a
header row takes them in that order. TSV is read without quoting (and checked line by
line first), CSV with standard double-quote quoting. An empty cell, an id missing from
the name tables or a missing column is an error naming the file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from mop.errors import MopError
from mop.kg import KnowledgeGraph, from_keyed
from mop.kg.delimited import check_delimited

ROLES = ("head", "relation", "tail")


def _format(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffix = path.suffix.lower()
    formats = {".tsv": "tsv", ".txt": "tsv", ".tab": "tsv", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in formats:
        raise MopError(f"{path}: cannot tell the format from the name; set `format`")
    return formats[suffix]


def read_table(
    path: str | Path, *, fmt: str | None = None, header: bool = True, width: int | None = None
) -> tuple[pl.DataFrame, int]:
    """A table of strings with a `line` column (1-based file line, or row for Parquet).

    Returns the table and the number to add to a 0-based row index to get its line.
    """
    path = Path(path)
    if not path.is_file():
        raise MopError(f"{path}: file not found")
    fmt = _format(path, fmt)
    first = 2 if header else 1
    try:
        if fmt == "parquet":
            df = pl.read_parquet(path).cast(pl.String)
            first = 1
        else:
            sep = "\t" if fmt == "tsv" else ","
            if fmt == "tsv":
                with path.open("rb") as fh:
                    cols = fh.readline().rstrip(b"\r\n").count(b"\t") + 1
                check_delimited(path, fields=width or cols, sep="\t", trailing=False)
            df = pl.read_csv(
                path,
                separator=sep,
                has_header=header,
                quote_char=None if fmt == "tsv" else '"',
                infer_schema=False,
                empty_string_is_null=False,
            )
    except pl.exceptions.PolarsError as exc:
        raise MopError(f"{path}: cannot read as {fmt}: {str(exc).splitlines()[0]}") from exc
    return df.with_row_index("line", offset=first), first


def _columns(df: pl.DataFrame, path: Path, wanted: dict[str, str], header: bool) -> pl.DataFrame:
    if not header:
        names = [c for c in df.columns if c != "line"]
        if len(names) < len(wanted):
            raise MopError(f"{path}: expected {len(wanted)} columns, found {len(names)}")
        df = df.rename(dict(zip(names, wanted.values(), strict=False)))
    missing = [c for c in wanted.values() if c not in df.columns]
    if missing:
        raise MopError(f"{path}: no column {missing[0]!r} (columns: {', '.join(df.columns[1:])})")
    df = df.select("line", *[pl.col(c).alias(role) for role, c in wanted.items()])
    empty = df.filter(
        pl.any_horizontal(
            [pl.col(r).is_null() | (pl.col(r).str.strip_chars() == "") for r in wanted]
        )
    )
    if empty.height:
        row = empty.row(0, named=True)
        role = next(r for r in wanted if not (row[r] or "").strip())
        raise MopError(f"{path}:{row['line']}: empty {role}")
    return df


def _name_table(path: str | Path) -> pl.DataFrame:
    df, _ = read_table(path)
    key = "key" if "key" in df.columns else "id"
    return _columns(df, Path(path), {"key": key, "name": "name"}, header=True)


def load_triples(
    path: str | Path,
    *,
    format: str | None = None,
    header: bool = True,
    columns: dict[str, str] | None = None,
    entities: str | None = None,
    relations: str | None = None,
    key: str = "kgs.*",
) -> tuple[KnowledgeGraph, dict[str, Any]]:
    """Build a graph from a triples file (and optional entity / relation name tables)."""
    path = Path(path)
    wanted = {r: (columns or {}).get(r, r) for r in ROLES}
    df, _ = read_table(path, fmt=format, header=header)
    rows = _columns(df, path, wanted, header)
    if rows.height == 0:
        raise MopError(f"{path}: no triples")
    meta: dict[str, Any] = {"source": "triples", "path": str(path), "rows": rows.height}
    if relations:
        rel_names = _name_table(relations)
        unknown = rows.filter(~pl.col("relation").is_in(rel_names["key"].implode()))
        if unknown.height:
            row = unknown.row(0, named=True)
            raise MopError(
                f"{path}:{row['line']}: relation {row['relation']!r} is not in {relations}"
            )
        rows = rows.with_columns(
            pl.col("relation").replace_strict(dict(rel_names.select("key", "name").iter_rows()))
        )
    if entities:
        ents = _name_table(entities)
        dup = ents.filter(pl.int_range(pl.len()).over("key") == 1)
        if dup.height:
            row = dup.row(0, named=True)
            raise MopError(f"{entities}:{row['line']}: entity {row['key']!r} appears twice")
        known = ents["key"].implode()
        for role in ("head", "tail"):
            unknown = rows.filter(~pl.col(role).is_in(known))
            if unknown.height:
                row = unknown.row(0, named=True)
                raise MopError(f"{path}:{row['line']}: {role} {row[role]!r} is not in {entities}")
        used = pl.concat([rows["head"], rows["tail"]]).unique().implode()
        ents = ents.filter(pl.col("key").is_in(used)).select("key", "name")
    else:
        ents = pl.concat([rows["head"], rows["tail"]]).unique().to_frame("key")
        ents = ents.with_columns(name=pl.col("key"))
    kg = from_keyed(ents, rows.select(ROLES), source=str(path))
    meta["duplicate_rows"] = rows.height - kg.triples.height
    return kg, meta

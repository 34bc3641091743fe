"""The UMLS Rich Release Format (RRF): the columns of MRCONSO, MRREL and MRDOC, finding a
release's files, lazy scans of them, MRDOC's relation names and CUIs as integers.

RRF files are pipe-delimited with a `|` ending every line (so one empty last field), no
quoting and no header; the columns are those of the UMLS Reference Manual.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from mop.errors import MopError
from mop.kg.delimited import check_delimited

MRCONSO_FIELDS = (
    "CUI",
    "LAT",
    "TS",
    "LUI",
    "STT",
    "SUI",
    "ISPREF",
    "AUI",
    "SAUI",
    "SCUI",
    "SDUI",
    "SAB",
    "TTY",
    "CODE",
    "STR",
    "SRL",
    "SUPPRESS",
    "CVF",
)
MRREL_FIELDS = (
    "CUI1",
    "AUI1",
    "STYPE1",
    "REL",
    "CUI2",
    "AUI2",
    "STYPE2",
    "RELA",
    "RUI",
    "SRUI",
    "SAB",
    "SL",
    "RG",
    "DIR",
    "SUPPRESS",
    "CVF",
)
MRDOC_FIELDS = ("DOCKEY", "VALUE", "TYPE", "EXPL")


def release_file(path: str | Path, name: str) -> Path:
    """`<path>/<name>` or `<path>/META/<name>`; a MopError naming both when neither exists."""
    root = Path(path)
    for candidate in (root / name, root / "META" / name):
        if candidate.is_file():
            return candidate
    raise MopError(f"{root / name}: UMLS file not found (nor {root / 'META' / name})")


def scan_rrf(path: Path, fields: Sequence[str]) -> pl.LazyFrame:
    """A lazy scan of an RRF file; the empty field after the trailing `|` is dropped."""
    schema = dict.fromkeys([*fields, "_end"], pl.String)
    return pl.scan_csv(
        path,
        separator="|",
        has_header=False,
        quote_char=None,
        schema=schema,
        empty_string_is_null=False,
    ).drop("_end")


def read_mrdoc(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(RELA -> expanded form, RELA -> its inverse) from MRDOC.RRF."""
    check_delimited(path, fields=len(MRDOC_FIELDS))
    doc = (
        scan_rrf(path, MRDOC_FIELDS)
        .filter(pl.col("DOCKEY") == "RELA")
        .filter(pl.col("TYPE").is_in(["expanded_form", "rela_inverse"]))
        .collect()
    )
    expanded = doc.filter(pl.col("TYPE") == "expanded_form")
    inverse = doc.filter(pl.col("TYPE") == "rela_inverse")
    return (
        dict(zip(expanded["VALUE"], expanded["EXPL"], strict=True)),
        dict(zip(inverse["VALUE"], inverse["EXPL"], strict=True)),
    )


def cui_code(column: str) -> pl.Expr:
    """A CUI (`C` + 7 digits) as an integer, -1 for anything else; ordered like the CUIs."""
    col = pl.col(column)
    return (
        pl.when(col.str.contains(r"^C[0-9]{7}$"))
        .then(col.str.slice(1).cast(pl.Int32, strict=False))
        .otherwise(-1)
    )

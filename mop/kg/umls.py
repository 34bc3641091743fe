"""UMLS Metathesaurus release (RRF) -> a source vocabulary's graph: the paper's SFull and S20Rel.

Read from a release folder (`<path>/MRCONSO.RRF` or `<path>/META/MRCONSO.RRF`):

- Entities are the concepts (CUIs) with an atom of the source `sab` (SNOMEDCT_US), keyed
  by CUI, so two concepts with one name stay two entities. Only concepts that take part
  in a kept triple become entities.
- A concept's name is its atom of `sab` in one of `languages` whose term type comes first
  in `name_tty` (PT: the US preferred term); without one, its preferred atom (TS=P,
  STT=PF, ISPREF=Y) when `name_fallback`. Suppressed atoms (SUPPRESS O, E, Y) are not
  used unless `include_suppressed`. Ties go to the preferred atom, then the earlier line.
- Triples come from MRREL rows of `sab` with a RELA and a REL in `rel`, read as the UMLS
  documents them: the row `CUI1|...|REL|CUI2|...|RELA|` says CUI2 --RELA--> CUI1, so
  (head, relation, tail) = (CUI2, RELA, CUI1). Suppressed rows are left out unless
  `include_suppressed`; duplicate triples collapse. By default `rel` is [RO], the rows
  the paper's SFull was built from (its 229 relations are RO relations); add PAR/CHD
  for the is-a hierarchy (RELA isa / inverse_isa), or `all` for every REL with a RELA.
- Relation names are MRDOC's expanded forms of the RELA values (else the RELA with `_`
  -> space; `relation_names: rela` always uses the latter, as the paper did).
- S20Rel: `top_relations: N` keeps the N most frequent relations after dropping one
  direction of every inverse pair (pairs from MRDOC `rela_inverse`); `relations: [...]`
  keeps exactly the listed ones (RELA, RELA with spaces, or expanded form). The paper's
  list is in `PAPER_S20REL`.
- The relations table's `inverse` column pairs every kept relation with its kept MRDOC
  inverse (SFull keeps both directions), so that held-out facts leave with their inverse.

Every file is checked line by line first (field count, trailing `|`, UTF-8; see
`mop.kg.delimited`), then streamed with polars' lazy CSV scanner, never loaded whole.
A relation whose concept has no atom of `sab` at all is an error naming the MRREL line;
one whose concept has atoms but no usable name (a retired concept whose atoms are all
suppressed: real releases have them) is skipped and counted in the metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from mop.errors import MopError
from mop.kg import KnowledgeGraph, from_coded, with_inverses
from mop.kg.delimited import check_delimited
from mop.kg.rrf import MRCONSO_FIELDS, MRREL_FIELDS, cui_code, read_mrdoc, release_file, scan_rrf

# What naming a concept reads of its atoms.
ATOM_FIELDS = ("CUI", "LAT", "TS", "STT", "ISPREF", "TTY", "STR", "SUPPRESS")

# The relations of the paper's S20Rel (its appendix A.1), RELA with `_` -> space.
PAPER_S20REL = (
    "has causative agent",
    "has active ingredient",
    "has direct substance",
    "has finding site",
    "has direct procedure site",
    "has procedure site",
    "possibly equivalent to",
    "has occurrence",
    "has associated morphology",
    "has direct morphology",
    "interprets",
    "has method",
    "has direct device",
    "has dose form",
    "has subject relationship context",
    "has pathological process",
    "has interpretation",
    "moved to",
    "has intent",
    "has temporal context",
)


def concept_names(
    path: Path,
    *,
    sab: str,
    languages: Sequence[str],
    name_tty: Sequence[str],
    name_fallback: bool,
    include_suppressed: bool,
) -> tuple[pl.DataFrame, pl.Series, dict[str, int]]:
    """(names: code, key, name), every CUI code with an atom of `sab`, and name counts."""
    atoms = (
        scan_rrf(path, MRCONSO_FIELDS)
        .with_row_index("line", offset=1)
        .filter(pl.col("SAB") == sab)
        .select("line", *ATOM_FIELDS, code=cui_code("CUI"))
        .collect()
    )
    bad = atoms.filter(pl.col("code") < 0)
    if bad.height:
        row = bad.row(0, named=True)
        raise MopError(f"{path}:{row['line']}: CUI {row['CUI']!r} is not C + 7 digits")
    known = atoms["code"].unique()
    preferred = (pl.col("TS") == "P") & (pl.col("STT") == "PF") & (pl.col("ISPREF") == "Y")
    rank = pl.col("TTY").replace_strict(
        {tty: i for i, tty in enumerate(name_tty)}, default=None, return_dtype=pl.Int32
    )
    if name_fallback:
        rank = pl.when(rank.is_not_null()).then(rank).when(preferred).then(len(name_tty))
    candidates = atoms.filter(pl.col("LAT").is_in(list(languages)))
    if not include_suppressed:
        candidates = candidates.filter(pl.col("SUPPRESS") == "N")
    chosen = (
        candidates.with_columns(rank=rank, preferred=preferred)
        .drop_nulls("rank")
        .sort(["code", "rank", "preferred", "line"], descending=[False, False, True, False])
        .unique("code", keep="first", maintain_order=True)
    )
    empty = chosen.filter(pl.col("STR").str.strip_chars() == "")
    if empty.height:
        row = empty.row(0, named=True)
        raise MopError(f"{path}:{row['line']}: the name (STR) of concept {row['CUI']} is empty")
    counts = {f"names_{tty}": int((chosen["rank"] == i).sum()) for i, tty in enumerate(name_tty)}
    if name_fallback:
        counts["names_fallback_preferred_atom"] = int((chosen["rank"] == len(name_tty)).sum())
    counts["concepts_without_usable_name"] = known.len() - chosen.height
    return chosen.select("code", key="CUI", name="STR"), known, counts


def _first_line(path: Path, sab: str, code: int) -> int:
    """The first MRREL line of `sab` whose CUI1 or CUI2 has `code` (for error messages)."""
    hit = (
        scan_rrf(path, MRREL_FIELDS)
        .with_row_index("line", offset=1)
        .filter((pl.col("SAB") == sab) & ((cui_code("CUI1") == code) | (cui_code("CUI2") == code)))
        .select("line")
        .head(1)
        .collect()
    )
    return int(hit["line"][0]) if hit.height else 0


def keep_direction(a: str, b: str) -> str:
    """Which RELA of an inverse pair S20Rel keeps: the active form (has_x over x_of).

    In order: not `inverse_*`, a `has_*` form, not `*_of`, not `is_*_by`, not `*_from`,
    then the alphabetically first. This keeps the paper's direction for all 20 of its
    relations (has finding site, interprets, moved to, ...) and isa over inverse_isa.
    """

    def score(r: str) -> tuple:
        return (
            r.startswith("inverse_"),
            not r.startswith("has_"),
            r.endswith("_of"),
            r.startswith("is_") and r.endswith("_by"),
            r.endswith("_from"),
            r,
        )

    return min(a, b, key=score)


def select_relations(
    freq: pl.DataFrame,
    inverse: dict[str, str],
    display: dict[str, str],
    *,
    top: int | None,
    listed: Sequence[str] | None,
    key: str,
    source: str,
) -> tuple[list[str], dict[str, Any]]:
    """RELAs to keep from `freq` (RELA, triples): all, the top N one-directional, or a list."""
    present = dict(zip(freq["RELA"], freq["triples"], strict=True))
    if listed:
        lookup: dict[str, str] = {}
        for rela in present:
            for form in (rela, rela.replace("_", " "), display.get(rela, "")):
                if form:
                    lookup.setdefault(form.lower(), rela)
        chosen = []
        for item in listed:
            rela = lookup.get(str(item).lower())
            if rela is None:
                raise MopError(
                    f"config key {key}.relations: relation {item!r} does not occur in "
                    f"{source} after filtering"
                )
            chosen.append(rela)
        return sorted(set(chosen)), {"relations_listed": list(listed)}
    if top is None:
        return sorted(present), {}
    dropped = sorted(
        r
        for r in present
        if (p := inverse.get(r, r)) != r and p in present and keep_direction(r, p) != r
    )
    one_way = sorted((r for r in present if r not in dropped), key=lambda r: (-present[r], r))
    return sorted(one_way[:top]), {
        "inverse_directions_dropped": dropped,
        "one_direction_relations": len(one_way),
    }


def relation_rows(
    mrrel: Path, *, sab: str, rel: Sequence[str] | str, include_suppressed: bool
) -> pl.DataFrame:
    """(head, RELA, tail) codes of the MRREL rows of `sab` with a RELA and a REL in `rel`."""
    rows = scan_rrf(mrrel, MRREL_FIELDS).filter((pl.col("SAB") == sab) & (pl.col("RELA") != ""))
    if rel != "all":
        rows = rows.filter(pl.col("REL").is_in(list(rel)))
    if not include_suppressed:
        rows = rows.filter(pl.col("SUPPRESS") == "N")
    rows = rows.select(
        head=cui_code("CUI2"), RELA=pl.col("RELA").cast(pl.Categorical), tail=cui_code("CUI1")
    ).collect()
    if rows.height == 0:
        raise MopError(
            f"{mrrel}: no relation rows left after filtering (SAB={sab}, REL in {rel}, "
            f"a RELA{'' if include_suppressed else ', SUPPRESS=N'})"
        )
    return rows


def named_rows(
    rows: pl.DataFrame, names: pl.DataFrame, known: pl.Series, mrrel: Path, mrconso: Path, sab: str
) -> tuple[pl.DataFrame, int]:
    """The rows whose both concepts have a usable name, and how many rows are left out.
    A concept without any atom of `sab` is an error naming its first MRREL line."""
    codes = pl.concat([rows["head"], rows["tail"]]).unique()
    unknown = codes.filter(~codes.is_in(known.implode()))
    if unknown.len():
        code = int(unknown.sort()[0])
        what = (
            f"concept C{code:07d} has no {sab} atom in {mrconso}"
            if code >= 0
            else "a CUI is not C + 7 digits"
        )
        raise MopError(f"{mrrel}:{_first_line(mrrel, sab, code)}: {what}")
    named = names["code"].implode()
    usable = rows.filter(pl.col("head").is_in(named) & pl.col("tail").is_in(named))
    return usable, rows.height - usable.height


def relation_display(chosen: Sequence[str], display: dict[str, str], style: str) -> dict[str, str]:
    """Each kept RELA's relation name: MRDOC's expanded form, or (`style` rela, or none
    given) the RELA with `_` -> space; two RELAs sharing an expanded form keep their RELAs."""
    if style == "rela":
        names_of = {r: r.replace("_", " ") for r in chosen}
    else:
        names_of = {r: display.get(r) or r.replace("_", " ") for r in chosen}
    taken = list(names_of.values())
    for r, name in names_of.items():
        if taken.count(name) > 1:
            names_of[r] = r.replace("_", " ")
    return names_of


def load_umls(
    path: str | Path,
    *,
    sab: str = "SNOMEDCT_US",
    rel: Sequence[str] | str = ("RO",),
    languages: Sequence[str] = ("ENG",),
    name_tty: Sequence[str] = ("PT",),
    name_fallback: bool = True,
    include_suppressed: bool = False,
    relation_names: str = "expanded_form",
    top_relations: int | None = None,
    relations: Sequence[str] | None = None,
    key: str = "kgs.*",
) -> tuple[KnowledgeGraph, dict[str, Any]]:
    """Build the graph of one source vocabulary from a UMLS release folder.

    `top_relations: null` and no `relations` gives SFull; `top_relations: 20` gives
    S20Rel. See the module docstring for every rule.
    """
    if relations and top_relations is not None:
        raise MopError(f"config key {key}: set either relations or top_relations, not both")
    mrconso, mrrel, mrdoc = (release_file(path, f"{f}.RRF") for f in ("MRCONSO", "MRREL", "MRDOC"))
    meta: dict[str, Any] = {"source": "umls", "sab": sab, "rel": rel, "path": str(path)}
    meta["mrconso_lines"] = check_delimited(mrconso, fields=len(MRCONSO_FIELDS))
    meta["mrrel_lines"] = check_delimited(mrrel, fields=len(MRREL_FIELDS))
    display, inverse = read_mrdoc(mrdoc)
    names, known, name_counts = concept_names(
        mrconso,
        sab=sab,
        languages=languages,
        name_tty=name_tty,
        name_fallback=name_fallback,
        include_suppressed=include_suppressed,
    )
    meta |= name_counts
    rows = relation_rows(mrrel, sab=sab, rel=rel, include_suppressed=include_suppressed)
    meta["mrrel_rows_selected"] = rows.height
    rows, skipped = named_rows(rows, names, known, mrrel, mrconso, sab)
    meta["rows_skipped_unnamed_concept"] = skipped
    pair = pl.col("head").cast(pl.Int64) * 2**32 + pl.col("tail")
    freq = rows.group_by(pl.col("RELA").cast(pl.String)).agg(triples=pair.n_unique())
    meta["relations_available"] = freq.height
    chosen, selection = select_relations(
        freq, inverse, display, top=top_relations, listed=relations, key=key, source=str(mrrel)
    )
    meta |= selection
    meta["relas"] = chosen
    names_of = relation_display(chosen, display, relation_names)
    rows = rows.filter(pl.col("RELA").cast(pl.String).is_in(chosen)).select(
        "head",
        pl.col("RELA").cast(pl.String).replace_strict(names_of).alias("relation"),
        "tail",
    )
    used = pl.concat([rows["head"], rows["tail"]]).unique().implode()
    kg = from_coded(names.filter(pl.col("code").is_in(used)), rows, source=str(mrrel))
    meta["duplicate_rows"] = rows.height - kg.triples.height
    present = set(kg.relations["name"].to_list())
    pairs = {
        names_of[r]: names_of[inverse[r]]
        for r in chosen
        if inverse.get(r) in names_of and {names_of[r], names_of[inverse[r]]} <= present
    }
    return with_inverses(kg, pairs, f"{key} (MRDOC rela_inverse)"), meta

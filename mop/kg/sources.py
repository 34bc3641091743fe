"""Dispatch from a KG's config section to the source that reads it."""

from __future__ import annotations

from typing import Any

from mop.errors import MopError
from mop.kg import KnowledgeGraph, with_inverses

SOURCES = ("hpo", "umls", "rf2", "obo", "triples", "openke")


def build_kg(cfg: dict[str, Any], key: str = "kgs.*") -> tuple[KnowledgeGraph, dict[str, Any]]:
    """Build the graph a `kgs.<name>` config section describes; return it and its metadata."""
    kg, meta = _load(cfg, key)
    if cfg.get("inverses"):
        kg = with_inverses(kg, cfg["inverses"], f"{key}.inverses")
    return kg, meta


def _load(cfg: dict[str, Any], key: str) -> tuple[KnowledgeGraph, dict[str, Any]]:
    source = cfg.get("source")
    options = {k: v for k, v in cfg.items() if k not in ("source", "inverses")}
    if source == "hpo":
        from mop.kg.hpo import load_hpo

        return load_hpo(**options)
    if source == "umls":
        from mop.kg.umls import load_umls as load
    elif source == "rf2":
        from mop.kg.rf2 import load_rf2 as load
    elif source == "obo":
        from mop.kg.obo import load_obo as load
    elif source == "triples":
        from mop.kg.triples import load_triples as load
    elif source == "openke":
        from mop.kg.openke import load_openke as load
    else:
        raise MopError(f"config key {key}.source: unknown source {source!r}")
    if "path" not in options:
        raise MopError(f"config key {key}.path: required for source {source!r}")
    return load(**options, key=key)

"""Dispatch from a KG's config section to the source that reads it."""

from __future__ import annotations

from typing import Any

from mop.errors import MopError
from mop.kg import KnowledgeGraph


def build_kg(cfg: dict[str, Any], key: str = "kgs.*") -> tuple[KnowledgeGraph, dict[str, Any]]:
    """Build the graph a `kgs.<name>` config section describes; return it and its metadata."""
    source = cfg.get("source")
    options = {k: v for k, v in cfg.items() if k != "source"}
    if source == "hpo":
        from mop.kg.hpo import load_hpo

        return load_hpo(**options)
    raise MopError(f"config key {key}.source: unknown source {source!r}")

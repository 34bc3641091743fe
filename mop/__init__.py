"""Mixture-of-Partitions: infuse a knowledge graph into BERT models through METIS
partitions, one adapter per partition, and a mixture layer over them.

`mop.load(DIR)` loads a model written by `mop export` (see mop.export)."""

from __future__ import annotations

from typing import Any


def load(path: Any, device: str = "cpu", precision: str | None = None) -> Any:
    """An exported model (`mop export`), ready to predict: see mop.export.load."""
    from mop.export import load as _load

    return _load(path, device, precision)

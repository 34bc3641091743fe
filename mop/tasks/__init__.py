"""Downstream tasks: each prepares its data as Parquet splits and names its head and metric.

Every task's `prepare` step turns its own format into `{train,dev,test}.parquet` with
columns id, text_a, text_b (may be null) and label (an int; a list of ints for
multi-label tasks), plus any columns the metric needs. Fine-tuning only reads those files,
so adding a task is one small module here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

SPLITS = ("train", "dev", "test")


def accuracy(frame: pl.DataFrame) -> dict[str, float]:
    """Share of rows whose `pred` equals `label`."""
    return {"accuracy": float((frame["pred"] == frame["label"]).mean())}


@dataclass(frozen=True)
class TaskSpec:
    """What fine-tuning needs to know about a task."""

    name: str
    labels: tuple[str, ...]
    metric: Callable[[pl.DataFrame], dict[str, float]]
    main_metric: str
    kind: str = "single"  # "single" label classification (more kinds come with the paper's tasks)

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def get_task(name: str) -> TaskSpec:
    from mop.tasks import probe

    registry = {probe.SPEC.name: probe.SPEC}
    if name not in registry:
        raise KeyError(name)
    return registry[name]


def label_counts(labels: np.ndarray, num_labels: int) -> list[int]:
    return np.bincount(labels, minlength=num_labels).tolist()

"""What a fine-tuning run produced, and how it is saved."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl
from safetensors.torch import save_model

from mop.finetune.config import FinetuneConfig
from mop.finetune.model import Classifier
from mop.finetune.selection import FinetuneState
from mop.io import atomic_path, write_json, write_parquet
from mop.models import ModelSpec
from mop.runtime import Runtime
from mop.tasks import TaskSpec


@dataclass
class FinetuneResult:
    """What a run produced. `save` writes it with metrics.json last, so a folder that has
    metrics is complete; the model (best weights) and its record only with save_model."""

    metrics: dict[str, Any]
    predictions: pl.DataFrame  # per example and split, for significance tests
    mixture: pl.DataFrame | None  # MoP: the test split's mixture weights
    model: Classifier | None
    record: dict[str, Any]

    def save(self, out: Path) -> None:
        write_parquet(self.predictions, out / "predictions.parquet")
        if self.mixture is not None:
            write_parquet(self.mixture, out / "mixture.parquet")
        if self.model is not None:
            self.model.cpu()
            with atomic_path(out / "model.safetensors") as tmp:
                save_model(self.model, str(tmp))
            write_json(self.record, out / "model.json")
        write_json(self.metrics, out / "metrics.json")


def run_metrics(
    task: TaskSpec,
    method: str,
    cfg: FinetuneConfig,
    state: FinetuneState,
    scores: dict[str, Any],
    rt: Runtime,
) -> dict[str, Any]:
    """metrics.json of a run: the best epoch's split metrics (`scores`: `test_accuracy`
    and the like), training and settings."""
    return {
        "task": task.name,
        "method": method,
        "seed": cfg.seed,
        "main_metric": task.main_metric,
        "best_epoch": state.best_epoch,
        "epochs_run": len(state.history),
        "steps": state.step,
        "examples_per_s": state.examples_per_s,
        "train_seconds": state.seconds,
        **scores,
        "history": state.history,
        "config": asdict(cfg),
        "runtime": rt.describe() | {"peak_memory_mb": rt.peak_memory_mb()},
    }


def export_record(
    spec: ModelSpec,
    task: TaskSpec,
    method: str,
    adapter_dirs: list[Path],
    cfg: FinetuneConfig,
    links: str | Path | None,
) -> dict[str, Any]:
    """What `mop export` needs to rebuild the model around its weights."""
    return {
        "task": task.name,
        "method": method,
        "model": asdict(spec),
        "adapters": [str(Path(d).resolve()) for d in adapter_dirs],
        "finetune": asdict(cfg),
        "links": str(Path(links).resolve()) if links is not None else None,
    }

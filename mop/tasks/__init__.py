"""Downstream tasks: each prepares its data as Parquet splits and names its head and metric.

Every task's `prepare` step turns its own format into `{train,dev,test}.parquet` with
columns id, text_a, text_b (may be null) and label, plus any columns the metric or the
input encoding needs. The label is an int for single-label tasks, a 0/1 list over the
task's labels for multi-label tasks, and the index of the right option for
multiple-choice tasks (whose rows also hold `choices` and, when retrieved, `contexts`).
Fine-tuning only reads those files, so adding a task is one small module here.

Kinds of task (what the head and the loss are):
- `single`: one label per example; softmax + cross-entropy.
- `multi`: any number of labels per example; sigmoid + binary cross-entropy, threshold 0.5.
- `choice`: one score per option, softmax over the options + cross-entropy.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from sklearn.metrics import f1_score

from mop.errors import MopError
from mop.io import write_json, write_parquet

SPLITS = ("train", "dev", "test")
KINDS = ("single", "multi", "choice")

# task name -> module under mop.tasks (BioASQ 7b and 8b share one loader)
MODULES = {
    "probe": "probe",
    "hoc": "hoc",
    "pubmedqa": "pubmedqa",
    "bioasq7b": "bioasq",
    "bioasq8b": "bioasq",
    "mednli": "mednli",
    "medqa": "medqa",
}
DATA_TASKS = tuple(name for name in MODULES if name != "probe")


def accuracy(frame: pl.DataFrame) -> dict[str, float]:
    """Share of rows whose `pred` equals `label`."""
    return {"accuracy": float((frame["pred"] == frame["label"]).mean())}


def accuracy_and_macro_f1(frame: pl.DataFrame) -> dict[str, float]:
    """Accuracy and the unweighted mean of the per-class F1 (classes seen in label or pred)."""
    y, p = frame["label"].to_numpy(), frame["pred"].to_numpy()
    return accuracy(frame) | {"macro_f1": float(f1_score(y, p, average="macro", zero_division=0))}


def document_micro_f1(frame: pl.DataFrame) -> dict[str, float]:
    """Micro-F1 over documents x labels after OR-merging the sentence rows of each document.

    A document has a label when any of its sentences has it, for the gold labels and for
    the predictions alike (the HoC evaluation of Gu et al. 2020 / BLURB).
    """
    docs, inverse = np.unique(frame["document"].to_numpy(), return_inverse=True)
    gold = np.zeros((docs.size, len(frame["label"][0])), dtype=np.int64)
    pred = np.zeros_like(gold)
    np.maximum.at(gold, inverse, np.asarray(frame["label"].to_list(), dtype=np.int64))
    np.maximum.at(pred, inverse, np.asarray(frame["pred"].to_list(), dtype=np.int64))
    return {
        "micro_f1": float(f1_score(gold, pred, average="micro", zero_division=0)),
        "sentence_micro_f1": float(
            f1_score(
                np.asarray(frame["label"].to_list()),
                np.asarray(frame["pred"].to_list()),
                average="micro",
                zero_division=0,
            )
        ),
    }


@dataclass(frozen=True)
class TaskSpec:
    """What fine-tuning needs to know about a task."""

    name: str
    labels: tuple[str, ...]
    metric: Callable[[pl.DataFrame], dict[str, float]]
    main_metric: str
    kind: str = "single"
    metric_columns: tuple[str, ...] = ()  # split columns the metric reads besides label/pred
    folds: int = 0  # > 0: data in fold{i}/ folders; the run with seed i trains on fold i
    # columns with the (head, tail) entity ids of the KG fact each example asks about (the
    # KG probe): a run on any partitioning knows which partition holds the fact
    facts: tuple[str, ...] = ()
    source: str = ""  # where the data comes from and its licence (for missing-data errors)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task kind {self.kind!r} is not one of {KINDS}")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def head_size(self) -> int:
        """Outputs of the linear head: one score per option for choice tasks."""
        return 1 if self.kind == "choice" else self.num_labels


def task_module(name: str) -> Any:
    if name not in MODULES:
        raise MopError(f"unknown task {name!r} (known: {', '.join(MODULES)})")
    return importlib.import_module(f"mop.tasks.{MODULES[name]}")


def get_task(name: str) -> TaskSpec:
    module = task_module(name)
    return module.SPECS[name] if hasattr(module, "SPECS") else module.SPEC


def data_files(name: str, options: dict[str, Any]) -> list[Path]:
    """The files a data task's prepare step reads (its rule's inputs)."""
    return [Path(p) for p in task_module(name).data_files(options)]


def check_data(name: str, options: dict[str, Any]) -> None:
    """Raise MopError naming the first missing file, where the data comes from and its licence."""
    if "path" not in options:
        raise MopError(f"config key tasks.{name}.path: the folder with the {name} data is required")
    for path in data_files(name, options):
        if not path.is_file():
            raise MopError(
                f"config key tasks.{name}.path: {path} not found. {get_task(name).source}"
            )


def prepare_data(name: str, options: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Run a data task's prepare step (its files checked first); return its summary."""
    if name not in DATA_TASKS:
        raise MopError(f"task {name!r} has no data files to prepare (data tasks: {DATA_TASKS})")
    check_data(name, options)
    module = task_module(name)
    if hasattr(module, "SPECS"):
        return module.prepare(options, out_dir, name=name)
    return module.prepare(options, out_dir)


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-empty line; bad JSON names the line."""
    path = Path(path)
    out = []
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MopError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise MopError(f"{path}:{n}: expected a JSON object")
                out.append((n, obj))
    except (OSError, UnicodeDecodeError) as exc:
        raise MopError(f"{path}: cannot read ({exc})") from exc
    return out


def require(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise MopError(f"{where}: missing field {key!r}")
    return obj[key]


def label_counts(labels: np.ndarray, num_labels: int) -> list[int]:
    return np.bincount(labels, minlength=num_labels).tolist()


def lookup_label(spec: TaskSpec, value: Any, where: str) -> int:
    """Index of a label string; an unknown one is an error naming the file and line."""
    try:
        return spec.labels.index(value)
    except ValueError:
        raise MopError(f"{where}: label {value!r} is not one of {', '.join(spec.labels)}") from None


def split_frame(rows: list[dict[str, Any]], spec: TaskSpec, where: str) -> pl.DataFrame:
    """The standard split columns from row dicts; an empty split is an error."""
    if not rows:
        raise MopError(f"{where}: no examples")
    label_type: pl.DataType = pl.List(pl.Int64) if spec.kind == "multi" else pl.Int64
    schema: dict[str, Any] = {
        "id": pl.String,
        "text_a": pl.String,
        "text_b": pl.String,
        "label": label_type,
    }
    extra = [k for k in rows[0] if k not in schema]
    return pl.DataFrame(rows, schema_overrides=schema).select(
        "id", "text_a", "text_b", "label", *extra
    )


def check_ids(frame: pl.DataFrame, where: str) -> None:
    """Every example of a split has its own id: predictions, joins and error analyses key on it."""
    ids = frame["id"]
    if ids.n_unique() != ids.len():
        dup = ids.filter(ids.is_duplicated())[0]
        raise MopError(f"{where}: id {dup!r} occurs more than once")


def write_splits(
    splits: dict[str, pl.DataFrame], spec: TaskSpec, out_dir: str | Path, **extra: Any
) -> dict[str, Any]:
    """Write `{split}.parquet` and `summary.json` (examples and label counts per split)."""
    out = Path(out_dir)
    summary: dict[str, Any] = {"task": spec.name, "kind": spec.kind, "examples": {}, "labels": {}}
    for split, frame in splits.items():
        check_ids(frame, f"{spec.name} {split}")
        summary["examples"][split] = frame.height
        if spec.kind == "multi":
            counts = np.asarray(frame["label"].to_list()).sum(0).tolist()
        else:
            counts = label_counts(frame["label"].to_numpy(), spec.num_labels)
        summary["labels"][split] = dict(zip(spec.labels, counts, strict=False))
    summary |= extra
    for split, frame in splits.items():
        write_parquet(frame, out / f"{split}.parquet")
    write_json(summary, out / "summary.json")
    return summary

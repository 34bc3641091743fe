"""A task's encoded splits as a run reads them: labels checked, and for the methods that
need them candidate vectors (bilinear head), routes (oracle), fact partitions and links."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from mop.errors import MopError
from mop.finetune.config import FinetuneConfig
from mop.linking import read_links
from mop.models import ModelSpec, load_base_model
from mop.partition import fact_partitions, read_membership
from mop.runtime import Runtime
from mop.tasks import SPLITS, TaskSpec
from mop.tasks.encode import EncodedSplit, load_split


def check_labels(task: TaskSpec, split: EncodedSplit, path: Path) -> None:
    """Labels must fit the head: classes, 0/1 vectors of the task's width, or option indices."""
    if task.kind == "multi":
        if split.labels.ndim != 2 or split.labels.shape[1] != task.num_labels:
            raise MopError(f"{path}: labels must be 0/1 lists of length {task.num_labels}")
        bad = ((split.labels != 0) & (split.labels != 1)).any(1)
        limit = 1
    else:
        limit = split.choices - 1 if task.kind == "choice" else task.num_labels - 1
        bad = (split.labels < 0) | (split.labels > limit)
    if bad.any():
        row = int(np.argmax(bad))
        raise MopError(
            f"{path}: row {row} has label {split.labels[row].tolist()} outside 0..{limit}"
        )


def batch_inputs(split: EncodedSplit, idx: np.ndarray, pad_id: int, rt: Runtime) -> dict[str, Any]:
    """A batch of examples as model keyword arguments, on the runtime's device."""
    batch: dict[str, Any] = rt.batch(split.seqs.batch(split.rows(idx), pad_id))
    for name, value in split.extras(idx).items():
        batch[name] = rt.to_device(value) if isinstance(value, torch.Tensor) else value
    return batch


def with_candidates(
    spec: ModelSpec,
    tokenizer: Any,
    data: dict[str, EncodedSplit],
    task_dir: str | Path,
    runtime: Runtime | None = None,
    centre: torch.Tensor | None = None,
    encoder: torch.nn.Module | None = None,
) -> tuple[dict[str, EncodedSplit], torch.Tensor]:
    """Attach each example's candidate vector: the frozen base encoder's [CLS] vector of
    its `candidate` text, centred (on the mean over all distinct candidates, or on a given
    `centre`: an exported model's) and of unit length. Returns the data and the centre.

    encoder: the frozen base encoder, if the caller keeps one (default: load it)."""
    from mop.vectors import centred, raw_name_vectors

    for s, split in data.items():
        if "candidate" not in split.frame.columns:
            raise MopError(
                f"{Path(task_dir) / f'{s}.parquet'}: the bilinear head needs a "
                "candidate column (probe: format pair)"
            )
    names = sorted({c for split in data.values() for c in split.frame["candidate"].to_list()})
    raw = raw_name_vectors(encoder or load_base_model(spec), tokenizer, names, runtime=runtime)
    if centre is None:
        centre = raw.mean(0, keepdim=True)
    vectors = centred(raw, centre)
    index = {n: i for i, n in enumerate(names)}
    out = {
        s: replace(split, candidates=vectors[[index[c] for c in split.frame["candidate"]]])
        for s, split in data.items()
    }
    return out, centre


def with_routes(
    data: dict[str, EncodedSplit], task_dir: str | Path, adapters_given: int
) -> dict[str, EncodedSplit]:
    """The oracle routes each example to the adapter of its `partition` column: the one
    trained on the question's fact; where the partitioning cut the fact (-1), to the
    adapter of its head entity (`head_partition`), the one that knows the head's facts."""
    out = {}
    for s, split in data.items():
        if "partition" not in split.frame.columns:
            raise MopError(
                f"{Path(task_dir) / f'{s}.parquet'}: the oracle needs a partition "
                "column (only the KG probe has one)"
            )
        route = split.frame["partition"].to_numpy()
        if "head_partition" in split.frame.columns:
            route = np.where(route >= 0, route, split.frame["head_partition"].to_numpy())
        if route.min() < 0 or route.max() >= adapters_given:
            raise MopError(
                f"{Path(task_dir) / f'{s}.parquet'}: partitions {route.min()}..{route.max()} "
                f"but {adapters_given} adapters given"
            )
        out[s] = replace(split, route=route)
    return out


def with_fact_partitions(
    task: TaskSpec, data: dict[str, EncodedSplit], partition_dir: str | Path
) -> dict[str, EncodedSplit]:
    """Replace a KG probe's `partition` column (its facts' partitions where the probe was
    built) by the partitions of the run's own partitioning (-1 where it cut the fact),
    and add its head entity's partition: a run at another K is routed and judged by the
    partitions its adapters were trained on."""
    if not task.facts:
        return data
    membership = read_membership(partition_dir)
    head, tail = task.facts
    out = {}
    for s, split in data.items():
        heads, tails = split.frame[head].to_numpy(), split.frame[tail].to_numpy()
        frame = split.frame.with_columns(
            partition=pl.Series(fact_partitions(heads, tails, membership)),
            head_partition=pl.Series(membership[heads].astype(np.int32)),
        )
        out[s] = replace(split, frame=frame)
    return out


def load_data(
    spec: ModelSpec,
    task: TaskSpec,
    task_dir: str | Path,
    method: str,
    adapters_given: int,
    cfg: FinetuneConfig,
    tokenizer: Any,
    encoded_dir: str | Path | None = None,
    runtime: Runtime | None = None,
    links: str | Path | None = None,
    partition_dir: str | Path | None = None,
) -> dict[str, EncodedSplit]:
    """The three splits with their tokens, labels checked, plus routes (oracle) and linked
    partitions (`mop link`'s links.parquet, for routed mixtures) where the run uses them;
    `partition_dir`: the run's partitioning, for tasks that know their facts (KG probe)."""
    data = {}
    for s in SPLITS:
        data[s] = load_split(
            task_dir,
            s,
            task.kind,
            encoded_dir=encoded_dir,
            tokenizer=tokenizer,
            max_length=cfg.max_length,
        )
        check_labels(task, data[s], Path(task_dir) / f"{s}.parquet")
    if partition_dir is not None:
        data = with_fact_partitions(task, data, partition_dir)
    if method == "oracle":
        data = with_routes(data, task_dir, adapters_given)
    if links is not None:
        data = {
            s: replace(
                split,
                links=read_links(links, split.ids, adapters_given, cfg.mixture.router),
            )
            for s, split in data.items()
        }
    return data

"""Prediction and metrics: probabilities per split, the task's metrics, the mixture
weights and routing and linking diagnostics of MoP runs."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from mop.batching import sequential_batches
from mop.errors import MopError
from mop.finetune.config import FinetuneConfig
from mop.finetune.data import batch_inputs
from mop.finetune.model import Classifier
from mop.runtime import Runtime, evaluating
from mop.tasks import SPLITS, TaskSpec
from mop.tasks.encode import EncodedSplit


def scores_to_probs(task: TaskSpec, logits: torch.Tensor, n: int) -> torch.Tensor:
    """Per example: class probabilities, per-label probabilities, or option probabilities."""
    logits = logits.float().view(n, -1)
    return torch.sigmoid(logits) if task.kind == "multi" else torch.softmax(logits, -1)


def predict(
    model: Classifier,
    task: TaskSpec,
    split: EncodedSplit,
    pad_id: int,
    batch_size: int,
    fusion_name: str | None = None,
    runtime: Runtime | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Probabilities per example and, with a fusion, two views of the mixture weights per
    sequence: the final layer's at [CLS] (Figure 4) and the mean over layers and real
    tokens (what the routing loss trains).

    Runs on the runtime's device under inference mode; only the outputs come back."""
    rt = runtime or Runtime(next(model.parameters()).device)
    width = split.choices if task.kind == "choice" else task.head_size
    probs = np.zeros((len(split), width), dtype=np.float32)
    mix = mean_mix = None
    batches = sequential_batches(len(split), batch_size, split.lengths)
    with evaluating(model):
        for idx in tqdm(batches, desc="evaluate", mininterval=5, leave=False):
            inputs = batch_inputs(split, idx, pad_id, rt)
            with rt.forward_context():
                logits, att = model(**inputs, output_mixture=fusion_name is not None)
            probs[idx] = scores_to_probs(task, logits, idx.size).cpu().numpy()
            if att is not None:
                layers = att[fusion_name]
                stacked = np.stack([layers[n]["output_adapter"] for n in sorted(layers)])
                if mix is None:
                    mix = np.zeros((len(split.seqs), stacked.shape[-1]), dtype=np.float32)
                    mean_mix = np.zeros_like(mix)
                rows = split.rows(idx)
                mix[rows] = stacked[-1][:, 0, :]
                real = inputs["attention_mask"].cpu().numpy().astype(np.float32)[..., None]
                per_token = stacked.mean(0)
                mean_mix[rows] = (per_token * real).sum(1) / np.maximum(real.sum(1), 1.0)
    if not np.isfinite(probs).all():
        bad = int((~np.isfinite(probs)).any(1).sum())
        raise MopError(
            f"predict: {bad} of {len(split)} examples got non-finite probabilities (the "
            "model's weights or inputs hold NaN or infinity); no metrics are written"
        )
    return probs, mix, mean_mix


def routing_diagnostics(
    split: EncodedSplit, mean_mix: np.ndarray, links: np.ndarray | None
) -> dict[str, float]:
    """How the mixture routes: the mean entropy (nats) of each input's weights and, where
    known, the share of inputs whose largest weight falls on the linked partition (of
    linked inputs) or on the true one (the KG probe: the partition of the run's own
    partitioning that holds the question's fact, over the facts it did not cut, with the
    share of those in `facts_inside`)."""
    w = mean_mix.reshape(len(split), split.choices, -1).mean(1)
    out = {"mixture_entropy": float(-(w * np.log(np.clip(w, 1e-12, None))).sum(1).mean())}
    top = w.argmax(1)
    if links is not None and (linked := links.sum(1) > 0).any():
        out["routing_linked"] = float((top[linked] == links[linked].argmax(1)).mean())
    if "partition" in split.frame.columns:
        true = split.frame["partition"].to_numpy()
        inside = true >= 0  # facts the run's partitioning cut have no true partition
        out["facts_inside"] = float(inside.mean())
        if inside.any():
            out["routing_true"] = float((top[inside] == true[inside]).mean())
    return out


def linking_diagnostics(task: TaskSpec, split: EncodedSplit, frame: pl.DataFrame) -> dict:
    """What a routed run's links were worth on this split: the share of inputs linked, how
    often the top link is the true partition (KG probe, facts inside), and the task's
    metric on the linked and the unlinked inputs apart (where linking fails, a link prior
    has nothing to add)."""
    linked = split.links.sum(1) > 0
    out: dict[str, float] = {"linked_share": float(linked.mean())}
    if "partition" in split.frame.columns:
        true = split.frame["partition"].to_numpy()
        judged = linked & (true >= 0)
        if judged.any():
            out["top_link_true"] = float((split.links[judged].argmax(1) == true[judged]).mean())
    for name, rows in (("linked", linked), ("unlinked", ~linked)):
        if rows.any():
            out[f"{name}_{task.main_metric}"] = task.metric(frame.filter(pl.Series(rows)))[
                task.main_metric
            ]
    return out


def evaluate(task: TaskSpec, split: EncodedSplit, probs: np.ndarray) -> tuple[dict, pl.DataFrame]:
    """The task's metrics and the per-example frame (id, label, pred, prob, metric columns)."""
    if task.kind == "multi":
        label = pl.Series("label", split.labels.tolist(), dtype=pl.List(pl.Int64))
        pred = pl.Series("pred", (probs >= 0.5).astype(np.int64).tolist(), dtype=pl.List(pl.Int64))
    else:
        label = pl.Series("label", split.labels)
        pred = pl.Series("pred", probs.argmax(1).astype(np.int64))
    frame = pl.DataFrame(
        [
            pl.Series("id", split.ids, dtype=pl.String),
            label,
            pred,
            pl.Series("prob", probs.tolist(), dtype=pl.List(pl.Float32)),
        ]
    )
    if task.metric_columns:
        frame = pl.concat([frame, split.frame.select(task.metric_columns)], how="horizontal")
    return task.metric(frame), frame


def mixture_frame(split: EncodedSplit, mix: np.ndarray, mean_mix: np.ndarray) -> pl.DataFrame:
    """One row per sequence: example id (and option index for choice tasks), final-layer
    [CLS] weights, weights averaged over layers and tokens, the linked partition (argmax
    of the links, -1 where unlinked or unknown), the true one where the task knows it (KG
    probe) and the text."""
    linked = np.full(len(split), -1, dtype=np.int32)
    if split.links is not None:
        has = split.links.sum(1) > 0
        linked[has] = split.links[has].argmax(1)
    frame = pl.DataFrame(
        {
            "id": np.repeat(np.asarray(split.ids, dtype=object), split.choices).tolist(),
            "weights": pl.Series(mix.tolist(), dtype=pl.List(pl.Float32)),
            "mean_weights": pl.Series(mean_mix.tolist(), dtype=pl.List(pl.Float32)),
            "linked": np.repeat(linked, split.choices),
            "text": np.repeat(
                np.asarray(split.frame["text_a"].to_list(), dtype=object), split.choices
            ).tolist(),
        }
    )
    if "partition" in split.frame.columns:  # the KG probe: the question's own partition
        frame = frame.with_columns(
            partition=pl.Series(np.repeat(split.frame["partition"].to_numpy(), split.choices))
        )
    if split.choices > 1:
        frame = frame.with_columns(choice=pl.Series(np.tile(np.arange(split.choices), len(split))))
    return frame


def final_evaluation(
    model: Classifier,
    task: TaskSpec,
    data: dict[str, EncodedSplit],
    best_dev: list,
    cfg: FinetuneConfig,
    pad_id: int,
    fusion_name: str | None,
    rt: Runtime,
) -> tuple[dict[str, dict], list[pl.DataFrame], pl.DataFrame | None]:
    """Each split's metrics and per-example frame under the best weights, and the test
    split's mixture weights (MoP runs); dev is the best epoch's own pass, not a new one."""
    results: dict[str, dict] = {}
    frames, mixture = [], None
    for s in SPLITS:
        if s == "train" and not cfg.eval_train:
            continue
        if s == "dev":
            probs, mix, mean_mix = np.asarray(best_dev, dtype=np.float32), None, None
        else:
            fusion = fusion_name if s == "test" else None
            probs, mix, mean_mix = predict(
                model, task, data[s], pad_id, cfg.eval_batch_size, fusion, rt
            )
        metrics, frame = evaluate(task, data[s], probs)
        if mix is not None:
            mixture = mixture_frame(data[s], mix, mean_mix)
            metrics |= routing_diagnostics(data[s], mean_mix, data[s].links)
        if data[s].links is not None:
            metrics |= linking_diagnostics(task, data[s], frame)
        results[s] = metrics
        frames.append(frame.with_columns(split=pl.lit(s)))
    return results, frames, mixture

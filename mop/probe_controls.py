"""Controls for the KG probe: what the adapters know without fine-tuning, and what a
model could score from shortcuts alone.

- adapter zero-shot: each question (disease d, phenotype p) is scored by the adapter of
  its partition with that adapter's own pretrained entity head on the input
  `[CLS] d [SEP] has phenotype [SEP]`: the share of the partition's other entities that
  p outscores (ties count half). A rank share, not the raw logit, because every partition
  has its own head with its own scale, and one threshold (chosen on dev) turns scores
  into answers across all of them. No fine-tuning: the knowledge ceiling MoP could reach.
- shortcut baselines: answers from the phenotype's or the disease's "yes" rate in the
  probe's training split, the phenotype's number of annotations in the KG, and the
  similarity of the two names under the base encoder; thresholds are chosen on dev.
  Swapped-pair negatives bring the first three to 0.5 by construction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from mop.batching import Sequences, sequential_batches
from mop.errors import MopError
from mop.io import write_json, write_parquet
from mop.kg import read_kg, read_table
from mop.models import ModelSpec, load_base_model, load_tokenizer
from mop.partition import MEMBERSHIP_SCHEMA
from mop.pretrain import load_entity_predictor
from mop.runtime import Runtime, evaluating
from mop.tasks import SPLITS
from mop.vectors import name_vectors


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The cut that maximises accuracy of `score > cut` (midpoints of sorted scores)."""
    order = np.unique(scores)
    cuts = np.concatenate([[order[0] - 1], (order[:-1] + order[1:]) / 2, [order[-1] + 1]])
    acc = [((scores > c) == labels).mean() for c in cuts]
    return float(cuts[int(np.argmax(acc))])


def rank_share(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Share of each row's other entities that its target outscores, ties counting half:
    1 for the head's top entity, 0 for its last, whatever the head's scale."""
    target = scores.gather(1, targets[:, None])
    if not torch.isfinite(target).all():
        raise MopError("adapter zero-shot: an entity head gave a non-finite score")
    if scores.shape[1] == 1:
        return torch.full((scores.shape[0],), 0.5, dtype=torch.float64)
    below = (scores < target).sum(1).double()
    ties = (scores == target).sum(1).double() - 1
    return (below + 0.5 * ties) / (scores.shape[1] - 1)


def _splits(task_dir: str | Path) -> dict[str, pl.DataFrame]:
    cols = ("disease", "phenotype", "partition", "label", "id")
    out = {}
    for s in SPLITS:
        frame = read_table(Path(task_dir) / f"{s}.parquet")
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise MopError(
                f"{Path(task_dir) / f'{s}.parquet'}: not a KG probe split "
                f"(missing {', '.join(missing)})"
            )
        out[s] = frame
    return out


def _accuracies(scores: dict[str, np.ndarray], splits: dict[str, pl.DataFrame]) -> dict[str, float]:
    cut = best_threshold(scores["dev"], splits["dev"]["label"].to_numpy())
    return {
        f"{s}_accuracy": float(((scores[s] > cut) == splits[s]["label"].to_numpy()).mean())
        for s in SPLITS
    } | {"threshold": cut}


def zero_shot(
    spec: ModelSpec,
    task_dir: str | Path,
    kg_dir: str | Path,
    partition_dir: str | Path,
    adapter_dirs: list[Path],
    out_dir: str | Path,
    relation: str = "has phenotype",
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Score every probe question with its partition's adapter and pretrained head
    (the pretraining input: the disease and the relation as a sentence pair)."""
    rt = runtime or Runtime.create("cpu")
    splits = _splits(task_dir)
    names = read_kg(kg_dir).entities["name"].to_list()
    local = (
        read_table(Path(partition_dir) / "membership.parquet", MEMBERSHIP_SCHEMA)
        .sort("entity")["local"]
        .to_numpy()
    )
    tokenizer = load_tokenizer(spec)
    scores = {s: np.zeros(f.height) for s, f in splits.items()}
    for k, adapter_dir in enumerate(adapter_dirs):
        model = load_entity_predictor(
            spec, adapter_dir / "adapter", adapter_dir / "head.safetensors"
        ).to(rt.device)
        for s, frame in splits.items():
            rows = np.flatnonzero(frame["partition"].to_numpy() == k)
            if rows.size == 0:
                continue
            part = frame[rows.tolist()]
            enc = tokenizer(
                [names[d] for d in part["disease"]],
                [relation] * part.height,
                truncation=True,
                max_length=64,
            )
            seqs = Sequences.from_series(
                pl.Series(enc["input_ids"], dtype=pl.List(pl.Int32)),
                pl.Series(enc["token_type_ids"], dtype=pl.List(pl.Int8))
                if "token_type_ids" in enc
                else None,
            )
            target = torch.from_numpy(local[part["phenotype"].to_numpy()].astype(np.int64))
            with evaluating(model):
                for idx in sequential_batches(len(seqs), 256, seqs.lengths):
                    batch = rt.batch(seqs.batch(idx, tokenizer.pad_token_id))
                    logits = model.scores(batch, rt).cpu()
                    share = rank_share(logits, target[torch.from_numpy(idx)])
                    scores[s][rows[idx]] = share.numpy()
    metrics = {
        "task": "probe",
        "method": "zeroshot",
        "main_metric": "accuracy",
        **_accuracies(scores, splits),
        "runtime": rt.describe(),
    }
    out = Path(out_dir)
    write_parquet(
        pl.concat(
            [
                f.select("id", "label").with_columns(score=pl.Series(scores[s]), split=pl.lit(s))
                for s, f in splits.items()
            ]
        ),
        out / "predictions.parquet",
    )
    write_json(metrics, out / "metrics.json")
    return metrics


def shortcut_baselines(
    spec: ModelSpec,
    task_dir: str | Path,
    kg_dir: str | Path,
    out_path: str | Path,
    relation: str = "has phenotype",
    runtime: Runtime | None = None,
) -> dict[str, dict[str, float]]:
    """Accuracy of answers that use no knowledge of the (disease, phenotype) pair."""
    splits = _splits(task_dir)
    train = splits["train"]
    base_rate = float(train["label"].mean())
    kg = read_kg(kg_dir)
    rel = kg.relations.filter(pl.col("name") == relation)["id"]
    degree = np.bincount(
        kg.triples.filter(pl.col("relation").is_in(rel.implode()))["tail"].to_numpy(),
        minlength=kg.num_entities,
    )
    names = kg.entities["name"].to_list()
    used = sorted(
        {int(x) for f in splits.values() for c in ("disease", "phenotype") for x in f[c].to_list()}
    )
    vectors = name_vectors(
        load_base_model(spec), load_tokenizer(spec), [names[i] for i in used], runtime=runtime
    )
    row = {e: i for i, e in enumerate(used)}

    def prior(column: str) -> dict[str, np.ndarray]:
        rate = dict(train.group_by(column).agg(pl.col("label").mean()).iter_rows())
        return {
            s: np.array([rate.get(x, base_rate) for x in f[column].to_list()])
            for s, f in splits.items()
        }

    def similarity(frame: pl.DataFrame) -> np.ndarray:
        d = vectors[[row[x] for x in frame["disease"].to_list()]]
        p = vectors[[row[x] for x in frame["phenotype"].to_list()]]
        return (d * p).sum(-1).numpy()

    candidates = {
        "phenotype prior (train yes rate)": prior("phenotype"),
        "disease prior (train yes rate)": prior("disease"),
        "phenotype annotations in the KG": {
            s: degree[f["phenotype"].to_numpy()].astype(float) for s, f in splits.items()
        },
        "name similarity (base encoder)": {s: similarity(f) for s, f in splits.items()},
    }
    majority = int(base_rate >= 0.5)
    results = {
        "majority class": {
            f"{s}_accuracy": float((f["label"].to_numpy() == majority).mean())
            for s, f in splits.items()
        }
    }
    for name, scores in candidates.items():
        results[name] = _accuracies(scores, splits)
    write_json(results, out_path)
    return results

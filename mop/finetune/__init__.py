"""Fine-tuning on a downstream task, one loop for every task and method.

Tasks supply data, head kind and metric (see mop.tasks): single-label (softmax +
cross-entropy), multi-label (sigmoid + binary cross-entropy, threshold 0.5) and
multiple-choice (one score per option from the same head, softmax over the options).

Methods:
- `base`: the plain base model, everything trained;
- `adapter`: the base model with one pretrained partition adapter, everything trained;
- `mop`: the base model with all K pretrained adapters through a mixture layer
  (softmax AdapterFusion, Gumbel-softmax or sparse MoE), everything trained (paper 2.3);
- `oracle` (KG probe control): each example through its own partition's adapter only.

The loop (`finetune`, in the loop pretraining shares: mop.training.Loop): AdamW (weight decay 0.01
except bias/LayerNorm; separate learning rates for base model, adapters, fusion and head),
linear schedule with warmup, gradient accumulation and clipping, dev evaluation after every
epoch (one log line each), early stopping with patience, best-on-dev weights restored for
the test split. Checkpoints every `checkpoint_every` steps and at every epoch end; a killed
or requeued job resumes to the same result as an uninterrupted one.
Outputs: metrics.json, predictions.parquet (per example, for significance tests),
mixture.parquet (final-layer [CLS] mixture weights on test, for mop) and optionally the
best model as safetensors.

The parts: `config` (the settings), `data` (splits, candidates, routes), `model` (the
classifier and its heads), `evaluation` (predict, metrics, diagnostics), `selection`
(dev selection and early stopping, the after-epoch hook), `result` (the run's outputs);
here the task loss (`task_loss`, `batch_loss`) and `finetune` itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from transformers import get_linear_schedule_with_warmup

from mop.checkpoint import Checkpoint, file_digest, fingerprint
from mop.errors import MopError
from mop.finetune.config import FinetuneConfig, execution_keys
from mop.finetune.data import batch_inputs, load_data, with_candidates
from mop.finetune.evaluation import (
    evaluate,
    final_evaluation,
    linking_diagnostics,
    predict,
    routing_diagnostics,
)
from mop.finetune.model import Classifier, build_classifier, classifier_groups, model_part
from mop.finetune.result import FinetuneResult, export_record, run_metrics
from mop.finetune.selection import DevSelection, FinetuneState
from mop.fusion import mixture_aux_loss
from mop.models import ModelSpec, load_tokenizer
from mop.runtime import Runtime, seed_all
from mop.tasks import TaskSpec
from mop.tasks.encode import EncodedSplit
from mop.tracking import Tracker
from mop.training import Loop, share
from mop.vectors import POOLINGS

__all__ = [
    "POOLINGS",
    "Classifier",
    "DevSelection",
    "FinetuneConfig",
    "FinetuneResult",
    "FinetuneState",
    "batch_inputs",
    "batch_loss",
    "build_classifier",
    "classifier_groups",
    "evaluate",
    "execution_keys",
    "finetune",
    "linking_diagnostics",
    "load_data",
    "model_part",
    "predict",
    "routing_diagnostics",
    "task_loss",
    "with_candidates",
]


def task_loss(task: TaskSpec, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over classes or options; binary cross-entropy per label for multi-label."""
    logits = logits.float()
    if task.kind == "multi":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    return torch.nn.functional.cross_entropy(logits.view(len(labels), -1), labels)


def batch_loss(
    model: Classifier,
    forward: Any,
    task: TaskSpec,
    split: EncodedSplit,
    micro: np.ndarray,
    batch: np.ndarray,
    cfg: FinetuneConfig,
    rt: Runtime,
    pad_id: int,
) -> torch.Tensor:
    """A micro-batch's part of its batch's training loss: the task's loss plus
    AdapterFusion's value regulariser (weighted by the micro-batch's share) and the
    mixture's auxiliary losses (MoE balance, routing: `mixture_aux_loss`).

    forward: what to call for the forward (the model, or its compiled form)."""
    part = share(micro, batch)
    with rt.forward_context():
        logits, _ = forward(**batch_inputs(split, micro, pad_id, rt))
    loss = task_loss(task, logits, rt.to_device(torch.from_numpy(split.labels[micro])))
    if cfg.mixture.fusion_reg and model.mixture_layers:
        reg = model.encoder.get_fusion_regularization_loss()
        if reg is not None:
            loss = loss + reg
    loss = loss * part
    if model.mixture_layers:
        linked = None if split.links is None else int((split.links[batch].sum(1) > 0).sum())
        aux = mixture_aux_loss(model, part, linked)
        if aux is not None:
            loss = loss + aux
    return loss


def run_fingerprint(
    spec: ModelSpec,
    method: str,
    adapter_dirs: list[Path],
    data: dict[str, EncodedSplit],
    cfg: FinetuneConfig,
) -> str:
    """What a checkpoint must match to be resumed: settings that change the result, the
    model, the adapters' bytes and the data."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in execution_keys(cfg)}
    parts: list[Any] = [method, spec.identifier()]
    for d in adapter_dirs:
        parts += [file_digest(f) for f in sorted(Path(d).iterdir()) if f.is_file()]
    for split in data.values():
        parts += [split.seqs.values, split.seqs.offsets, split.labels]
        if split.seqs.types is not None:
            parts.append(split.seqs.types)
        if split.links is not None:
            parts.append(split.links)
    return fingerprint(settings, *parts)


def routed_links(
    method: str, cfg: FinetuneConfig, links: str | Path | None, out: Path
) -> str | Path | None:
    """The links a run reads: a routed mixture's (which needs them); other runs ignore them."""
    if not (method == "mop" and cfg.mixture.needs_links):
        return None
    if links is None:
        raise MopError(f"finetune {out}: a routed mixture needs the task's links (--links)")
    return links


def build_run(
    spec: ModelSpec,
    task: TaskSpec,
    task_dir: str | Path,
    method: str,
    adapter_dirs: list[Path],
    cfg: FinetuneConfig,
    tokenizer: Any,
    rt: Runtime,
    encoded_dir: str | Path | None = None,
    links: str | Path | None = None,
    partition_dir: str | Path | None = None,
) -> tuple[dict[str, EncodedSplit], Classifier, str | None]:
    """A run's data (the three splits, with candidate vectors for the bilinear head) and
    its fresh model; and the name of its fusion layer, if it has one."""
    data = load_data(
        spec,
        task,
        task_dir,
        method,
        len(adapter_dirs),
        cfg,
        tokenizer,
        encoded_dir,
        rt,
        links,
        partition_dir if adapter_dirs else None,
    )
    centre = None
    if cfg.head == "bilinear":
        data, centre = with_candidates(spec, tokenizer, data, task_dir, rt)
    model, fusion_name = build_classifier(spec, task, method, adapter_dirs, cfg)
    if centre is not None:
        model.head.centre.copy_(centre)
    return data, model, fusion_name


def finetune(
    spec: ModelSpec,
    task: TaskSpec,
    task_dir: str | Path,
    method: str,
    adapter_dirs: list[Path],
    cfg: FinetuneConfig,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    runtime: Runtime | None = None,
    encoded_dir: str | Path | None = None,
    links: str | Path | None = None,
    partition_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train on train, select on dev, report test; write every output of the run.

    links: `mop link`'s links.parquet for this task and partitioning; routed mixtures
    need it (and other runs ignore it). partition_dir: the partitioning the adapters were
    trained on, for a task that knows its facts (the KG probe's oracle and diagnostics)."""
    out = Path(out_dir)
    rt = runtime or Runtime.create("cpu")
    seed_all(cfg.seed)
    links = routed_links(method, cfg, links, out)
    tokenizer = load_tokenizer(spec)
    pad_id = tokenizer.pad_token_id
    data, model, fusion_name = build_run(
        spec,
        task,
        task_dir,
        method,
        adapter_dirs,
        cfg,
        tokenizer,
        rt,
        encoded_dir,
        links,
        partition_dir,
    )
    forward = rt.prepare(model)
    train = data["train"]
    total = math.ceil(len(train) / cfg.batch_size) * cfg.epochs
    optimizer = rt.optimizer(classifier_groups(model, cfg))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup * total), total)

    def loss_of(micro: np.ndarray, batch: np.ndarray) -> torch.Tensor:
        return batch_loss(model, forward, task, train, micro, batch, cfg, rt, pad_id)

    selection = DevSelection(model, task, data["dev"], cfg, pad_id, rt, out.name, tracker)
    loop = Loop.from_config(
        cfg,
        f"finetune {out}",
        model,
        optimizer,
        scheduler,
        Checkpoint(out / "checkpoint", run_fingerprint(spec, method, adapter_dirs, data, cfg)),
        loss_of,
        train.lengths,
        total,
        after_epoch=selection,
        kept=selection.kept,
    )
    state, selection.best = loop.resume(FinetuneState())
    state = loop.run(state)

    selection.restore_best(f"finetune {out}")
    results, frames, mixture = final_evaluation(
        model, task, data, state.best_dev, cfg, pad_id, fusion_name, rt
    )
    scores = {f"{s}_{k}": v for s, m in results.items() for k, v in m.items()}
    metrics = run_metrics(task, method, cfg, state, scores, rt)
    record = export_record(spec, task, method, adapter_dirs, cfg, links)
    kept = model if cfg.save_model else None
    FinetuneResult(metrics, pl.concat(frames), mixture, kept, record).save(out)
    loop.checkpoint.remove()
    if tracker:
        tracker.log_metrics(scores, len(state.history))
        tracker.log_artifact(out / "metrics.json")
    return metrics

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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import save_model
from transformers import get_linear_schedule_with_warmup

from mop.checkpoint import Checkpoint, file_digest, fingerprint, trainable_state
from mop.errors import MopError
from mop.finetune.config import POOLINGS, FinetuneConfig, execution_keys
from mop.finetune.data import batch_inputs, load_data, with_candidates
from mop.finetune.evaluation import (
    evaluate,
    final_evaluation,
    linking_diagnostics,
    predict,
    routing_diagnostics,
)
from mop.finetune.model import Classifier, build_classifier, classifier_groups, model_part
from mop.fusion import mixture_aux_loss
from mop.io import atomic_path, write_json, write_parquet
from mop.log import log
from mop.models import ModelSpec, load_tokenizer
from mop.runtime import Runtime, seed_all
from mop.tasks import TaskSpec
from mop.tasks.encode import EncodedSplit
from mop.tracking import Tracker
from mop.training import Loop, LoopState, share

__all__ = [
    "POOLINGS",
    "Classifier",
    "FinetuneConfig",
    "FinetuneResult",
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


@dataclass
class FinetuneState(LoopState):
    """The loop's state and early stopping's: the best dev score so far, its epoch and
    dev probabilities (the final dev metrics are that epoch's own), epochs without gain."""

    best_score: float = -math.inf
    best_epoch: int = -1
    best_dev: list | None = None
    stale: int = 0


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


@dataclass
class DevSelection:
    """The loop's after-epoch hook: evaluate on dev, log and track the epoch, keep the
    best weights (`best`, checkpointed as the kept state), stop once `patience` epochs
    in a row bring no gain."""

    model: Classifier
    task: TaskSpec
    dev: EncodedSplit
    cfg: FinetuneConfig
    pad_id: int
    rt: Runtime
    name: str
    tracker: Tracker | None = None
    best: dict[str, torch.Tensor] | None = None

    def kept(self, state: FinetuneState) -> tuple[int, dict[str, torch.Tensor] | None]:
        return state.best_epoch, self.best

    def __call__(self, state: FinetuneState, train_loss: float) -> bool:
        task, cfg = self.task, self.cfg
        probs, _, _ = predict(
            self.model, task, self.dev, self.pad_id, cfg.eval_batch_size, runtime=self.rt
        )
        dev_metrics, _ = evaluate(task, self.dev, probs)
        entry = {
            "epoch": state.epoch,
            "step": state.step,
            "train_loss": train_loss,
            **{f"dev_{k}": v for k, v in dev_metrics.items()},
        }
        state.history.append(entry)
        improved = dev_metrics[task.main_metric] > state.best_score
        if improved:
            state.best_score, state.best_epoch = dev_metrics[task.main_metric], state.epoch
            state.best_dev, state.stale = probs.tolist(), 0
            self.best = trainable_state(self.model)
        else:
            state.stale += 1
        speed = state.examples_per_s
        log(
            f"finetune {self.name} epoch {state.epoch + 1}/{cfg.epochs}: train loss "
            f"{train_loss:.4f}, "
            + ", ".join(f"dev {k} {v:.4f}" for k, v in dev_metrics.items())
            + f"{' (best)' if improved else ''}, {speed:.1f} examples/s"
        )
        if self.tracker:
            metrics = {k: v for k, v in entry.items() if k != "epoch"}
            self.tracker.log_metrics(metrics | {"examples_per_s": speed}, state.epoch)
        return state.stale >= cfg.patience


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
    routed = method == "mop" and cfg.mixture.needs_links
    if routed and links is None:
        raise MopError(f"finetune {out}: a routed mixture needs the task's links (--links)")
    tokenizer = load_tokenizer(spec)
    pad_id = tokenizer.pad_token_id
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
        links if routed else None,
        partition_dir if adapter_dirs else None,
    )
    centre = None
    if cfg.head == "bilinear":
        data, centre = with_candidates(spec, tokenizer, data, task_dir, rt)
    model, fusion_name = build_classifier(spec, task, method, adapter_dirs, cfg)
    if centre is not None:
        model.head.centre.copy_(centre)
    forward = rt.prepare(model)
    train = data["train"]
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = rt.optimizer(classifier_groups(model, cfg))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup * total), total)

    def loss_of(micro: np.ndarray, batch: np.ndarray) -> torch.Tensor:
        return batch_loss(model, forward, task, train, micro, batch, cfg, rt, pad_id)

    selection = DevSelection(model, task, data["dev"], cfg, pad_id, rt, out.name, tracker)
    loop = Loop(
        f"finetune {out}",
        model,
        optimizer,
        scheduler,
        Checkpoint(out / "checkpoint", run_fingerprint(spec, method, adapter_dirs, data, cfg)),
        loss_of,
        train.lengths,
        cfg.batch_size,
        cfg.seed,
        cfg.epochs,
        total,
        grad_accum=cfg.grad_accum,
        max_grad_norm=cfg.max_grad_norm,
        checkpoint_every=cfg.checkpoint_every,
        after_epoch=selection,
        kept=selection.kept,
    )
    state, selection.best = loop.resume(FinetuneState())
    state = loop.run(state)

    history = state.history
    if selection.best is None:
        raise MopError(f"finetune {out}: no epoch was evaluated (epochs = {cfg.epochs})")
    model.load_state_dict(selection.best, strict=False)
    results, frames, mixture = final_evaluation(
        model, task, data, state.best_dev, cfg, pad_id, fusion_name, rt
    )
    metrics = {
        "task": task.name,
        "method": method,
        "seed": cfg.seed,
        "main_metric": task.main_metric,
        "best_epoch": state.best_epoch,
        "epochs_run": len(history),
        "steps": state.step,
        "examples_per_s": state.examples_per_s,
        "train_seconds": state.seconds,
        **{f"{s}_{k}": v for s, m in results.items() for k, v in m.items()},
        "history": history,
        "config": asdict(cfg),
        "runtime": rt.describe() | {"peak_memory_mb": rt.peak_memory_mb()},
    }
    record = {  # what `mop export` needs to rebuild the model around its weights
        "task": task.name,
        "method": method,
        "model": asdict(spec),
        "adapters": [str(Path(d).resolve()) for d in adapter_dirs],
        "finetune": asdict(cfg),
        "links": str(Path(links).resolve()) if routed and links is not None else None,
    }
    result = FinetuneResult(
        metrics, pl.concat(frames), mixture, model if cfg.save_model else None, record
    )
    result.save(out)
    loop.checkpoint.remove()
    if tracker:
        tracker.log_metrics(
            {f"{s}_{k}": v for s, m in results.items() for k, v in m.items()}, len(history)
        )
        tracker.log_artifact(out / "metrics.json")
    return metrics

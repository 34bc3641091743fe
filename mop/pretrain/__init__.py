"""Knowledge infusion: one bottleneck adapter per partition, trained by entity prediction.

For a triple (h, r, t) of a partition, the frozen base model with the partition's adapter
reads the pair (h, r) as its tokenizer lays out pairs (`[CLS] h [SEP] r [SEP]` for BERT,
`<s> h </s></s> r </s>` for RoBERTa) and a linear entity head over the first token's
vector scores every entity of that partition; the loss (`entity_loss`, below) is the
cross-entropy of t (paper section 2.2). Only the adapter and the head are trained. With
`bidirectional`, (r, t) -> h examples are added, as in the original code's option.

The parts: `tokens` (the KG tokenized once, `tokenize_kg`), `data` (a partition's
examples), `model` (the entity predictor), `probes` (the knowledge probe), `config` (the
settings). `pretrain_partition` trains in the loop fine-tuning shares (mop.training.Loop,
on mop.runtime): device, precision, gradient accumulation, checkpoints (adapter, head,
optimizer, scheduler, RNG states, position in the data); a killed job started again
resumes where it stopped and, on CPU with the same seed, ends with the same adapter as an
uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import get_linear_schedule_with_warmup

from mop.checkpoint import Checkpoint, fingerprint
from mop.io import atomic_dir, atomic_path, write_json
from mop.models import ModelSpec, load_tokenizer
from mop.pretrain.config import EXECUTION_KEYS, PretrainConfig
from mop.pretrain.data import PartitionData, canonical_facts, load_partition_data
from mop.pretrain.model import (
    EntityPredictor,
    build_adapter_model,
    build_entity_predictor,
    load_entity_predictor,
)
from mop.pretrain.probes import filtered_ranks, knowledge_probe, probe_partition, probe_rows
from mop.pretrain.tokens import MAX_RELATION_TOKENS, tokenize_kg
from mop.runtime import Runtime, seed_all
from mop.tracking import Tracker
from mop.training import Loop, LoopState, param_groups, share

__all__ = [
    "EXECUTION_KEYS",
    "MAX_RELATION_TOKENS",
    "EntityPredictor",
    "PartitionData",
    "PretrainConfig",
    "build_adapter_model",
    "build_entity_predictor",
    "canonical_facts",
    "entity_loss",
    "filtered_ranks",
    "knowledge_probe",
    "load_entity_predictor",
    "load_partition_data",
    "pretrain_partition",
    "probe_partition",
    "probe_rows",
    "run_fingerprint",
    "save_outputs",
    "tokenize_kg",
]


def entity_loss(
    forward: Callable[..., torch.Tensor],
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    rt: Runtime,
) -> torch.Tensor:
    """The entity-prediction loss: cross-entropy of the target entity over the partition's
    entities (paper section 2.2), computed in fp32 whatever the autocast precision."""
    with rt.forward_context():
        logits = forward(**inputs)
    return torch.nn.functional.cross_entropy(logits.float(), labels)


def run_fingerprint(spec: ModelSpec, data: PartitionData, cfg: PretrainConfig) -> str:
    """What a checkpoint must match to be resumed: settings that change the result, data."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in EXECUTION_KEYS}
    arrays = [data.labels, data.seqs.values, data.seqs.offsets, data.heldout]
    if data.seqs.types is not None:
        arrays.append(data.seqs.types)
    return fingerprint(settings, spec.identifier(), *arrays)


def total_steps(train_examples: int, cfg: PretrainConfig) -> int:
    """Optimizer steps of the run: `epochs` (possibly fractional) over the training
    examples, capped by `max_steps`."""
    steps = math.ceil(cfg.epochs * math.ceil(train_examples / cfg.batch_size))
    return steps if cfg.max_steps is None else min(steps, cfg.max_steps)


@dataclass
class LossLog:
    """The loop's after-step hook: every `log_every` steps (and the last), the batch loss,
    learning rate and speed into the history and the tracker."""

    scheduler: Any
    total_steps: int
    log_every: int
    tracker: Tracker | None = None

    def __call__(self, state: LoopState, loss: torch.Tensor) -> None:
        if state.step % self.log_every == 0 or state.step == self.total_steps:
            lr, speed = self.scheduler.get_last_lr()[0], state.examples_per_s
            state.history.append([state.step, loss.item(), lr, speed])
            if self.tracker:
                self.tracker.log_metrics(
                    {"loss": loss.item(), "lr": lr, "examples_per_s": speed}, state.step
                )


def pretrain_partition(
    spec: ModelSpec,
    data: PartitionData,
    cfg: PretrainConfig,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    adapter_name: str = "knowledge",
    source: dict | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Train one partition's adapter and head; write them, a model card and metrics."""
    out = Path(out_dir)
    rt = runtime or Runtime.create("cpu")
    seed_all(cfg.seed)
    tokenizer = load_tokenizer(spec)
    pad_id = tokenizer.pad_token_id
    model = build_entity_predictor(spec, data, cfg, tokenizer, adapter_name, rt)
    forward = rt.prepare(model)
    train_rows = np.flatnonzero(~data.heldout)
    steps = total_steps(train_rows.size, cfg)
    optimizer = rt.optimizer(param_groups(model, cfg.weight_decay, {"all": cfg.lr}))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup * steps), steps)

    def loss_of(rows: np.ndarray, batch: np.ndarray) -> torch.Tensor:
        labels = rt.to_device(torch.from_numpy(data.labels[rows]))
        inputs = rt.batch(data.seqs.batch(rows, pad_id))
        return entity_loss(forward, inputs, labels, rt) * share(rows, batch)

    loop = Loop.from_config(
        cfg,
        f"pretrain {out}",
        model,
        optimizer,
        scheduler,
        Checkpoint(out / "checkpoint", run_fingerprint(spec, data, cfg)),
        loss_of,
        data.seqs.lengths[train_rows],
        steps,
        rows=train_rows,
        after_step=LossLog(scheduler, steps, cfg.log_every, tracker),
    )
    state = loop.run(loop.resume(LoopState())[0])

    probe, probe_seconds = probe_partition(model, data, cfg, pad_id, rt)
    metrics = run_metrics(state, data, int(train_rows.size), probe, probe_seconds, rt)
    fp = loop.checkpoint.fingerprint
    save_outputs(model, out, adapter_name, metrics, cfg, spec, fp, source)
    loop.checkpoint.remove()
    if tracker:
        flat = {f"{split}_{k}": v for split, m in probe.items() for k, v in m.items()}
        tracker.log_metrics(flat | {"train_seconds": state.seconds}, state.step)
        tracker.log_artifact(out / "metrics.json")
        tracker.log_artifact(out / "card.json")
    return metrics


def run_metrics(
    state: LoopState,
    data: PartitionData,
    train_examples: int,
    probe: dict[str, dict[str, float]],
    probe_seconds: float,
    rt: Runtime,
) -> dict[str, Any]:
    """metrics.json of a run: training (steps, speed, loss curve) and the knowledge probe."""
    history = state.history
    return {
        "steps": state.step,
        "examples_seen": state.examples,
        "train_seconds": state.seconds,
        "examples_per_s": state.examples_per_s,
        "final_loss": history[-1][1] if history else None,
        "entities": data.num_entities,
        "train_examples": train_examples,
        "probe": probe,
        "probe_seconds": probe_seconds,
        "runtime": rt.describe() | {"peak_memory_mb": rt.peak_memory_mb()},
        "loss_curve": [
            {"step": s, "loss": lo, "lr": lr, "examples_per_s": eps} for s, lo, lr, eps in history
        ],
    }


def save_outputs(
    model: EntityPredictor,
    out: Path,
    adapter_name: str,
    metrics: dict,
    cfg: PretrainConfig,
    spec: ModelSpec,
    data_hash: str,
    source: dict | None = None,
) -> None:
    """The adapter in the `adapters` format, the head (safetensors), metrics and a card
    (`source` says which KG and partition the adapter was trained on)."""
    model.cpu()
    with atomic_dir(out / "adapter") as tmp:
        model.encoder.save_adapter(str(tmp), adapter_name, use_safetensors=True)
    with atomic_path(out / "head.safetensors") as tmp:
        save_file(
            {
                "weight": model.head.weight.detach().contiguous(),
                "bias": model.head.bias.detach().contiguous(),
            },
            tmp,
        )
    write_json(metrics, out / "metrics.json")
    write_json(
        {
            **(source or {}),
            "model": spec.alias,
            "model_source": spec.identifier(),
            "data_hash": data_hash,
            "adapter_name": adapter_name,
            "config": asdict(cfg),
            "entities": metrics["entities"],
            "train_examples": metrics["train_examples"],
            "probe": metrics["probe"],
        },
        out / "card.json",
    )

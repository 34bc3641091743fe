"""What the throughput benchmarks share: the machine, its own dense matmul rate, and a
fine-tuning run of the product itself (mop.training.Loop with mop.finetune's batch loss
on the mop runtime), timed by the loop.

MFU here is the model FLOPs per second (mop.flops, the count `mop plan --estimate` uses)
over the dense matmul rate this machine reaches, in the same process and thread settings,
at the model's own matmul shapes (its tokens per batch x its weights): what the model
could reach if it were nothing but matmuls, not a data-sheet peak.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from mop.batching import bucketed_batches
from mop.checkpoint import Checkpoint
from mop.finetune import Classifier, FinetuneConfig, batch_loss, classifier_groups
from mop.flops import Shape, matmul_rate, model_matmuls, train_flops_per_token
from mop.machine import cpu_name
from mop.runtime import Runtime, bf16_supported
from mop.tasks import TaskSpec
from mop.tasks.encode import EncodedSplit
from mop.training import Loop, LoopState

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def machine() -> str:
    """The CPU's model name and core count (the figures' machine)."""
    return f"{cpu_name()}, {os.cpu_count()} cpus"


def load() -> float:
    return round(os.getloadavg()[0], 2)


def precisions(device: torch.device) -> list[str]:
    """fp32, and bf16 where the device computes it natively (CUDA, AVX-512 BF16 / AMX)."""
    return ["fp32", "bf16"] if bf16_supported(device) else ["fp32"]


def matmul_rates(
    shape: Shape, tokens: int, device: torch.device, names: list[str], seconds: float = 1.0
) -> dict[str, float]:
    """FLOP/s of the model's layer matmuls at `tokens` tokens, per precision."""
    mix = model_matmuls(shape, max(1, tokens))
    return {p: matmul_rate(mix, DTYPES[p], device, seconds) for p in names}


def finetune_run(
    model: Classifier,
    task: TaskSpec,
    split: EncodedSplit,
    cfg: FinetuneConfig,
    rt: Runtime,
    pad_id: int,
    warmup_steps: int = 1,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """Train `model` on `split` as `mop finetune` does (one loop, its batch loss, AdamW
    groups and schedule) for `cfg.epochs` or `total_steps`; the rate leaves out the first
    `warmup_steps` steps (thread pools, allocator, kernels). Returns examples, seconds,
    the per-step losses and, per timed step, its batch's (rows, longest length)."""
    forward = rt.prepare(model)
    steps_per_epoch = math.ceil(len(split) / cfg.batch_size)
    total = total_steps or steps_per_epoch * math.ceil(cfg.epochs)
    epochs = math.ceil(total / steps_per_epoch)
    optimizer = rt.optimizer(classifier_groups(model, cfg))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup * total), total)
    marks: dict[str, Any] = {"losses": [], "warm": (0, 0.0)}

    def loss_of(micro: np.ndarray, batch: np.ndarray) -> torch.Tensor:
        return batch_loss(model, forward, task, split, micro, batch, cfg, rt, pad_id)

    def after_step(state: LoopState, loss: torch.Tensor) -> None:
        marks["losses"].append(float(loss))
        if state.step == warmup_steps:
            marks["warm"] = (state.examples, state.seconds)

    with tempfile.TemporaryDirectory() as tmp:
        loop = Loop(
            "benchmark",
            model,
            optimizer,
            scheduler,
            Checkpoint(Path(tmp) / "checkpoint", "benchmark"),
            loss_of,
            split.lengths,
            cfg.batch_size,
            cfg.seed,
            epochs,
            total,
            grad_accum=cfg.grad_accum,
            max_grad_norm=cfg.max_grad_norm,
            after_step=after_step,
        )
        state = loop.run(LoopState())
    examples, seconds = state.examples - marks["warm"][0], state.seconds - marks["warm"][1]
    batches = [  # the loop's own batch order: (seed, epoch) fixes it
        b
        for e in range(epochs)
        for b in bucketed_batches(split.lengths, cfg.batch_size, cfg.seed, e)
    ][warmup_steps : state.step]
    return {
        "examples": examples,
        "seconds": seconds,
        "losses": marks["losses"],
        "lengths": np.concatenate([split.lengths[b] for b in batches]),
        "batch_tokens": float(np.mean([split.lengths[b].max() * b.size for b in batches])),
    }


def model_flops(shape: Shape, lengths: np.ndarray, classes: int, **kw: Any) -> float:
    """Training FLOPs of one pass over sequences of these lengths (mop.flops' count)."""
    return float(
        sum(n * train_flops_per_token(shape, n, classes=classes, **kw)[0] for n in lengths)
    )

"""The settings of one fine-tuning run, and which of them change its result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mop.fusion import MixtureConfig


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 3
    batch_size: int = 16  # examples per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = 1
    max_length: int = 128
    lr: float = 2e-5  # base model
    lr_adapters: float | None = None  # defaults to lr
    lr_fusion: float | None = None
    lr_head: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.1
    patience: int = 5
    dropout: float = 0.1
    pooling: str = "cls"  # "cls", "mean" or "pooler" (BERT's pooler output)
    head: str = "linear"  # "linear", or "bilinear" (query x candidate; tasks with a candidate)
    max_grad_norm: float | None = None
    eval_batch_size: int = 64
    eval_train: bool = True  # also predict the training split at the end (its metric)
    checkpoint_every: int = 500  # steps; 0: only at epoch ends
    seed: int = 0
    save_model: bool = True
    mixture: MixtureConfig = field(default_factory=MixtureConfig)

    @classmethod
    def from_options(
        cls, options: dict[str, Any], seed: int = 0, mixture: str = "softmax"
    ) -> FinetuneConfig:
        """A run's settings from a `finetune` section (schema defaults where a key is not
        given), its seed and its mixture's name."""
        from mop.config import with_defaults

        o = with_defaults("finetune", options)
        fields = set(cls.__dataclass_fields__) - {"seed", "mixture"}
        return cls(
            **{k: o[k] for k in fields},
            seed=seed,
            mixture=MixtureConfig.from_options(options, mixture),
        )


# Settings that change how a run executes, not what it computes: a checkpoint written
# under other values still resumes.
EXECUTION_KEYS = ("grad_accum", "eval_batch_size", "checkpoint_every", "save_model", "eval_train")


def execution_keys(cfg: FinetuneConfig) -> tuple[str, ...]:
    """`EXECUTION_KEYS` for this run. MoE's balance losses are a CV^2 over a micro-batch's
    tokens, not linear in the batch, so for MoE `grad_accum` changes what is learned: it
    is part of what the run computes and a checkpoint resumes only under the same value."""
    if cfg.mixture.kind == "moe":
        return tuple(k for k in EXECUTION_KEYS if k != "grad_accum")
    return EXECUTION_KEYS

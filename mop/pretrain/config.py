"""The settings of one partition's pretraining run, and which of them change its result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PretrainConfig:
    epochs: float = 1.0
    batch_size: int = 32  # examples per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.0
    reduction_factor: int = 8
    head_init: str = "random"  # "random" (paper) or "names" (our addition)
    pooling: str = "cls"  # the head's input: "cls" (paper), "mean" or "pooler" (original code)
    dropout: float = 0.0  # before the head (the original code's head: 0.1 on the pooler)
    max_grad_norm: float | None = None
    checkpoint_every: int = 200
    log_every: int = 10
    eval_batch_size: int = 256
    heldout_share: float = 0.0
    probe_examples: int | str = 5000  # examples the knowledge probe ranks, or "all"
    seed: int = 0
    max_steps: int | None = None  # stop early (benchmarks, fault tests)

    @classmethod
    def from_options(cls, options: dict[str, Any], **overrides: Any) -> PretrainConfig:
        """A job's settings from a `pretrain` section (schema defaults where a key is not
        given); keys the section has but training does not read (tokenizing) are left out."""
        from mop.config import with_defaults

        o = with_defaults("pretrain", options) | overrides
        return cls(**{k: v for k, v in o.items() if k in cls.__dataclass_fields__})


# Settings that change how a run executes, not what it computes.
EXECUTION_KEYS = ("grad_accum", "log_every", "checkpoint_every", "eval_batch_size")

"""The classifier fine-tuning trains: a base encoder (with one adapter, or K adapters
through a mixture layer), pooling, and a linear or bilinear head; its AdamW groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import adapters
import numpy as np
import torch

from mop.errors import MopError
from mop.finetune.config import FinetuneConfig
from mop.fusion import add_mixture, mixtures, set_context
from mop.models import ModelSpec, load_base_model, uses_token_types
from mop.tasks import TaskSpec
from mop.training import param_groups
from mop.vectors import POOLINGS, pool


class BilinearHead(torch.nn.Module):
    """Scores a query vector against a candidate vector: s = a * q^T M c + b, M = I at start.

    The probe's candidates (phenotypes) are the frozen base encoder's name vectors, as in
    the entity head's initialisation, so the head holds no per-entity parameters and the
    base model and MoP are compared with the same head. Two logits, (0, s), keep the
    softmax / cross-entropy of single-label tasks.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.eye(hidden))
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.bias = torch.nn.Parameter(torch.tensor(0.0))
        # The mean of the training data's raw candidate vectors: kept with the weights so
        # that an exported model centres new candidates as the run did (mop.export).
        self.register_buffer("centre", torch.zeros(1, hidden))

    def forward(self, query: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        score = self.scale * ((query @ self.weight) * candidate).sum(-1) + self.bias
        return torch.stack([torch.zeros_like(score), score], -1)


class Classifier(torch.nn.Module):
    """Encoder (with any active adapters / fusion) + dropout + a linear or bilinear head."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        outputs: int,
        dropout: float,
        pooling: str,
        head: str = "linear",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise MopError(f"finetune.pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
        if head not in ("linear", "bilinear"):
            raise MopError(f"finetune.head: {head!r} is not linear or bilinear")
        if pooling == "pooler" and getattr(encoder, "pooler", None) is None:
            raise MopError(
                f"finetune.pooling: pooler needs a base model with a pooler layer "
                f"({encoder.config.model_type} has none: use cls or mean)"
            )
        self.encoder = encoder
        self.pooling = pooling
        # Segment ids reach only models that have segments (not RoBERTa, XLM-R, DeBERTa-v3,
        # DistilBERT), whatever the tokenizer wrote.
        self.segments = uses_token_types(encoder.config)
        self.dropout = torch.nn.Dropout(dropout)
        hidden = encoder.config.hidden_size
        if head == "bilinear" and outputs != 2:
            raise MopError("finetune.head: bilinear scores yes/no tasks (two labels) only")
        self.head = BilinearHead(hidden) if head == "bilinear" else torch.nn.Linear(hidden, outputs)
        # The mixture layers (a plain list: they are registered under the encoder already).
        self.mixture_layers = mixtures(encoder)

    def pool(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor, Any]:
        out = self.encoder(**inputs, **kwargs)
        return pool(out, inputs["attention_mask"], self.pooling), out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        output_mixture: bool = False,
        candidates: torch.Tensor | None = None,
        route: np.ndarray | None = None,
        links: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.mixture_layers:
            set_context(self.mixture_layers, attention_mask, links)
        if token_type_ids is not None and self.segments:
            inputs["token_type_ids"] = token_type_ids
        kwargs = {"output_adapter_fusion_attentions": True} if output_mixture else {}
        if route is None:
            pooled, out = self.pool(inputs, **kwargs)
            mixture = out.adapter_fusion_attentions if output_mixture else None
        else:
            # The oracle control: each example through its own partition's adapter only.
            pooled = None
            for k in np.unique(route):
                sel = torch.from_numpy(route == k).to(input_ids.device)
                self.encoder.set_active_adapters(f"p{k}")
                part = self.pool({n: t[sel] for n, t in inputs.items()})[0]
                if pooled is None:
                    pooled = part.new_zeros(len(route), part.shape[-1])
                pooled[sel] = part
            mixture = None
        pooled = self.dropout(pooled)
        if isinstance(self.head, BilinearHead):
            if candidates is None:
                raise MopError("finetune.head: bilinear needs a task with a candidate column")
            return self.head(pooled, candidates.to(pooled.dtype)), mixture
        return self.head(pooled), mixture


def build_classifier(
    spec: ModelSpec,
    task: TaskSpec,
    method: str,
    adapter_dirs: list[Path],
    cfg: FinetuneConfig,
) -> tuple[Classifier, str | None]:
    """The model for a method; returns it and the fusion's name (None without fusion)."""
    encoder = load_base_model(spec)
    fusion_name = None
    if method in ("adapter", "mop", "oracle"):
        if not adapter_dirs:
            raise MopError(f"finetune: method {method} needs pretrained adapters")
        adapters.init(encoder)
        names = []
        for i, d in enumerate(adapter_dirs):
            name = f"p{i}"
            encoder.load_adapter(str(d), load_as=name, use_safetensors=True)
            names.append(name)
        if method == "adapter" and len(names) != 1:
            raise MopError("finetune: method adapter takes exactly one adapter")
        if method == "mop":
            fusion_name = add_mixture(encoder, names, cfg.mixture).name
        else:
            encoder.set_active_adapters(names[0])
            for p in encoder.parameters():
                p.requires_grad_(True)
    elif method != "base":
        raise MopError(f"finetune: unknown method {method!r} (base, adapter, mop, oracle)")
    model = Classifier(encoder, task.head_size, cfg.dropout, cfg.pooling, cfg.head)
    return model, fusion_name


def model_part(name: str) -> str:
    """Which learning rate a parameter takes: head, fusion, adapters or base."""
    if name.startswith("head."):
        return "head"
    if "adapter_fusion_layer" in name:
        return "fusion"
    if ".adapters." in name:
        return "adapters"
    return "base"


def classifier_groups(model: Classifier, cfg: FinetuneConfig) -> list[dict]:
    """Four learning rates (base, adapters, fusion, head), no decay on bias / LayerNorm.

    A part whose learning rate is 0 is frozen (no gradients computed)."""

    def rate(value: float | None) -> float:
        return cfg.lr if value is None else value

    lrs = {
        "base": cfg.lr,
        "adapters": rate(cfg.lr_adapters),
        "fusion": rate(cfg.lr_fusion),
        "head": rate(cfg.lr_head),
    }
    return param_groups(model, cfg.weight_decay, lrs, model_part)

"""The entity predictor: base model + one adapter + a linear entity head; built fresh
for training, or rebuilt from a trained run's adapter and head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import adapters
import torch
from adapters import SeqBnConfig
from safetensors.torch import load_file

from mop.errors import MopError
from mop.io import read_json
from mop.models import ModelSpec, load_base_model, uses_token_types
from mop.pretrain.config import PretrainConfig
from mop.pretrain.data import PartitionData
from mop.runtime import Runtime
from mop.vectors import POOLINGS, name_vectors, pool


class EntityPredictor(torch.nn.Module):
    """Base model + one adapter, and a linear entity head on the [CLS] vector.

    pooling `cls` reads the last layer's first token (the paper's "representation of the
    [CLS] token"; `<s>` for RoBERTa-style models); `mean` the mean of the real tokens, for
    any family; `pooler` reads the pooler output of models that have one, and with
    `dropout` 0.1 this is the original code's head (a sequence-classification head:
    pooler, dropout, linear)."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        num_entities: int,
        pooling: str = "cls",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise MopError(f"pretrain.pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
        if pooling == "pooler" and getattr(encoder, "pooler", None) is None:
            raise MopError(
                "pretrain.pooling: pooler needs a base model with a pooler layer "
                f"({encoder.config.model_type} has none: use cls or mean)"
            )
        self.encoder = encoder
        self.pooling = pooling
        self.segments = uses_token_types(encoder.config)  # else token_type_ids are dropped
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(encoder.config.hidden_size, num_entities)

    def cls(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        types = {"token_type_ids": token_type_ids} if self.segments else {}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **types)
        return pool(out, attention_mask, self.pooling)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.head(self.dropout(self.cls(input_ids, attention_mask, token_type_ids)))

    def scores(self, inputs: dict[str, torch.Tensor], rt: Runtime) -> torch.Tensor:
        """Evaluation scores over the partition's entities, in fp32: the encoder runs in the
        runtime's precision, the head outside autocast (bf16 logits keep ~3 significant
        digits, so over thousands of entities they tie)."""
        with rt.forward_context():
            vector = self.cls(**inputs)
        with torch.autocast(rt.device.type, enabled=False):
            return self.head(vector.float())


def build_adapter_model(
    spec: ModelSpec, adapter_name: str, reduction_factor: int
) -> torch.nn.Module:
    """The frozen base model with one fresh Pfeiffer (SeqBn) adapter, active and trainable."""
    encoder = load_base_model(spec)
    adapters.init(encoder)
    encoder.add_adapter(adapter_name, config=SeqBnConfig(reduction_factor=reduction_factor))
    encoder.train_adapter(adapter_name)
    encoder.set_active_adapters(adapter_name)
    return encoder


def build_entity_predictor(
    spec: ModelSpec,
    data: PartitionData,
    cfg: PretrainConfig,
    tokenizer: Any,
    adapter_name: str,
    rt: Runtime,
) -> EntityPredictor:
    """A fresh predictor for a partition's entities: a new adapter, and the head random
    (the paper) or, with `head_init: names`, the entities' [CLS] name vectors."""
    if cfg.head_init == "names" and cfg.pooling != "cls":
        raise MopError(
            "pretrain.head_init: names starts the head from [CLS] name vectors; with "
            f"pooling {cfg.pooling} use head_init random (the original code's)"
        )
    model = EntityPredictor(
        build_adapter_model(spec, adapter_name, cfg.reduction_factor),
        data.num_entities,
        cfg.pooling,
        cfg.dropout,
    )
    if cfg.head_init == "names":
        model.head.weight.data.copy_(
            name_vectors(model.encoder, tokenizer, data.entities["name"].to_list(), runtime=rt)
        )
        model.head.bias.data.zero_()
    return model


def load_entity_predictor(
    spec: ModelSpec, adapter_dir: str | Path, head_path: str | Path, adapter_name: str = "knowledge"
) -> EntityPredictor:
    """Rebuild a trained entity predictor from its saved adapter and head (pooled as its
    run pooled, from the `card.json` beside the head)."""
    card = Path(head_path).parent / "card.json"
    pooling = read_json(card).get("config", {}).get("pooling", "cls") if card.is_file() else "cls"
    encoder = load_base_model(spec)
    adapters.init(encoder)
    encoder.load_adapter(
        str(adapter_dir), load_as=adapter_name, set_active=True, use_safetensors=True
    )
    head = load_file(str(head_path))
    model = EntityPredictor(encoder, head["weight"].shape[0], pooling)
    model.head.load_state_dict(head)
    return model.eval()

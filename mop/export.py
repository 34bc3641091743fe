"""Take a fine-tuned model home: export a run in the libraries' own formats, load it back,
predict on new text.

`export_run` writes a folder laid out as a Hugging Face model repository (what
`huggingface_hub.upload_folder` publishes):

- `config.json`, `model.safetensors`, tokenizer files: the fine-tuned base encoder
  (`transformers.AutoModel.from_pretrained(DIR)` loads it; no adapter weights inside);
- `adapters/p<i>/`: each partition adapter as `adapters` saves it (`save_adapter`);
- `fusion/`: the mixture layer as `adapters` saves an AdapterFusion
  (`save_adapter_fusion`), with `mixture.json` (our kind: softmax, Gumbel, MoE, routing
  switches and their settings) and `mixture_extra.safetensors` (weights AdapterFusion does
  not have: the MoE noise projections) beside it;
- `head.safetensors` and `mop.json`: the task head and what a loader needs (task, kind,
  labels, pooling, head, max_length, method, adapters, and the base model the bilinear
  head's candidate vectors come from);
- `README.md`: a model card.

`load(DIR)` rebuilds the model from those files alone (plus, for a bilinear head, the
original base model the candidates are encoded with) and `Predictor.predict` scores a
frame of new inputs as the run scored its test split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import adapters
import numpy as np
import polars as pl
import torch
from adapters import Fuse
from safetensors.torch import load_file, load_model, save_file
from transformers import AutoModel

from mop.errors import MopError
from mop.finetune import (
    Classifier,
    FinetuneConfig,
    build_classifier,
    predict,
    with_candidates,
)
from mop.fusion import MixtureConfig, extra_state, load_extra_state, use_mixture
from mop.io import atomic_dir, read_json, write_json, write_parquet
from mop.kg import read_table
from mop.linking import (
    EntityLinker,
    PartitionRetriever,
    entity_partitions,
    input_text,
    link_frame,
    name_partitions,
    partition_documents,
)
from mop.model_card import kg_facts, model_card
from mop.models import ModelSpec, load_base_model, load_tokenizer
from mop.runtime import Runtime
from mop.tasks import TaskSpec, get_task
from mop.tasks.encode import EncodedSplit, encode_frame, split_from_tokens

FORMAT = 1


def spec_from_dict(d: dict[str, Any]) -> ModelSpec:
    tok = d.get("tokenizer")
    return ModelSpec(**{**d, "tokenizer": spec_from_dict(tok) if tok else None})


def config_from_dict(d: dict[str, Any]) -> FinetuneConfig:
    names = {f.name for f in fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in d.items() if k in names and k != "mixture"})
    return replace(cfg, mixture=MixtureConfig(**d.get("mixture", {})))


def _run_files(run_dir: Path) -> tuple[dict, dict]:
    if not (run_dir / "metrics.json").is_file():
        raise MopError(f"{run_dir}: not a finished fine-tuning run (no metrics.json)")
    if not (run_dir / "model.json").is_file() or not (run_dir / "model.safetensors").is_file():
        raise MopError(
            f"{run_dir}: no saved model (model.json, model.safetensors); the run was made with "
            "finetune.save_model: false; set it to true and run it again"
        )
    return read_json(run_dir / "model.json"), read_json(run_dir / "metrics.json")


# Parameter names the `adapters` library adds to a model (adapters, fusion, and its views of
# the embeddings): the exported base encoder leaves them out.
ADAPTER_KEYS = ("adapter", "prompt_tuning", "prefix_tuning", "invertible", "shared_parameters")


def _added_by_adapters(key: str) -> bool:
    return any(part in key for part in ADAPTER_KEYS)


def exportable(method: str) -> bool:
    """Whether a run of this method has a model for new inputs (an oracle run saves its
    weights but routes each question by the probe's answer key)."""
    return method != "oracle"


def _linker_table(run_dir: Path, record: dict, router: str) -> tuple[pl.DataFrame, dict]:
    """What a -prior mixture needs to route new inputs as the run's links were made: every
    entity's name (the BM25 router: and synonym) with its partition, and the router's
    settings (from the links' coverage.json)."""
    links = record.get("links")
    summary = Path(links).parent / "coverage.json" if links else None
    if summary is None or not summary.is_file():
        raise MopError(
            f"{run_dir}: a -prior mixture links each new input to partitions; the run's "
            f"links and their coverage.json ({summary or 'not recorded'}) are needed to export it"
        )
    facts = read_json(summary)
    kg, partition = (_workflow_path(facts[key], summary.parent) for key in ("kg", "partition"))
    settings = {"router": router, "min_chars": int(facts["min_chars"])}
    if router == "bm25":
        settings["bm25_temperature"] = float(facts["bm25_temperature"])
        return name_partitions(kg, partition), settings
    return entity_partitions(kg, partition), settings


def _workflow_path(given: str, links_dir: Path) -> Path:
    """A path the link job was given: relative ones are relative to the workflow's working
    directory, the folder above the results tree the links sit in."""
    from mop.plan import Run

    path = Path(given)
    if path.is_absolute():
        return path
    try:
        return Path(Run.root(links_dir)).parent / path
    except MopError:  # links made outside a results tree: relative to where we run
        return path


def export_run(run_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Export a finished run (made with `save_model: true`) to `out_dir`; return mop.json."""
    run_dir = Path(run_dir)
    record, metrics = _run_files(run_dir)
    method = record["method"]
    if not exportable(method):
        raise MopError(
            f"{run_dir}: an oracle run routes by the probe's own partition column; "
            "it has no model to export for new inputs"
        )
    spec = spec_from_dict(record["model"])
    task = get_task(record["task"])
    cfg = config_from_dict(record["finetune"])
    prior = method == "mop" and cfg.mixture.prior
    linker = _linker_table(run_dir, record, cfg.mixture.router) if prior else None
    adapter_dirs = [Path(a) for a in record["adapters"]]
    model, fusion_name = build_classifier(spec, task, method, adapter_dirs, cfg)
    load_model(model, str(run_dir / "model.safetensors"), strict=True)
    encoder = model.encoder
    names = [f"p{i}" for i in range(len(adapter_dirs))]
    meta = {
        "format": FORMAT,
        "task": task.name,
        "kind": task.kind,
        "labels": list(task.labels),
        "method": method,
        "base_model": f"{spec.alias} ({spec.identifier()})",
        "candidate_encoder": asdict(spec) if cfg.head == "bilinear" else None,
        "max_length": cfg.max_length,
        "pooling": cfg.pooling,
        "head": cfg.head,
        "dropout": cfg.dropout,
        "head_size": task.head_size,
        "adapters": names,
        "fusion": fusion_name,
        "mixture": asdict(cfg.mixture) if fusion_name else None,
        "kg": kg_facts(record["adapters"]),
        "linker": None if linker is None else linker[1] | {"k": len(adapter_dirs)},
        "metrics": {k: v for k, v in metrics.items() if k.split("_")[0] in ("dev", "test")},
        "seed": metrics["seed"],
        # what the run computed in, so that a loaded model predicts as the run did
        "precision": metrics.get("runtime", {}).get("precision", "fp32"),
    }
    with atomic_dir(out_dir) as tmp:
        base = {k: v for k, v in encoder.state_dict().items() if not _added_by_adapters(k)}
        config = encoder.config.to_dict()
        for key in ("adapters", "adapter_fusion_models"):
            config.pop(key, None)
        type(encoder).config_class.from_dict(config).save_pretrained(tmp)
        save_file(
            {k: v.contiguous() for k, v in base.items()},
            tmp / "model.safetensors",
            metadata={"format": "pt"},
        )
        load_tokenizer(spec).save_pretrained(tmp)
        for name in names:
            (tmp / "adapters" / name).mkdir(parents=True)
            encoder.save_adapter(str(tmp / "adapters" / name), name, use_safetensors=True)
        if fusion_name:
            encoder.save_adapter_fusion(str(tmp / "fusion"), fusion_name, use_safetensors=True)
            write_json(asdict(cfg.mixture), tmp / "fusion" / "mixture.json")
            extra = extra_state(encoder)
            if extra:
                save_file(extra, tmp / "fusion" / "mixture_extra.safetensors")
        save_file(
            {k: v.contiguous() for k, v in model.head.state_dict().items()},
            tmp / "head.safetensors",
        )
        if linker is not None:
            write_parquet(linker[0], tmp / "linker" / "entities.parquet")
        write_json(meta, tmp / "mop.json")
        (tmp / "README.md").write_text(model_card(meta, metrics, run_dir))
    return meta


def _router(table_path: Path, settings: dict[str, Any]) -> Callable[[pl.DataFrame], np.ndarray]:
    """The exported router as a function of an input frame: the BM25 partition router or
    the entity linker, over the names (and partitions) the export carries."""
    table = read_table(table_path)
    names, partition, k = table["name"].to_list(), table["partition"].to_numpy(), settings["k"]
    if settings.get("router") == "bm25":
        bm25 = PartitionRetriever(
            partition_documents(names, partition, k), settings["bm25_temperature"]
        )
        return lambda frame: bm25.routes(input_text(frame))
    linker = EntityLinker(names, settings["min_chars"])
    return lambda frame: (
        link_frame(frame, linker, partition, k)["route"].to_numpy().astype(np.float32)
    )


@dataclass
class Predictor:
    """An exported model, ready to score new inputs of its task."""

    model: Classifier
    task: TaskSpec
    tokenizer: Any
    meta: dict[str, Any]
    runtime: Runtime
    path: Path
    candidate_encoder: torch.nn.Module | None = None  # the frozen base (bilinear head)
    router: Callable[[pl.DataFrame], np.ndarray] | None = None  # a -prior mixture's

    def links(self, frame: pl.DataFrame) -> np.ndarray:
        """Each input's partition distribution, routed as the run routed its task."""
        if self.router is None:  # built once, reused by every call
            self.router = _router(self.path / "linker" / "entities.parquet", self.meta["linker"])
        return self.router(frame)

    def encode(self, frame: pl.DataFrame) -> EncodedSplit:
        kind = self.task.kind
        if "label" not in frame.columns:
            width = self.task.head_size if kind == "multi" else None
            frame = frame.with_columns(
                label=pl.Series([[0] * width] * frame.height) if width else pl.lit(0)
            )
        if "id" not in frame.columns:
            frame = frame.with_row_index("id").with_columns(pl.col("id").cast(pl.String))
        tokens = encode_frame(frame, self.tokenizer, self.meta["max_length"], kind)
        split = split_from_tokens(frame, tokens, kind)
        if self.meta.get("linker"):
            split = replace(split, links=self.links(frame))
        if self.meta["head"] == "bilinear":
            spec = spec_from_dict(self.meta["candidate_encoder"])
            if self.candidate_encoder is None:  # loaded once, reused by every call
                self.candidate_encoder = load_base_model(spec)
            centre = self.model.head.centre.cpu()
            split = with_candidates(
                spec,
                self.tokenizer,
                {"x": split},
                "input",
                self.runtime,
                centre,
                self.candidate_encoder,
            )[0]["x"]
        return split

    def predict(self, frame: pl.DataFrame, batch_size: int = 64) -> np.ndarray:
        """Class (or label, or option) probabilities, one row per input row."""
        split = self.encode(frame)
        pad = self.tokenizer.pad_token_id
        probs, _, _ = predict(self.model, self.task, split, pad, batch_size, runtime=self.runtime)
        return probs

    def predict_records(self, records: list[dict[str, Any]], batch_size: int = 64) -> np.ndarray:
        return self.predict(pl.DataFrame(records), batch_size)


def load(path: str | Path, device: str = "cpu", precision: str | None = None) -> Predictor:
    """Rebuild an exported model (mop export) on `device` (cpu, cuda, cuda:N, auto), in
    `precision` (auto, fp32, bf16; default: the precision its run computed in, which
    `auto` would not give on another machine)."""
    path = Path(path)
    if not (path / "mop.json").is_file():
        raise MopError(f"{path}: not a mop export (no mop.json)")
    meta = read_json(path / "mop.json")
    if meta.get("format") != FORMAT:
        raise MopError(f"{path}/mop.json: export format {meta.get('format')}, expected {FORMAT}")
    start = time.perf_counter()
    encoder = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    names = meta["adapters"]
    if names:
        adapters.init(encoder)
        for name in names:
            encoder.load_adapter(str(path / "adapters" / name), load_as=name, use_safetensors=True)
        if meta["fusion"]:
            encoder.load_adapter_fusion(str(path / "fusion"), use_safetensors=True)
            mixture = MixtureConfig(**read_json(path / "fusion" / "mixture.json"))
            use_mixture(encoder, Fuse(*names), mixture)
            extra = path / "fusion" / "mixture_extra.safetensors"
            if extra.is_file():
                load_extra_state(encoder, load_file(extra))
        else:
            encoder.set_active_adapters(names[0])
    model = Classifier(encoder, meta["head_size"], meta["dropout"], meta["pooling"], meta["head"])
    model.head.load_state_dict(load_file(path / "head.safetensors"))
    precision = precision or meta.get("precision", "fp32")
    rt = Runtime.create(device, precision, threads=torch.get_num_threads())
    model.to(rt.device).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    meta["load_seconds"] = time.perf_counter() - start
    return Predictor(model, get_task(meta["task"]), tokenizer, meta, rt, path)

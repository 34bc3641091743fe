"""Knowledge infusion: one bottleneck adapter per partition, trained by entity prediction.

For a triple (h, r, t) of a partition, the frozen base model with the partition's adapter
reads `[CLS] h [SEP] r [SEP]` and a linear entity head over the [CLS] vector scores every
entity of that partition; the loss is the cross-entropy of t (paper section 2.2). Only the
adapter and the head are trained. With `bidirectional`, `[CLS] r [SEP] t [SEP]` -> h
examples are added, as in the original code's option.

The KG is tokenized once per (KG, tokenizer) into `tokens.parquet`, shared by all K jobs:
entity and relation names are tokenized once each and concatenated, so SNOMED-size graphs
tokenize in seconds. The two names are a sentence pair: the relation (or, backwards, the
entity) is segment 1, as in the fine-tuning of pair tasks. It trains in the loop
fine-tuning shares (mop.training.Loop, on mop.runtime): device, precision, gradient
accumulation, checkpoints (adapter, head, optimizer, scheduler, RNG states, position in
the data); a killed job started again
resumes where it stopped and, on CPU with the same seed, ends with the same adapter as an
uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import adapters
import numpy as np
import polars as pl
import torch
from adapters import SeqBnConfig
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from mop.batching import Sequences, sequential_batches
from mop.checkpoint import Checkpoint, fingerprint
from mop.errors import MopError
from mop.io import atomic_dir, atomic_path, read_json, require_file, write_json
from mop.kg import KnowledgeGraph, read_kg, read_table
from mop.models import ModelSpec, load_base_model, load_tokenizer
from mop.partition import MEMBERSHIP_SCHEMA
from mop.runtime import Runtime, evaluating, seed_all
from mop.tracking import Tracker
from mop.training import Loop, LoopState, param_groups, share
from mop.vectors import name_vectors

MAX_RELATION_TOKENS = 16


# ----------------------------------------------------------------------------- tokenization


def _name_ids(tokenizer: Any, names: list[str]) -> list[list[int]]:
    return tokenizer(names, add_special_tokens=False)["input_ids"]


def tokenize_kg(
    kg_dir: str | Path,
    spec: ModelSpec,
    out_path: str | Path,
    *,
    max_length: int = 64,
    bidirectional: bool = False,
) -> int:
    """Write the entity-prediction examples of every triple of a KG; return their number.

    Columns: direction (0: (h, r) -> t, 1: (r, t) -> h), head, relation, tail, target (the
    entity to predict), input_ids and token_type_ids (0 up to the first [SEP], 1 after).
    Names are truncated so that every example fits `max_length` tokens: the relation to 16
    tokens, then the entity name.
    """
    kg = read_kg(kg_dir)
    tok = load_tokenizer(spec)
    ent_ids = _name_ids(tok, kg.entities["name"].to_list())
    rel_ids = [ids[:MAX_RELATION_TOKENS] for ids in _name_ids(tok, kg.relations["name"].to_list())]
    ents = pl.DataFrame(
        {"entity": kg.entities["id"], "e_ids": ent_ids},
        schema={"entity": pl.Int32, "e_ids": pl.List(pl.Int32)},
    )
    rels = pl.DataFrame(
        {"relation": kg.relations["id"], "r_ids": rel_ids},
        schema={"relation": pl.Int32, "r_ids": pl.List(pl.Int32)},
    )
    cls, sep = tok.cls_token_id, tok.sep_token_id
    frames = []
    directions = [(0, "head", "tail")] + ([(1, "tail", "head")] if bidirectional else [])
    for direction, anchor, target in directions:
        df = (
            kg.triples.join(ents.rename({"entity": anchor}), on=anchor)
            .join(rels, on="relation")
            .with_columns(
                room=(max_length - 3 - pl.col("r_ids").list.len()).cast(pl.Int32),
                direction=pl.lit(direction, dtype=pl.Int8),
                target=pl.col(target),
            )
            .with_columns(e_ids=pl.col("e_ids").list.head(pl.col("room")))
        )
        first, second = ("e_ids", "r_ids") if direction == 0 else ("r_ids", "e_ids")
        df = df.with_columns(
            input_ids=pl.concat_list(
                pl.lit([cls], dtype=pl.List(pl.Int32)),
                first,
                pl.lit([sep], dtype=pl.List(pl.Int32)),
                second,
                pl.lit([sep], dtype=pl.List(pl.Int32)),
            ),
            first_len=pl.col(first).list.len() + 2,
            second_len=pl.col(second).list.len() + 1,
        )
        df = df.with_columns(
            token_type_ids=pl.concat_list(
                pl.lit(0, dtype=pl.Int8).repeat_by(pl.col("first_len")),
                pl.lit(1, dtype=pl.Int8).repeat_by(pl.col("second_len")),
            )
        )
        frames.append(
            df.select(
                "direction", "head", "relation", "tail", "target", "input_ids", "token_type_ids"
            )
        )
    out = pl.concat(frames).sort(["direction", "head", "relation", "tail"])
    with atomic_path(out_path) as tmp:
        out.write_parquet(tmp)
    return out.height


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class PartitionData:
    """A partition's examples: token sequences, local target labels and query groups."""

    seqs: Sequences
    labels: np.ndarray  # local index of the target entity within the partition
    query: np.ndarray  # examples with the same input share a query id (for filtered ranks)
    entities: pl.DataFrame  # entity, local, name (the head's rows, in local order)
    heldout: np.ndarray  # bool: held out of training for the knowledge probe

    @property
    def num_entities(self) -> int:
        return self.entities.height


def canonical_facts(
    heads: np.ndarray, relations: np.ndarray, tails: np.ndarray, kg: KnowledgeGraph
) -> np.ndarray:
    """A dense fact index per triple in which a triple (h, r, t) and its inverse
    (t, inverse(r), h) share one index (the relations table's `inverse` column; without
    it every triple is its own fact). Indices follow the sorted canonical triples."""
    inverse = np.full(int(kg.relations["id"].max()) + 1, -1, dtype=np.int64)
    if "inverse" in kg.relations.columns:
        known = kg.relations.filter(pl.col("inverse").is_not_null())
        inverse[known["id"].to_numpy()] = known["inverse"].to_numpy()
    h, r, t = (np.asarray(a, dtype=np.int64) for a in (heads, relations, tails))
    inv = inverse[r]
    flip = (inv >= 0) & ((t < h) | ((t == h) & (inv < r)))
    canon = np.stack([np.where(flip, t, h), np.where(flip, inv, r), np.where(flip, h, t)], 1)
    return np.unique(canon, axis=0, return_inverse=True)[1].reshape(-1)


def load_partition_data(
    tokens_path: str | Path,
    partition_dir: str | Path,
    kg_dir: str | Path,
    part: int,
    *,
    heldout_share: float = 0.0,
    seed: int = 0,
) -> PartitionData:
    """Select partition `part`'s examples from the shared tokens table."""
    members = read_table(Path(partition_dir) / "membership.parquet", MEMBERSHIP_SCHEMA).filter(
        pl.col("partition") == part
    )
    require_file(tokens_path, "tokens table")
    if members.height == 0:
        raise MopError(f"{partition_dir}: partition {part} does not exist or is empty")
    ids = members["entity"].implode()
    try:
        df = (
            pl.scan_parquet(tokens_path)
            .filter(pl.col("head").is_in(ids) & pl.col("tail").is_in(ids))
            .collect()
        )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise MopError(f"{tokens_path}: not a readable tokens table ({exc})") from exc
    df = df.join(
        members.select(pl.col("entity").alias("target"), pl.col("local").alias("label")),
        on="target",
    ).sort(["direction", "head", "relation", "tail"])
    if df.height == 0:
        raise MopError(f"{partition_dir}: partition {part} has no triples to train on")
    query = (
        df.select(
            pl.struct(
                "direction",
                pl.when(pl.col("direction") == 0).then("head").otherwise("tail"),
                "relation",
            ).rank("dense")
            - 1
        )
        .to_series()
        .to_numpy()
    )
    kg = read_kg(kg_dir)
    names = kg.entities.select(pl.col("id").alias("entity"), "name")
    entities = members.select("entity", "local").join(names, on="entity").sort("local")
    heldout = np.zeros(df.height, dtype=bool)
    if heldout_share > 0:
        # Hold out facts, not examples: both directions of a triple (with bidirectional)
        # go together, and so do a triple and its inverse (t, inverse(r), h), so that a
        # held-out fact is never answered by looking up its other half in training.
        fact = canonical_facts(
            df["head"].to_numpy(), df["relation"].to_numpy(), df["tail"].to_numpy(), kg
        )
        rng = np.random.default_rng(seed)
        heldout = (rng.random(int(fact.max()) + 1) < heldout_share)[fact]
    types = df["token_type_ids"] if "token_type_ids" in df.columns else None
    return PartitionData(
        Sequences.from_series(df["input_ids"], types),
        df["label"].to_numpy().astype(np.int64),
        query.astype(np.int64),
        entities,
        heldout,
    )


# ----------------------------------------------------------------------------- model


class EntityPredictor(torch.nn.Module):
    """Base model + one adapter, and a linear entity head on the [CLS] vector.

    pooling `cls` reads the last layer's first token (the paper's "representation of the
    [CLS] token"); `pooler` reads BERT's pooler output, and with `dropout` 0.1 this is the
    original code's head (a sequence-classification head: pooler, dropout, linear)."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        num_entities: int,
        pooling: str = "cls",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "pooler"):
            raise MopError(f"pretrain.pooling: {pooling!r} is not cls or pooler")
        if pooling == "pooler" and getattr(encoder, "pooler", None) is None:
            raise MopError("pretrain.pooling: pooler needs a base model with a pooler layer")
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(encoder.config.hidden_size, num_entities)

    def cls(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        if self.pooling == "pooler":
            return out.pooler_output
        return out.last_hidden_state[:, 0]

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


# ----------------------------------------------------------------------------- probes


def filtered_ranks(
    scores: torch.Tensor, targets: torch.Tensor, known: torch.Tensor
) -> torch.Tensor:
    """Realistic rank of each target among its row's scores, other known answers filtered.

    scores: (n, E); targets: (n,); known: (n, E) bool, True for every correct answer of
    the row's query. Rank = 1 + non-answers scoring higher + half the non-answers that tie
    with the target: the expected rank under a random order of ties (PyKEEN's "realistic"
    rank), so ties never count in the target's favour. Float, e.g. 1.5.
    """
    target_score = scores.gather(1, targets[:, None])
    higher = ((scores > target_score) & ~known).sum(1)
    ties = ((scores == target_score) & ~known).sum(1)
    return 1.0 + higher.double() + 0.5 * ties.double()


def knowledge_probe(
    model: EntityPredictor,
    data: PartitionData,
    rows: np.ndarray,
    pad_id: int,
    batch_size: int = 256,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """hits@1, hits@10 and MRR of entity prediction on the given example rows (filtered,
    realistic ranks over fp32 scores: see `filtered_ranks`)."""
    if rows.size == 0:
        return {}
    rt = runtime or Runtime(next(model.parameters()).device)
    answers: dict[int, list[int]] = {}
    for q, label in zip(data.query, data.labels, strict=True):
        answers.setdefault(int(q), []).append(int(label))
    ranks = []
    batches = sequential_batches(rows.size, batch_size, data.seqs.lengths[rows])
    with evaluating(model):
        for idx in tqdm(batches, desc="knowledge probe", mininterval=5):
            batch = rows[idx]
            scores = model.scores(rt.batch(data.seqs.batch(batch, pad_id)), rt).cpu()
            if not torch.isfinite(scores).all():
                raise MopError(
                    "knowledge probe: the entity head gives non-finite scores (a diverged "
                    "adapter or head); its metrics would mean nothing"
                )
            known = torch.zeros_like(scores, dtype=torch.bool)
            for i, q in enumerate(data.query[batch]):
                known[i, answers[int(q)]] = True
            ranks.append(filtered_ranks(scores, torch.from_numpy(data.labels[batch]), known))
    r = torch.cat(ranks)
    return {
        "hits_at_1": float((r <= 1).double().mean()),
        "hits_at_10": float((r <= 10).double().mean()),
        "mrr": float((1.0 / r).mean()),
        "examples": int(r.numel()),
    }


# ----------------------------------------------------------------------------- training


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
    pooling: str = "cls"  # the head's input: "cls" (paper) or "pooler" (original code)
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


def probe_rows(rows: np.ndarray, size: int | str, seed: int) -> np.ndarray:
    """The example rows the knowledge probe ranks: all of them, or a seeded sample of
    `size` (in row order), so a partition of 400k triples costs a few thousand forwards."""
    if size == "all" or rows.size <= int(size):
        return rows
    rng = np.random.default_rng([seed, 0x9E0B])  # its own stream: training's draws stay
    return np.sort(rng.choice(rows, int(size), replace=False))


def run_fingerprint(spec: ModelSpec, data: PartitionData, cfg: PretrainConfig) -> str:
    """What a checkpoint must match to be resumed: settings that change the result, data."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in EXECUTION_KEYS}
    arrays = [data.labels, data.seqs.values, data.seqs.offsets, data.heldout]
    if data.seqs.types is not None:
        arrays.append(data.seqs.types)
    return fingerprint(settings, spec.identifier(), *arrays)


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
    forward = rt.prepare(model)

    train_rows = np.flatnonzero(~data.heldout)
    steps_per_epoch = math.ceil(train_rows.size / cfg.batch_size)
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = rt.optimizer(param_groups(model, cfg.weight_decay, {"all": cfg.lr}))
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup * total_steps), total_steps
    )

    def loss_of(rows: np.ndarray, batch: np.ndarray) -> torch.Tensor:
        labels = rt.to_device(torch.from_numpy(data.labels[rows]))
        inputs = rt.batch(data.seqs.batch(rows, pad_id))
        return entity_loss(forward, inputs, labels, rt) * share(rows, batch)

    def after_step(state: LoopState, loss: torch.Tensor) -> None:
        if state.step % cfg.log_every == 0 or state.step == total_steps:
            lr, speed = scheduler.get_last_lr()[0], state.examples_per_s
            state.history.append([state.step, loss.item(), lr, speed])
            if tracker:
                tracker.log_metrics(
                    {"loss": loss.item(), "lr": lr, "examples_per_s": speed}, state.step
                )

    loop = Loop(
        f"pretrain {out}",
        model,
        optimizer,
        scheduler,
        Checkpoint(out / "checkpoint", run_fingerprint(spec, data, cfg)),
        loss_of,
        data.seqs.lengths[train_rows],
        cfg.batch_size,
        cfg.seed,
        cfg.epochs,
        total_steps,
        rows=train_rows,
        grad_accum=cfg.grad_accum,
        max_grad_norm=cfg.max_grad_norm,
        checkpoint_every=cfg.checkpoint_every,
        after_step=after_step,
    )
    state = loop.run(loop.resume(LoopState())[0])
    history = state.history

    tick = time.perf_counter()
    sample = probe_rows(train_rows, cfg.probe_examples, cfg.seed)
    probe = {"train": knowledge_probe(model, data, sample, pad_id, cfg.eval_batch_size, rt)}
    if data.heldout.any():
        held = probe_rows(np.flatnonzero(data.heldout), cfg.probe_examples, cfg.seed)
        probe["heldout"] = knowledge_probe(model, data, held, pad_id, cfg.eval_batch_size, rt)
    probe_seconds = time.perf_counter() - tick
    metrics = {
        "steps": state.step,
        "examples_seen": state.examples,
        "train_seconds": state.seconds,
        "examples_per_s": state.examples_per_s,
        "final_loss": history[-1][1] if history else None,
        "entities": data.num_entities,
        "train_examples": int(train_rows.size),
        "probe": probe,
        "probe_seconds": probe_seconds,
        "runtime": rt.describe() | {"peak_memory_mb": rt.peak_memory_mb()},
        "loss_curve": [
            {"step": s, "loss": lo, "lr": lr, "examples_per_s": eps} for s, lo, lr, eps in history
        ],
    }
    fp = loop.checkpoint.fingerprint
    save_outputs(model, out, adapter_name, metrics, cfg, spec, fp, source)
    loop.checkpoint.remove()
    if tracker:
        flat = {f"{split}_{k}": v for split, m in probe.items() for k, v in m.items()}
        tracker.log_metrics(flat | {"train_seconds": state.seconds}, state.step)
        tracker.log_artifact(out / "metrics.json")
        tracker.log_artifact(out / "card.json")
    return metrics


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

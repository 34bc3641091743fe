"""Knowledge infusion: one bottleneck adapter per partition, trained by entity prediction.

For a triple (h, r, t) of a partition, the frozen base model with the partition's adapter
reads `[CLS] h [SEP] r [SEP]` and a linear entity head over the [CLS] vector scores every
entity of that partition; the loss is the cross-entropy of t (paper section 2.2). Only the
adapter and the head are trained. With `bidirectional`, `[CLS] r [SEP] t [SEP]` -> h
examples are added, as in the original code's option.

The KG is tokenized once per (KG, tokenizer) into `tokens.parquet`, shared by all K jobs:
entity and relation names are tokenized once each and concatenated, so SNOMED-size graphs
tokenize in seconds. Checkpoints (adapter, head, optimizer, scheduler, RNG states, position
in the data) are written atomically; a killed job started again resumes where it stopped
and, on CPU with the same seed, ends with the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
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

from mop.batching import Sequences, bucketed_batches, sequential_batches
from mop.errors import MopError
from mop.io import atomic_dir, atomic_path, require_file, write_json
from mop.kg import read_kg, read_table
from mop.models import ModelSpec, load_base_model, load_tokenizer
from mop.partition import MEMBERSHIP_SCHEMA
from mop.tracking import Tracker

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
    entity to predict) and input_ids. Names are truncated so that every example fits
    `max_length` tokens: the relation to 16 tokens, then the entity name.
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
            )
        )
        frames.append(df.select("direction", "head", "relation", "tail", "target", "input_ids"))
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
    names = read_kg(kg_dir).entities.select(pl.col("id").alias("entity"), "name")
    entities = members.select("entity", "local").join(names, on="entity").sort("local")
    heldout = np.zeros(df.height, dtype=bool)
    if heldout_share > 0:
        rng = np.random.default_rng(seed)
        heldout[rng.random(df.height) < heldout_share] = True
    return PartitionData(
        Sequences.from_series(df["input_ids"]),
        df["label"].to_numpy().astype(np.int64),
        query.astype(np.int64),
        entities,
        heldout,
    )


# ----------------------------------------------------------------------------- model


class EntityPredictor(torch.nn.Module):
    """Base model + one adapter, and a linear entity head on the [CLS] vector."""

    def __init__(self, encoder: torch.nn.Module, num_entities: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, num_entities)

    def cls(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state[:, 0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.cls(input_ids, attention_mask))


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


@torch.no_grad()
def name_vectors(
    encoder: torch.nn.Module, tokenizer: Any, names: list[str], batch_size: int = 256
) -> torch.Tensor:
    """Centred, unit-length [CLS] vectors of entity names from `encoder` as it is (our
    entity head initialisation, and the probe's candidate vectors)."""
    enc = tokenizer(names, truncation=True, max_length=32)
    seqs = Sequences.from_series(pl.Series(enc["input_ids"], dtype=pl.List(pl.Int32)))
    out = torch.empty(len(names), encoder.config.hidden_size)
    was_training = encoder.training
    encoder.eval()
    for idx in sequential_batches(len(seqs), batch_size, seqs.lengths):
        ids, mask = seqs.pad(idx, tokenizer.pad_token_id)
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        out[torch.from_numpy(idx)] = hidden[:, 0].float()
    encoder.train(was_training)
    out = out - out.mean(0, keepdim=True)
    return torch.nn.functional.normalize(out, dim=-1)


# ----------------------------------------------------------------------------- probes


def filtered_ranks(
    scores: torch.Tensor, targets: torch.Tensor, known: torch.Tensor
) -> torch.Tensor:
    """Rank of each target among its row's scores, other known answers filtered out.

    scores: (n, E); targets: (n,); known: (n, E) bool, True for every correct answer of
    the row's query. Rank = 1 + number of non-answers scoring strictly higher.
    """
    target_score = scores.gather(1, targets[:, None])
    higher = (scores > target_score) & ~known
    return 1 + higher.sum(1)


@torch.no_grad()
def knowledge_probe(
    model: EntityPredictor,
    data: PartitionData,
    rows: np.ndarray,
    pad_id: int,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> dict[str, float]:
    """hits@1, hits@10 and MRR of entity prediction on the given example rows (filtered)."""
    if rows.size == 0:
        return {}
    device = device or torch.device("cpu")
    answers: dict[int, list[int]] = {}
    for q, label in zip(data.query, data.labels, strict=True):
        answers.setdefault(int(q), []).append(int(label))
    model.eval()
    ranks = []
    for idx in sequential_batches(rows.size, batch_size, data.seqs.lengths[rows]):
        batch = rows[idx]
        ids, mask = data.seqs.pad(batch, pad_id)
        scores = model(ids.to(device), mask.to(device)).float().cpu()
        known = torch.zeros_like(scores, dtype=torch.bool)
        for i, q in enumerate(data.query[batch]):
            known[i, answers[int(q)]] = True
        ranks.append(filtered_ranks(scores, torch.from_numpy(data.labels[batch]), known))
    r = torch.cat(ranks).double()
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
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.0
    reduction_factor: int = 8
    head_init: str = "random"  # "random" (paper) or "names" (our addition)
    max_grad_norm: float | None = None
    checkpoint_every: int = 200
    log_every: int = 10
    eval_batch_size: int = 256
    heldout_share: float = 0.0
    seed: int = 0
    threads: int = 1
    compile: bool = False
    max_steps: int | None = None  # stop early (benchmarks, fault tests)


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (
            no_decay
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name
            else decay
        ).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n in names}


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: dict[str, Any],
) -> None:
    with atomic_dir(path) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "position": position,
            },
            tmp / "train_state.pt",
        )


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    fingerprint: str,
) -> dict[str, Any] | None:
    """Restore a checkpoint written for the same run (same fingerprint), else None."""
    if not (path / "train_state.pt").is_file():
        return None
    try:
        state = torch.load(path / "train_state.pt", weights_only=True)
        trainable = load_file(path / "trainable.safetensors")
    except Exception as exc:  # any unreadable checkpoint: say which, never guess
        raise MopError(
            f"{path}: checkpoint is unreadable ({type(exc).__name__}); delete this folder to "
            "restart the partition's training from scratch"
        ) from exc
    if state["position"].get("fingerprint") != fingerprint:
        print(f"mop pretrain: ignoring {path}: written for other data or settings", flush=True)
        return None
    model.load_state_dict(trainable, strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state["position"]


def train_step(
    step_fn: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    autocast: Any,
    max_grad_norm: float | None = None,
) -> torch.Tensor:
    """One optimisation step of the entity-prediction loss (cross-entropy over the
    partition's entities); returns the loss."""
    device = next(model.parameters()).device
    with autocast:
        logits = step_fn(ids.to(device, non_blocking=True), mask.to(device, non_blocking=True))
    loss = torch.nn.functional.cross_entropy(logits.float(), labels.to(device))
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_fingerprint(spec: ModelSpec, data: PartitionData, cfg: PretrainConfig) -> str:
    """What a checkpoint must match to be resumed: settings that change the result, data."""
    settings = {
        k: v
        for k, v in asdict(cfg).items()
        if k not in ("threads", "log_every", "checkpoint_every", "eval_batch_size")
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(spec.identifier().encode())
    for array in (data.labels, data.seqs.values, data.seqs.offsets, data.heldout):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def pretrain_partition(
    spec: ModelSpec,
    data: PartitionData,
    cfg: PretrainConfig,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    adapter_name: str = "knowledge",
    source: dict | None = None,
) -> dict[str, Any]:
    """Train one partition's adapter and head; write them, a model card and metrics."""
    out = Path(out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, cfg.threads))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(spec)
    model = EntityPredictor(
        build_adapter_model(spec, adapter_name, cfg.reduction_factor), data.num_entities
    )
    if cfg.head_init == "names":
        model.head.weight.data.copy_(
            name_vectors(model.encoder, tokenizer, data.entities["name"].to_list())
        )
        model.head.bias.data.zero_()
    model.to(device)
    step_fn = torch.compile(model) if cfg.compile else model

    train_rows = np.flatnonzero(~data.heldout)
    lengths = data.seqs.lengths[train_rows]
    steps_per_epoch = math.ceil(train_rows.size / cfg.batch_size)
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=device.type == "cuda"
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup * total_steps), total_steps
    )

    ckpt = out / "checkpoint"
    fingerprint = run_fingerprint(spec, data, cfg)
    position = load_checkpoint(ckpt, model, optimizer, scheduler, fingerprint) or {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "history": [],
        "examples": 0,
        "seconds": 0.0,
    }
    if position["step"]:
        print(f"mop pretrain: resuming from step {position['step']} ({ckpt})", flush=True)
    history: list[list[float]] = position["history"]
    step, epoch, start_batch = position["step"], position["epoch"], position["batch"]
    seen, seconds = position["examples"], position["seconds"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(total=total_steps, initial=step, desc=f"pretrain {out.name}", mininterval=5)
    model.train()
    while step < total_steps:
        batches = bucketed_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        for b in range(start_batch, len(batches)):
            tick = time.perf_counter()
            rows = train_rows[batches[b]]
            ids, mask = data.seqs.pad(rows, tokenizer.pad_token_id)
            labels = torch.from_numpy(data.labels[rows])
            loss = train_step(
                step_fn, model, optimizer, scheduler, ids, mask, labels, autocast, cfg.max_grad_norm
            )
            step += 1
            seen += rows.size
            seconds += time.perf_counter() - tick
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                lr = scheduler.get_last_lr()[0]
                history.append([step, loss.item(), lr, seen / max(seconds, 1e-9)])
                if tracker:
                    tracker.log_metrics(
                        {
                            "loss": history[-1][1],
                            "lr": lr,
                            "examples_per_s": seen / max(seconds, 1e-9),
                        },
                        step,
                    )
            done_epoch = b + 1 == len(batches)
            if step % cfg.checkpoint_every == 0 or done_epoch or step == total_steps:
                pos = {
                    "step": step,
                    "epoch": epoch + done_epoch,
                    "batch": 0 if done_epoch else b + 1,
                    "history": history,
                    "examples": seen,
                    "seconds": seconds,
                    "fingerprint": fingerprint,
                }
                save_checkpoint(ckpt, model, optimizer, scheduler, pos)
            if step >= total_steps:
                break
        else:
            epoch += 1
            start_batch = 0
            continue
        break
    bar.close()

    probe = {
        "train": knowledge_probe(
            model, data, train_rows, tokenizer.pad_token_id, cfg.eval_batch_size, device
        )
    }
    if data.heldout.any():
        probe["heldout"] = knowledge_probe(
            model,
            data,
            np.flatnonzero(data.heldout),
            tokenizer.pad_token_id,
            cfg.eval_batch_size,
            device,
        )
    metrics = {
        "steps": step,
        "examples_seen": seen,
        "train_seconds": seconds,
        "examples_per_s": seen / max(seconds, 1e-9),
        "final_loss": history[-1][1] if history else None,
        "entities": data.num_entities,
        "train_examples": int(train_rows.size),
        "probe": probe,
        "loss_curve": [
            {"step": s, "loss": lo, "lr": lr, "examples_per_s": eps} for s, lo, lr, eps in history
        ],
    }
    save_outputs(model, out, adapter_name, metrics, cfg, spec, fingerprint, source)
    shutil.rmtree(ckpt, ignore_errors=True)
    if tracker:
        flat = {f"{split}_{k}": v for split, m in probe.items() for k, v in m.items()}
        tracker.log_metrics(flat | {"train_seconds": seconds}, step)
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
    """Rebuild a trained entity predictor from its saved adapter and head."""
    encoder = load_base_model(spec)
    adapters.init(encoder)
    encoder.load_adapter(
        str(adapter_dir), load_as=adapter_name, set_active=True, use_safetensors=True
    )
    head = load_file(str(head_path))
    model = EntityPredictor(encoder, head["weight"].shape[0])
    model.head.load_state_dict(head)
    return model.eval()

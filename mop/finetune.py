"""Fine-tuning on a downstream task, one loop for every task and method.

Tasks supply data, head kind and metric (see mop.tasks): single-label (softmax +
cross-entropy), multi-label (sigmoid + binary cross-entropy, threshold 0.5) and
multiple-choice (one score per option from the same head, softmax over the options).

Methods:
- `base`: the plain base model, everything trained;
- `adapter`: the base model with one pretrained partition adapter, everything trained;
- `mop`: the base model with all K pretrained adapters through a mixture layer
  (softmax AdapterFusion, Gumbel-softmax or sparse MoE), everything trained (paper 2.3).

The loop: AdamW (weight decay 0.01 except bias/LayerNorm; separate learning rates for base
model, adapters, fusion and head), linear schedule with warmup, dev evaluation after every
epoch, early stopping with patience, best-on-dev weights restored for the test split.
Outputs: metrics.json, predictions.parquet (per example, for significance tests),
mixture.parquet (final-layer [CLS] mixture weights on test, for mop) and optionally the
best model as safetensors.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import adapters
import numpy as np
import polars as pl
import torch
from safetensors.torch import save_model
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from mop.batching import Sequences, bucketed_batches, sequential_batches
from mop.errors import MopError
from mop.fusion import MixtureConfig, add_mixture, mixture_aux_loss
from mop.io import atomic_path, write_json, write_parquet
from mop.models import ModelSpec, load_base_model, load_tokenizer
from mop.tasks import SPLITS, TaskSpec
from mop.tracking import Tracker


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 3
    batch_size: int = 16
    max_length: int = 128
    lr: float = 2e-5  # base model
    lr_adapters: float | None = None  # defaults to lr
    lr_fusion: float | None = None
    lr_head: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.1
    patience: int = 5
    dropout: float = 0.1
    pooling: str = "cls"  # "cls" or "mean"
    head: str = "linear"  # "linear", or "bilinear" (query x candidate; tasks with a candidate)
    max_grad_norm: float | None = None
    seed: int = 0
    threads: int = 1
    save_model: bool = True
    mixture: MixtureConfig = field(default_factory=MixtureConfig)


@dataclass(frozen=True)
class EncodedSplit:
    """A tokenized split: one sequence per example, or per (example, option) for choice tasks.

    For choice tasks the sequences of example i are rows i * choices ... i * choices +
    choices - 1, so a batch of examples maps to its sequence rows with `rows`.
    """

    ids: list[str]
    seqs: Sequences
    labels: np.ndarray  # (n,) class / option index, or (n, labels) 0/1 for multi-label
    frame: pl.DataFrame
    choices: int = 1
    candidates: torch.Tensor | None = None  # (n, hidden) vectors for the bilinear head
    route: np.ndarray | None = None  # (n,) the adapter each example goes to (oracle)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        """Per example: the longest of its sequences (for length bucketing)."""
        return self.seqs.lengths.reshape(len(self), self.choices).max(1)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return (idx[:, None] * self.choices + np.arange(self.choices)[None, :]).ravel()

    def extras(self, idx: np.ndarray) -> tuple[torch.Tensor | None, np.ndarray | None]:
        """The batch's candidate vectors and routes, where the model uses them."""
        cand = None if self.candidates is None else self.candidates[torch.from_numpy(idx)]
        route = None if self.route is None else self.route[idx]
        return cand, route


def _tokenize(tokenizer: Any, a: list[str], b: list[str | None], max_length: int) -> Sequences:
    if all(x is None for x in b):
        enc = tokenizer(a, truncation=True, max_length=max_length)
    else:
        enc = tokenizer(a, [x or "" for x in b], truncation="longest_first", max_length=max_length)
    return Sequences.from_series(pl.Series(enc["input_ids"], dtype=pl.List(pl.Int32)))


def encode_split(
    frame: pl.DataFrame, tokenizer: Any, max_length: int, kind: str = "single"
) -> EncodedSplit:
    """Tokenize a split once, truncated to max_length.

    single / multi: the pair (text_a, text_b). choice: per option, the pair
    (text_a + " " + option, the option's retrieved context if any).
    """
    ids = frame["id"].to_list()
    a = frame["text_a"].to_list()
    if kind == "choice":
        choices = frame["choices"].to_list()
        width = len(choices[0])
        if any(len(c) != width for c in choices):
            raise MopError("finetune: every question of a choice task needs the same options")
        contexts = (
            frame["contexts"].to_list()
            if "contexts" in frame.columns
            else [[None] * width] * len(a)
        )
        pair_a = [f"{q} {c}" for q, opts in zip(a, choices, strict=True) for c in opts]
        pair_b = [x or None for ctx in contexts for x in ctx]
        seqs = _tokenize(tokenizer, pair_a, pair_b, max_length)
        labels = frame["label"].to_numpy().astype(np.int64)
        return EncodedSplit(ids, seqs, labels, frame, width)
    b = frame["text_b"].to_list() if "text_b" in frame.columns else [None] * len(a)
    seqs = _tokenize(tokenizer, a, b, max_length)
    if kind == "multi":
        labels = np.asarray(frame["label"].to_list(), dtype=np.int64)
    else:
        labels = frame["label"].to_numpy().astype(np.int64)
    return EncodedSplit(ids, seqs, labels, frame)


def check_labels(task: TaskSpec, split: EncodedSplit, path: Path) -> None:
    """Labels must fit the head: classes, 0/1 vectors of the task's width, or option indices."""
    if task.kind == "multi":
        if split.labels.ndim != 2 or split.labels.shape[1] != task.num_labels:
            raise MopError(f"{path}: labels must be 0/1 lists of length {task.num_labels}")
        bad = ((split.labels != 0) & (split.labels != 1)).any(1)
        limit = 1
    else:
        limit = split.choices - 1 if task.kind == "choice" else task.num_labels - 1
        bad = (split.labels < 0) | (split.labels > limit)
    if bad.any():
        row = int(np.argmax(bad))
        raise MopError(
            f"{path}: row {row} has label {split.labels[row].tolist()} outside 0..{limit}"
        )


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
        if pooling not in ("cls", "mean"):
            raise MopError(f"finetune.pooling: {pooling!r} is not cls or mean")
        if head not in ("linear", "bilinear"):
            raise MopError(f"finetune.head: {head!r} is not linear or bilinear")
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = torch.nn.Dropout(dropout)
        hidden = encoder.config.hidden_size
        if head == "bilinear" and outputs != 2:
            raise MopError("finetune.head: bilinear scores yes/no tasks (two labels) only")
        self.head = BilinearHead(hidden) if head == "bilinear" else torch.nn.Linear(hidden, outputs)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        h = out.last_hidden_state
        if self.pooling == "cls":
            return h[:, 0], out
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1), out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        output_mixture: bool = False,
        candidates: torch.Tensor | None = None,
        route: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, Any]:
        kwargs = {"output_adapter_fusion_attentions": True} if output_mixture else {}
        if route is None:
            pooled, out = self.pool(input_ids, attention_mask, **kwargs)
            mixture = out.adapter_fusion_attentions if output_mixture else None
        else:
            # The oracle control: each example through its own partition's adapter only.
            hidden = self.encoder.config.hidden_size
            pooled = torch.zeros(len(route), hidden, device=input_ids.device)
            for k in np.unique(route):
                sel = torch.from_numpy(route == k)
                self.encoder.set_active_adapters(f"p{k}")
                pooled[sel] = self.pool(input_ids[sel], attention_mask[sel])[0]
            mixture = None
        pooled = self.dropout(pooled)
        if isinstance(self.head, BilinearHead):
            if candidates is None:
                raise MopError("finetune.head: bilinear needs a task with a candidate column")
            return self.head(pooled, candidates), mixture
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


def _param_groups(model: Classifier, cfg: FinetuneConfig) -> list[dict]:
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
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head."):
            part = "head"
        elif "adapter_fusion_layer" in name:
            part = "fusion"
        elif ".adapters." in name:
            part = "adapters"
        else:
            part = "base"
        if lrs[part] == 0:
            p.requires_grad_(False)
            continue
        decay = not (name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name)
        groups.setdefault((part, decay), []).append(p)
    return [
        {
            "params": ps,
            "lr": lrs[part],
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), ps in sorted(groups.items())
    ]


def task_loss(task: TaskSpec, logits: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """Cross-entropy over classes or options; binary cross-entropy per label for multi-label."""
    target = torch.from_numpy(labels)
    if task.kind == "multi":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float())
    return torch.nn.functional.cross_entropy(logits.view(len(labels), -1), target)


def scores_to_probs(task: TaskSpec, logits: torch.Tensor, n: int) -> torch.Tensor:
    """Per example: class probabilities, per-label probabilities, or option probabilities."""
    logits = logits.float().view(n, -1)
    return torch.sigmoid(logits) if task.kind == "multi" else torch.softmax(logits, -1)


@torch.no_grad()
def predict(
    model: Classifier,
    task: TaskSpec,
    split: EncodedSplit,
    pad_id: int,
    batch_size: int,
    fusion_name: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities per example (and final-layer [CLS] mixture weights per sequence)."""
    model.eval()
    width = split.choices if task.kind == "choice" else task.head_size
    probs = np.zeros((len(split), width), dtype=np.float32)
    mix = None
    batches = sequential_batches(len(split), batch_size, split.lengths)
    for idx in tqdm(batches, desc="evaluate", mininterval=5, leave=False):
        rows = split.rows(idx)
        ids, mask = split.seqs.pad(rows, pad_id)
        logits, att = model(ids, mask, fusion_name is not None, *split.extras(idx))
        probs[idx] = scores_to_probs(task, logits, idx.size).numpy()
        if att is not None:
            layers = att[fusion_name]
            last = layers[max(layers)]["output_adapter"]
            if mix is None:
                mix = np.zeros((len(split.seqs), last.shape[-1]), dtype=np.float32)
            mix[rows] = last[:, 0, :]
    return probs, mix


def evaluate(task: TaskSpec, split: EncodedSplit, probs: np.ndarray) -> tuple[dict, pl.DataFrame]:
    """The task's metrics and the per-example frame (id, label, pred, prob, metric columns)."""
    if task.kind == "multi":
        label = pl.Series("label", split.labels.tolist(), dtype=pl.List(pl.Int64))
        pred = pl.Series("pred", (probs >= 0.5).astype(np.int64).tolist(), dtype=pl.List(pl.Int64))
    else:
        label = pl.Series("label", split.labels)
        pred = pl.Series("pred", probs.argmax(1).astype(np.int64))
    frame = pl.DataFrame(
        [
            pl.Series("id", split.ids, dtype=pl.String),
            label,
            pred,
            pl.Series("prob", probs.tolist(), dtype=pl.List(pl.Float32)),
        ]
    )
    if task.metric_columns:
        frame = pl.concat([frame, split.frame.select(task.metric_columns)], how="horizontal")
    return task.metric(frame), frame


def mixture_frame(split: EncodedSplit, mix: np.ndarray) -> pl.DataFrame:
    """One row per sequence: example id (and option index for choice tasks), weights, text."""
    frame = pl.DataFrame(
        {
            "id": np.repeat(np.asarray(split.ids, dtype=object), split.choices).tolist(),
            "weights": pl.Series(mix.tolist(), dtype=pl.List(pl.Float32)),
            "text": np.repeat(
                np.asarray(split.frame["text_a"].to_list(), dtype=object), split.choices
            ).tolist(),
        }
    )
    if split.choices > 1:
        frame = frame.with_columns(choice=pl.Series(np.tile(np.arange(split.choices), len(split))))
    return frame


def with_candidates(
    spec: ModelSpec, tokenizer: Any, data: dict[str, EncodedSplit], task_dir: str | Path
) -> dict[str, EncodedSplit]:
    """Attach each example's candidate vector: the frozen base encoder's [CLS] vector of
    its `candidate` text, centred over all candidates and of unit length."""
    from mop.pretrain import name_vectors

    for s, split in data.items():
        if "candidate" not in split.frame.columns:
            raise MopError(
                f"{Path(task_dir) / f'{s}.parquet'}: the bilinear head needs a "
                "candidate column (probe: format pair)"
            )
    names = sorted({c for split in data.values() for c in split.frame["candidate"].to_list()})
    vectors = name_vectors(load_base_model(spec), tokenizer, names)
    index = {n: i for i, n in enumerate(names)}
    return {
        s: replace(split, candidates=vectors[[index[c] for c in split.frame["candidate"]]])
        for s, split in data.items()
    }


def with_routes(
    data: dict[str, EncodedSplit], task_dir: str | Path, adapters_given: int
) -> dict[str, EncodedSplit]:
    """The oracle routes each example to the adapter of its `partition` column."""
    out = {}
    for s, split in data.items():
        if "partition" not in split.frame.columns:
            raise MopError(
                f"{Path(task_dir) / f'{s}.parquet'}: the oracle needs a partition "
                "column (only the KG probe has one)"
            )
        route = split.frame["partition"].to_numpy()
        if route.max() >= adapters_given:
            raise MopError(
                f"{Path(task_dir) / f'{s}.parquet'}: partition {route.max()} but only "
                f"{adapters_given} adapters given"
            )
        out[s] = replace(split, route=route)
    return out


def finetune(
    spec: ModelSpec,
    task: TaskSpec,
    task_dir: str | Path,
    method: str,
    adapter_dirs: list[Path],
    cfg: FinetuneConfig,
    out_dir: str | Path,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Train on train, select on dev, report test; write every output of the run."""
    out = Path(out_dir)
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(spec)
    data = {}
    for s in SPLITS:
        path = Path(task_dir) / f"{s}.parquet"
        if not path.is_file():
            raise MopError(f"{path}: task split not found (run the task's prepare step)")
        data[s] = encode_split(pl.read_parquet(path), tokenizer, cfg.max_length, task.kind)
        check_labels(task, data[s], path)
    if cfg.head == "bilinear":
        data = with_candidates(spec, tokenizer, data, task_dir)
    if method == "oracle":
        data = with_routes(data, task_dir, len(adapter_dirs))
    model, fusion_name = build_classifier(spec, task, method, adapter_dirs, cfg)
    train = data["train"]
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(_param_groups(model, cfg))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup * total), total)
    best = {"score": -math.inf, "epoch": -1, "state": None}
    history = []
    step, seen, seconds, stale = 0, 0, 0.0, 0
    for epoch in range(cfg.epochs):
        model.train()
        losses = []
        batches = bucketed_batches(train.lengths, cfg.batch_size, cfg.seed, epoch)
        for idx in tqdm(batches, desc=f"finetune {out.name} epoch {epoch}", mininterval=5):
            tick = time.perf_counter()
            ids, mask = train.seqs.pad(train.rows(idx), tokenizer.pad_token_id)
            logits, _ = model(ids, mask, False, *train.extras(idx))
            loss = task_loss(task, logits, train.labels[idx])
            if fusion_name is not None:
                if cfg.mixture.fusion_reg:
                    reg = model.encoder.get_fusion_regularization_loss()
                    if reg is not None:
                        loss = loss + reg
                aux = mixture_aux_loss(model)
                if aux is not None:
                    loss = loss + aux
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            seen += idx.size
            seconds += time.perf_counter() - tick
        dev_probs, _ = predict(model, task, data["dev"], tokenizer.pad_token_id, cfg.batch_size * 4)
        dev_metrics, _ = evaluate(task, data["dev"], dev_probs)
        score = dev_metrics[task.main_metric]
        entry = {
            "epoch": epoch,
            "step": step,
            "train_loss": float(np.mean(losses)),
            **{f"dev_{k}": v for k, v in dev_metrics.items()},
        }
        history.append(entry)
        if tracker:
            tracker.log_metrics(
                {k: v for k, v in entry.items() if k != "epoch"}
                | {"examples_per_s": seen / max(seconds, 1e-9)},
                epoch,
            )
        if score > best["score"]:
            best = {
                "score": score,
                "epoch": epoch,
                "state": copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()}),
                "dev": dev_probs,
            }
            stale = 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best["state"])
    results: dict[str, Any] = {}
    frames = []
    mixture = None
    for s in SPLITS:
        if s == "dev":  # the best epoch's own dev pass: the same weights, the same probs
            probs, mix = best["dev"], None
        else:
            probs, mix = predict(
                model,
                task,
                data[s],
                tokenizer.pad_token_id,
                cfg.batch_size * 4,
                fusion_name if s == "test" else None,
            )
        metrics, frame = evaluate(task, data[s], probs)
        results[s] = metrics
        frames.append(frame.with_columns(split=pl.lit(s)))
        if mix is not None:
            mixture = mixture_frame(data[s], mix)
    metrics = {
        "task": task.name,
        "method": method,
        "seed": cfg.seed,
        "main_metric": task.main_metric,
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "steps": step,
        "examples_per_s": seen / max(seconds, 1e-9),
        "train_seconds": seconds,
        **{f"{s}_{k}": v for s, m in results.items() for k, v in m.items()},
        "history": history,
        "config": asdict(cfg),
    }
    write_parquet(pl.concat(frames), out / "predictions.parquet")
    if mixture is not None:
        write_parquet(mixture, out / "mixture.parquet")
    if cfg.save_model:
        with atomic_path(out / "model.safetensors") as tmp:
            save_model(model, str(tmp))
    write_json(metrics, out / "metrics.json")
    if tracker:
        tracker.log_metrics(
            {f"{s}_{k}": v for s, m in results.items() for k, v in m.items()}, len(history)
        )
        tracker.log_artifact(out / "metrics.json")
    return metrics

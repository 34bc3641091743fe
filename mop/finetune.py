"""Fine-tuning on a downstream task, one loop for every task and method.

Tasks supply data, head kind and metric (see mop.tasks): single-label (softmax +
cross-entropy), multi-label (sigmoid + binary cross-entropy, threshold 0.5) and
multiple-choice (one score per option from the same head, softmax over the options).

Methods:
- `base`: the plain base model, everything trained;
- `adapter`: the base model with one pretrained partition adapter, everything trained;
- `mop`: the base model with all K pretrained adapters through a mixture layer
  (softmax AdapterFusion, Gumbel-softmax or sparse MoE), everything trained (paper 2.3);
- `oracle` (KG probe control): each example through its own partition's adapter only.

The loop (`finetune`, in the loop pretraining shares: mop.training.Loop): AdamW (weight decay 0.01
except bias/LayerNorm; separate learning rates for base model, adapters, fusion and head),
linear schedule with warmup, gradient accumulation and clipping, dev evaluation after every
epoch (one log line each), early stopping with patience, best-on-dev weights restored for
the test split. Checkpoints every `checkpoint_every` steps and at every epoch end; a killed
or requeued job resumes to the same result as an uninterrupted one.
Outputs: metrics.json, predictions.parquet (per example, for significance tests),
mixture.parquet (final-layer [CLS] mixture weights on test, for mop) and optionally the
best model as safetensors.
"""

from __future__ import annotations

import math
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

from mop.batching import sequential_batches
from mop.checkpoint import Checkpoint, file_digest, fingerprint, trainable_state
from mop.errors import MopError
from mop.fusion import MixtureConfig, add_mixture, mixture_aux_loss, mixtures, set_context
from mop.io import atomic_path, write_json, write_parquet
from mop.linking import read_links
from mop.log import log
from mop.models import ModelSpec, load_base_model, load_tokenizer
from mop.partition import fact_partitions, read_membership
from mop.runtime import Runtime, evaluating, seed_all
from mop.tasks import SPLITS, TaskSpec
from mop.tasks.encode import EncodedSplit, load_split
from mop.tracking import Tracker
from mop.training import Loop, LoopState, param_groups, share

POOLINGS = ("cls", "mean", "pooler")


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


@dataclass
class FinetuneState(LoopState):
    """The loop's state and early stopping's: the best dev score so far, its epoch and
    dev probabilities (the final dev metrics are that epoch's own), epochs without gain."""

    best_score: float = -math.inf
    best_epoch: int = -1
    best_dev: list | None = None
    stale: int = 0


def execution_keys(cfg: FinetuneConfig) -> tuple[str, ...]:
    """`EXECUTION_KEYS` for this run. MoE's balance losses are a CV^2 over a micro-batch's
    tokens, not linear in the batch, so for MoE `grad_accum` changes what is learned: it
    is part of what the run computes and a checkpoint resumes only under the same value."""
    if cfg.mixture.kind == "moe":
        return tuple(k for k in EXECUTION_KEYS if k != "grad_accum")
    return EXECUTION_KEYS


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
            raise MopError("finetune.pooling: pooler needs a base model with a pooler layer")
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = torch.nn.Dropout(dropout)
        hidden = encoder.config.hidden_size
        if head == "bilinear" and outputs != 2:
            raise MopError("finetune.head: bilinear scores yes/no tasks (two labels) only")
        self.head = BilinearHead(hidden) if head == "bilinear" else torch.nn.Linear(hidden, outputs)
        # The mixture layers (a plain list: they are registered under the encoder already).
        self.mixture_layers = mixtures(encoder)

    def pool(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor, Any]:
        out = self.encoder(**inputs, **kwargs)
        h = out.last_hidden_state
        if self.pooling == "cls":
            return h[:, 0], out
        if self.pooling == "pooler":
            return out.pooler_output, out
        m = inputs["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1), out

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
        if token_type_ids is not None:
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
    return param_groups(model, cfg.weight_decay, lrs, model_part)


def task_loss(task: TaskSpec, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over classes or options; binary cross-entropy per label for multi-label."""
    logits = logits.float()
    if task.kind == "multi":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    return torch.nn.functional.cross_entropy(logits.view(len(labels), -1), labels)


def scores_to_probs(task: TaskSpec, logits: torch.Tensor, n: int) -> torch.Tensor:
    """Per example: class probabilities, per-label probabilities, or option probabilities."""
    logits = logits.float().view(n, -1)
    return torch.sigmoid(logits) if task.kind == "multi" else torch.softmax(logits, -1)


def _inputs(split: EncodedSplit, idx: np.ndarray, pad_id: int, rt: Runtime) -> dict[str, Any]:
    """A batch of examples as model keyword arguments, on the runtime's device."""
    batch: dict[str, Any] = rt.batch(split.seqs.batch(split.rows(idx), pad_id))
    for name, value in split.extras(idx).items():
        batch[name] = rt.to_device(value) if isinstance(value, torch.Tensor) else value
    return batch


def batch_loss(
    model: Classifier,
    forward: Any,
    task: TaskSpec,
    split: EncodedSplit,
    micro: np.ndarray,
    batch: np.ndarray,
    cfg: FinetuneConfig,
    rt: Runtime,
    pad_id: int,
) -> torch.Tensor:
    """A micro-batch's part of its batch's training loss: the task's loss plus
    AdapterFusion's value regulariser (weighted by the micro-batch's share) and the
    mixture's auxiliary losses (MoE balance, routing: `mixture_aux_loss`).

    forward: what to call for the forward (the model, or its compiled form)."""
    part = share(micro, batch)
    with rt.forward_context():
        logits, _ = forward(**_inputs(split, micro, pad_id, rt))
    loss = task_loss(task, logits, rt.to_device(torch.from_numpy(split.labels[micro])))
    if cfg.mixture.fusion_reg and model.mixture_layers:
        reg = model.encoder.get_fusion_regularization_loss()
        if reg is not None:
            loss = loss + reg
    loss = loss * part
    if model.mixture_layers:
        linked = None if split.links is None else int((split.links[batch].sum(1) > 0).sum())
        aux = mixture_aux_loss(model, part, linked)
        if aux is not None:
            loss = loss + aux
    return loss


def predict(
    model: Classifier,
    task: TaskSpec,
    split: EncodedSplit,
    pad_id: int,
    batch_size: int,
    fusion_name: str | None = None,
    runtime: Runtime | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Probabilities per example and, with a fusion, two views of the mixture weights per
    sequence: the final layer's at [CLS] (Figure 4) and the mean over layers and real
    tokens (what the routing loss trains).

    Runs on the runtime's device under inference mode; only the outputs come back."""
    rt = runtime or Runtime(next(model.parameters()).device)
    width = split.choices if task.kind == "choice" else task.head_size
    probs = np.zeros((len(split), width), dtype=np.float32)
    mix = mean_mix = None
    batches = sequential_batches(len(split), batch_size, split.lengths)
    with evaluating(model):
        for idx in tqdm(batches, desc="evaluate", mininterval=5, leave=False):
            inputs = _inputs(split, idx, pad_id, rt)
            with rt.forward_context():
                logits, att = model(**inputs, output_mixture=fusion_name is not None)
            probs[idx] = scores_to_probs(task, logits, idx.size).cpu().numpy()
            if att is not None:
                layers = att[fusion_name]
                stacked = np.stack([layers[n]["output_adapter"] for n in sorted(layers)])
                if mix is None:
                    mix = np.zeros((len(split.seqs), stacked.shape[-1]), dtype=np.float32)
                    mean_mix = np.zeros_like(mix)
                rows = split.rows(idx)
                mix[rows] = stacked[-1][:, 0, :]
                real = inputs["attention_mask"].cpu().numpy().astype(np.float32)[..., None]
                per_token = stacked.mean(0)
                mean_mix[rows] = (per_token * real).sum(1) / np.maximum(real.sum(1), 1.0)
    if not np.isfinite(probs).all():
        bad = int((~np.isfinite(probs)).any(1).sum())
        raise MopError(
            f"predict: {bad} of {len(split)} examples got non-finite probabilities (the "
            "model's weights or inputs hold NaN or infinity); no metrics are written"
        )
    return probs, mix, mean_mix


def routing_diagnostics(
    split: EncodedSplit, mean_mix: np.ndarray, links: np.ndarray | None
) -> dict[str, float]:
    """How the mixture routes: the mean entropy (nats) of each input's weights and, where
    known, the share of inputs whose largest weight falls on the linked partition (of
    linked inputs) or on the true one (the KG probe: the partition of the run's own
    partitioning that holds the question's fact, over the facts it did not cut, with the
    share of those in `facts_inside`)."""
    w = mean_mix.reshape(len(split), split.choices, -1).mean(1)
    out = {"mixture_entropy": float(-(w * np.log(np.clip(w, 1e-12, None))).sum(1).mean())}
    top = w.argmax(1)
    if links is not None and (linked := links.sum(1) > 0).any():
        out["routing_linked"] = float((top[linked] == links[linked].argmax(1)).mean())
    if "partition" in split.frame.columns:
        true = split.frame["partition"].to_numpy()
        inside = true >= 0  # facts the run's partitioning cut have no true partition
        out["facts_inside"] = float(inside.mean())
        if inside.any():
            out["routing_true"] = float((top[inside] == true[inside]).mean())
    return out


def linking_diagnostics(task: TaskSpec, split: EncodedSplit, frame: pl.DataFrame) -> dict:
    """What a routed run's links were worth on this split: the share of inputs linked, how
    often the top link is the true partition (KG probe, facts inside), and the task's
    metric on the linked and the unlinked inputs apart (where linking fails, a link prior
    has nothing to add)."""
    linked = split.links.sum(1) > 0
    out: dict[str, float] = {"linked_share": float(linked.mean())}
    if "partition" in split.frame.columns:
        true = split.frame["partition"].to_numpy()
        judged = linked & (true >= 0)
        if judged.any():
            out["top_link_true"] = float((split.links[judged].argmax(1) == true[judged]).mean())
    for name, rows in (("linked", linked), ("unlinked", ~linked)):
        if rows.any():
            out[f"{name}_{task.main_metric}"] = task.metric(frame.filter(pl.Series(rows)))[
                task.main_metric
            ]
    return out


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


def mixture_frame(split: EncodedSplit, mix: np.ndarray, mean_mix: np.ndarray) -> pl.DataFrame:
    """One row per sequence: example id (and option index for choice tasks), final-layer
    [CLS] weights, weights averaged over layers and tokens, the linked partition (argmax
    of the links, -1 where unlinked or unknown), the true one where the task knows it (KG
    probe) and the text."""
    linked = np.full(len(split), -1, dtype=np.int32)
    if split.links is not None:
        has = split.links.sum(1) > 0
        linked[has] = split.links[has].argmax(1)
    frame = pl.DataFrame(
        {
            "id": np.repeat(np.asarray(split.ids, dtype=object), split.choices).tolist(),
            "weights": pl.Series(mix.tolist(), dtype=pl.List(pl.Float32)),
            "mean_weights": pl.Series(mean_mix.tolist(), dtype=pl.List(pl.Float32)),
            "linked": np.repeat(linked, split.choices),
            "text": np.repeat(
                np.asarray(split.frame["text_a"].to_list(), dtype=object), split.choices
            ).tolist(),
        }
    )
    if "partition" in split.frame.columns:  # the KG probe: the question's own partition
        frame = frame.with_columns(
            partition=pl.Series(np.repeat(split.frame["partition"].to_numpy(), split.choices))
        )
    if split.choices > 1:
        frame = frame.with_columns(choice=pl.Series(np.tile(np.arange(split.choices), len(split))))
    return frame


def with_candidates(
    spec: ModelSpec,
    tokenizer: Any,
    data: dict[str, EncodedSplit],
    task_dir: str | Path,
    runtime: Runtime | None = None,
    centre: torch.Tensor | None = None,
    encoder: torch.nn.Module | None = None,
) -> tuple[dict[str, EncodedSplit], torch.Tensor]:
    """Attach each example's candidate vector: the frozen base encoder's [CLS] vector of
    its `candidate` text, centred (on the mean over all distinct candidates, or on a given
    `centre`: an exported model's) and of unit length. Returns the data and the centre.

    encoder: the frozen base encoder, if the caller keeps one (default: load it)."""
    from mop.vectors import centred, raw_name_vectors

    for s, split in data.items():
        if "candidate" not in split.frame.columns:
            raise MopError(
                f"{Path(task_dir) / f'{s}.parquet'}: the bilinear head needs a "
                "candidate column (probe: format pair)"
            )
    names = sorted({c for split in data.values() for c in split.frame["candidate"].to_list()})
    raw = raw_name_vectors(encoder or load_base_model(spec), tokenizer, names, runtime=runtime)
    if centre is None:
        centre = raw.mean(0, keepdim=True)
    vectors = centred(raw, centre)
    index = {n: i for i, n in enumerate(names)}
    out = {
        s: replace(split, candidates=vectors[[index[c] for c in split.frame["candidate"]]])
        for s, split in data.items()
    }
    return out, centre


def with_routes(
    data: dict[str, EncodedSplit], task_dir: str | Path, adapters_given: int
) -> dict[str, EncodedSplit]:
    """The oracle routes each example to the adapter of its `partition` column: the one
    trained on the question's fact; where the partitioning cut the fact (-1), to the
    adapter of its head entity (`head_partition`), the one that knows the head's facts."""
    out = {}
    for s, split in data.items():
        if "partition" not in split.frame.columns:
            raise MopError(
                f"{Path(task_dir) / f'{s}.parquet'}: the oracle needs a partition "
                "column (only the KG probe has one)"
            )
        route = split.frame["partition"].to_numpy()
        if "head_partition" in split.frame.columns:
            route = np.where(route >= 0, route, split.frame["head_partition"].to_numpy())
        if route.min() < 0 or route.max() >= adapters_given:
            raise MopError(
                f"{Path(task_dir) / f'{s}.parquet'}: partitions {route.min()}..{route.max()} "
                f"but {adapters_given} adapters given"
            )
        out[s] = replace(split, route=route)
    return out


def with_fact_partitions(
    task: TaskSpec, data: dict[str, EncodedSplit], partition_dir: str | Path
) -> dict[str, EncodedSplit]:
    """Replace a KG probe's `partition` column (its facts' partitions where the probe was
    built) by the partitions of the run's own partitioning (-1 where it cut the fact),
    and add its head entity's partition: a run at another K is routed and judged by the
    partitions its adapters were trained on."""
    if not task.facts:
        return data
    membership = read_membership(partition_dir)
    head, tail = task.facts
    out = {}
    for s, split in data.items():
        heads, tails = split.frame[head].to_numpy(), split.frame[tail].to_numpy()
        frame = split.frame.with_columns(
            partition=pl.Series(fact_partitions(heads, tails, membership)),
            head_partition=pl.Series(membership[heads].astype(np.int32)),
        )
        out[s] = replace(split, frame=frame)
    return out


def load_data(
    spec: ModelSpec,
    task: TaskSpec,
    task_dir: str | Path,
    method: str,
    adapters_given: int,
    cfg: FinetuneConfig,
    tokenizer: Any,
    encoded_dir: str | Path | None = None,
    runtime: Runtime | None = None,
    links: str | Path | None = None,
    partition_dir: str | Path | None = None,
) -> dict[str, EncodedSplit]:
    """The three splits with their tokens, labels checked, plus routes (oracle) and linked
    partitions (`mop link`'s links.parquet, for routed mixtures) where the run uses them;
    `partition_dir`: the run's partitioning, for tasks that know their facts (KG probe)."""
    data = {}
    for s in SPLITS:
        data[s] = load_split(
            task_dir,
            s,
            task.kind,
            encoded_dir=encoded_dir,
            tokenizer=tokenizer,
            max_length=cfg.max_length,
        )
        check_labels(task, data[s], Path(task_dir) / f"{s}.parquet")
    if partition_dir is not None:
        data = with_fact_partitions(task, data, partition_dir)
    if method == "oracle":
        data = with_routes(data, task_dir, adapters_given)
    if links is not None:
        data = {
            s: replace(
                split,
                links=read_links(links, split.ids, adapters_given, cfg.mixture.router),
            )
            for s, split in data.items()
        }
    return data


def run_fingerprint(
    spec: ModelSpec,
    method: str,
    adapter_dirs: list[Path],
    data: dict[str, EncodedSplit],
    cfg: FinetuneConfig,
) -> str:
    """What a checkpoint must match to be resumed: settings that change the result, the
    model, the adapters' bytes and the data."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in execution_keys(cfg)}
    parts: list[Any] = [method, spec.identifier()]
    for d in adapter_dirs:
        parts += [file_digest(f) for f in sorted(Path(d).iterdir()) if f.is_file()]
    for split in data.values():
        parts += [split.seqs.values, split.seqs.offsets, split.labels]
        if split.seqs.types is not None:
            parts.append(split.seqs.types)
        if split.links is not None:
            parts.append(split.links)
    return fingerprint(settings, *parts)


@dataclass
class DevSelection:
    """The loop's after-epoch hook: evaluate on dev, log and track the epoch, keep the
    best weights (`best`, checkpointed as the kept state), stop once `patience` epochs
    in a row bring no gain."""

    model: Classifier
    task: TaskSpec
    dev: EncodedSplit
    cfg: FinetuneConfig
    pad_id: int
    rt: Runtime
    name: str
    tracker: Tracker | None = None
    best: dict[str, torch.Tensor] | None = None

    def kept(self, state: FinetuneState) -> tuple[int, dict[str, torch.Tensor] | None]:
        return state.best_epoch, self.best

    def __call__(self, state: FinetuneState, train_loss: float) -> bool:
        task, cfg = self.task, self.cfg
        probs, _, _ = predict(
            self.model, task, self.dev, self.pad_id, cfg.eval_batch_size, runtime=self.rt
        )
        dev_metrics, _ = evaluate(task, self.dev, probs)
        entry = {
            "epoch": state.epoch,
            "step": state.step,
            "train_loss": train_loss,
            **{f"dev_{k}": v for k, v in dev_metrics.items()},
        }
        state.history.append(entry)
        improved = dev_metrics[task.main_metric] > state.best_score
        if improved:
            state.best_score, state.best_epoch = dev_metrics[task.main_metric], state.epoch
            state.best_dev, state.stale = probs.tolist(), 0
            self.best = trainable_state(self.model)
        else:
            state.stale += 1
        speed = state.examples_per_s
        log(
            f"finetune {self.name} epoch {state.epoch + 1}/{cfg.epochs}: train loss "
            f"{train_loss:.4f}, "
            + ", ".join(f"dev {k} {v:.4f}" for k, v in dev_metrics.items())
            + f"{' (best)' if improved else ''}, {speed:.1f} examples/s"
        )
        if self.tracker:
            metrics = {k: v for k, v in entry.items() if k != "epoch"}
            self.tracker.log_metrics(metrics | {"examples_per_s": speed}, state.epoch)
        return state.stale >= cfg.patience


@dataclass
class FinetuneResult:
    """What a run produced. `save` writes it with metrics.json last, so a folder that has
    metrics is complete; the model (best weights) and its record only with save_model."""

    metrics: dict[str, Any]
    predictions: pl.DataFrame  # per example and split, for significance tests
    mixture: pl.DataFrame | None  # MoP: the test split's mixture weights
    model: Classifier | None
    record: dict[str, Any]

    def save(self, out: Path) -> None:
        write_parquet(self.predictions, out / "predictions.parquet")
        if self.mixture is not None:
            write_parquet(self.mixture, out / "mixture.parquet")
        if self.model is not None:
            self.model.cpu()
            with atomic_path(out / "model.safetensors") as tmp:
                save_model(self.model, str(tmp))
            write_json(self.record, out / "model.json")
        write_json(self.metrics, out / "metrics.json")


def final_evaluation(
    model: Classifier,
    task: TaskSpec,
    data: dict[str, EncodedSplit],
    state: FinetuneState,
    cfg: FinetuneConfig,
    pad_id: int,
    fusion_name: str | None,
    rt: Runtime,
) -> tuple[dict[str, dict], list[pl.DataFrame], pl.DataFrame | None]:
    """Each split's metrics and per-example frame under the best weights, and the test
    split's mixture weights (MoP runs); dev is the best epoch's own pass, not a new one."""
    results: dict[str, dict] = {}
    frames, mixture = [], None
    for s in SPLITS:
        if s == "train" and not cfg.eval_train:
            continue
        if s == "dev":
            probs, mix, mean_mix = np.asarray(state.best_dev, dtype=np.float32), None, None
        else:
            fusion = fusion_name if s == "test" else None
            probs, mix, mean_mix = predict(
                model, task, data[s], pad_id, cfg.eval_batch_size, fusion, rt
            )
        metrics, frame = evaluate(task, data[s], probs)
        if mix is not None:
            mixture = mixture_frame(data[s], mix, mean_mix)
            metrics |= routing_diagnostics(data[s], mean_mix, data[s].links)
        if data[s].links is not None:
            metrics |= linking_diagnostics(task, data[s], frame)
        results[s] = metrics
        frames.append(frame.with_columns(split=pl.lit(s)))
    return results, frames, mixture


def finetune(
    spec: ModelSpec,
    task: TaskSpec,
    task_dir: str | Path,
    method: str,
    adapter_dirs: list[Path],
    cfg: FinetuneConfig,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    runtime: Runtime | None = None,
    encoded_dir: str | Path | None = None,
    links: str | Path | None = None,
    partition_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train on train, select on dev, report test; write every output of the run.

    links: `mop link`'s links.parquet for this task and partitioning; routed mixtures
    need it (and other runs ignore it). partition_dir: the partitioning the adapters were
    trained on, for a task that knows its facts (the KG probe's oracle and diagnostics)."""
    out = Path(out_dir)
    rt = runtime or Runtime.create("cpu")
    seed_all(cfg.seed)
    routed = method == "mop" and cfg.mixture.needs_links
    if routed and links is None:
        raise MopError(f"finetune {out}: a routed mixture needs the task's links (--links)")
    tokenizer = load_tokenizer(spec)
    pad_id = tokenizer.pad_token_id
    data = load_data(
        spec,
        task,
        task_dir,
        method,
        len(adapter_dirs),
        cfg,
        tokenizer,
        encoded_dir,
        rt,
        links if routed else None,
        partition_dir if adapter_dirs else None,
    )
    centre = None
    if cfg.head == "bilinear":
        data, centre = with_candidates(spec, tokenizer, data, task_dir, rt)
    model, fusion_name = build_classifier(spec, task, method, adapter_dirs, cfg)
    if centre is not None:
        model.head.centre.copy_(centre)
    forward = rt.prepare(model)
    train = data["train"]
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = rt.optimizer(_param_groups(model, cfg))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup * total), total)

    def loss_of(micro: np.ndarray, batch: np.ndarray) -> torch.Tensor:
        return batch_loss(model, forward, task, train, micro, batch, cfg, rt, pad_id)

    selection = DevSelection(model, task, data["dev"], cfg, pad_id, rt, out.name, tracker)
    loop = Loop(
        f"finetune {out}",
        model,
        optimizer,
        scheduler,
        Checkpoint(out / "checkpoint", run_fingerprint(spec, method, adapter_dirs, data, cfg)),
        loss_of,
        train.lengths,
        cfg.batch_size,
        cfg.seed,
        cfg.epochs,
        total,
        grad_accum=cfg.grad_accum,
        max_grad_norm=cfg.max_grad_norm,
        checkpoint_every=cfg.checkpoint_every,
        after_epoch=selection,
        kept=selection.kept,
    )
    state, selection.best = loop.resume(FinetuneState())
    state = loop.run(state)

    history = state.history
    if selection.best is None:
        raise MopError(f"finetune {out}: no epoch was evaluated (epochs = {cfg.epochs})")
    model.load_state_dict(selection.best, strict=False)
    results, frames, mixture = final_evaluation(
        model, task, data, state, cfg, pad_id, fusion_name, rt
    )
    metrics = {
        "task": task.name,
        "method": method,
        "seed": cfg.seed,
        "main_metric": task.main_metric,
        "best_epoch": state.best_epoch,
        "epochs_run": len(history),
        "steps": state.step,
        "examples_per_s": state.examples_per_s,
        "train_seconds": state.seconds,
        **{f"{s}_{k}": v for s, m in results.items() for k, v in m.items()},
        "history": history,
        "config": asdict(cfg),
        "runtime": rt.describe() | {"peak_memory_mb": rt.peak_memory_mb()},
    }
    record = {  # what `mop export` needs to rebuild the model around its weights
        "task": task.name,
        "method": method,
        "model": asdict(spec),
        "adapters": [str(Path(d).resolve()) for d in adapter_dirs],
        "finetune": asdict(cfg),
        "links": str(Path(links).resolve()) if routed and links is not None else None,
    }
    result = FinetuneResult(
        metrics, pl.concat(frames), mixture, model if cfg.save_model else None, record
    )
    result.save(out)
    loop.checkpoint.remove()
    if tracker:
        tracker.log_metrics(
            {f"{s}_{k}": v for s, m in results.items() for k, v in m.items()}, len(history)
        )
        tracker.log_artifact(out / "metrics.json")
    return metrics

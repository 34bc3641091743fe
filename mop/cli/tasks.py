"""`mop task` (a task's splits as Parquet), `mop pubmedqa-folds`, `mop encode` (tokens) and
`mop link` (the KG partitions each input names)."""

from __future__ import annotations

import argparse

from mop.cli.common import add_model, add_options, add_out, model_spec
from mop.log import log


def cmd_task(args: argparse.Namespace) -> None:
    from mop.plan import Run

    task = Run.parse(args.out).task
    if task != "probe":
        from mop.tasks import prepare_data

        summary = prepare_data(task, args.options, args.out)
        log(f"task {task}: {summary.get('examples')} examples -> {args.out}")
        return
    from mop.tasks.probe import prepare

    o = {k: v for k, v in args.options.items() if k not in ("kg", "k", "inside_at")}
    if "shares" in o:
        o["shares"] = tuple(o["shares"])
    summary = prepare(args.kg, args.partition, args.out, inside_at=args.inside_at, **o)
    log(f"task probe: {summary['examples']} questions -> {args.out}")


def cmd_pubmedqa_folds(args: argparse.Namespace) -> None:
    from mop.tasks.pubmedqa import write_official_split

    sizes = write_official_split(args.ori_pqal, args.out, seed=args.seed)
    log(f"pubmedqa: test {sizes['test']}, folds train {sizes['train']} dev {sizes['dev']}")


def cmd_encode(args: argparse.Namespace) -> None:
    from mop.plan import Run
    from mop.tasks import get_task
    from mop.tasks.encode import write_encoding

    run = Run.parse(args.out)
    spec = model_spec(args, run.tokenizer)
    record = write_encoding(args.task_dir, get_task(run.task).kind, spec, run.length, args.out)
    tokens = sum(e["tokens"] for e in record["splits"].values())
    log(
        f"encoded {run.task} ({len(record['splits'])} splits, {tokens} tokens, "
        f"max_length {run.length}) for {run.tokenizer} -> {args.out}"
    )


def cmd_link(args: argparse.Namespace) -> None:
    from mop.config import with_defaults
    from mop.linking import run_link
    from mop.plan import Run
    from mop.tasks import get_task

    options = with_defaults("linking", args.options)
    summary = run_link(
        args.task_dir,
        args.kg,
        args.partition,
        args.out,
        min_chars=options["min_chars"],
        facts=get_task(Run.parse(args.task_dir).task).facts,
        bm25_temperature=options["bm25_temperature"],
    )
    for split, c in summary["splits"].items():
        log(
            f"link {split}: {c['linked_share']:.1%} of {c['inputs']} inputs linked, "
            f"{c['entities_per_input']:.2f} entities per input"
            + (
                f", largest weight on the true partition {c['top_is_true_partition']:.1%}"
                if "top_is_true_partition" in c
                else ""
            )
            + f"; BM25 router: {c['bm25_linked_share']:.1%} routed"
            + (
                f", largest weight on the true partition {c['bm25_top_is_true_partition']:.1%}"
                if "bm25_top_is_true_partition" in c
                else ""
            )
        )


def cmd_download(args: argparse.Namespace) -> None:
    from mop.download import download

    out = download(args.url, args.sha256, args.out)
    log(f"downloaded {args.url} -> {out} (SHA-256 checked)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="fetch a dataset file, checked against its SHA-256")
    p.add_argument("--url", required=True)
    p.add_argument("--sha256", required=True, help="the expected digest (hex)")
    p.add_argument("--out", required=True, help="where the file goes (only if it matches)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("link", help="link a task's inputs to KG entities and their partitions")
    p.add_argument("--task-dir", required=True, help="the prepared task")
    p.add_argument("--kg", required=True, help="the KG folder")
    p.add_argument("--partition", required=True, help="the partition folder")
    add_options(p, "min_chars (the linking section)")
    add_out(p, "results/links/<task>/<kg>/k<K>-<scheme>")
    p.set_defaults(func=cmd_link)

    p = sub.add_parser("task", help="prepare a task's splits as Parquet")
    p.add_argument("--kg", help="the KG folder (KG probe)")
    p.add_argument("--partition", help="the partition folder (KG probe)")
    p.add_argument(
        "--inside-at",
        nargs="*",
        default=[],
        help="other partition folders: keep only facts inside one partition in each (KG probe)",
    )
    add_options(p, "the tasks.<task> section without finetune and controls")
    add_out(p, "results/tasks/<task>")
    p.set_defaults(func=cmd_task)

    p = sub.add_parser(
        "pubmedqa-folds",
        help="write PubMedQA's official test set and 10 folds from ori_pqal.json",
    )
    p.add_argument("ori_pqal")
    p.add_argument("--out", required=True, help="folder for test_set.json and pqal_fold*/")
    p.add_argument("--seed", type=int, default=0, help="the official recipe's seed is 0")
    p.set_defaults(func=cmd_pubmedqa_folds)

    p = sub.add_parser(
        "encode", help="tokenize a prepared task's splits once per tokenizer and max_length"
    )
    p.add_argument("--task-dir", required=True, help="the prepared task (its folds too)")
    add_model(p)
    add_out(p, "results/encoded/<task>/<tokenizer>/len<max_length>")
    p.set_defaults(func=cmd_encode)

"""`mop select-subsets` (rank the adapters, choose subsets) and `mop topics`."""

from __future__ import annotations

import argparse

from mop.cli.common import add_options, as_json
from mop.log import log


def cmd_select_subsets(args: argparse.Namespace) -> None:
    from mop.plan import Run
    from mop.report.runs import load_runs
    from mop.subsets import write_selection

    k = Run.parse(args.out).k
    runs = load_runs(args.runs or [])
    record = write_selection(runs, args.subsets, k, args.out, args.rank_by)
    log(
        "subsets: "
        + "; ".join(f"{n} {s['partitions']}" for n, s in record["subsets"].items())
        + f" -> {args.out}"
    )


def cmd_topics(args: argparse.Namespace) -> None:
    from mop.config import with_defaults
    from mop.topics import run_topics

    o = with_defaults("analysis.topics", args.options)
    info = run_topics(
        args.kg, args.partition, args.out, groups=o["groups"], terms=o["terms"], seed=o["seed"]
    )
    log(
        f"topics: {info['partitions']} partitions in {info['groups']} groups, "
        f"{info['vocabulary']} terms -> {args.out}"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select-subsets",
        help="rank adapters by their single-adapter runs and write the subsets for MoP",
    )
    p.add_argument("--runs", nargs="*", help="metrics.json of the single-adapter runs")
    p.add_argument("--subsets", type=as_json, required=True, help="the analysis.subsets section")
    p.add_argument("--rank-by", default="dev", choices=["train", "dev", "test"])
    p.add_argument(
        "--out", required=True, help="results/analysis/<task>/<model>/<kg>/k<K>-metis/subsets.json"
    )
    p.set_defaults(func=cmd_select_subsets)

    p = sub.add_parser("topics", help="TF-IDF terms and k-means groups of the partitions")
    p.add_argument("--kg", required=True, help="a KG folder")
    p.add_argument("--partition", required=True, help="a partition folder of that KG")
    add_options(p, "groups, terms, seed (the analysis.topics section)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_topics)

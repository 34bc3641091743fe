"""`mop partition`: METIS (or a controlled shuffle of it) into K sub-graphs."""

from __future__ import annotations

import argparse

from mop.cli.common import add_options, add_out
from mop.log import log


def cmd_partition(args: argparse.Namespace) -> None:
    from mop.config import with_defaults
    from mop.partition import run_partition
    from mop.plan import Run, scheme_rate

    run = Run.parse(args.out)
    o = with_defaults("partition", args.options)
    stats = run_partition(
        args.kg,
        args.out,
        run.k,
        seed=o["seed"],
        ufactor=o["ufactor"],
        weighted=o["weighted"],
        recursive=o["recursive"],
        shuffle=scheme_rate(run.scheme),
        given=args.given,
    )
    log(
        f"partition K={run.k} {run.scheme}: {stats['triples_retained']} of "
        f"{stats['triples']} triples kept ({stats['triples_retained_share']:.1%}) -> {args.out}"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("partition", help="METIS K-way partition of a KG")
    p.add_argument("--kg", required=True, help="the KG folder")
    add_options(p, "the partition section without k and shuffle")
    p.add_argument("--given", help="an OpenKE folder whose partition_<K>.txt replaces METIS")
    add_out(p, "results/partition/<kg>/k<K>-<metis|shuffle<rate>>")
    p.set_defaults(func=cmd_partition)

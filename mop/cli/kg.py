"""`mop kg` (extract a knowledge graph) and `mop export-openke`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mop.cli.common import add_experiment, add_options, add_out, tracker
from mop.log import log


def cmd_kg(args: argparse.Namespace) -> None:
    from mop.kg import RELATION_FREQUENCY, write_kg
    from mop.kg.sources import build_kg
    from mop.plan import Run

    name = Run.parse(args.out).kg
    kg, meta = build_kg(args.options, f"kgs.{name}")
    stats = write_kg(kg, args.out, meta)
    log(
        f"kg {name}: {stats['entities']} entities, {stats['relations']} relations, "
        f"{stats['triples']} triples -> {args.out}"
    )
    run = tracker(args, {"kg": args.options})
    run.log_metrics({k: stats[k] for k in ("entities", "relations", "triples")})
    run.log_artifact(Path(args.out) / RELATION_FREQUENCY)
    run.log_artifact(Path(args.out) / "stats.json")
    run.finish()


def cmd_export_openke(args: argparse.Namespace) -> None:
    from mop.kg.openke import export_openke

    written = export_openke(args.kg, args.out, args.partition)
    log(f"OpenKE files for {args.kg} ({written['triples']} triples) -> {args.out}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kg", help="extract a knowledge graph into Parquet tables")
    add_options(p, "the kgs.<name> section")
    add_out(p, "the KG folder, results/kg/<name>")
    add_experiment(p)
    p.set_defaults(func=cmd_kg)

    p = sub.add_parser(
        "export-openke", help="write a KG and its partitions in the authors' OpenKE format"
    )
    p.add_argument("--kg", required=True, help="a KG folder")
    p.add_argument("--partition", nargs="*", default=[], help="partition folders of that KG")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_openke)

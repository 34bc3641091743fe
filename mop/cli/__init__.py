"""The `mop` command line: one subcommand per workflow stage, each a thin shell over `mop.*`.

Snakemake rules call these; a user can too. A run's identity (task, model, method,
mixture, KG, K, scheme, partition, seed) is read from its `--out` folder through the
results grammar (mop.plan), so a command is given where to write, the files it reads and
its options (one JSON object, `--options`: exactly the config keys that job reads, so
Snakemake reruns it when, and only when, one of them changes). Where training runs
(`--device`, `--precision`, `--compile`) and the MLflow experiment come from flags or from
the environment the workflow sets (MOP_DEVICE, MOP_PRECISION, MOP_COMPILE,
MOP_EXPERIMENT), never from params.

Each module of this package holds its subcommands' parsers next to their commands.
"""

from __future__ import annotations

import argparse
import sys
import time

from mop.cli import (
    analysis,
    export,
    finetune,
    kg,
    partition,
    plan,
    pretrain,
    report,
    tasks,
    tracking,
)
from mop.errors import MopError, Preempted
from mop.log import log

MODULES = (plan, kg, partition, pretrain, tasks, finetune, analysis, report, tracking, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    label = " ".join(x for x in (args.command, getattr(args, "what", None)) if x)
    start = time.perf_counter()
    log(f"start {label}")
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
    log(f"done {label} in {time.perf_counter() - start:.1f} s")
    return 0

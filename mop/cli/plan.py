"""`mop check-config` (the pre-flight checks) and `mop plan --estimate` (what a config costs)."""

from __future__ import annotations

import argparse
import json


def cmd_check_config(args: argparse.Namespace) -> None:
    from mop.config import load_config, preflight

    config = load_config(*args.configfile)
    preflight(config)
    print(f"config OK: {', '.join(map(str, args.configfile))}")


def cmd_plan(args: argparse.Namespace) -> None:
    from mop.estimate import plan, render

    est, card, mfu, source = plan(args.estimate, args.workdir, args.gpu, args.mfu, args.benchmark)
    if args.json:
        print(json.dumps(est.as_dict(card, mfu) | {"mfu_source": source}, indent=2))
    else:
        print(render(est, card, mfu, source))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-config", help="validate config files and run the pre-flight checks")
    p.add_argument("configfile", nargs="+")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "plan", help="jobs per stage and the GPU-hours a config needs, before anything runs"
    )
    p.add_argument("--estimate", required=True, metavar="CONFIG", help="a workflow config")
    p.add_argument("--workdir", default=".", help="where the workflow would run")
    p.add_argument("--gpu", default="a100", help="card: h100, h200, a100, l40s, a10, l4, ...")
    p.add_argument("--mfu", type=float, help="model FLOPs utilisation to assume (0-1)")
    p.add_argument("--benchmark", help="output of benchmarks/finetune_gpu.py (its peak_mfu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plan)

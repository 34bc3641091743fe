"""`mop report NAME` (one table or figure of the registry), `mop report docs` (every table
as a snippet for the docs) and `mop publish` (MLflow)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mop.log import log


def cmd_report(args: argparse.Namespace) -> None:
    from mop.errors import MopError
    from mop.report.registry import REPORTS

    if args.what == "docs":
        from mop.report.docs import docs_tables

        if not args.config:
            raise MopError("mop report docs: needs --config (the run's config files)")
        paths = docs_tables(args.config, args.results, args.out)
        log(f"report docs: {len(paths)} tables in {args.out}")
        return
    report = REPORTS[args.what]
    files = {name: list(getattr(args, name) or []) for name in report.args}
    missing = [f"--{name}" for name, paths in files.items() if not paths and name != "single"]
    if missing:
        raise MopError(f"mop report {args.what}: needs {', '.join(missing)}")
    paths = report.build(files, Path(args.out))
    log(f"report {args.what}: {', '.join(str(p) for p in paths)}")


def cmd_publish(args: argparse.Namespace) -> None:
    """Log the tables and figures as a report run, then sync every run record to MLflow."""
    from mop.tracking import (
        EXPERIMENT_ENV,
        Tracker,
        default_tracking_uri,
        log_models_wanted,
        sync_all,
    )

    results = Path(args.results)
    tracker = Tracker(
        results / "report",
        experiment=args.experiment or os.environ.get(EXPERIMENT_ENV) or "mop",
        run_name="report",
        tags={"stage": "report"},
        params={},
        results_dir=results,
    )
    for path in args.artifacts:
        tracker.log_artifact(path)
    tracker.finish()
    uri = default_tracking_uri(results)
    try:
        counts = sync_all(results, uri)
        if log_models_wanted():
            from mop.serving import sync_models

            counts["models"] = sync_models(results, uri)
        log(f"MLflow ({uri}): {counts}")
    except Exception as exc:  # the tables are written; tracking can catch up later
        log(f"MLflow not reachable at {uri} ({exc}); run `mop track sync` later")


def register(sub: argparse._SubParsersAction) -> None:
    from mop.report.registry import INPUTS, REPORTS

    p = sub.add_parser("report", help="a table or figure of the paper from finished runs")
    p.add_argument(
        "what",
        choices=[*REPORTS, "docs"],
        help="the report (mop.report.registry), or docs: every table as a docs snippet",
    )
    for name in INPUTS:
        p.add_argument(f"--{name}", nargs="*", help=f"the {name} files it reads")
    p.add_argument("--config", nargs="+", help="docs: the run's config files")
    p.add_argument("--results", help="docs: the results folder (default: the config's)")
    p.add_argument("--out", required=True, help="output path without suffix (docs: a folder)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("publish", help="log tables and figures as a report run; sync MLflow")
    p.add_argument("--results", default="results")
    p.add_argument("--experiment", help="MLflow experiment (default: $MOP_EXPERIMENT or mop)")
    p.add_argument("--artifacts", nargs="*", default=[])
    p.set_defaults(func=cmd_publish)

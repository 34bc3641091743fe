"""`mop track sync` (log what MLflow misses) and `mop ui` (the MLflow UI on 127.0.0.1)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def cmd_track(args: argparse.Namespace) -> None:
    from mop.tracking import default_tracking_uri, log_models_wanted, sync_all

    uri = args.uri or default_tracking_uri(args.results)
    counts = sync_all(args.results, uri)
    if log_models_wanted(args.log_models):
        from mop.serving import sync_models

        counts["models"] = sync_models(Path(args.results), uri)
    print(f"{uri}: {counts}")


def cmd_ui(args: argparse.Namespace) -> None:
    """Start MLflow through this interpreter (`python -m mlflow`), so `.venv/bin/mop ui`
    works without an activated venv."""
    from mop.tracking import default_tracking_uri

    uri = default_tracking_uri(args.results)
    cmd = [
        sys.executable,
        "-m",
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
    os.execv(cmd[0], cmd)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("track", help="log run records that MLflow does not hold yet")
    p.add_argument("action", choices=["sync"])
    p.add_argument("--results", default="results")
    p.add_argument("--uri")
    p.add_argument(
        "--log-models",
        action="store_true",
        default=None,
        help="also export and register the fine-tuned models (default: $MOP_LOG_MODELS=1)",
    )
    p.set_defaults(func=cmd_track)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the local store")
    p.add_argument("--results", default="results")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

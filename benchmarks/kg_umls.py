"""Benchmark: SFull and S20Rel from a synthetic UMLS release with 10 million MRREL rows.

Target (issue 3): extracting both graphs takes at most 60 s wall and 4 GB peak RSS on
2 cores. The release is generated first (format-exact, seeded; see mop.kg.synthetic),
then each graph is built the way the workflow's `kg` job builds it (`build_kg` +
`write_kg`, with every file checked line by line) in its own process pinned to `--cores`
CPUs, so its peak RSS is its own. The last line printed is one JSON object.

    python benchmarks/kg_umls.py                      # 10M rows, 350k concepts, 2 cores
    python benchmarks/kg_umls.py --rows 1000000 --keep --workdir /tmp/umls-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SFULL = {"source": "umls", "top_relations": None}
S20REL = {"source": "umls", "top_relations": 20, "relation_names": "rela"}


def extract_one(name: str, options: dict, out: Path) -> dict:
    """Build and write one graph in this process; return its timing, RSS and size."""
    from mop.kg import write_kg
    from mop.kg.sources import build_kg

    start = time.perf_counter()
    kg, meta = build_kg(options, f"kgs.{name}")
    stats = write_kg(kg, out, meta)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "name": name,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "entities": stats["entities"],
        "relations": stats["relations"],
        "triples": stats["triples"],
        "relation_names": sorted(kg.relations["name"].to_list()),
    }


def run_child(name: str, options: dict, out: Path, cores: int) -> dict:
    env = dict(os.environ, POLARS_MAX_THREADS=str(cores))
    cmd = [sys.executable, __file__, "--extract-one", name, json.dumps(options), str(out)]
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    result = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="MRREL lines")
    parser.add_argument("--concepts", type=int, default=350_000, help="SNOMED CT concepts")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where the release goes (default: a tmp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the release and the graphs")
    parser.add_argument(
        "--extract-one", nargs=3, metavar=("NAME", "OPTIONS", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--smoke", action="store_true", help="20,000 MRREL rows: seconds")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.concepts = 20_000, 2_000
    if args.extract_one:
        name, options, out = args.extract_one
        print(json.dumps(extract_one(name, json.loads(options), Path(out))))
        return

    from mop.kg.synthetic import write_umls_release
    from mop.kg.umls import PAPER_S20REL

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kg-umls-bench-")
        args.workdir = Path(tmp.name)
    release_dir = args.workdir / "release"
    start = time.perf_counter()
    release = write_umls_release(
        release_dir, concepts=args.concepts, mrrel_rows=args.rows, seed=args.seed
    )
    generate_s = time.perf_counter() - start
    mrrel_bytes = (release_dir / "META" / "MRREL.RRF").stat().st_size
    graphs = {}
    for name, options in (("sfull", SFULL), ("s20rel", S20REL)):
        graphs[name] = run_child(
            name, options | {"path": str(release_dir)}, args.workdir / "kg" / name, args.cores
        )
    extract_s = sum(g["seconds"] for g in graphs.values())
    peak = max(g["peak_rss_mb"] for g in graphs.values())
    s20_names = graphs["s20rel"].pop("relation_names")
    graphs["sfull"].pop("relation_names")
    result = {
        "benchmark": "kg_umls",
        "smoke": args.smoke,
        "mrrel_rows": release.mrrel_rows,
        "mrrel_mb": round(mrrel_bytes / 2**20, 1),
        "mrconso_rows": release.mrconso_rows,
        "cores": args.cores,
        "generate_seconds": round(generate_s, 2),
        "seconds": round(extract_s, 2),
        "cpu_seconds": round(sum(g["cpu_seconds"] for g in graphs.values()), 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "peak_rss_mb": peak,
        "rows_per_second": round(2 * release.mrrel_rows / extract_s),
        "sfull": graphs["sfull"],
        "s20rel": graphs["s20rel"],
        "s20rel_is_the_papers_list": s20_names == sorted(PAPER_S20REL),
        "target_met": extract_s <= 60 and peak <= 4096,
    }
    if tmp is not None and not args.keep:
        tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()

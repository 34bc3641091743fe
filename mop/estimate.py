"""What a config costs before it runs: jobs per stage and the GPU-hours of training.

`mop plan --estimate CONFIG` asks Snakemake for the jobs a config would run (a dry run:
no data needed; missing inputs are listed as warnings), then sizes every training job:

- tokens it trains on: examples x epochs x tokens per example. Examples and lengths come
  from what is already built when it is (a KG's stats, a partition's retained triples, a
  prepared task's summary, its tokens), else from published figures (the paper's Tables 2
  and 3 for the UMLS graphs; each task's official split sizes), else from a stated guess;
  every assumption is listed in the output.
- FLOPs per token, from the model's shape (its config.json, read offline, any encoder
  family; BERT-base when unknown), counted by `mop.flops` (the count the throughput
  benchmarks report their `mfu` with): the encoder, the K adapters, and MoP's fusion with
  its key and value projections on every adapter's output (at K = 20 a MoP run is 4.4
  times BERT-base per token), plus attention; 3 forwards per training step. Evaluation
  passes count one forward each.
- GPU-hours = FLOPs / (the card's dense bf16 peak, `mop.flops.GPU_PEAKS`, x model FLOPs
  utilisation). The utilisation comes from a measured benchmark JSON line when given
  (`benchmarks/finetune_gpu.py`, field `peak_mfu`: against the same data-sheet peak),
  else 0.30 (assumed, stated).

Training jobs stop early on dev (patience), so fine-tuning figures are upper bounds.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mop.errors import MopError
from mop.flops import Shape, gpu_peak_or_error, shape_from_config, train_flops_per_token

REPO = Path(__file__).resolve().parents[1]

DEFAULT_MFU = 0.30

# Published split sizes (train, dev, test) of the official data; one fold for PubMedQA.
OFFICIAL_SIZES = {
    "hoc": ((12119, 1798, 3547), "BLURB HoC sentences (1,295 / 186 / 371 abstracts)"),
    "pubmedqa": ((450, 50, 500), "PubMedQA PQA-L, one of the 10 folds"),
    "bioasq7b": ((670, 75, 140), "BLURB BioASQ 7b"),
    "bioasq8b": ((670, 75, 140), "assumed equal to BioASQ 7b (8b sizes not published here)"),
    "mednli": ((11232, 1395, 1422), "MedNLI"),
    "medqa": ((10178, 1272, 1273), "MedQA US, 4 options"),
}
# Typical tokens per sequence (BERT WordPiece) before truncation; guesses, stated as such.
TYPICAL_TOKENS = {
    "hoc": 40,
    "pubmedqa": 340,  # question 14.4 + context 238.9 words on average (Jin et al. 2019)
    "bioasq7b": 300,
    "bioasq8b": 300,
    "mednli": 45,
    "medqa": 512,  # question + option + 25 retrieved sentences: at the limit
    "probe": 16,
}
# The paper's UMLS graphs: Table 2 (triples) and Table 3 (METIS K = 20 keeps this share).
PAPER_KGS = {
    "sfull": (4_129_726, 2_830_674 / 4_129_726),
    "s20rel": (1_750_677, 1_225_708 / 1_750_677),
}
PRETRAIN_TOKENS = 24  # [CLS] head [SEP] relation [SEP] of UMLS names: a guess

TRAINING_RULES = ("pretrain", "finetune", "probe_controls")


@dataclass
class Estimate:
    jobs: Counter = field(default_factory=Counter)
    gpu_hours: Counter = field(default_factory=Counter)
    flops: Counter = field(default_factory=Counter)
    assumptions: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self, card: str, mfu: float) -> dict[str, Any]:
        return {
            "card": card,
            "mfu": mfu,
            "jobs": dict(self.jobs),
            "total_jobs": sum(self.jobs.values()),
            "gpu_hours": {k: round(v, 2) for k, v in self.gpu_hours.items()},
            "total_gpu_hours": round(sum(self.gpu_hours.values()), 2),
            "assumptions": sorted(self.assumptions),
            "warnings": self.warnings,
        }


def dry_run_jobs(
    configfile: str | Path, workdir: str | Path, standalone: bool
) -> tuple[list[tuple[str, dict[str, str]]], list[str]]:
    """(rule, wildcards) of every job a config would run now, and the dry run's warnings."""
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "-s",
        str(REPO / "workflow" / "Snakefile"),
        "-d",
        str(workdir),
        "--cores",
        "1",
        "--configfile",
        str(Path(configfile).resolve()),
    ]
    if standalone:
        cmd.append("--replace-workflow-config")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        errors = [x for x in result.stderr.splitlines() if "mop:" in x or "Error" in x]
        raise MopError(f"{configfile}: the dry run failed: {' '.join(errors[-3:])}")
    jobs: list[tuple[str, dict[str, str]]] = []
    for block in re.split(r"^(?=rule \w+:$)", result.stdout, flags=re.M):
        head = re.match(r"rule (\w+):", block)
        if head is None:
            continue
        found = re.search(r"^\s+wildcards: (.*)$", block, flags=re.M)
        wildcards = dict(kv.split("=", 1) for kv in found[1].split(", ")) if found else {}
        jobs.append((head[1], wildcards))
    warnings = [
        x.split("mop: warning (a real run stops here): ", 1)[1]
        for x in result.stderr.splitlines()
        if "mop: warning" in x
    ]
    return jobs, warnings


def model_shape(alias: str, models: dict[str, Any]) -> Shape:
    """The encoder's shape from its config.json (offline, any family: mop.flops), BERT-base
    when it is not available here."""
    entry = models[alias]
    if "random" in entry:
        r = entry["random"]
        return Shape(r.get("layers", 2), r.get("hidden", 128), r.get("intermediate", 256))
    try:
        from transformers.utils import cached_file

        from mop.models import resolve_model

        location = resolve_model(alias, models).location
        path = Path(location) / "config.json"
        if not path.is_file():  # a hub id: its config.json from the local cache
            path = Path(cached_file(location, "config.json", local_files_only=True))
        return shape_from_config(path)
    except Exception:  # not available offline: say so, assume the paper's size
        return Shape(12, 768, 3072, f"{alias}: assumed BERT-base (no config.json offline)")


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _kg_triples(name: str, config: dict[str, Any], est: Estimate) -> int | None:
    results = Path(config["results"])
    stats = _read(results / "kg" / name / "stats.json")
    if stats:
        return int(stats["triples"])
    kg = config["kgs"][name]
    if kg["source"] == "umls":
        which = "s20rel" if kg.get("top_relations") or kg.get("relations") else "sfull"
        est.assumptions.add(f"kg {name}: {PAPER_KGS[which][0]:,} triples (paper Table 2)")
        return PAPER_KGS[which][0]
    if kg["source"] == "hpo":
        from mop.kg.sources import build_kg

        return build_kg(kg, f"kgs.{name}")[0].triples.height
    est.warnings.append(f"kg {name}: size unknown until it is built; its pretraining not sized")
    return None


def _partition_examples(w: dict[str, str], config: dict[str, Any], est: Estimate) -> float | None:
    """Training examples of one partition's adapter."""
    results = Path(config["results"])
    k = int(w["k"])
    stats = _read(results / "partition" / w["kg"] / f"k{k}-{w['scheme']}" / "stats.json")
    if stats:
        retained = float(stats["triples_retained"])
    else:
        triples = _kg_triples(w["kg"], config, est)
        if triples is None:
            return None
        share = 0.69  # METIS at K = 20 keeps 68.5-70.0 % of the paper's graphs (Table 3)
        if w["scheme"].startswith("shuffle"):
            rate = float(w["scheme"].removeprefix("shuffle"))
            share = (1 - rate) * share + rate / k  # towards a random partition's 1/K
        est.assumptions.add(f"partition: {share:.0%} of triples kept ({w['scheme']}, K = {k})")
        retained = triples * share
    bidirectional = 2 if config["pretrain"]["bidirectional"] else 1
    return retained / k * bidirectional


def _task_sizes(task: str, config: dict[str, Any], est: Estimate) -> tuple[int, int, int]:
    summary = _read(Path(config["results"]) / "tasks" / task / "summary.json")
    if summary and "examples" in summary and "train" in summary["examples"]:
        ex = summary["examples"]
        return ex["train"], ex["dev"], ex["test"]
    if task == "probe":
        caps = config["tasks"]["probe"].get("max_questions", {})
        sizes = tuple(caps.get(s, 1000) for s in ("train", "dev", "test"))
        est.assumptions.add(f"probe: {sizes} questions (max_questions, 1000 where unset)")
        return sizes  # type: ignore[return-value]
    sizes, source = OFFICIAL_SIZES[task]
    est.assumptions.add(f"{task}: {sizes[0]:,} / {sizes[1]:,} / {sizes[2]:,} examples ({source})")
    return sizes


def _task_tokens(task: str, model: str, config: dict[str, Any], est: Estimate) -> float:
    from mop.plan import Plan

    length = Plan(config).training(task)["max_length"]
    entry = config["models"][model]
    tokenizer = entry["tokenizer"] if "random" in entry else model
    record = _read(
        Path(config["results"]) / "encoded" / task / tokenizer / f"len{length}" / "encoding.json"
    )
    if record:
        seqs = sum(v["sequences"] for v in record["splits"].values())
        return sum(v["tokens"] for v in record["splits"].values()) / max(seqs, 1)
    typical = TYPICAL_TOKENS.get(task, length)
    est.assumptions.add(f"{task}: {min(typical, length)} tokens per sequence (typical, assumed)")
    return float(min(typical, length))


def estimate(
    config: dict[str, Any],
    jobs: list[tuple[str, dict[str, str]]],
    card: str = "a100",
    mfu: float = DEFAULT_MFU,
) -> Estimate:
    """Jobs per rule and GPU-hours per training rule for the given dry-run jobs."""
    from mop.plan import Plan
    from mop.tasks import get_task

    peak = gpu_peak_or_error(card)
    est = Estimate()
    rf = config["pretrain"]["reduction_factor"]
    for rule, w in jobs:
        est.jobs[rule] += 1
        if not rule.startswith(TRAINING_RULES):
            continue
        shape = model_shape(w["model"], config["models"])
        if shape.source != "config":
            est.assumptions.add(shape.source)
        if rule == "pretrain":
            examples = _partition_examples(w, config, est)
            if examples is None:
                continue
            train, forward = train_flops_per_token(
                shape, PRETRAIN_TOKENS, 1, rf, False, frozen_base=True
            )
            est.assumptions.add(f"pretraining: {PRETRAIN_TOKENS} tokens per example (assumed)")
            tokens = examples * PRETRAIN_TOKENS
            flops = tokens * config["pretrain"]["epochs"] * train + tokens * forward
        else:
            task = w.get("task", "probe")
            settings = Plan(config).training(task)
            spec = get_task(task)
            sizes = _task_sizes(task, config, est)
            per_seq = _task_tokens(task, w["model"], config, est)
            options = 4 if spec.kind == "choice" else 1
            adapters = {"mop": int(w.get("k", 0)), "base": 0}.get(rule.removeprefix("finetune_"), 1)
            train, forward = train_flops_per_token(
                shape, per_seq, adapters, rf, rule == "finetune_mop", frozen_base=False
            )
            seq = per_seq * options
            epochs = settings["epochs"] if rule != "probe_controls" else 0
            train_tokens = sizes[0] * seq * epochs
            eval_tokens = (sizes[1] * epochs + sizes[0] + sizes[2]) * seq
            flops = train_tokens * train + eval_tokens * forward
        est.flops[rule] += flops
        est.gpu_hours[rule] += flops / (peak * mfu) / 3600
    if any(r.startswith("finetune") for r in est.jobs):
        est.assumptions.add("fine-tuning runs every epoch (early stopping only shortens it)")
    return est


def measured_mfu(path: str | Path) -> float:
    """The utilisation in the last JSON line of a benchmark output that has one: against
    the card's data-sheet peak (`peak_mfu`) where given, else its `mfu`."""
    for line in reversed(Path(path).read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        mfu = record.get("peak_mfu") or record.get("mfu")
        if mfu:
            return float(mfu)
    raise MopError(f"{path}: no benchmark JSON line with an mfu figure")


def render(est: Estimate, card: str, mfu: float, mfu_source: str) -> str:
    """The estimate as a small Markdown report."""
    lines = [
        f"| stage | jobs | GPU-hours ({card}, MFU {mfu:.0%}) |",
        "|---|---:|---:|",
    ]
    for rule, n in sorted(est.jobs.items(), key=lambda x: (-est.gpu_hours.get(x[0], 0), x[0])):
        hours = est.gpu_hours.get(rule)
        lines.append(f"| {rule} | {n} | {'-' if hours is None else f'{hours:,.1f}'} |")
    total = sum(est.gpu_hours.values())
    lines.append(f"| **total** | **{sum(est.jobs.values())}** | **{total:,.1f}** |")
    lines += ["", f"MFU: {mfu_source}.", "", "Assumptions:"]
    lines += [f"- {a}" for a in sorted(est.assumptions)] or ["- none"]
    if est.warnings:
        lines += ["", "Warnings (a real run stops on missing data):"]
        lines += [f"- {w}" for w in est.warnings]
    return "\n".join(lines)


def plan(
    configfile: str | Path,
    workdir: str | Path = ".",
    card: str = "a100",
    mfu: float | None = None,
    benchmark: str | Path | None = None,
) -> tuple[Estimate, str, float, str]:
    """Dry-run a config and estimate it; returns (estimate, card, mfu, where the mfu is from).

    A config that is not standalone extends the working folder's config/config.yaml, as
    Snakemake's `--configfile` does."""
    import yaml
    from snakemake.utils import update_config

    from mop.config import validate_config

    path = Path(configfile)
    config: dict[str, Any] = {}
    try:
        own = yaml.safe_load(path.read_text()) or {}
        base = Path(workdir) / "config" / "config.yaml"
        if not own.get("standalone") and base.is_file():
            config = yaml.safe_load(base.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise MopError(f"{path}: cannot read config ({exc})") from exc
    update_config(config, own)
    standalone = bool(own.get("standalone"))
    validate_config(config)
    config["results"] = str(Path(workdir) / config["results"])
    if benchmark is not None:
        mfu, source = measured_mfu(benchmark), f"measured ({benchmark})"
    elif mfu is not None:
        source = "given"
    else:
        mfu, source = DEFAULT_MFU, "assumed 30% (no measured benchmark given: --benchmark)"
    if not math.isfinite(mfu) or not 0 < mfu <= 1:
        raise MopError(f"mop plan: MFU {mfu} is not in (0, 1]")
    jobs, warnings = dry_run_jobs(path, workdir, standalone)
    est = estimate(config, jobs, card, mfu)
    est.warnings = warnings + est.warnings
    return est, card, mfu, source

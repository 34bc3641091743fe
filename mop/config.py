"""The workflow config: schema validation (with defaults) and checks run before any job.

`validate_config` applies `workflow/schemas/config.schema.yaml` through Snakemake's own
`validate` (which also fills in defaults) and turns its error into one line naming the
key. `preflight` then checks what a schema cannot: that model aliases resolve offline,
that names used across sections exist, that K does not exceed a KG's entity count (when
the KG is built or cheap to build: a KG's source files are not required, so a dry run can
show the DAG before a UMLS release is in place), and that every downstream task to run has
its data files (a missing dataset names where it comes from and its licence).
Both run in the Snakefile before the DAG is built, and in `mop check-config`. Missing
input data (KG source files, task datasets) stops a real run before any job; a dry run
(`snakemake -n`, `mop plan`) lists it as warnings and shows the whole DAG anyway.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from mop.errors import MopError
from mop.io import read_json, safe_name
from mop.plan import SCHEME, Plan, scheme_name

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA.read_text())


def schema_defaults(section: str) -> dict[str, Any]:
    """The schema's default of every key of a config section (a dotted path such as
    `finetune`, `tasks.probe` or `analysis.topics`): the one place a default is defined.
    Jobs get validated sections with these filled in; code called without the workflow
    (the `mop` commands, the library) fills them from here too."""
    schema = _schema()
    node: dict[str, Any] = schema
    for name in section.split("."):
        node = node["properties"][name]
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return {
        key: prop["default"]
        for key, prop in node.get("properties", {}).items()
        if "default" in prop
    }


def with_defaults(section: str, options: dict[str, Any]) -> dict[str, Any]:
    """A section's options with the schema's defaults where a key is not given."""
    return {**schema_defaults(section), **options}


def _key_path(error: Any) -> str:
    parts = []
    for p in error.absolute_path:
        parts.append(f"[{p}]" if isinstance(p, int) else (f".{p}" if parts else str(p)))
    return "".join(parts) or "(top level)"


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate in place against the schema, filling defaults; raise MopError naming the key."""
    import jsonschema
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, str(SCHEMA), set_default=True)
    except WorkflowError as exc:
        # Snakemake raises inside `except ValidationError`, so the cause is the context.
        cause = exc.__context__
        if not isinstance(cause, jsonschema.ValidationError):
            raise MopError(f"config: {exc}") from exc
        best = jsonschema.exceptions.best_match([cause, *cause.context]) if cause.context else cause
        raise MopError(f"config key {_key_path(best)}: {best.message}") from exc
    return config


def load_config(*paths: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read YAML config files (later ones win at the top level), validate, fill defaults."""
    config: dict[str, Any] = {}
    for p in paths:
        p = Path(p)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise MopError(f"{p}: cannot read config ({exc})") from exc
        config.update(data)
    config.update(overrides or {})
    return validate_config(config)


def kg_entity_count(name: str, kg_cfg: dict[str, Any], results: Path) -> int | None:
    """Entities in a KG: from its stats.json if built, else by building it if that is cheap."""
    stats = results / "kg" / name / "stats.json"
    if stats.is_file():
        return int(read_json(stats)["entities"])
    if kg_cfg["source"] == "hpo":
        from mop.kg.sources import build_kg

        return build_kg(kg_cfg, f"kgs.{name}")[0].num_entities
    return None


def check_tasks(config: dict[str, Any]) -> list[str]:
    """Every task to fine-tune has settings, its data files, and seeds that fit its folds.

    Returns the missing datasets (one line each, where each comes from and its licence),
    so a user setting up the paper's grid learns in one go what to fetch.
    """
    from mop.tasks import DATA_TASKS, check_data, get_task

    missing = []
    for task in config["finetune"]["tasks"]:
        if task not in DATA_TASKS:
            continue
        options = config["tasks"].get(task)
        if options is None:
            missing.append(
                f"config key tasks.{task}: finetune.tasks lists {task} but it has no settings "
                f"(tasks.{task}.path: the folder with its data). {get_task(task).source}"
            )
            continue
        if options.get("download"):
            from mop.download import source

            source(task, options)  # a task without a public source is an error here
        else:
            try:
                check_data(task, options)
            except MopError as exc:
                missing.append(str(exc))
        folds = get_task(task).folds
        bad = [s for s in Plan(config).seeds(task) if folds and not 0 <= s < folds]
        if bad:
            raise MopError(
                f"config key tasks.{task}.finetune.seeds: {bad} - the run with seed i trains "
                f"on fold i, so seeds must be 0..{folds - 1}"
            )
    return missing


def check_analysis(config: dict[str, Any]) -> None:
    """The analysis' tasks are fine-tuned, and its subsets fit K and have their ranking."""
    an, ft = config["analysis"], config["finetune"]
    for task in an.get("tasks") or []:
        if task not in ft["tasks"]:
            raise MopError(
                f"config key analysis.tasks: {task} is not in finetune.tasks {ft['tasks']}"
            )
    k = ft["k"]
    if an["rank_by"] == "train" and (an["single_adapters"] or an["subsets"]):
        off = [
            t for t in an.get("tasks") or ft["tasks"] if not Plan(config).training(t)["eval_train"]
        ]
        if off:
            raise MopError(
                f"config key analysis.rank_by: train ranks by the training split's metric, "
                f"but finetune.eval_train is false for {', '.join(off)}"
            )
    for name, rule in an["subsets"].items():
        [(how, value)] = rule.items()
        if how in ("top", "bottom"):
            if not an["single_adapters"]:
                raise MopError(
                    f"config key analysis.subsets.{name}.{how}: ranking the adapters needs "
                    "the single-adapter runs (analysis.single_adapters: true)"
                )
            if value > k:
                raise MopError(
                    f"config key analysis.subsets.{name}.{how}: {value} adapters of "
                    f"finetune.k = {k}"
                )
        elif max(value) >= k:
            raise MopError(
                f"config key analysis.subsets.{name}.partitions: {max(value)} is not a "
                f"partition of finetune.k = {k} (ids 0..{k - 1})"
            )


def check_partitionings(config: dict[str, Any]) -> set[int]:
    """The shuffle rates name scheme folders, the K fine-tuning uses is partitioned, the
    probe's KG exists; returns every K partitioned (the probe's own and `inside_at` too)."""
    ft = config["finetune"]
    for rate in config["partition"]["shuffle"]:
        if not re.fullmatch(SCHEME, scheme_name(rate)):
            raise MopError(
                f"config key partition.shuffle: rate {rate} is too small to name a scheme "
                "folder (use 0 or at least 0.0001)"
            )
    if ft["partition_experiments"] and "mop" not in ft["methods"]:
        raise MopError(
            "config key finetune.partition_experiments: MoP runs for every K and shuffle "
            "rate need mop in finetune.methods"
        )
    ks = set(config["partition"]["k"])
    if "mop" in ft["methods"] and ft["k"] not in ks:
        raise MopError(f"config key finetune.k: {ft['k']} is not one of partition.k {sorted(ks)}")
    probe = config["tasks"].get("probe")
    if "probe" in ft["tasks"]:
        if probe is None:
            raise MopError(
                "config key tasks.probe: finetune.tasks lists probe but it has no settings"
            )
        if probe["kg"] not in config["kgs"]:
            raise MopError(f"config key tasks.probe.kg: unknown KG {probe['kg']!r}")
        ks.add(probe["k"])
        ks.update(probe["inside_at"])
    return ks


def preflight(config: dict[str, Any], missing_ok: bool = False) -> list[str]:
    """Checks that need more than the schema; raise MopError on the first problem.

    Missing input data (KG source files, task datasets) is collected: with `missing_ok`
    (a dry run, an estimate) it is returned as warnings, else it stops with all of it.
    """
    from mop.models import check_models

    for alias in config["models"]:
        safe_name(alias, f"models.{alias}")
    check_models(config)
    missing = []
    for name, kg_cfg in config["kgs"].items():
        safe_name(name, f"kgs.{name}")
        for key in ("path", "entities", "relations"):
            value = kg_cfg.get(key)
            if isinstance(value, str) and not Path(value).exists():
                missing.append(f"config key kgs.{name}.{key}: {value} does not exist")
    ft = config["finetune"]
    if config.get("tracking", {}).get("log_models") and not ft["save_model"]:
        raise MopError(
            "config key tracking.log_models: logging the fine-tuned models needs their "
            "weights; set finetune.save_model: true"
        )
    for name in ft.get("kgs") or []:
        if name not in config["kgs"]:
            raise MopError(f"config key finetune.kgs: unknown KG {name!r}")
    ks = check_partitionings(config)
    missing += check_tasks(config)
    if missing and not missing_ok:
        raise MopError("\n".join(missing))
    check_analysis(config)
    results = Path(config["results"])
    for name, kg_cfg in config["kgs"].items():
        n = kg_entity_count(name, kg_cfg, results)
        if n is not None and max(ks) > n:
            raise MopError(
                f"config key partition.k: K = {max(ks)} is larger than the {n} entities "
                f"of KG {name!r}"
            )
    return missing

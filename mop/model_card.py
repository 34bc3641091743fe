"""The model card (`README.md`) of an exported run: base model, KG and partition figures,
task, metrics, licences and how to load it, in the layout of a Hugging Face model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mop.errors import MopError
from mop.io import read_json

LICENCES = {
    "hpo": "Human Phenotype Ontology: see https://hpo.jax.org/license (cite Köhler et al.)",
    "umls": "UMLS Metathesaurus: the UMLS licence applies to anything derived from it",
    "rf2": "SNOMED CT: the SNOMED CT affiliate licence applies to anything derived from it",
}


def model_card(meta: dict[str, Any], metrics: dict[str, Any], run_dir: Path) -> str:
    """The card's Markdown: what the export holds, the KG it learned from (with the
    source's licence), its metrics and the lines that load it."""
    task = meta["task"]
    main = metrics["main_metric"]
    lines = [
        "---",
        "library_name: adapters",
        "tags: [mop, mixture-of-partitions, adapter-transformers, knowledge-graph]",
        "---",
        "",
        f"# {meta['method']} on {task}: a `mop` export",
        "",
        "Fine-tuned with Mixture-of-Partitions (Meng et al., EMNLP 2021): a biomedical "
        "knowledge graph split into partitions with METIS, one adapter per partition "
        "trained by entity prediction, all adapters mixed into the base model for the task.",
        "",
        f"- base model: `{meta['base_model']}`",
        f"- method: {meta['method']}"
        + (f", mixture `{meta['mixture']['kind']}`" if meta.get("mixture") else ""),
        f"- task: {task} ({meta['kind']}, labels {', '.join(meta['labels'])})",
        f"- max_length {meta['max_length']}, pooling {meta['pooling']}, head {meta['head']}",
        f"- seed {metrics['seed']}, best epoch {metrics['best_epoch']}",
        f"- {main}: dev {metrics.get('dev_' + main, float('nan')):.4f}, "
        f"test {metrics.get('test_' + main, float('nan')):.4f}",
        f"- run folder: `{run_dir}`",
    ]
    kg = meta.get("kg")
    if kg:
        lines += [
            "",
            "## Knowledge graph",
            "",
            f"- KG `{kg['name']}` ({kg.get('source', '?')}): {kg.get('entities', '?')} entities, "
            f"{kg.get('relations', '?')} relations, {kg.get('triples', '?')} triples",
            f"- K = {kg.get('k')} partitions ({kg.get('scheme')}), "
            f"{kg.get('retained_share', float('nan')):.1%} of the triples inside a partition",
            f"- licence: {LICENCES.get(kg.get('source', ''), 'that of the source you used')}",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import mop",
        "model = mop.load('THIS_FOLDER')",
        "probs = model.predict_records([{'text_a': '...'}])",
        "```",
        "",
        "or `mop predict THIS_FOLDER --input questions.jsonl --out predictions.jsonl`. "
        "The base encoder alone loads with `transformers.AutoModel.from_pretrained`, each "
        "adapter with `model.load_adapter('adapters/p0')`, the fusion with "
        "`model.load_adapter_fusion('fusion')` (its mixture kind is in `fusion/mixture.json`).",
        "",
    ]
    return "\n".join(lines)


def kg_facts(adapter_dirs: list[str]) -> dict[str, Any] | None:
    """The KG and partition of the adapters, read from the results tree, when present."""
    from mop.plan import Run

    if not adapter_dirs:
        return None
    try:
        run = Run.parse(Path(adapter_dirs[0]).parent)
        root = Path(Run.root(Path(adapter_dirs[0]).parent))
    except MopError:
        return None
    out: dict[str, Any] = {"name": run.kg, "k": run.k, "scheme": run.scheme}
    stats = Path(Run("kg", kg=run.kg).folder(root)) / "stats.json"
    part = Path(Run("partition", kg=run.kg, k=run.k, scheme=run.scheme).folder(root))
    if stats.is_file():
        s = read_json(stats)
        out |= {x: s.get(x) for x in ("entities", "relations", "triples")}
        out["source"] = s.get("meta", {}).get("source", "?")
    if (part / "stats.json").is_file():
        out["retained_share"] = read_json(part / "stats.json").get("triples_retained_share")
    return out

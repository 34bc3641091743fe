"""`mop export` (a fine-tuned run in the libraries' formats) and `mop predict` (new inputs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mop.errors import MopError
from mop.log import log


def cmd_export(args: argparse.Namespace) -> None:
    from mop.export import export_run

    meta = export_run(args.run, args.out)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    log(
        f"exported {meta['method']} on {meta['task']} ({len(meta['adapters'])} adapters, "
        f"{size / 1e6:.1f} MB) -> {args.out}"
    )


def required_columns(meta: dict[str, Any]) -> list[str]:
    """The input columns an exported model needs for its task."""
    cols = ["text_a"]
    if meta["head"] == "bilinear":
        cols.append("candidate")
    if meta["kind"] == "choice":
        cols.append("choices")
    return cols


def read_inputs(path: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of a JSONL or TSV file, checked against what the model needs (file and line
    named on the first problem)."""
    from mop.tasks import read_jsonl

    if not path.is_file():
        raise MopError(f"{path}: input file not found")
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
    elif path.suffix in (".tsv", ".txt"):
        import csv

        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            rows = [(n, dict(r)) for n, r in enumerate(reader, start=2)]
        if meta["kind"] == "choice":
            for n, r in rows:
                try:
                    r["choices"] = json.loads(r.get("choices") or "null")
                except json.JSONDecodeError:
                    raise MopError(f"{path}:{n}: choices must be a JSON list") from None
    else:
        raise MopError(f"{path}: input must be .jsonl or .tsv")
    if not rows:
        raise MopError(f"{path}: no inputs (empty file)")
    needed = required_columns(meta)
    width = None
    for n, row in rows:
        for col in needed:
            value = row.get(col)
            if col == "choices":
                if (
                    not isinstance(value, list)
                    or not value
                    or not all(isinstance(x, str) for x in value)
                ):
                    raise MopError(f"{path}:{n}: choices must be a non-empty list of strings")
                if width is not None and len(value) != width:
                    raise MopError(f"{path}:{n}: {len(value)} choices, earlier rows {width}")
                width = len(value)
            elif not isinstance(value, str) or not value.strip():
                raise MopError(
                    f"{path}:{n}: missing {col!r} (a {meta['task']} model reads "
                    f"{', '.join(needed)})"
                )
        if meta["kind"] != "choice" and "choices" in row:
            raise MopError(
                f"{path}:{n}: 'choices' given, but this is a {meta['kind']} model of task "
                f"{meta['task']}, not a multiple-choice one"
            )
    return [dict(r, id=str(r.get("id", n))) for n, r in rows]


def cmd_predict(args: argparse.Namespace) -> None:
    import polars as pl

    from mop.export import load
    from mop.io import atomic_path
    from mop.tasks import get_task

    model = load(args.model, device=args.device, precision=args.precision)
    rows = read_inputs(Path(args.input), model.meta)
    columns = {name: [r.get(name) for r in rows] for name in ("id", "text_a", "text_b")}
    for name in ("candidate", "choices", "contexts"):
        if any(name in r for r in rows):
            columns[name] = [r.get(name) for r in rows]
    frame = pl.DataFrame(columns, schema_overrides={"text_b": pl.String})
    probs = model.predict(frame, batch_size=args.batch_size)
    task = get_task(model.meta["task"])
    out = Path(args.out)
    with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row, p in zip(rows, probs, strict=True):
            if task.kind == "multi":
                label: Any = [lab for lab, x in zip(task.labels, p, strict=True) if x >= 0.5]
                scores = dict(zip(task.labels, p.tolist(), strict=True))
            elif task.kind == "choice":
                label, scores = int(p.argmax()), p.tolist()
            else:
                label = task.labels[int(p.argmax())]
                scores = dict(zip(task.labels, p.tolist(), strict=True))
            f.write(json.dumps({"id": row["id"], "label": label, "probs": scores}) + "\n")
    log(f"predicted {len(rows)} inputs -> {out}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a fine-tuned run (save_model: true) for reuse")
    p.add_argument("run", help="the run folder (results/finetune/...)")
    p.add_argument("--out", required=True, help="the export folder (a Hugging Face model layout)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="predict new inputs with an exported model")
    p.add_argument("model", help="an export folder (mop export)")
    p.add_argument("--input", required=True, help="JSONL or TSV with text_a (and text_b, ...)")
    p.add_argument("--out", required=True, help="JSONL: id, label, probs per input")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="default: the precision the model's run computed in (its mop.json)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_predict)

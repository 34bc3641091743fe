"""PubMedQA (PQA-L): question + abstract contexts -> yes | no | maybe, ten cross-validation folds.

Input, in one folder: the official split files `test_set.json` (500 questions) and
`pqal_fold{0..9}/{train_set,dev_set}.json` (450/50 each), or only `ori_pqal.json` (the
1,000 labelled questions), from which the same split files are made with the official
recipe (`make_official_split`, also `mop pubmedqa-folds`). Every file maps a PMID to
{QUESTION, CONTEXTS, LABELS, MESHES, YEAR, reasoning_required_pred, reasoning_free_pred,
final_decision, LONG_ANSWER}. The model reads the question and the joined CONTEXTS.

Output: `fold{i}/{train,dev,test}.parquet` for i = 0..9 (the test split is the same in
every fold); the run with seed i trains and selects on fold i. Metrics: accuracy and
macro-F1.

The official recipe (PubMedQA's `preprocess/split_dataset.py`), which
`make_official_split` follows step by step so that it writes the same files:
Python's `random` seeded with 0 once; a label-stratified split of ori_pqal.json into two
halves (the first half becomes the cross-validation pool, the second the test set), then
the same split of the pool into 10 parts; fold i's dev set is part i and its train set the
other parts in order. The stratified split into n parts: PMIDs grouped by final_decision
in the order yes, no, maybe (each group in file order), each group shuffled, cut into
chunks of ceil(size / n) (the last chunk takes the rest); part i joins chunk i of yes, no
and maybe. If the last part ends up with a different size from the first, one PMID drawn
with `random.choice` from each other part, in order, moves to the end of the last part.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from mop.errors import MopError
from mop.io import atomic_dir, write_json, write_parquet
from mop.tasks import (
    SPLITS,
    TaskSpec,
    accuracy_and_macro_f1,
    check_ids,
    lookup_label,
    split_frame,
)

FOLDS = 10
LABELS = ("yes", "no", "maybe")
SPEC = TaskSpec(
    name="pubmedqa",
    labels=LABELS,
    metric=accuracy_and_macro_f1,
    main_metric="accuracy",
    folds=FOLDS,
    source=(
        "PubMedQA (Jin et al. 2019; MIT licence) comes from https://github.com/pubmedqa/pubmedqa "
        "(data/ori_pqal.json): put ori_pqal.json, or the official split files test_set.json "
        "and pqal_fold0..9/{train_set,dev_set}.json, in this folder."
    ),
)
FIELDS = ("QUESTION", "CONTEXTS", "final_decision")


def data_files(options: dict[str, Any]) -> list[Path]:
    """The official split files if the folder has test_set.json, else ori_pqal.json."""
    root = Path(options["path"])
    if not (root / "test_set.json").is_file():
        return [root / "ori_pqal.json"]
    return [root / "test_set.json"] + [
        root / f"pqal_fold{i}" / f"{name}_set.json"
        for i in range(FOLDS)
        for name in ("train", "dev")
    ]


def read_questions(path: str | Path) -> dict[str, dict[str, Any]]:
    """A PubMedQA JSON file (PMID -> question), key order kept; checks the fields we use."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise MopError(f"{path}: cannot read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise MopError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not data:
        raise MopError(f"{path}: expected a non-empty JSON object PMID -> question")
    for pmid, item in data.items():
        missing = [f for f in FIELDS if not isinstance(item, dict) or f not in item]
        if missing:
            raise MopError(f"{path}: PMID {pmid} lacks {', '.join(missing)}")
        if item["final_decision"] not in LABELS:
            raise MopError(
                f"{path}: PMID {pmid} has final_decision {item['final_decision']!r} "
                f"(expected {', '.join(LABELS)})"
            )
        if not isinstance(item["CONTEXTS"], list):
            raise MopError(f"{path}: PMID {pmid}: CONTEXTS is not a list")
    return data


def stratified_parts(
    items: dict[str, dict[str, Any]], n: int, rng: random.Random
) -> list[dict[str, dict[str, Any]]]:
    """One label-stratified split into n parts, exactly as the official recipe draws it."""
    groups: dict[str, list[str]] = {label: [] for label in LABELS}
    for pmid, item in items.items():
        groups[item["final_decision"]].append(pmid)
    chunks = {}
    for label, pmids in groups.items():
        rng.shuffle(pmids)
        size = math.ceil(len(pmids) / n)
        chunks[label] = [pmids[i * size : (i + 1) * size if i < n - 1 else None] for i in range(n)]
    parts = [{p: items[p] for label in LABELS for p in chunks[label][i]} for i in range(n)]
    if len(parts[-1]) != len(parts[0]):
        for part in parts[:-1]:
            moved = rng.choice(list(part))
            parts[-1][moved] = part.pop(moved)
    return parts


def make_official_split(
    questions: dict[str, dict[str, Any]], folds: int = FOLDS, seed: int = 0
) -> tuple[dict[str, dict[str, Any]], list[tuple[dict, dict]]]:
    """(test set, [(train set, dev set) per fold]) from ori_pqal.json's questions."""
    rng = random.Random(seed)
    pool, test = stratified_parts(questions, 2, rng)
    parts = stratified_parts(pool, folds, rng)
    cv = []
    for i in range(folds):
        train = {p: q for j, part in enumerate(parts) if j != i for p, q in part.items()}
        cv.append((train, parts[i]))
    return test, cv


def write_official_split(ori_pqal: str | Path, out_dir: str | Path, seed: int = 0) -> dict:
    """Write test_set.json and pqal_fold{i}/{train_set,dev_set}.json as the official script does."""
    test, cv = make_official_split(read_questions(ori_pqal), seed=seed)
    with atomic_dir(out_dir) as tmp:
        (tmp / "test_set.json").write_text(json.dumps(test, indent=4))
        for i, (train, dev) in enumerate(cv):
            (tmp / f"pqal_fold{i}").mkdir()
            (tmp / f"pqal_fold{i}" / "dev_set.json").write_text(json.dumps(dev, indent=4))
            (tmp / f"pqal_fold{i}" / "train_set.json").write_text(json.dumps(train, indent=4))
    return {"test": len(test), "train": [len(t) for t, _ in cv], "dev": [len(d) for _, d in cv]}


def to_rows(questions: dict[str, dict[str, Any]], where: str) -> list[dict[str, Any]]:
    return [
        {
            "id": str(pmid),
            "text_a": q["QUESTION"],
            "text_b": " ".join(q["CONTEXTS"]),
            "label": lookup_label(SPEC, q["final_decision"], f"{where}: PMID {pmid}"),
        }
        for pmid, q in questions.items()
    ]


def load_folds(options: dict[str, Any]) -> tuple[dict, list[tuple[dict, dict]], str]:
    """(test, [(train, dev)] per fold, where they came from) from whichever files exist."""
    files = data_files(options)
    if files[0].name == "ori_pqal.json":
        test, cv = make_official_split(read_questions(files[0]))
        return test, cv, f"{files[0]} (official split recipe, seed 0)"
    test = read_questions(files[0])
    cv = [
        (read_questions(files[1 + 2 * i]), read_questions(files[2 + 2 * i])) for i in range(FOLDS)
    ]
    return test, cv, f"{files[0].parent} (official split files)"


def prepare(options: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    test, cv, origin = load_folds(options)
    out = Path(out_dir)
    test_frame = split_frame(to_rows(test, "test_set"), SPEC, "test_set")
    summary: dict[str, Any] = {"task": SPEC.name, "kind": SPEC.kind, "source": origin, "folds": []}
    folds = []
    for i, (train, dev) in enumerate(cv):
        overlap = (set(train) | set(dev)) & set(test)
        if overlap or set(train) & set(dev):
            raise MopError(f"pubmedqa fold {i}: train, dev and test share PMIDs")
        frames = {
            "train": split_frame(to_rows(train, f"fold {i} train"), SPEC, f"fold {i} train"),
            "dev": split_frame(to_rows(dev, f"fold {i} dev"), SPEC, f"fold {i} dev"),
            "test": test_frame,
        }
        for s in SPLITS:
            check_ids(frames[s], f"pubmedqa fold {i} {s}")
        folds.append(frames)
    for i, frames in enumerate(folds):  # every fold checked before any is written
        for s in SPLITS:
            write_parquet(frames[s], out / f"fold{i}" / f"{s}.parquet")
        summary["folds"].append({s: frames[s].height for s in SPLITS})
    summary["examples"] = {"test": test_frame.height}
    write_json(summary, out / "summary.json")
    return summary

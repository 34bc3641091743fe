"""MedNLI: premise / hypothesis pairs from MIMIC-III clinical notes -> 3-way entailment.

Input: `mli_{train,dev,test}_v1.jsonl`, one JSON object per line with pairID, gold_label
(entailment | neutral | contradiction), sentence1 (premise), sentence2 (hypothesis) and
parse fields we do not use. Metric: accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mop.tasks import (
    SPLITS,
    TaskSpec,
    accuracy,
    lookup_label,
    read_jsonl,
    require,
    split_frame,
    write_splits,
)

SPEC = TaskSpec(
    name="mednli",
    labels=("entailment", "neutral", "contradiction"),
    metric=accuracy,
    main_metric="accuracy",
    source=(
        "MedNLI (Romanov and Shivade 2018) is distributed by PhysioNet "
        "(https://physionet.org/content/mednli/) to credentialed users only: it needs a "
        "PhysioNet account with completed human-subjects training and the signed PhysioNet "
        "Credentialed Health Data Use Agreement, and may not be shared. Put "
        "mli_train_v1.jsonl, mli_dev_v1.jsonl and mli_test_v1.jsonl in this folder."
    ),
)


def data_files(options: dict[str, Any]) -> list[Path]:
    return [Path(options["path"]) / f"mli_{s}_v1.jsonl" for s in SPLITS]


def read_split(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        rows.append(
            {
                "id": str(require(obj, "pairID", where)),
                "text_a": require(obj, "sentence1", where),
                "text_b": require(obj, "sentence2", where),
                "label": lookup_label(SPEC, require(obj, "gold_label", where), where),
            }
        )
    return rows


def prepare(options: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    splits = {
        s: split_frame(read_split(path), SPEC, str(path))
        for s, path in zip(SPLITS, data_files(options), strict=True)
    }
    return write_splits(splits, SPEC, out_dir)

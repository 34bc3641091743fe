"""Hallmarks of Cancer (HoC): 10-label multi-label sentence classification, scored per document.

Input: the BLURB preprocessing, `{train,dev,test}.tsv` with the header
`labels<TAB>sentence<TAB>index`, one row per sentence. `labels` lists every hallmark as
`<i>_<0|1>` (e.g. `0_0,1_1,2_0,...,9_0`), in the order of `LABELS`; `index` is
`<PMID>_s<i>`. Each sentence is one training example; at evaluation the sentence
predictions of a document are OR-merged and the micro-F1 is taken over documents x labels.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mop.errors import MopError
from mop.tasks import SPLITS, TaskSpec, document_micro_f1, split_frame, write_splits

LABELS = (
    "activating invasion and metastasis",
    "avoiding immune destruction",
    "cellular energetics",
    "enabling replicative immortality",
    "evading growth suppressors",
    "genomic instability and mutation",
    "inducing angiogenesis",
    "resisting cell death",
    "sustaining proliferative signaling",
    "tumor promoting inflammation",
)
HEADER = ["labels", "sentence", "index"]
SPEC = TaskSpec(
    name="hoc",
    labels=LABELS,
    metric=document_micro_f1,
    main_metric="micro_f1",
    kind="multi",
    metric_columns=("document",),
    source=(
        "HoC comes from the BLURB benchmark's preprocessing (https://microsoft.github.io/BLURB/) "
        "of the Hallmarks of Cancer corpus (Baker et al. 2016, "
        "https://github.com/sb895/Hallmarks-of-Cancer); put train.tsv, dev.tsv and test.tsv in "
        "this folder. Licence: the corpus repository states none beyond asking to cite "
        "Baker et al.; check its terms before sharing the files."
    ),
)
_INDEX = re.compile(r"^(?P<doc>.+)_s(?P<sentence>\d+)$")


def data_files(options: dict[str, Any]) -> list[Path]:
    return [Path(options["path"]) / f"{s}.tsv" for s in SPLITS]


def parse_labels(text: str, where: str) -> list[int]:
    """`0_0,1_1,...,9_0` -> a 0/1 list over the 10 hallmarks."""
    values: dict[int, int] = {}
    for item in text.split(","):
        index, _, value = item.strip().partition("_")
        if not (index.isdigit() and value in ("0", "1")) or int(index) >= len(LABELS):
            raise MopError(f"{where}: bad label {item!r} (expected <0-9>_<0|1>)")
        if int(index) in values:
            raise MopError(f"{where}: label {index} given twice")
        values[int(index)] = int(value)
    if len(values) != len(LABELS):
        raise MopError(f"{where}: {len(values)} labels, expected all {len(LABELS)}")
    return [values[i] for i in range(len(LABELS))]


def read_split(path: str | Path) -> list[dict[str, Any]]:
    """Rows of one BLURB HoC file (see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MopError(f"{path}: cannot read ({exc})") from exc
    if not lines or lines[0].split("\t") != HEADER:
        raise MopError(f"{path}:1: header must be {chr(9).join(HEADER)!r}")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise MopError(f"{path}:{n}: {len(fields)} tab-separated fields, expected 3")
        labels, sentence, index = fields
        match = _INDEX.match(index)
        if match is None:
            raise MopError(f"{path}:{n}: index {index!r} is not <PMID>_s<i>")
        rows.append(
            {
                "id": index,
                "text_a": sentence,
                "text_b": None,
                "label": parse_labels(labels, f"{path}:{n}"),
                "document": match["doc"],
            }
        )
    return rows


def prepare(options: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    splits = {}
    for s, path in zip(SPLITS, data_files(options), strict=True):
        splits[s] = split_frame(read_split(path), SPEC, str(path))
    return write_splits(
        splits,
        SPEC,
        out_dir,
        documents={s: f["document"].n_unique() for s, f in splits.items()},
    )

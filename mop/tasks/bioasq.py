"""BioASQ 7b and 8b yes/no questions (BLURB preprocessing): question + passage -> yes | no.

Input: `{train,dev,test}.tsv` without a header, four tab-separated columns
`id<TAB>question<TAB>passage<TAB>yes|no` (the passage is the question's snippets joined by
spaces). Official splits: 670/75/140 (7b), 729/152/152 (8b). Metric: accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mop.errors import MopError
from mop.tasks import SPLITS, TaskSpec, accuracy, lookup_label, split_frame, write_splits

_SOURCE = (
    "BioASQ Task B ({year}) yes/no questions, as preprocessed by BLURB "
    "(https://microsoft.github.io/BLURB/): put train.tsv, dev.tsv and test.tsv in this folder. "
    "Licence: the BioASQ data need a free registration at http://participants-area.bioasq.org "
    "and are used under the BioASQ terms of use."
)
SPECS = {
    name: TaskSpec(
        name=name,
        labels=("no", "yes"),
        metric=accuracy,
        main_metric="accuracy",
        source=_SOURCE.format(year=year),
    )
    for name, year in (("bioasq7b", "7b, 2019"), ("bioasq8b", "8b, 2020"))
}


def data_files(options: dict[str, Any]) -> list[Path]:
    return [Path(options["path"]) / f"{s}.tsv" for s in SPLITS]


def read_split(path: str | Path, spec: TaskSpec) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MopError(f"{path}: cannot read ({exc})") from exc
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise MopError(
                f"{path}:{n}: {len(fields)} tab-separated fields, expected 4 "
                "(id, question, passage, yes|no; no header)"
            )
        qid, question, passage, answer = fields
        rows.append(
            {
                "id": qid,
                "text_a": question,
                "text_b": passage,
                "label": lookup_label(spec, answer.strip(), f"{path}:{n}"),
            }
        )
    return rows


def prepare(options: dict[str, Any], out_dir: str | Path, name: str = "bioasq7b") -> dict:
    spec = SPECS[name]
    splits = {
        s: split_frame(read_split(path, spec), spec, str(path))
        for s, path in zip(SPLITS, data_files(options), strict=True)
    }
    return write_splits(splits, spec, out_dir)

"""MedQA (USMLE, English): multiple choice with contexts retrieved from medical textbooks.

Input: `{train,dev,test}.jsonl` from the MedQA release (`questions/US/` with five options
A-E, or `questions/US/4_options/` with A-D), one JSON object per line with question,
answer, options {"A": ..., ...}, meta_info and answer_idx. Every question of a dataset
must have the same option letters.

Contexts (paper A.2, after Jin et al. 2020): for every question + option, the `top_k`
(25) best BM25 sentences of a user-given corpus (the MedQA textbooks, `textbooks/en/*.txt`,
or any folder of .txt files or one file), joined in rank order. The paper used
Elasticsearch; here the `bm25s` library, whose default scoring is Lucene's BM25 (the
formula Elasticsearch uses), over lower-cased word tokens without English stop words.
Without a corpus the inputs are question + option alone (not the paper's setting).

Output rows: text_a = question, `choices` (option texts in letter order), `contexts` (one
per option), label = index of answer_idx. Metric: accuracy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import bm25s
import numpy as np

from mop.errors import MopError
from mop.tasks import SPLITS, TaskSpec, accuracy, read_jsonl, require, split_frame, write_splits

SPEC = TaskSpec(
    name="medqa",
    labels=("A", "B", "C", "D", "E"),
    metric=accuracy,
    main_metric="accuracy",
    kind="choice",
    source=(
        "MedQA (Jin et al. 2020; MIT licence) comes from https://github.com/jind11/MedQA "
        "(the data_clean archive linked there): point tasks.medqa.path at questions/US "
        "(or questions/US/4_options) with train.jsonl, dev.jsonl and test.jsonl, and "
        "tasks.medqa.corpus at textbooks/en."
    ),
)
# A sentence ends at ., ! or ? followed by white space and an upper-case letter or digit.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def corpus_files(corpus: str | Path) -> list[Path]:
    corpus = Path(corpus)
    if corpus.is_dir():
        return sorted(corpus.glob("*.txt"))
    return [corpus]


def data_files(options: dict[str, Any]) -> list[Path]:
    files = [Path(options["path"]) / f"{s}.jsonl" for s in SPLITS]
    if options.get("corpus"):
        corpus = Path(options["corpus"])
        found = corpus_files(corpus)
        files += found if found else [corpus / "*.txt"]
    return files


def read_split(path: str | Path) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """Rows (id, question, choices, label) and the option letters of one MedQA file."""
    rows: list[dict[str, Any]] = []
    letters: tuple[str, ...] | None = None
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        options = require(obj, "options", where)
        if not isinstance(options, dict) or not options:
            raise MopError(f"{where}: options must be an object letter -> text")
        keys = tuple(sorted(options))
        if letters is None:
            letters = keys
            if not set(keys) <= set(SPEC.labels):
                raise MopError(f"{where}: option letters {keys} are not among A-E")
        elif keys != letters:
            raise MopError(f"{where}: options {keys} differ from the file's first row {letters}")
        answer = require(obj, "answer_idx", where)
        if answer not in options:
            raise MopError(f"{where}: answer_idx {answer!r} is not one of the options")
        rows.append(
            {
                "id": f"{Path(path).stem}-{n}",
                "text_a": require(obj, "question", where),
                "text_b": None,
                "label": keys.index(answer),
                "choices": [str(options[k]) for k in keys],
            }
        )
    if letters is None:
        raise MopError(f"{path}: no questions")
    return rows, letters


def read_sentences(corpus: str | Path) -> list[str]:
    """The corpus' sentences: every non-empty line of every .txt file, split at sentence ends."""
    sentences = []
    files = corpus_files(corpus)
    if not files:
        raise MopError(f"{corpus}: no .txt files in the MedQA corpus folder")
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MopError(f"{path}: cannot read ({exc})") from exc
        for line in text.splitlines():
            sentences.extend(s.strip() for s in _SENTENCE_END.split(line) if s.strip())
    if not sentences:
        raise MopError(f"{corpus}: the MedQA corpus has no text")
    return sentences


class SentenceIndex:
    """A BM25 index over sentences; `search` returns the joined top-k per query."""

    def __init__(self, sentences: list[str]):
        self.sentences = sentences
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(sentences, show_progress=False), show_progress=False)

    def search(self, queries: list[str], top_k: int) -> list[str]:
        k = min(top_k, len(self.sentences))
        tokens = bm25s.tokenize(queries, show_progress=False)
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)
        return [
            " ".join(self.sentences[d] for d, s in zip(row, srow, strict=True) if s > 0)
            for row, srow in zip(np.asarray(docs), np.asarray(scores), strict=True)
        ]


def prepare(options: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    root = Path(options["path"])
    top_k = int(options.get("top_k", 25))
    index = SentenceIndex(read_sentences(options["corpus"])) if options.get("corpus") else None
    splits, letters = {}, set()
    for s in SPLITS:
        path = root / f"{s}.jsonl"
        rows, keys = read_split(path)
        letters.add(keys)
        if index is not None:
            queries = [f"{r['text_a']} {c}" for r in rows for c in r["choices"]]
            found = index.search(queries, top_k)
            width = len(keys)
            for i, r in enumerate(rows):
                r["contexts"] = found[i * width : (i + 1) * width]
        splits[s] = split_frame(rows, SPEC, str(path))
    if len(letters) != 1:
        raise MopError(f"{root}: the splits have different option letters {sorted(letters)}")
    return write_splits(
        splits,
        SPEC,
        out_dir,
        options=len(next(iter(letters))),
        corpus=str(options.get("corpus") or ""),
        sentences=len(index.sentences) if index else 0,
        top_k=top_k if index else 0,
    )

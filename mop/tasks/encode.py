"""Token ids of a task's splits, written once per tokenizer and max_length.

Every seed, method and mixture of a task reads the same tokens, so the workflow's `encode`
rule tokenizes each prepared split once (`mop encode`) instead of once per run. A split's
tokens are one row per sequence - per example, or per (example, option) for choice tasks -
laid out by the tokenizer's own template (`[CLS] a [SEP] b [SEP]` for BERT, `<s> a </s></s>
b </s>` for RoBERTa and XLM-R), with `input_ids` and, for tokenizers that write segments,
`token_type_ids`: sentence pairs (PubMedQA, BioASQ, MedNLI, MedQA, the pair-format probe)
carry segment 1 on the second text, as BERT was pretrained and as the original fine-tuning
code passed them. Tokens are shared by every model with the same tokenizer, so the model
decides: segment ids reach only models that have more than one token type
(`mop.models.uses_token_types`; a random DistilBERT reading MiniLM's vocabulary ignores
them).

`encoding.json` records the tokenizer, max_length and the digest of every split file it
read; fine-tuning refuses tokens made from another version of a split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from mop.batching import Sequences
from mop.checkpoint import file_digest
from mop.errors import MopError
from mop.io import read_json, write_json, write_parquet
from mop.kg import read_table
from mop.models import ModelSpec, load_tokenizer
from mop.tasks import SPLITS

ENCODING = "encoding.json"


@dataclass(frozen=True)
class EncodedSplit:
    """A tokenized split: one sequence per example, or per (example, option) for choice tasks.

    For choice tasks the sequences of example i are rows i * choices ... i * choices +
    choices - 1, so a batch of examples maps to its sequence rows with `rows`.
    """

    ids: list[str]
    seqs: Sequences
    labels: np.ndarray  # (n,) class / option index, or (n, labels) 0/1 for multi-label
    frame: pl.DataFrame
    choices: int = 1
    candidates: torch.Tensor | None = None  # (n, hidden) vectors for the bilinear head
    route: np.ndarray | None = None  # (n,) the adapter each example goes to (oracle)
    links: np.ndarray | None = None  # (n, K) linked partition distribution (routed mixtures)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        """Per example: the longest of its sequences (for length bucketing)."""
        return self.seqs.lengths.reshape(len(self), self.choices).max(1)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return (idx[:, None] * self.choices + np.arange(self.choices)[None, :]).ravel()

    def extras(self, idx: np.ndarray) -> dict[str, Any]:
        """The batch's candidate vectors, oracle routes and links, where the model uses
        them (links repeated for every option of a choice task)."""
        out: dict[str, Any] = {}
        if self.candidates is not None:
            out["candidates"] = self.candidates[torch.from_numpy(idx)]
        if self.route is not None:
            out["route"] = self.route[idx]
        if self.links is not None:
            out["links"] = torch.from_numpy(np.repeat(self.links[idx], self.choices, axis=0))
        return out


def _pairs(frame: pl.DataFrame, kind: str) -> tuple[list[str], list[str | None], int]:
    """The texts to tokenize: (first texts, second texts or None, sequences per example).

    single / multi: (text_a, text_b). choice: per option, (text_a + " " + option, the
    option's retrieved context if any).
    """
    a = frame["text_a"].to_list()
    if kind != "choice":
        b = frame["text_b"].to_list() if "text_b" in frame.columns else [None] * len(a)
        return a, b, 1
    choices = frame["choices"].to_list()
    width = len(choices[0]) if choices else 0
    if any(len(c) != width for c in choices):
        raise MopError("finetune: every question of a choice task needs the same options")
    contexts = (
        frame["contexts"].to_list() if "contexts" in frame.columns else [[None] * width] * len(a)
    )
    pair_a = [f"{q} {c}" for q, opts in zip(a, choices, strict=True) for c in opts]
    pair_b = [x or None for ctx in contexts for x in ctx]
    return pair_a, pair_b, width


def encode_frame(frame: pl.DataFrame, tokenizer: Any, max_length: int, kind: str) -> pl.DataFrame:
    """One row per sequence: example, option, input_ids (and token_type_ids), truncated to
    max_length (longest text first for pairs)."""
    a, b, width = _pairs(frame, kind)
    if all(x is None for x in b):
        enc = tokenizer(a, truncation=True, max_length=max_length)
    else:
        enc = tokenizer(a, [x or "" for x in b], truncation="longest_first", max_length=max_length)
    n = len(a)
    columns: dict[str, pl.Series] = {
        "example": pl.Series(np.arange(n) // max(width, 1), dtype=pl.Int32),
        "option": pl.Series(np.arange(n) % max(width, 1), dtype=pl.Int16),
        "input_ids": pl.Series(enc["input_ids"], dtype=pl.List(pl.Int32)),
    }
    if "token_type_ids" in enc:
        columns["token_type_ids"] = pl.Series(enc["token_type_ids"], dtype=pl.List(pl.Int8))
    return pl.DataFrame(columns)


def split_folders(task_dir: str | Path) -> list[Path]:
    """The folders holding a task's prepared splits: the task folder, or its folds."""
    root = Path(task_dir)
    folders = [p.parent for p in sorted(root.glob("**/train.parquet"))]
    if not folders:
        raise MopError(f"{root}: no prepared task splits (train.parquet) found")
    return folders


def write_encoding(
    task_dir: str | Path, kind: str, spec: ModelSpec, max_length: int, out_dir: str | Path
) -> dict[str, Any]:
    """Tokenize every split of a prepared task (every fold too); mirror its folders."""
    root, out = Path(task_dir), Path(out_dir)
    tokenizer = load_tokenizer(spec)
    record: dict[str, Any] = {
        "tokenizer": (spec.tokenizer or spec).identifier(),
        "max_length": max_length,
        "kind": kind,
        "splits": {},
    }
    for folder in split_folders(root):
        rel = folder.relative_to(root)
        for s in SPLITS:
            path = folder / f"{s}.parquet"
            frame = read_table(path)
            tokens = encode_frame(frame, tokenizer, max_length, kind)
            write_parquet(tokens, out / rel / f"{s}.parquet")
            record["splits"][str(rel / s)] = {
                "digest": file_digest(path),
                "sequences": tokens.height,
                "tokens": int(tokens["input_ids"].list.len().sum()),
            }
    write_json(record, out / ENCODING)
    return record


def _labels(frame: pl.DataFrame, kind: str) -> np.ndarray:
    if kind == "multi":
        return np.asarray(frame["label"].to_list(), dtype=np.int64)
    return frame["label"].to_numpy().astype(np.int64)


def split_from_tokens(frame: pl.DataFrame, tokens: pl.DataFrame, kind: str) -> EncodedSplit:
    """A split from its frame and its tokens (`encode_frame`'s rows, in the same order)."""
    choices = len(frame["choices"][0]) if kind == "choice" and frame.height else 1
    types = tokens["token_type_ids"] if "token_type_ids" in tokens.columns else None
    return EncodedSplit(
        frame["id"].cast(pl.String).to_list(),
        Sequences.from_series(tokens["input_ids"], types),
        _labels(frame, kind),
        frame,
        choices,
    )


def load_split(
    task_dir: str | Path,
    split: str,
    kind: str,
    *,
    encoded_dir: str | Path | None = None,
    tokenizer: Any = None,
    max_length: int = 128,
) -> EncodedSplit:
    """A split with its tokens: read from `encoded_dir` (written by `mop encode` for the
    same split file and max_length), or tokenized here with `tokenizer`."""
    path = Path(task_dir) / f"{split}.parquet"
    if not path.is_file():
        raise MopError(f"{path}: task split not found (run the task's prepare step)")
    frame = read_table(path)
    if encoded_dir is None:
        return split_from_tokens(frame, encode_frame(frame, tokenizer, max_length, kind), kind)
    encoded = Path(encoded_dir)
    record_path = next(
        (p / ENCODING for p in (encoded, *encoded.parents) if (p / ENCODING).is_file()), None
    )
    if record_path is None:
        raise MopError(f"{encoded}: no {ENCODING} (run `mop encode` for this task)")
    record = read_json(record_path)
    key = str((encoded / split).relative_to(record_path.parent))
    entry = record["splits"].get(key)
    if entry is None or entry["digest"] != file_digest(path):
        raise MopError(
            f"{encoded / f'{split}.parquet'}: tokens were made from another version of {path}; "
            "run `mop encode` again"
        )
    if record["max_length"] != max_length:
        raise MopError(
            f"{record_path}: tokens were made with max_length {record['max_length']}, "
            f"this run asks for {max_length}"
        )
    tokens = read_table(encoded / f"{split}.parquet")
    return split_from_tokens(frame, tokens, kind)

"""Length-bucketed batches of token id sequences, padded per batch.

Sequences live in one flat int32 array with offsets, so a batch is built with a few
numpy operations and no Python loop per token; there is no DataLoader to starve the model.
Each epoch's order is a pure function of (seed, epoch), so a resumed job sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch


@dataclass(frozen=True)
class Sequences:
    """Variable-length token id sequences: flat values plus start offsets, and optionally
    the segment (token type) id of every token, for sentence pairs."""

    values: np.ndarray  # int32, all sequences back to back
    offsets: np.ndarray  # int64, len n + 1
    types: np.ndarray | None = None  # int8, same layout as values

    @classmethod
    def from_series(cls, ids: pl.Series, types: pl.Series | None = None) -> Sequences:
        lengths = ids.list.len().to_numpy().astype(np.int64)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat_types = None
        if types is not None:
            if not (types.list.len().to_numpy() == lengths).all():
                raise ValueError("token_type_ids and input_ids differ in length")
            flat_types = types.explode().to_numpy().astype(np.int8)
        return cls(ids.explode().to_numpy().astype(np.int32), offsets, flat_types)

    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def pad(self, index: np.ndarray, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) for the given rows, padded to their longest."""
        starts = self.offsets[index]
        lens = self.offsets[index + 1] - starts
        width = int(lens.max())
        cols = np.arange(width)
        mask = cols[None, :] < lens[:, None]
        gather = np.where(mask, starts[:, None] + cols[None, :], 0)
        ids = np.where(mask, self.values[gather], pad_id)
        return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def batch(self, index: np.ndarray, pad_id: int = 0) -> dict[str, torch.Tensor]:
        """The model inputs of the given rows: input_ids, attention_mask and, for sequences
        with segments, token_type_ids (0 on padding)."""
        ids, mask = self.pad(index, pad_id)
        out = {"input_ids": ids, "attention_mask": mask}
        if self.types is not None:
            starts = self.offsets[index]
            cols = np.arange(ids.shape[1])
            m = mask.numpy().astype(bool)
            gather = np.where(m, starts[:, None] + cols[None, :], 0)
            out["token_type_ids"] = torch.from_numpy(
                np.where(m, self.types[gather], 0).astype(np.int64)
            )
        return out


def bucketed_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, bucket_batches: int = 50
) -> list[np.ndarray]:
    """One epoch of batches: shuffle, sort by length within buckets, shuffle the batches.

    A bucket holds `bucket_batches` batches' worth of examples, so batches are nearly
    uniform in length (little padding) while their order and composition stay random.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(lengths.size)
    span = batch_size * bucket_batches
    batches: list[np.ndarray] = []
    for start in range(0, order.size, span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, chunk.size, batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def sequential_batches(
    n: int, batch_size: int, lengths: np.ndarray | None = None
) -> list[np.ndarray]:
    """Evaluation batches: every example once, sorted by length when lengths are given."""
    order = np.argsort(lengths, kind="stable") if lengths is not None else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]

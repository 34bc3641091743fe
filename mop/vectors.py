"""Vectors from an encoder: the pooling both stages' heads read (`pool`), and entity-name
vectors: the entity head's initialisation in pretraining (`head_init: names`), the
candidates of the bilinear head in fine-tuning, and the probe's name-similarity baseline.
One module, so both stages read sequences and names the same way."""

from __future__ import annotations

from typing import Any

import polars as pl
import torch

from mop.batching import Sequences, sequential_batches
from mop.runtime import Runtime, evaluating

POOLINGS = ("cls", "mean", "pooler")


def pool(out: Any, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per sequence from an encoder's output, for every family: `cls` the last
    layer's first token (`[CLS]`, `<s>`), `mean` the mean over the sequence's real tokens,
    `pooler` the pooler output of models that have one."""
    if pooling == "pooler":
        return out.pooler_output
    h = out.last_hidden_state
    if pooling == "cls":
        return h[:, 0]
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def raw_name_vectors(
    encoder: torch.nn.Module,
    tokenizer: Any,
    names: list[str],
    batch_size: int = 256,
    runtime: Runtime | None = None,
) -> torch.Tensor:
    """[CLS] vectors of entity names from `encoder` as it is; on the CPU, fp32.

    Computed on the runtime's device (the encoder comes back to where it was)."""
    rt = runtime or Runtime(next(encoder.parameters()).device)
    enc = tokenizer(names, truncation=True, max_length=32)
    seqs = Sequences.from_series(pl.Series(enc["input_ids"], dtype=pl.List(pl.Int32)))
    out = torch.empty(len(names), encoder.config.hidden_size)
    home = next(encoder.parameters()).device
    encoder.to(rt.device)
    with evaluating(encoder):
        for idx in sequential_batches(len(seqs), batch_size, seqs.lengths):
            ids, mask = seqs.pad(idx, tokenizer.pad_token_id)
            with rt.forward_context():
                hidden = encoder(
                    input_ids=rt.to_device(ids), attention_mask=rt.to_device(mask)
                ).last_hidden_state
            out[torch.from_numpy(idx)] = hidden[:, 0].float().cpu()
    encoder.to(home)
    return out


def centred(vectors: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """Unit-length vectors after subtracting `centre` (default: their own mean)."""
    c = vectors.mean(0, keepdim=True) if centre is None else centre
    return torch.nn.functional.normalize(vectors - c, dim=-1)


def name_vectors(
    encoder: torch.nn.Module,
    tokenizer: Any,
    names: list[str],
    batch_size: int = 256,
    runtime: Runtime | None = None,
) -> torch.Tensor:
    """Centred, unit-length [CLS] vectors of entity names (our entity head initialisation,
    and the probe's candidate vectors)."""
    return centred(raw_name_vectors(encoder, tokenizer, names, batch_size, runtime))

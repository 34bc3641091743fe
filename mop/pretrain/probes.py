"""The knowledge probe: how well a partition's entity predictor ranks the right entity."""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from mop.batching import sequential_batches
from mop.errors import MopError
from mop.pretrain.config import PretrainConfig
from mop.pretrain.data import PartitionData
from mop.pretrain.model import EntityPredictor
from mop.runtime import Runtime, evaluating


def filtered_ranks(
    scores: torch.Tensor, targets: torch.Tensor, known: torch.Tensor
) -> torch.Tensor:
    """Realistic rank of each target among its row's scores, other known answers filtered.

    scores: (n, E); targets: (n,); known: (n, E) bool, True for every correct answer of
    the row's query. Rank = 1 + non-answers scoring higher + half the non-answers that tie
    with the target: the expected rank under a random order of ties (PyKEEN's "realistic"
    rank), so ties never count in the target's favour. Float, e.g. 1.5.
    """
    target_score = scores.gather(1, targets[:, None])
    higher = ((scores > target_score) & ~known).sum(1)
    ties = ((scores == target_score) & ~known).sum(1)
    return 1.0 + higher.double() + 0.5 * ties.double()


def knowledge_probe(
    model: EntityPredictor,
    data: PartitionData,
    rows: np.ndarray,
    pad_id: int,
    batch_size: int = 256,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """hits@1, hits@10 and MRR of entity prediction on the given example rows (filtered,
    realistic ranks over fp32 scores: see `filtered_ranks`)."""
    if rows.size == 0:
        return {}
    rt = runtime or Runtime(next(model.parameters()).device)
    answers: dict[int, list[int]] = {}
    for q, label in zip(data.query, data.labels, strict=True):
        answers.setdefault(int(q), []).append(int(label))
    ranks = []
    batches = sequential_batches(rows.size, batch_size, data.seqs.lengths[rows])
    with evaluating(model):
        for idx in tqdm(batches, desc="knowledge probe", mininterval=5):
            batch = rows[idx]
            scores = model.scores(rt.batch(data.seqs.batch(batch, pad_id)), rt).cpu()
            if not torch.isfinite(scores).all():
                raise MopError(
                    "knowledge probe: the entity head gives non-finite scores (a diverged "
                    "adapter or head); its metrics would mean nothing"
                )
            known = torch.zeros_like(scores, dtype=torch.bool)
            for i, q in enumerate(data.query[batch]):
                known[i, answers[int(q)]] = True
            ranks.append(filtered_ranks(scores, torch.from_numpy(data.labels[batch]), known))
    r = torch.cat(ranks)
    return {
        "hits_at_1": float((r <= 1).double().mean()),
        "hits_at_10": float((r <= 10).double().mean()),
        "mrr": float((1.0 / r).mean()),
        "examples": int(r.numel()),
    }


def probe_rows(rows: np.ndarray, size: int | str, seed: int) -> np.ndarray:
    """The example rows the knowledge probe ranks: all of them, or a seeded sample of
    `size` (in row order), so a partition of 400k triples costs a few thousand forwards."""
    if size == "all" or rows.size <= int(size):
        return rows
    rng = np.random.default_rng([seed, 0x9E0B])  # its own stream: training's draws stay
    return np.sort(rng.choice(rows, int(size), replace=False))


def probe_partition(
    model: EntityPredictor, data: PartitionData, cfg: PretrainConfig, pad_id: int, rt: Runtime
) -> tuple[dict[str, dict[str, float]], float]:
    """The knowledge probe on a sample of the training facts and, when some were held
    out, of the held-out ones; and the seconds it took."""
    tick = time.perf_counter()
    train = probe_rows(np.flatnonzero(~data.heldout), cfg.probe_examples, cfg.seed)
    probe = {"train": knowledge_probe(model, data, train, pad_id, cfg.eval_batch_size, rt)}
    if data.heldout.any():
        held = probe_rows(np.flatnonzero(data.heldout), cfg.probe_examples, cfg.seed)
        probe["heldout"] = knowledge_probe(model, data, held, pad_id, cfg.eval_batch_size, rt)
    return probe, time.perf_counter() - tick

"""The training loop adapter pretraining and fine-tuning share.

`Loop.run` is the one loop both stages train in (`mop.pretrain.pretrain_partition`,
`mop.finetune.finetune`): epochs of length-bucketed batches, one optimisation step per
batch over `grad_accum` micro-batches (`accumulate`: the gradient equals the whole
batch's), a stop on a non-finite loss before the step is applied (`check_finite`),
checkpoints every `checkpoint_every` steps and at every epoch end, SIGTERM honoured at the
next step, and resume from the last checkpoint. A stage supplies its batch loss and two
hooks: `after_step` (logging, tracking) and `after_epoch` (evaluation, early stopping).
`param_groups` builds AdamW's groups: no weight decay on biases and LayerNorm weights, one
learning rate per model part.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from mop.batching import bucketed_batches
from mop.checkpoint import Checkpoint, StopSignal
from mop.errors import MopError, Preempted
from mop.log import log


def no_decay(name: str) -> bool:
    """Biases and LayerNorm weights get no weight decay (BERT practice)."""
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lrs: Mapping[str, float],
    part_of: Callable[[str], str] = lambda name: "all",
) -> list[dict]:
    """AdamW groups, one per (part, decay): `part_of(name)` names a parameter's part and
    `lrs[part]` its learning rate. A part whose learning rate is 0 is frozen (its
    parameters stop requiring gradients); parameters that do not train are left out."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = part_of(name)
        if lrs[part] == 0:
            p.requires_grad_(False)
            continue
        groups.setdefault((part, not no_decay(name)), []).append(p)
    return [
        {
            "params": ps,
            "lr": lrs[part],
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), ps in sorted(groups.items())
    ]


def micro_batches(index: np.ndarray, grad_accum: int) -> list[np.ndarray]:
    """A batch's rows in `grad_accum` near-equal consecutive parts (fewer if it is smaller)."""
    return np.array_split(index, max(1, min(grad_accum, index.size)))


def accumulate(
    index: np.ndarray,
    grad_accum: int,
    loss_of: Callable[[np.ndarray, np.ndarray], torch.Tensor],
) -> torch.Tensor:
    """Forward and backward over the micro-batches of one batch; return the batch loss.

    `loss_of(micro, index)` returns the micro-batch's part of the whole batch's loss (a
    mean loss weighted by `micro.size / index.size`, a sum divided by a count over the
    whole batch), so the summed gradient is the whole batch's: `grad_accum` only trades
    memory for time wherever the loss is linear in the batch. The loss stays on the
    device (no sync).
    """
    total: torch.Tensor | None = None
    for micro in micro_batches(index, grad_accum):
        loss = loss_of(micro, index)
        loss.backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
    assert total is not None
    return total


def share(micro: np.ndarray, index: np.ndarray) -> float:
    """A micro-batch's share of its batch: the weight of its mean loss."""
    return micro.size / index.size


def check_finite(loss: torch.Tensor, where: str, step: int, checkpoint: Checkpoint) -> None:
    """Stop a run whose training loss is NaN or infinite, before the step is applied.

    One message names the run, the step and the last checkpoint written before it (the
    weights there are the last known good ones); nothing else of the run is written."""
    if bool(torch.isfinite(loss)):
        return
    last = checkpoint.current()
    good = f"last good checkpoint: {last}" if last else "no checkpoint was written before it"
    raise MopError(
        f"{where}: training loss is {float(loss)} at step {step}; {good}. Lower the "
        "learning rate, set max_grad_norm or use fp32, then run it again"
    )


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_grad_norm: float | None = None,
) -> None:
    """Clip (when asked), step the optimizer and the schedule, clear the gradients."""
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.grad is not None], max_grad_norm
        )
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class LoopState:
    """Where a run is; a checkpoint stores it as plain values. A stage with more state
    (fine-tuning's early stopping) subclasses it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # the next batch of the current epoch
    examples: int = 0
    seconds: float = 0.0  # time in training steps (not evaluation or checkpoints)
    loss_sum: float = 0.0  # this epoch's summed batch losses so far
    finished: bool = False  # an `after_epoch` hook stopped the run (early stopping)
    history: list = field(default_factory=list)

    @property
    def examples_per_s(self) -> float:
        return self.examples / max(self.seconds, 1e-9)


State = TypeVar("State", bound=LoopState)


class LoopSettings(Protocol):
    """The settings of a stage's config that the loop reads (PretrainConfig, FinetuneConfig)."""

    batch_size: int
    seed: int
    epochs: float
    grad_accum: int
    max_grad_norm: float | None
    checkpoint_every: int


@dataclass
class Loop:
    """One run's training: what it trains, on which examples, for how long, and the
    stage's batch loss and hooks."""

    name: str  # the run, in messages and progress
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    checkpoint: Checkpoint
    loss_of: Callable[[np.ndarray, np.ndarray], torch.Tensor]  # see `accumulate`
    lengths: np.ndarray  # per training example, for length bucketing
    batch_size: int
    seed: int
    epochs: float
    total_steps: int
    rows: np.ndarray | None = None  # the examples `lengths` belong to (default 0..n-1)
    grad_accum: int = 1
    max_grad_norm: float | None = None
    checkpoint_every: int | None = None
    after_step: Callable[[Any, torch.Tensor], None] | None = None
    after_epoch: Callable[[Any, float], bool] | None = None  # True: stop after this epoch
    kept: Callable[[Any], tuple[Any, dict[str, torch.Tensor] | None]] | None = None  # (tag, it)

    @classmethod
    def from_config(
        cls,
        cfg: LoopSettings,
        name: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        checkpoint: Checkpoint,
        loss_of: Callable[[np.ndarray, np.ndarray], torch.Tensor],
        lengths: np.ndarray,
        total_steps: int,
        **hooks: Any,
    ) -> Loop:
        """A loop with a stage config's batch size, seed, epochs, accumulation, clipping and
        checkpoint cadence; `hooks`: the other fields (rows, after_step, after_epoch, kept)."""
        return cls(
            name,
            model,
            optimizer,
            scheduler,
            checkpoint,
            loss_of,
            lengths,
            cfg.batch_size,
            cfg.seed,
            cfg.epochs,
            total_steps,
            grad_accum=cfg.grad_accum,
            max_grad_norm=cfg.max_grad_norm,
            checkpoint_every=cfg.checkpoint_every,
            **hooks,
        )

    def resume(self, state: State) -> tuple[State, dict[str, torch.Tensor] | None]:
        """The checkpoint's state (and kept weights) if one matches this run, else `state`."""
        resumed = self.checkpoint.load(self.model, self.optimizer, self.scheduler)
        if resumed is None:
            return state, None
        log(
            f"{self.name}: resuming from step {resumed.position['step']} ({self.checkpoint.folder})"
        )
        names = {f.name for f in fields(state)}
        return type(state)(
            **{k: v for k, v in resumed.position.items() if k in names}
        ), resumed.kept

    def save(self, state: LoopState, stop: StopSignal) -> None:
        tag, weights = self.kept(state) if self.kept else (None, None)
        kept = (lambda: weights) if weights is not None else None
        self.checkpoint.save(
            self.model, self.optimizer, self.scheduler, asdict(state), kept, kept_tag=tag
        )
        if stop.requested:
            raise Preempted(
                f"{self.name}: stopped by SIGTERM at step {state.step}; the checkpoint holds "
                "it, run the same command again to resume"
            )

    def run(self, state: State) -> State:
        """Train from `state` until the epochs or steps are done or a hook stops it."""
        rows = np.arange(self.lengths.size) if self.rows is None else self.rows
        device = next(self.model.parameters()).device
        bar = tqdm(total=self.total_steps, initial=state.step, desc=self.name, mininterval=5)
        with StopSignal() as stop:
            while (
                not state.finished and state.epoch < self.epochs and state.step < self.total_steps
            ):
                self.model.train()
                batches = bucketed_batches(self.lengths, self.batch_size, self.seed, state.epoch)
                loss_sum = torch.tensor(state.loss_sum, device=device)
                for b in range(state.batch, len(batches)):
                    tick = time.perf_counter()
                    index = rows[batches[b]]
                    loss = accumulate(index, self.grad_accum, self.loss_of)
                    check_finite(loss, self.name, state.step + 1, self.checkpoint)
                    optimizer_step(self.model, self.optimizer, self.scheduler, self.max_grad_norm)
                    loss_sum += loss
                    state.step, state.batch = state.step + 1, b + 1
                    state.examples += index.size
                    state.seconds += time.perf_counter() - tick
                    bar.update(1)
                    if self.after_step:
                        self.after_step(state, loss)
                    if state.batch == len(batches) or state.step >= self.total_steps:
                        break
                    every = self.checkpoint_every
                    if stop.requested or (every and state.step % every == 0):
                        state.loss_sum = float(loss_sum)
                        self.save(state, stop)
                state.loss_sum = float(loss_sum)
                if state.batch == len(batches):  # the epoch is complete
                    if self.after_epoch:
                        state.finished = self.after_epoch(state, state.loss_sum / len(batches))
                    state.epoch, state.batch, state.loss_sum = state.epoch + 1, 0, 0.0
                self.save(state, stop)
        bar.close()
        return state

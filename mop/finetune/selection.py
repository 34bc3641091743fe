"""Dev selection, fine-tuning's after-epoch hook: evaluate on dev, keep the best
weights, stop early; and the loop state it keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mop.checkpoint import trainable_state
from mop.errors import MopError
from mop.finetune.config import FinetuneConfig
from mop.finetune.evaluation import evaluate, predict
from mop.finetune.model import Classifier
from mop.log import log
from mop.runtime import Runtime
from mop.tasks import TaskSpec
from mop.tasks.encode import EncodedSplit
from mop.tracking import Tracker
from mop.training import LoopState


@dataclass
class FinetuneState(LoopState):
    """The loop's state and early stopping's: the best dev score so far, its epoch and
    dev probabilities (the final dev metrics are that epoch's own), epochs without gain."""

    best_score: float = -math.inf
    best_epoch: int = -1
    best_dev: list | None = None
    stale: int = 0


@dataclass
class DevSelection:
    """The loop's after-epoch hook: evaluate on dev, log and track the epoch, keep the
    best weights (`best`, checkpointed as the kept state), stop once `patience` epochs
    in a row bring no gain."""

    model: Classifier
    task: TaskSpec
    dev: EncodedSplit
    cfg: FinetuneConfig
    pad_id: int
    rt: Runtime
    name: str
    tracker: Tracker | None = None
    best: dict[str, torch.Tensor] | None = None

    def kept(self, state: FinetuneState) -> tuple[int, dict[str, torch.Tensor] | None]:
        return state.best_epoch, self.best

    def restore_best(self, where: str) -> None:
        """Load the best epoch's weights into the model, for the final evaluation."""
        if self.best is None:
            raise MopError(f"{where}: no epoch was evaluated (epochs = {self.cfg.epochs})")
        self.model.load_state_dict(self.best, strict=False)

    def __call__(self, state: FinetuneState, train_loss: float) -> bool:
        task, cfg = self.task, self.cfg
        probs, _, _ = predict(
            self.model, task, self.dev, self.pad_id, cfg.eval_batch_size, runtime=self.rt
        )
        dev_metrics, _ = evaluate(task, self.dev, probs)
        entry = {
            "epoch": state.epoch,
            "step": state.step,
            "train_loss": train_loss,
            **{f"dev_{k}": v for k, v in dev_metrics.items()},
        }
        state.history.append(entry)
        improved = dev_metrics[task.main_metric] > state.best_score
        if improved:
            state.best_score, state.best_epoch = dev_metrics[task.main_metric], state.epoch
            state.best_dev, state.stale = probs.tolist(), 0
            self.best = trainable_state(self.model)
        else:
            state.stale += 1
        speed = state.examples_per_s
        log(
            f"finetune {self.name} epoch {state.epoch + 1}/{cfg.epochs}: train loss "
            f"{train_loss:.4f}, "
            + ", ".join(f"dev {k} {v:.4f}" for k, v in dev_metrics.items())
            + f"{' (best)' if improved else ''}, {speed:.1f} examples/s"
        )
        if self.tracker:
            metrics = {k: v for k, v in entry.items() if k != "epoch"}
            self.tracker.log_metrics(metrics | {"examples_per_s": speed}, state.epoch)
        return state.stale >= cfg.patience

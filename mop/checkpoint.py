"""Checkpoints that let a killed or requeued job resume to the same result.

`Checkpoint` holds the parameters that train, the optimizer, the scheduler, the CPU and
CUDA RNG states and the loop's position and state (history, early stopping), written so
that a killed job always finds a complete checkpoint, and resumed only when the data and
settings (its `fingerprint`) are the same. `StopSignal` turns SIGTERM (`scancel`,
preemption, a requeue) into a request to checkpoint at the next step and exit, so a
preempted job loses no work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mop.errors import MopError
from mop.io import write_json


def fingerprint(settings: Mapping[str, Any], *parts: Any) -> str:
    """A short digest of settings (JSON) and data (arrays, strings, bytes)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, bytes):
            digest.update(part)
        else:
            digest.update(str(part).encode())
    return digest.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, on the CPU (what a checkpoint or best state holds)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {
        n: t.detach().to("cpu", copy=True).contiguous()
        for n, t in model.state_dict().items()
        if n in names
    }


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Resumed:
    """What a checkpoint gives back: the loop's position and state, and a kept state
    (fine-tuning: the best epoch's weights) if one was saved."""

    position: dict[str, Any]
    kept: dict[str, torch.Tensor] | None


class Checkpoint:
    """A job's checkpoints in one folder: `step-<n>/` folders and `latest.json`.

    A checkpoint folder is written completely before `latest.json` (replaced atomically)
    points to it, and older folders are removed only after that, so a job killed at any
    moment leaves a complete checkpoint to resume from. A checkpoint resumes only a run
    with the same fingerprint (data and settings). The optional kept state (fine-tuning:
    the best weights so far) is rewritten only when its tag changes; otherwise the next
    checkpoint links the same file.
    """

    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self._kept_tag: Any = None

    @property
    def latest(self) -> Path:
        return self.folder / "latest.json"

    def exists(self) -> bool:
        return self.latest.is_file()

    def save(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        position: dict[str, Any],
        kept: Callable[[], dict[str, torch.Tensor]] | None = None,
        kept_tag: Any = None,
    ) -> Path:
        """Write a checkpoint at `position` (a dict of plain values: step, epoch, batch,
        history, ...); `kept()` is called only when `kept_tag` differs from the last one."""
        step = int(position["step"])
        target = self.folder / f"step-{step:08d}"
        tmp = self.folder / f".step-{step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        previous = self._current_dir()
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
                "position": {**position, "fingerprint": self.fingerprint},
            },
            tmp / "train_state.pt",
        )
        if kept is not None:
            old = previous / "kept.safetensors" if previous else None
            if kept_tag == self._kept_tag and old is not None and old.is_file():
                os.link(old, tmp / "kept.safetensors")
            else:
                save_file(kept(), tmp / "kept.safetensors")
            self._kept_tag = kept_tag
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        write_json({"dir": target.name, "step": step, "kept_tag": kept_tag}, self.latest)
        for old_dir in self.folder.glob("step-*"):
            if old_dir != target:
                shutil.rmtree(old_dir, ignore_errors=True)
        return target

    def _current_dir(self) -> Path | None:
        if not self.exists():
            return None
        return self.folder / json.loads(self.latest.read_text())["dir"]

    def current(self) -> Path | None:
        """The latest complete checkpoint's folder, if one was written."""
        return self._current_dir()

    def load(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> Resumed | None:
        """Restore the latest checkpoint into model, optimizer, scheduler and the RNGs;
        None when there is none or it was written for other data or settings."""
        current = self._current_dir()
        if current is None:
            return None
        try:
            pointer = json.loads(self.latest.read_text())
            state = torch.load(current / "train_state.pt", weights_only=True)
            trainable = load_file(current / "trainable.safetensors")
            kept_path = current / "kept.safetensors"
            kept = load_file(kept_path) if kept_path.is_file() else None
        except Exception as exc:  # any unreadable checkpoint: say which, never guess
            reason = (str(exc).splitlines() or [""])[0][:200]
            raise MopError(
                f"{current}: checkpoint is unreadable ({type(exc).__name__}: {reason}); "
                f"delete {self.folder} to restart this job from scratch"
            ) from exc
        position = state["position"]
        if position.get("fingerprint") != self.fingerprint:
            print(f"mop: ignoring {self.folder}: written for other data or settings", flush=True)
            return None
        model.load_state_dict(trainable, strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self._kept_tag = pointer.get("kept_tag")
        return Resumed(position, kept)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class StopSignal:
    """While active, SIGTERM only sets `requested`; the loop checkpoints and raises
    `Preempted` at its next step boundary (SLURM sends SIGTERM before SIGKILL)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopSignal:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave the default handler
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

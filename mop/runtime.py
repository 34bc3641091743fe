"""Where and how a model runs, shared by pretraining, fine-tuning and inference.

`Runtime`: the device (`auto`, `cpu`, `cuda`, `cuda:N`), bf16 autocast (CUDA, and CPUs
with native bf16), TF32 on CUDA, CPU threads, optional `torch.compile`, pinned
host-to-device copies, a malloc that keeps freed buffers (`keep_freed_memory`), and the
context every forward runs in (`forward_context`: autocast, and on the CPU the dropout
masks of `mop.dropout`); `Runtime.optimizer` is AdamW with the fused kernel. `seed_all`
seeds every generator a run draws from; `evaluating` is the inference mode every
evaluation pass runs in.
"""

from __future__ import annotations

import contextlib
import ctypes
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mop.dropout import CpuDropout
from mop.errors import MopError
from mop.machine import cpu_flags

PRECISIONS = ("auto", "fp32", "bf16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the current CUDA device when there is one, else the CPU; `cuda` without an
    index becomes the current device's `cuda:N`."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise MopError(f"config key runtime.device: {name!r} is not auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MopError(
                f"config key runtime.device: {name} asked for, but this torch "
                f"({torch.__version__}) sees no CUDA device; use auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MopError(
                f"config key runtime.device: {name} asked for, but only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible"
            )
        if device.index is None:  # torch.cuda.set_device and memory queries need an index
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether the device computes bf16 matmuls natively: a CUDA device that supports it,
    or a CPU with AVX-512 BF16 or AMX (elsewhere CPU bf16 is emulated, and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """fp32 or bf16: `auto` is bf16 where the device computes it natively."""
    if precision not in PRECISIONS:
        raise MopError(
            f"config key runtime.precision: {precision!r} is not one of {', '.join(PRECISIONS)}"
        )
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


@dataclass(frozen=True)
class Runtime:
    """Where a training or inference job runs, in which precision."""

    device: torch.device
    precision: str = "fp32"  # resolved: fp32 or bf16 (autocast)
    compile: bool = False

    @classmethod
    def create(
        cls,
        device: str = "auto",
        precision: str = "auto",
        threads: int = 1,
        compile: bool = False,
    ) -> Runtime:
        """Resolve the device and precision and set the process up for them.

        `precision: auto` is bf16 autocast where the device computes bf16 natively
        (`bf16_supported`: a CUDA card that has it, a CPU with AVX-512 BF16 or AMX) and fp32
        elsewhere. bf16 on the CPU is CPU autocast, the same path as on CUDA: the weights
        stay fp32 (the master copy the optimizer updates), matmuls run in bf16, and the
        losses, probe scores and mixture weights are computed in fp32. The default table
        holds under it within the seeds' spread (docs/measurements.md); its numbers differ
        from fp32's, and between CPUs, in more than the last bits, so `fp32` is the choice
        for numbers that must be equal on every machine. Where the CPU lacks native bf16,
        `bf16` is emulated and slower than fp32.
        """
        dev = resolve_device(device)
        torch.set_num_threads(max(1, threads))
        keep_freed_memory()
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return cls(dev, resolve_precision(dev, precision), compile)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """What every forward runs in: bf16 autocast when the precision asks for it, and for
        training forwards on the CPU `mop.dropout.CpuDropout` (dropout masks without the
        serial sampler); evaluation forwards draw no masks, so they skip its dispatch."""
        autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )
        masks = not self.cuda and torch.is_grad_enabled()
        with autocast, CpuDropout() if masks else contextlib.nullcontext():
            yield

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host-to-device copy; from pinned memory and asynchronous on CUDA."""
        if not self.cuda:
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def batch(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.to_device(v) for k, v in tensors.items()}

    def prepare(self, model: torch.nn.Module) -> Callable[..., Any]:
        """Move the model to the device; return what to call for training forwards
        (the compiled model with `compile`, else the model itself)."""
        model.to(self.device)
        return torch.compile(model, dynamic=True) if self.compile else model

    def optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """AdamW with the fused kernel, on the CPU too: one vectorised update per tensor
        instead of a Python loop of small ops (4.5x faster on MiniLM's 22.7M parameters
        on one core, which made the optimizer half of a fine-tuning step)."""
        return torch.optim.AdamW(groups, fused=True)

    def describe(self) -> dict[str, Any]:
        """What ran where, for metrics and run records."""
        out: dict[str, Any] = {
            "device": str(self.device),
            "precision": self.precision,
            "compile": self.compile,
            "threads": torch.get_num_threads(),
        }
        if self.cuda:
            out["gpu"] = torch.cuda.get_device_name(self.device)
        return out

    def peak_memory_mb(self) -> float | None:
        if not self.cuda:
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed buffers instead of returning them to the system.

    By default a buffer of more than a few MB (activations, gradients) is mmapped when
    allocated and unmapped when freed, so every training step faults its memory in again
    page by page: on a MiniLM step at 8 x 400 tokens that was a fifth of the time, in the
    kernel. Keeping freed memory in the heap (what jemalloc or tcmalloc do) removes it.
    Returns whether the setting took (glibc on Linux only; elsewhere nothing changes).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30)
        ok = ok and libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):
        return False
    return bool(ok)


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy's global generator and `random`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Evaluation mode and `torch.inference_mode()`; training mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)

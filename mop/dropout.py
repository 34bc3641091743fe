"""Dropout on the CPU without PyTorch's one-element-at-a-time Bernoulli sampler.

On the CPU, `torch.nn.functional.dropout` (and attention dropout inside
`scaled_dot_product_attention`, which then falls back to its unfused math path) draws
every mask element from a 53-bit uniform, one element at a time, on one thread
(`aten::bernoulli_`): fine-tuning MiniLM at 8 x 400 tokens spent 28% of each step there,
mostly on the attention dropout over batch x heads x length x length.

`keep_mask` takes the bits from the same seeded torch generator, 64 at a time, and
splits each draw into four 16-bit lanes; an element is kept when its lane is at least
round(p * 2^16), so the keep probability is 1 - p to within 2^-17, and the comparison
runs vectorised on every thread (about 5 x cheaper per element than `bernoulli_` here).
The masks still come from torch's seeded CPU generator, so a run, and a resumed run
(whose checkpoint holds the generator's state), draws the same masks again.

`CpuDropout` is a `TorchFunctionMode` - PyTorch's own extension point for overriding
functions within a scope - that routes `dropout` and training-time attention dropout on
CPU tensors through `keep_mask`, and leaves every other call, and every call on another
device, to PyTorch. `mop.runtime.Runtime.forward_context` enters it on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

LANES = 4  # 16-bit lanes per 64-bit draw
LANE_VALUES = 1 << 16


def keep_mask(
    shape: Sequence[int], p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A CPU bool mask of `shape`, each element True with probability 1 - p (to 2^-17)."""
    n = math.prod(shape)
    words = torch.empty((n + LANES - 1) // LANES, dtype=torch.int64)
    words.random_(-(2**63), None, generator=generator)  # the full 64-bit range
    lanes = words.view(torch.int16)[:n].view(tuple(shape))
    # int16 lanes are uniform over [-2^15, 2^15): keep the top 1 - p of them.
    return lanes >= round(p * LANE_VALUES) - LANE_VALUES // 2


class _Masked(torch.autograd.Function):
    """x where `keep`, else 0, times `scale`; saves only the bool mask for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-time (inverted) dropout of a CPU tensor with a `keep_mask` mask."""
    if p <= 0:
        return x
    if p >= 1:
        return torch.zeros_like(x)
    return _Masked.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    scale: float | None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) with dropout, @ v: what scaled_dot_product_attention's
    math path computes, with the dropout mask from `keep_mask` (0 < p < 1). The dropout's
    1 / (1 - p) multiplies the output (length x head size) instead of the probabilities
    (length x length)."""
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    kept = torch.where(keep_mask(probs.shape, dropout_p), probs, 0)
    return torch.matmul(kept, value) * (1.0 / (1.0 - dropout_p))


def _dropout_args(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> tuple[torch.Tensor, float, bool, bool]:
    return input, p, training, inplace


def _sdpa_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float, bool, float | None, bool
]:
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


class CpuDropout(TorchFunctionMode):
    """Within this mode, dropout on CPU tensors takes its masks from `keep_mask`."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p, training, inplace = _dropout_args(*args, **kwargs)
            if training and p > 0 and x.device.type == "cpu":
                out = dropout(x, p)
                return x.copy_(out) if inplace else out
        elif func is F.scaled_dot_product_attention:
            q, k, v, mask, p, causal, scale, gqa = _sdpa_args(*args, **kwargs)
            if 0 < p < 1 and not causal and not gqa and q.device.type == "cpu":
                return attention(q, k, v, mask, p, scale)
        return func(*args, **kwargs)

"""Mixture layers over the K partition adapters, plugged into the `adapters` library.

Every mixture replaces the library's fusion module in every layer with `MixtureFusion`, a
subclass that keeps its query/key/value projections and parameter names (so the weights
stay loadable as an AdapterFusion) and changes only how the scores over adapters become
mixture weights, and that returns those weights as float32 under any autocast precision
(the library's module computes them in bf16 under CPU autocast and hands that to numpy,
which fails):

- softmax: AdapterFusion itself (paper eq. 1-2; `temperature=False` in adapters 1.x), the
  same computation as the library's module.
- gumbel (paper eq. 4): Gumbel-softmax with temperature tau while training; at
  evaluation the noise-free softmax of the scores / tau, so predictions are deterministic.
- moe (Shazeer et al. 2017, paper eq. 5): noisy top-k gating over the adapter axis.
  Gaussian noise with a learned, input-dependent scale is added while training only; the
  k largest scores per token are kept and softmax-normalised, the rest are exactly 0.
  An optional load-balancing loss (squared coefficient of variation of the adapters'
  total weight in the batch) is exposed as `aux_loss`.

The original code ran its MoE top-k over the token axis and left both variants random at
evaluation; these are the fixes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch
from adapters import Fuse
from adapters.methods.modeling import BertFusion
from torch import nn

from mop.errors import MopError

MIXTURES = ("softmax", "gumbel", "moe")


@dataclass(frozen=True)
class MixtureConfig:
    kind: str = "softmax"
    tau: float = 1.0  # gumbel temperature
    top_k: int = 2  # moe: adapters kept per token
    balance: float = 0.0  # moe: weight of the load-balancing loss
    fusion_reg: bool = True  # AdapterFusion's value-matrix regulariser (as AdapterTrainer adds)

    def __post_init__(self) -> None:
        if self.kind not in MIXTURES:
            raise MopError(f"mixture kind {self.kind!r} is not one of {', '.join(MIXTURES)}")


MIXTURE_NAME = re.compile(r"^(softmax|gumbel(-t(?P<tau>[0-9]*\.?[0-9]+))?|moe(-k(?P<k>[0-9]+))?)$")


def parse_mixture(name: str, defaults: MixtureConfig | None = None) -> MixtureConfig:
    """A mixture from its name: `softmax`, `gumbel`, `gumbel-t0.5` (tau), `moe`, `moe-k3`.

    The name carries the hyperparameter that varies in the paper's Table 6; everything else
    comes from `defaults`.
    """
    m = MIXTURE_NAME.match(name)
    if m is None:
        raise MopError(f"mixture {name!r} is not softmax, gumbel[-t<tau>] or moe[-k<top k>]")
    base = defaults or MixtureConfig()
    kind = name.split("-")[0]
    out = replace(base, kind=kind)
    if m.group("tau"):
        out = replace(out, tau=float(m.group("tau")))
    if m.group("k"):
        out = replace(out, top_k=int(m.group("k")))
    return out


class MixtureFusion(BertFusion):
    """AdapterFusion with Gumbel-softmax or noisy top-k weights over the adapters."""

    def __init__(self, config: Any, dense_size: int, dropout_prob: float, mixture: MixtureConfig):
        super().__init__(config, dense_size, dropout_prob)
        self.mixture = mixture
        if mixture.kind == "moe":
            self.noise = nn.Linear(dense_size, dense_size)
            nn.init.zeros_(self.noise.weight)
            nn.init.zeros_(self.noise.bias)
        self.aux_loss: torch.Tensor | None = None

    def weights(self, scores: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Mixture weights over the last axis (adapters) from the attention scores."""
        m = self.mixture
        if m.kind == "gumbel":
            if self.training:
                return nn.functional.gumbel_softmax(scores, tau=m.tau, hard=False, dim=-1)
            return torch.softmax(scores / m.tau, dim=-1)
        if m.kind == "moe":
            k = min(m.top_k, scores.size(-1))
            if self.training:
                noise_scale = nn.functional.softplus(
                    torch.matmul(self.noise(query).unsqueeze(2), key.transpose(-2, -1)).squeeze(2)
                )
                scores = scores + torch.randn_like(scores) * noise_scale
            top = scores.topk(k, dim=-1).indices
            masked = torch.full_like(scores, float("-inf")).scatter(-1, top, scores.gather(-1, top))
            probs = torch.softmax(masked, dim=-1)
            if self.training and m.balance > 0:
                importance = probs.flatten(0, -2).sum(0)
                self.aux_loss = (
                    m.balance * importance.var(unbiased=False) / (importance.mean() ** 2 + 1e-10)
                )
            return probs
        return torch.softmax(scores / self.T, dim=-1)

    def forward(self, query, key, value, residual, output_attentions: bool = False):
        if self.config["residual_before"]:
            value = value + residual[:, :, None, :]
        query_layer = self.query(query) if self.config["query"] else query
        key_layer = self.key(key) if self.config["key"] else key
        value_before = self.config["value"] and self.config["value_before_softmax"]
        value_layer = self.value(value) if value_before else value
        scores = torch.matmul(query_layer.unsqueeze(2), key_layer.transpose(-2, -1)).squeeze(2)
        # Weights in float32 whatever the autocast precision: they are a distribution.
        probs = self.weights(self.dropout(scores).float(), query_layer, key_layer)
        context = torch.matmul(probs.unsqueeze(2), value_layer).squeeze(2)
        if self.config["value"] and not self.config["value_before_softmax"]:
            context = self.value(context)
        if not self.config["residual_before"]:
            context = context + residual
        if output_attentions:
            return context, probs.detach().float().cpu().numpy()
        return context


def fusion_layers(model: nn.Module, fusion_name: str) -> list[tuple[nn.ModuleDict, BertFusion]]:
    out = []
    for module in model.modules():
        layers = getattr(module, "adapter_fusion_layer", None)
        if isinstance(layers, nn.ModuleDict) and fusion_name in layers:
            out.append((layers, layers[fusion_name]))
    return out


def add_mixture(model: nn.Module, adapter_names: list[str], mixture: MixtureConfig) -> Fuse:
    """Add a fusion over `adapter_names` to an adapters-initialised model and activate it.

    Every parameter (base model, adapters, fusion) stays trainable, as in the paper.
    """
    fuse = Fuse(*adapter_names)
    model.add_adapter_fusion(fuse, "dynamic")
    for layers, old in fusion_layers(model, fuse.name):
        new = MixtureFusion(old.config, old.dense_size, old.dropout.p, mixture)
        new.load_state_dict(old.state_dict(), strict=False)
        layers[fuse.name] = new
    model.set_active_adapters(fuse)
    for p in model.parameters():
        p.requires_grad_(True)
    return fuse


def mixture_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the MoE load-balancing losses of the last forward pass, if any."""
    losses = [
        m.aux_loss
        for m in model.modules()
        if isinstance(m, MixtureFusion) and m.aux_loss is not None
    ]
    for m in model.modules():
        if isinstance(m, MixtureFusion):
            m.aux_loss = None
    return torch.stack(losses).sum() if losses else None

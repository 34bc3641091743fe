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
  While training it adds Shazeer et al.'s two balance losses over the batch's real tokens
  (padding excluded): importance (w_importance * CV^2 of each adapter's summed weight) and
  load (w_load * CV^2 of each adapter's summed probability of being in the top k under
  fresh noise, their smooth estimator); both 0.1 by default, their paper's setting.

Any of the three can be routed (mixture names ending in `-routed`, `-prior` or
`-routed-prior`; `mop.linking` gives each input a distribution q over the partitions
from the KG entities it names):

- routed: while training, an auxiliary loss `route_loss * H(q, p)` pulls p, the mixture
  weights averaged over an input's real tokens, towards q (cross-entropy, averaged over the
  fusion layers and over the linked inputs of the whole optimizer batch; unlinked inputs
  add nothing). At inference nothing about links is needed.
- prior: `route_prior * log(q + 1/K)` is added to every token's scores over the adapters,
  in training and at inference (so inference needs the links too); unlinked inputs get 0.
  `-prior-p<weight>` sets the weight in the name: at 1 the prior moves the argmax but
  leaves the weights near uniform at K = 20; larger weights make it a near-hard route.
- `-bm25` after either: q comes from the BM25 partition router (`mop.linking`: the words
  an input shares with each partition's entity names), which needs no entity linker.

Both auxiliary losses (MoE balance, routing) are averaged over the fusion layers, so a
weight means the same on a 6-layer MiniLM and a 12-layer BERT. The routing loss is a sum
over inputs divided by the batch's linked inputs, so gradient accumulation leaves it
unchanged; the MoE balance losses (a CV^2 over a micro-batch's tokens) are not linear in
the batch, so for MoE mixtures `grad_accum` is part of what a run computes
(`mop.finetune.execution_keys`).

CV^2 is the population variance over the mean squared. The original code ran its MoE top-k
over the token axis, left both variants random at evaluation and ignored the balance loss;
these are the fixes.
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
# `finetune` keys -> MixtureConfig fields
OPTION_FIELDS = {
    "gumbel_tau": "tau",
    "moe_top_k": "top_k",
    "moe_importance": "importance",
    "moe_load": "load",
    "fusion_reg": "fusion_reg",
    "route_loss": "route_loss",
    "route_prior": "route_prior",
}


@dataclass(frozen=True)
class MixtureConfig:
    kind: str = "softmax"
    tau: float = 1.0  # gumbel temperature
    top_k: int = 2  # moe: adapters kept per token
    importance: float = 0.1  # moe: weight of the importance loss
    load: float = 0.1  # moe: weight of the load loss
    fusion_reg: bool = True  # AdapterFusion's value-matrix regulariser (as AdapterTrainer adds)
    routed: bool = False  # pull the weights towards the linked partitions while training
    prior: bool = False  # add the linked partitions' log-prior to the scores
    route_loss: float = 1.0  # weight of the routing loss
    route_prior: float = 1.0  # weight of the log-prior
    router: str = "names"  # where the routes come from: the entity linker or bm25

    def __post_init__(self) -> None:
        if self.kind not in MIXTURES:
            raise MopError(f"mixture kind {self.kind!r} is not one of {', '.join(MIXTURES)}")

    @property
    def needs_links(self) -> bool:
        return self.routed or self.prior

    @classmethod
    def from_options(cls, options: dict[str, Any], name: str = "softmax") -> MixtureConfig:
        """The mixture `name` with the rest from a `finetune` section (schema defaults where
        a key is not given)."""
        from mop.config import with_defaults

        o = with_defaults("finetune", options)
        defaults = cls(**{f: o[key] for key, f in OPTION_FIELDS.items()})
        return parse_mixture(name, defaults)


def parse_mixture(name: str, defaults: MixtureConfig | None = None) -> MixtureConfig:
    """A mixture from its name: `softmax`, `gumbel`, `gumbel-t0.5` (tau), `moe`, `moe-k3`,
    each optionally followed by `-routed` (`-routed-w6`: routing loss weight 6, else
    `route_loss`) and / or `-prior` (`-prior-p4`: log-prior weight 4, else `route_prior`),
    then optionally `-bm25` (the routes come from the
    BM25 partition router of mop.linking instead of the entity linker; the grammar:
    mop.plan.MIXTURE).

    The name carries what varies in the paper's Table 6 and the routing switches;
    everything else comes from `defaults`.
    """
    from mop.plan import mixture_of

    kind, *parts = mixture_of(name).split("-")
    out = replace(
        defaults or MixtureConfig(),
        kind=kind,
        routed="routed" in parts,
        prior="prior" in parts,
        router="bm25" if "bm25" in parts else "names",
    )
    for part in parts:
        if kind == "gumbel" and part.startswith("t"):
            out = replace(out, tau=float(part[1:]))
        elif kind == "moe" and part.startswith("k"):
            out = replace(out, top_k=int(part[1:]))
        elif re.fullmatch(r"w[0-9.]+", part):  # -routed-w<weight>: the routing loss weight
            out = replace(out, route_loss=float(part[1:]))
        elif re.fullmatch(r"p[0-9.]+", part):  # -prior-p<weight>: the log-prior's weight
            out = replace(out, route_prior=float(part[1:]))
    return out


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (population variance / mean^2) of a vector."""
    return x.var(unbiased=False) / (x.mean() ** 2 + 1e-10)


def balance_losses(
    clean: torch.Tensor,
    noisy: torch.Tensor,
    noise_std: torch.Tensor,
    probs: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shazeer et al.'s importance and load terms (unweighted) over rows of tokens x adapters.

    Importance: CV^2 of the adapters' summed weights. Load: CV^2 of the adapters' summed
    P(adapter in the top k), where for adapter i the threshold is the k-th largest noisy
    score of the other adapters, and P = Phi((clean_i - threshold) / std_i).
    """
    importance = cv_squared(probs.sum(0))
    n = noisy.size(-1)
    if top_k >= n:
        return importance, importance.new_zeros(())
    top = noisy.topk(top_k + 1, dim=-1).values
    in_top = noisy >= top[:, top_k - 1 : top_k]
    threshold = torch.where(in_top, top[:, top_k : top_k + 1], top[:, top_k - 1 : top_k])
    normal = torch.distributions.Normal(0.0, 1.0)
    p_in = normal.cdf((clean - threshold) / noise_std.clamp_min(1e-6))
    return importance, cv_squared(p_in.sum(0))


def route_cross_entropy(
    probs: torch.Tensor, mask: torch.Tensor, route: torch.Tensor
) -> torch.Tensor:
    """Per input, H(q, p) with p = the weights averaged over its real tokens; 0 where unlinked.

    probs (B, T, K), mask (B, T) of 0/1, route (B, K) with rows of zeros where unlinked.
    """
    m = mask.to(probs.dtype).unsqueeze(-1)
    p = (probs * m).sum(1) / m.sum(1).clamp_min(1.0)
    linked = (route.sum(-1) > 0).to(probs.dtype)
    return -(route * torch.log(p.clamp_min(1e-9))).sum(-1) * linked


def route_loss(probs: torch.Tensor, mask: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """Mean of `route_cross_entropy` over the linked inputs (0 when none is linked)."""
    linked = int((route.sum(-1) > 0).sum())
    return route_cross_entropy(probs, mask, route).sum() / max(linked, 1)


def log_prior(route: torch.Tensor) -> torch.Tensor:
    """log(q + 1/K) per input, 0 where unlinked (no partition is ever ruled out)."""
    k = route.size(-1)
    linked = (route.sum(-1, keepdim=True) > 0).to(route.dtype)
    return torch.log(route + 1.0 / k) * linked


class MixtureFusion(BertFusion):
    """AdapterFusion with Gumbel-softmax or noisy top-k weights over the adapters, optionally
    routed by the inputs' linked partitions.

    The model sets `mask` (B, T) and `route` (B, K) before each forward (`set_context`).
    A training forward leaves its weighted MoE balance loss in `balance` and its weighted
    sum of routing cross-entropies (over the forward's linked inputs) in `route_sum`;
    `mixture_aux_loss` combines and clears them."""

    def __init__(self, config: Any, dense_size: int, dropout_prob: float, mixture: MixtureConfig):
        super().__init__(config, dense_size, dropout_prob)
        self.mixture = mixture
        if mixture.kind == "moe":
            self.noise = nn.Linear(dense_size, dense_size)
            nn.init.zeros_(self.noise.weight)
            nn.init.zeros_(self.noise.bias)
        self.balance: torch.Tensor | None = None
        self.route_sum: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.route: torch.Tensor | None = None

    def _real_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Rows (B*T, K) of the tokens that are not padding."""
        if self.mask is None:
            return x.flatten(0, -2)
        return x[self.mask.bool()]

    def weights(self, scores: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Mixture weights over the last axis (adapters) from the attention scores."""
        m = self.mixture
        if m.prior and self.route is not None:
            scores = scores + m.route_prior * log_prior(self.route.float()).unsqueeze(1)
        if m.kind == "gumbel":
            if self.training:
                return nn.functional.gumbel_softmax(scores, tau=m.tau, hard=False, dim=-1)
            return torch.softmax(scores / m.tau, dim=-1)
        if m.kind == "moe":
            k = min(m.top_k, scores.size(-1))
            clean = scores
            if self.training:
                noise_std = nn.functional.softplus(
                    torch.matmul(self.noise(query).unsqueeze(2), key.transpose(-2, -1)).squeeze(2)
                ).float()
                scores = scores + torch.randn_like(scores) * noise_std
            top = scores.topk(k, dim=-1).indices
            masked = torch.full_like(scores, float("-inf")).scatter(-1, top, scores.gather(-1, top))
            probs = torch.softmax(masked, dim=-1)
            if self.training and (m.importance > 0 or m.load > 0):
                importance, load = balance_losses(
                    self._real_tokens(clean),
                    self._real_tokens(scores),
                    self._real_tokens(noise_std),
                    self._real_tokens(probs),
                    k,
                )
                self.balance = m.importance * importance + m.load * load
            return probs
        return torch.softmax(scores / self.T, dim=-1)

    def forward(self, query, key, value, residual, output_attentions: bool = False):
        if self.config["residual_before"]:
            value = value + residual[:, :, None, :]
        # Contiguous, so that the projections of the (batch, length, K, hidden) stacks fold
        # into one matrix product: strided, torch.matmul broadcasts the weight over every
        # token, and CPU bf16 copies it out (7 x the fp32 evaluation time of the default run).
        key, value = key.contiguous(), value.contiguous()
        query_layer = self.query(query) if self.config["query"] else query
        key_layer = self.key(key) if self.config["key"] else key
        value_before = self.config["value"] and self.config["value_before_softmax"]
        value_layer = self.value(value) if value_before else value
        scores = torch.matmul(query_layer.unsqueeze(2), key_layer.transpose(-2, -1)).squeeze(2)
        # Weights in float32 whatever the autocast precision: they are a distribution.
        probs = self.weights(self.dropout(scores).float(), query_layer, key_layer)
        m = self.mixture
        if self.training and m.routed and self.route is not None and self.mask is not None:
            ce = route_cross_entropy(probs, self.mask, self.route.float())
            self.route_sum = m.route_loss * ce.sum()
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
    use_mixture(model, fuse, mixture)
    for p in model.parameters():
        p.requires_grad_(True)
    return fuse


def use_mixture(model: nn.Module, fuse: Fuse, mixture: MixtureConfig) -> None:
    """Turn the library's fusion layers of `fuse` (added, or loaded with
    `load_adapter_fusion`) into MixtureFusion layers with the same weights; activate it."""
    for layers, old in fusion_layers(model, fuse.name):
        new = MixtureFusion(old.config, old.dense_size, old.dropout.p, mixture)
        new.load_state_dict(old.state_dict(), strict=False)
        layers[fuse.name] = new.to(next(old.parameters()).device)
    model.set_active_adapters(fuse)


def extra_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The mixture layers' weights the library's fusion does not have (MoE noise), by
    layer index: what an export keeps beside the library's fusion file."""
    return {
        f"{i}.{name}": t.detach().cpu().contiguous()
        for i, layer in enumerate(mixtures(model))
        for name, t in layer.state_dict().items()
        if name.startswith("noise.")
    }


def load_extra_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    layers = mixtures(model)
    for key, tensor in state.items():
        i, name = key.split(".", 1)
        layers[int(i)].load_state_dict({name: tensor}, strict=False)


def mixtures(model: nn.Module) -> list[MixtureFusion]:
    return [m for m in model.modules() if isinstance(m, MixtureFusion)]


def set_context(
    layers: list[MixtureFusion], mask: torch.Tensor | None, route: torch.Tensor | None
) -> None:
    """What the mixture layers of the next forward know about its batch: which tokens are
    real and each input's linked partitions (None: not known)."""
    for layer in layers:
        layer.mask = mask
        layer.route = route


def mixture_aux_loss(
    model: nn.Module, share: float = 1.0, linked: int | None = None
) -> torch.Tensor | None:
    """The mixture layers' auxiliary losses of the last forward, each averaged over the
    layers, then cleared; None if there were none.

    The MoE balance loss is weighted by `share`, this forward's share of the optimizer
    batch (as the task loss is). The routing loss is the summed cross-entropy of this
    forward's linked inputs over `linked`, the number of linked inputs in the whole batch
    (default: this forward's), so micro-batches add up to the batch's mean.
    """
    layers = mixtures(model)
    balance = [m.balance for m in layers if m.balance is not None]
    routes = [m.route_sum for m in layers if m.route_sum is not None]
    if linked is None and routes:
        route = layers[0].route
        linked = int((route.sum(-1) > 0).sum()) if route is not None else 0
    for m in layers:
        m.balance = m.route_sum = None
    terms = []
    if balance:
        terms.append(share * torch.stack(balance).mean())
    if routes and linked:
        terms.append(torch.stack(routes).mean() / linked)
    return torch.stack(terms).sum() if terms else None

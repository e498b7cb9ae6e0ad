"""Unified normalized convex fusion of LLM layers: the paper's strategies in one module.

    H_cond(t, d) = sum_l softmax(z_{t,d})_l * LN(H_l)

Every strategy differs only in where the logits z come from and how many distinct mixes
("groups") exist: one shared by all blocks, or one per DiT block.

The paper's seventh row, FuseDiT deep fusion (`deep`), mixes nothing: block d reads the keys/values
of its own LLM layer (entry d of the text features), a fixed one-hot pairing with no learned weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

Strategy = Literal["single", "uniform", "static", "deep", "time", "depth", "joint"]
# Where a strategy's logits z come from: a fixed one-hot, fixed zeros, a learned vector, an MLP of t,
# or a fixed pairing of block d with text entry d (deep fusion).
LogitSource = Literal["one_hot", "zeros", "vector", "time_mlp", "pairing"]
# What the DiT reads from the LLM: LayerNorm'd hidden states (cross-attention to a fused context), or each
# paired layer's own attention keys/values (deep fusion: joint self-attention, no cross-attention).
TextFeatures = Literal["hidden_states", "keys_values"]


@dataclass(frozen=True)
class StrategySpec:
    """One row of the paper's table: where the logits come from, and one mix per DiT block or one for all."""

    paper_id: str
    paper_name: str
    logits: LogitSource
    per_block: bool

    @property
    def depends_on_t(self) -> bool:
        return self.logits == "time_mlp"

    @property
    def text_features(self) -> TextFeatures:
        return "keys_values" if self.logits == "pairing" else "hidden_states"


# The strategies in the order of the paper's tables. A new strategy is a row here (and, for a new kind
# of logits, a branch in `LayerFusion.group_logits`).
STRATEGY_TABLE: dict[str, StrategySpec] = {
    "single": StrategySpec("b1", "B1 penultimate", "one_hot", per_block=False),
    "uniform": StrategySpec("b2", "B2 uniform", "zeros", per_block=False),
    "static": StrategySpec("b3", "B3 static", "vector", per_block=False),
    "deep": StrategySpec("fusedit", "FuseDiT deep", "pairing", per_block=True),
    "time": StrategySpec("s1", "S1 time-wise", "time_mlp", per_block=False),
    "depth": StrategySpec("s2", "S2 depth-wise", "vector", per_block=True),
    "joint": StrategySpec("s3", "S3 joint", "time_mlp", per_block=True),
}
STRATEGIES: tuple[str, ...] = tuple(STRATEGY_TABLE)
# The paper's ids (b1..s3, fusedit) for the strategies, in the order of its tables.
PAPER_IDS: dict[str, str] = {spec.paper_id: name for name, spec in STRATEGY_TABLE.items()}
PAPER_NAMES: dict[str, str] = {spec.paper_id: spec.paper_name for spec in STRATEGY_TABLE.values()}
LN_EPS = 1e-6


def check_strategy(strategy: str) -> Strategy:
    """Return `strategy` as a canonical name, accepting the paper ids b1..s3 and fusedit."""
    name = PAPER_IDS.get(strategy, strategy)
    if name not in STRATEGIES:
        raise ValueError(
            f"unknown fusion strategy {strategy!r}; valid: {', '.join(STRATEGIES)} "
            f"(or the paper ids {', '.join(PAPER_IDS)})"
        )
    return cast(Strategy, name)


def pack_keys_values(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """LLM keys/values (D, B, kv_heads, S, d) each -> deep-fusion text features (D, B, S, 2 kv_heads d).

    One feature entry per paired layer, of width 2 kv_heads d (keys, then values): the shape of the hidden
    states the other strategies read, so tables, caches, caption dropout and padding treat both alike.
    """
    D, B, heads, S, d = keys.shape
    return torch.cat(
        [
            keys.permute(0, 1, 3, 2, 4).reshape(D, B, S, heads * d),
            values.permute(0, 1, 3, 2, 4).reshape(D, B, S, heads * d),
        ],
        dim=-1,
    )


def unpack_keys_values(features: torch.Tensor, kv_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of `pack_keys_values`: (D, B, S, 2 kv_heads
    d) -> D x (keys, values), (B, kv_heads, S, d) each."""
    D, B, S, width = features.shape
    kv = features.view(D, B, S, 2, kv_heads, width // (2 * kv_heads)).permute(3, 0, 1, 4, 2, 5)
    return [(kv[0, j], kv[1, j]) for j in range(D)]


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] scaled to the usual 0..1000 timestep range. (B,) -> (B, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class LayerFusion(nn.Module):
    """Softmax-weighted mix of LayerNorm'd LLM layers, routed per DiT block and/or per time."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        strategy: Strategy = "depth",
        single_layer: int = -2,
        gate_embed_dim: int = 64,
        gate_hidden_dim: int = 128,
    ):
        super().__init__()
        self.strategy = check_strategy(strategy)
        self.spec = STRATEGY_TABLE[self.strategy]
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        if not -num_layers <= single_layer < num_layers:
            raise ValueError(f"single_layer={single_layer} is outside the {num_layers} LLM layers given")
        self.single_layer = single_layer % num_layers
        if self.spec.logits == "pairing" and num_layers != num_blocks:
            raise ValueError(
                f"deep fusion pairs each of the {num_blocks} DiT blocks with one LLM layer, "
                f"but {num_layers} layers were given; give text_encoder.layers one layer per block"
            )
        self.gate_embed_dim = gate_embed_dim
        # Tracks the module's device for strategies that have no parameters.
        self._anchor: torch.Tensor
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        # Learned logits: one vector (static) or one per block (depth).
        if self.spec.logits == "vector":
            self.logits = nn.Parameter(torch.zeros(self.num_groups, num_layers))
        # Time gates g(phi(t)): one MLP (time) or one per block (joint), batched over groups.
        if self.spec.logits == "time_mlp":
            g = self.num_groups
            bound = 1.0 / math.sqrt(gate_embed_dim)
            self.gate_w1 = nn.Parameter(
                torch.empty(g, gate_embed_dim, gate_hidden_dim).uniform_(-bound, bound)
            )
            self.gate_b1 = nn.Parameter(torch.zeros(g, gate_hidden_dim))
            # Zero-init output layer: every learned strategy starts exactly at uniform (B2).
            self.gate_w2 = nn.Parameter(torch.zeros(g, gate_hidden_dim, num_layers))
            self.gate_b2 = nn.Parameter(torch.zeros(g, num_layers))

    def optimizer_groups(self, lr: float) -> list[dict]:
        """Parameter groups in which one Adam step moves every logit by about `lr`, whatever the strategy.

        Adam moves each weight by about lr, so a logit fed by a matrix with fan-in n would move n times
        faster than a plain logit vector: each gate matrix gets lr / fan-in. (At one shared lr the time
        gate collapsed to a single layer within 50 steps while the depth logits had barely moved.)
        """
        groups = []
        for name, p in self.named_parameters():
            scale = 1.0 / p.shape[-2] if name in ("gate_w1", "gate_w2") else 1.0
            groups.append({"params": [p], "lr": lr * scale, "weight_decay": 0.0})
        return groups

    @property
    def depends_on_t(self) -> bool:
        """Whether the weights change with diffusion time (then contexts must be recomputed per step)."""
        return self.spec.depends_on_t

    @property
    def num_groups(self) -> int:
        """Number of distinct mixes: one per DiT block for depth/joint, else one shared by all."""
        return self.num_blocks if self.spec.per_block else 1

    @staticmethod
    def normalize(hidden_states: torch.Tensor) -> torch.Tensor:
        """LayerNorm without affine over channels, per layer and token. (L, B, S, C) -> same"""
        return F.layer_norm(hidden_states.float(), hidden_states.shape[-1:], eps=LN_EPS)

    def group_logits(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """Logits z: (G, L) if the strategy ignores t, else (B, G, L) for t of shape (B,)."""
        source = self.spec.logits
        if source == "one_hot":
            z = torch.full((1, self.num_layers), -math.inf)
            z[0, self.single_layer] = 0.0
            return z.to(self._device())
        if source == "zeros":
            return torch.zeros(1, self.num_layers, device=self._device())
        if source == "pairing":  # block d reads entry d only
            z = torch.full((self.num_blocks, self.num_layers), -math.inf, device=self._device())
            return z.fill_diagonal_(0.0)
        if source == "vector":
            return self.logits
        if t is None:
            raise ValueError(f"strategy {self.strategy!r} depends on t: pass the diffusion time t")
        # (B, E), in the gates' dtype
        phi = sinusoidal_embedding(t, self.gate_embed_dim).to(self.gate_w1.dtype)
        h = F.silu(torch.einsum("be,geh->bgh", phi, self.gate_w1) + self.gate_b1)
        return torch.einsum("bgh,ghl->bgl", h, self.gate_w2) + self.gate_b2  # (B, G, L)

    def group_weights(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax weights per group, shapes as in `group_logits`; each row sums to 1."""
        return torch.softmax(self.group_logits(t).float(), dim=-1)

    def layer_weights(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """Weights every DiT block applies to every LLM layer: (D, L), or (B, D, L) if they depend on t."""
        w = self.group_weights(t)
        return w.expand(*w.shape[:-2], self.num_blocks, self.num_layers)

    def weight_entropy(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """Mean entropy (nats) of the per-block weights; ln(L) is uniform, 0 is a single layer."""
        if self.depends_on_t and t is None:
            t = torch.linspace(0, 1, 11, device=self._device())
        w = self.layer_weights(t)
        return torch.special.entr(w).sum(-1).mean()

    def forward(
        self, hidden_states: torch.Tensor, t: torch.Tensor | None = None, normalized: bool = False
    ) -> torch.Tensor:
        """Fuse LLM layers into one context per group.

        hidden_states: (L, B, S, C) raw layer outputs, or LayerNorm'd ones with normalized=True;
            for deep fusion the paired layers' keys/values, used as they are (never normalized)
        t: (B,) diffusion time in [0, 1]; required when `depends_on_t`
        returns: (G, B, S, C) with G = `num_groups`
        """
        if hidden_states.shape[0] != self.num_layers:
            raise ValueError(f"fusion expects {self.num_layers} LLM layers but got {hidden_states.shape[0]}")
        if self.spec.logits == "pairing":
            return hidden_states
        if self.spec.logits == "one_hot":  # a selection, not a mix: only that layer is normalized
            h = hidden_states[self.single_layer : self.single_layer + 1]
            return h if normalized else self.normalize(h)
        h = hidden_states if normalized else self.normalize(hidden_states)
        if self.spec.logits == "zeros":  # softmax of zeros: the plain mean
            return h.mean(0, keepdim=True)
        w = self.group_weights(t).to(h.dtype)
        if w.dim() == 2:
            return torch.einsum("gl,lbsc->gbsc", w, h)
        return torch.einsum("bgl,lbsc->gbsc", w, h)

    def _device(self) -> torch.device:
        return self._anchor.device

"""Unified normalized convex fusion of LLM layers: the paper's strategies in one module.

    H_cond(t, d) = sum_l softmax(z_{t,d})_l * LN(H_l)

Every strategy differs only in where the logits z come from and how many distinct mixes
("groups") exist: one shared by all blocks, or one per DiT block.

The paper's seventh row, FuseDiT deep fusion (`deep`), mixes nothing: block d reads the keys/values
of its own LLM layer (entry d of the text features), a fixed one-hot pairing with no learned weight.

Beside them, the multi-layer conditioners that shipped in released models, each a row of the same table:
`concat` stacks a few taps along channels for one projection (FLUX.2, Ideogram 4), `layer_attention` lets
every token attend over the layer axis with a learned query (UniFusion, Krea 2), and `hard` routes block d
to one layer of hidden states (HiDream-I1). Learned weights frozen after a warm-up phase (GRAN-TED) are
`train.freeze_fusion_after` on any learned strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

Strategy = Literal[
    "single", "uniform", "static", "deep", "time", "depth", "joint", "concat", "layer_attention", "hard"
]
# Where a strategy's logits z come from: a fixed one-hot, fixed zeros, a learned vector, an MLP of t, a fixed
# pairing of block d with one text entry (deep fusion, hard routing), the taps stacked along channels (no
# mix: concatenation), or a learned query attending over the layers of each token (content-dependent).
LogitSource = Literal["one_hot", "zeros", "vector", "time_mlp", "pairing", "taps", "attention"]
# What the DiT reads from the LLM: LayerNorm'd hidden states (cross-attention to a fused context), or each
# paired layer's own attention keys/values (deep fusion: joint self-attention, no cross-attention).
TextFeatures = Literal["hidden_states", "keys_values"]


@dataclass(frozen=True)
class StrategySpec:
    """One row of the table: where the logits come from, one mix per DiT block or one for all, what the DiT
    reads from the LLM, the taps it reads by default, and the released model(s) that shipped the design."""

    paper_id: str
    paper_name: str
    logits: LogitSource
    per_block: bool
    features: TextFeatures = "hidden_states"
    default_taps: tuple[float, ...] | None = None  # relative depths; None: every layer given
    shipped_by: str = ""

    @property
    def depends_on_t(self) -> bool:
        return self.logits == "time_mlp"

    @property
    def text_features(self) -> TextFeatures:
        return self.features

    @property
    def content_dependent(self) -> bool:
        """Whether the weights depend on the prompt's tokens (then they are measured, not read off)."""
        return self.logits == "attention"


# The strategies in the order of the paper's tables. A new strategy is a row here (and, for a new kind
# of logits, a branch in `LayerFusion.group_logits`).
STRATEGY_TABLE: dict[str, StrategySpec] = {
    "single": StrategySpec("b1", "B1 penultimate", "one_hot", per_block=False),
    "uniform": StrategySpec("b2", "B2 uniform", "zeros", per_block=False),
    "static": StrategySpec("b3", "B3 static", "vector", per_block=False),
    "deep": StrategySpec("fusedit", "FuseDiT deep", "pairing", per_block=True, features="keys_values"),
    "time": StrategySpec("s1", "S1 time-wise", "time_mlp", per_block=False),
    "depth": StrategySpec("s2", "S2 depth-wise", "vector", per_block=True),
    "joint": StrategySpec("s3", "S3 joint", "time_mlp", per_block=True),
    # The schemes of released models. FLUX.2 reads hidden states 10, 20, 30 of Mistral-3 Small's 40 layers
    # (9, 18, 27 of Qwen3's 36 in Klein): a quarter, half and three quarters of the depth.
    "concat": StrategySpec(
        "flux2",
        "Tap concat",
        "taps",
        per_block=False,
        default_taps=(0.25, 0.5, 0.75),
        shipped_by="FLUX.2, Ideogram 4",
    ),
    "layer_attention": StrategySpec(
        "unifusion", "Layer attention", "attention", per_block=False, shipped_by="UniFusion, Krea 2"
    ),
    "hard": StrategySpec("hidream", "Hard per-block", "pairing", per_block=True, shipped_by="HiDream-I1"),
}
STRATEGIES: tuple[str, ...] = tuple(STRATEGY_TABLE)
# The paper's ids (b1..s3, fusedit) for the strategies, in the order of its tables.
PAPER_IDS: dict[str, str] = {spec.paper_id: name for name, spec in STRATEGY_TABLE.items()}
PAPER_NAMES: dict[str, str] = {spec.paper_id: spec.paper_name for spec in STRATEGY_TABLE.values()}
LN_EPS = 1e-6
ATTENTION_DIM = 64  # width of layer_attention's query and keys
ATTENTION_MOMENTUM = 0.99  # layer_attention's running mean of its weights, for logs and routing plots


def resolve_taps(taps: list[float] | tuple[float, ...], num_layers: int) -> list[int]:
    """Relative depths in (0, 1] -> entries of the `num_layers` layers given (0-based, ascending, distinct):
    depth f reads layer round(f x num_layers) of them, so 0.25, 0.5, 0.75 of 36 layers are layers 9, 18, 27
    (FLUX.2 Klein's) and of 40 layers 10, 20, 30 (FLUX.2 dev's)."""
    bad = [f for f in taps if not (isinstance(f, (int, float)) and 0 < f <= 1)]
    if bad or not taps:
        raise ValueError(
            f"model.fusion_taps must be relative depths in (0, 1] (e.g. [0.25, 0.5, 0.75]), got "
            f"{list(taps)!r}"
        )
    entries = sorted({min(num_layers, max(1, round(f * num_layers))) - 1 for f in taps})
    if len(entries) != len(taps):
        raise ValueError(
            f"model.fusion_taps {list(taps)} name {len(entries)} distinct layers of the {num_layers} given; "
            "give distinct depths (or more text_encoder.layers)"
        )
    return entries


def block_pairing(num_layers: int, num_blocks: int) -> list[int]:
    """The entry block d reads under a fixed pairing: the layer at the same relative depth (block d of D reads
    entry round((d + 1) L / D) - 1; with as many layers as blocks, block d reads layer d, as HiDream-I1's
    block i reads layer i)."""
    return [max(0, round((d + 1) * num_layers / num_blocks) - 1) for d in range(num_blocks)]


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
        taps: list[float] | None = None,
        text_dim: int | None = None,
    ):
        """text_dim: the width of each layer (layer_attention projects keys from it).
        taps: relative depths of the layers `concat` stacks and `layer_attention` attends over (default:
        the strategy's published choice; `resolve_taps`)."""
        super().__init__()
        self.strategy = check_strategy(strategy)
        self.spec = STRATEGY_TABLE[self.strategy]
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        if not -num_layers <= single_layer < num_layers:
            raise ValueError(f"single_layer={single_layer} is outside the {num_layers} LLM layers given")
        self.single_layer = single_layer % num_layers
        if self.spec.features == "keys_values" and num_layers != num_blocks:
            raise ValueError(
                f"deep fusion pairs each of the {num_blocks} DiT blocks with one LLM layer, "
                f"but {num_layers} layers were given; give text_encoder.layers one layer per block"
            )
        # Block d reads entry pairing[d] (deep fusion: its own entry; hard routing: the same relative depth).
        self.pairing = block_pairing(num_layers, num_blocks)
        if taps is not None and self.spec.logits not in ("taps", "attention"):
            raise ValueError(
                f"model.fusion_taps applies to strategies concat and layer_attention, not {self.strategy!r}"
            )
        chosen = taps if taps is not None else self.spec.default_taps
        # The entries read, in order: the taps, or every layer given.
        self.taps = resolve_taps(chosen, num_layers) if chosen is not None else list(range(num_layers))
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
        # Layer attention: a query per group against keys projected from each tapped layer of each token. The
        # key projection starts at zero, so every weight starts at 1 / taps (B2 over the taps).
        if self.spec.logits == "attention":
            if text_dim is None:
                raise ValueError(
                    "layer_attention needs text_dim, the width of the LLM layers it attends over"
                )
            query = torch.randn(self.num_groups, ATTENTION_DIM) / math.sqrt(ATTENTION_DIM)
            self.attention_query = nn.Parameter(query)
            self.attention_key = nn.Parameter(torch.zeros(text_dim, ATTENTION_DIM))
            # The weights' running mean over the real tokens of training batches (saved with the weights):
            # what logs and `semroute routing` show for a content-dependent mix.
            self.attention_mean: torch.Tensor
            uniform = torch.full((self.num_groups, len(self.taps)), 1.0 / len(self.taps))
            self.register_buffer("attention_mean", uniform)

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
        if source == "pairing":  # block d reads entry pairing[d] only
            z = torch.full((self.num_blocks, self.num_layers), -math.inf, device=self._device())
            return z.scatter_(1, torch.tensor(self.pairing, device=z.device)[:, None], 0.0)
        if source in ("taps", "attention"):
            # What is read, not how: the taps (concat stacks them; layer attention's weights depend on the
            # tokens: their running mean over training batches is `attention_mean`).
            z = torch.full((self.num_groups, self.num_layers), -math.inf, device=self._device())
            if source == "taps":
                return z.index_fill_(1, torch.tensor(self.taps, device=z.device), 0.0)
            z[:, self.taps] = self.attention_mean.clamp_min(1e-30).log()
            return z
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

    def output_dim(self, text_dim: int) -> int:
        """Width of the fused context for layers of width `text_dim` (concat stacks its taps' channels)."""
        return text_dim * len(self.taps) if self.spec.logits == "taps" else text_dim

    def forward(
        self,
        hidden_states: torch.Tensor,
        t: torch.Tensor | None = None,
        normalized: bool = False,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fuse LLM layers into one context per group.

        hidden_states: (L, B, S, C) raw layer outputs, or LayerNorm'd ones with normalized=True;
            for deep fusion the paired layers' keys/values, used as they are (never normalized)
        t: (B,) diffusion time in [0, 1]; required when `depends_on_t`
        mask: (B, S) real tokens (layer attention's running mean counts only those)
        returns: (G, B, S, C) with G = `num_groups` (C x taps for concat)
        """
        if hidden_states.shape[0] != self.num_layers:
            raise ValueError(f"fusion expects {self.num_layers} LLM layers but got {hidden_states.shape[0]}")
        source = self.spec.logits
        if source == "pairing":
            if self.spec.features == "keys_values":  # deep fusion: entry d is block d's, used as it is
                return hidden_states
            h = hidden_states[self.pairing]  # (D, B, S, C): block d's layer
            return h if normalized else self.normalize(h)
        if source == "one_hot":  # a selection, not a mix: only that layer is normalized
            h = hidden_states[self.single_layer : self.single_layer + 1]
            return h if normalized else self.normalize(h)
        if source in ("taps", "attention"):
            h = hidden_states[self.taps] if len(self.taps) < self.num_layers else hidden_states
            h = h if normalized else self.normalize(h)
            if source == "taps":  # (k, B, S, C) -> (1, B, S, k C): each token's taps side by side
                k, B, S, C = h.shape
                return h.permute(1, 2, 0, 3).reshape(1, B, S, k * C)
            return self._attend(h, mask)
        h = hidden_states if normalized else self.normalize(hidden_states)
        if self.spec.logits == "zeros":  # softmax of zeros: the plain mean
            return h.mean(0, keepdim=True)
        w = self.group_weights(t).to(h.dtype)
        if w.dim() == 2:
            return torch.einsum("gl,lbsc->gbsc", w, h)
        return torch.einsum("bgl,lbsc->gbsc", w, h)

    def _attend(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Layer attention: per token, each group's query scores the keys projected from its layers; the
        context is the softmax-weighted mix of the layers. (k, B, S, C) -> (G, B, S, C)"""
        keys = torch.einsum("lbsc,ca->lbsa", h, self.attention_key.to(h.dtype))
        z = torch.einsum("ga,lbsa->gbsl", self.attention_query.to(h.dtype), keys) / math.sqrt(ATTENTION_DIM)
        w = torch.softmax(z.float(), dim=-1)  # (G, B, S, k)
        if self.training:
            with torch.no_grad():
                keep = (
                    torch.ones(w.shape[1:3], device=w.device) if mask is None else mask.to(w.device).float()
                )
                mean = (w * keep[None, :, :, None]).sum((1, 2)) / keep.sum().clamp_min(1.0)
                self.attention_mean.lerp_(mean.to(self.attention_mean.dtype), 1 - ATTENTION_MOMENTUM)
        return torch.einsum("gbsl,lbsc->gbsc", w.to(h.dtype), h)

    def _device(self) -> torch.device:
        return self._anchor.device

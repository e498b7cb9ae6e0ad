"""Diffusion Transformer whose cross-attention reads a per-block routed mix of LLM layers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import cross_mask, current_attention, joint_mask
from .blocks import (
    ContextEmbedder,
    CrossAttention,
    DiTBlock,
    FinalLayer,
    NoiseLevelHead,
    TimestepEmbedder,
    rope_2d,
)
from .fusion import (
    STRATEGY_TABLE,
    LayerFusion,
    Strategy,
    check_strategy,
    unpack_keys_values,
)

TIMESTEP_CONDITIONING = ("none", "adaln-zero")
# What the time gates of the `time` and `joint` strategies read: the nominal t of the schedule (the paper), or
# the noise level a small head estimates from x_t itself (trajectory-aware; trained jointly with the DiT).
GATE_SIGNALS = ("nominal", "estimated")


@dataclass
class RoutedContext:
    """Per-block text keys/values of a batch of prompts, plus the text padding mask.

    Cross-attention keys/values, (B, heads, S, d) each; with deep fusion, the paired LLM layers' own
    keys/values, (B, kv_heads, S, d) each.
    """

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # D x (keys, values)
    mask: torch.Tensor  # (B, S) bool
    _formed: dict = field(default_factory=dict, repr=False)

    def attention_mask(self, image_tokens: int, deep: bool) -> torch.Tensor | None:
        """The mask every block's attention takes, made once per context (a sampler reuses it for every step):
        the text mask as `attention.cross_mask`, or with deep fusion `joint_mask` over [text; image
        tokens]."""
        key = (image_tokens, deep, current_attention())
        if key not in self._formed:
            self._formed[key] = joint_mask(self.mask, image_tokens) if deep else cross_mask(self.mask)
        return self._formed[key]


def check_deep_layout(hidden_size: int, num_heads: int, text_dim: int, text_kv_heads: int | None) -> None:
    """Deep fusion's DiT attention takes the LLM's head layout: its heads group evenly over the LLM's
    key/value heads and have the LLM's head size. One error naming both layouts otherwise."""
    if text_kv_heads is None:
        raise ValueError(
            "deep fusion needs the LLM's key/value head count (text_kv_heads); it comes from the text "
            "encoder: build the DiT through `semroute train` or pass text_kv_heads"
        )
    llm_head, rest = divmod(text_dim, 2 * text_kv_heads)
    head = hidden_size // num_heads
    if rest or num_heads % text_kv_heads or head != llm_head:
        raise ValueError(
            f"deep fusion: the LLM's attention has {text_kv_heads} key/value heads of size {llm_head}, this "
            f"DiT has {num_heads} heads of size {head}; set model.num_heads to a multiple of {text_kv_heads} "
            f"and model.hidden_size to {llm_head} x num_heads (e.g. num_heads {text_kv_heads}, hidden_size "
            f"{text_kv_heads * llm_head})"
        )


# Far beyond any DiT that fits a machine (the paper's is 0.5B): a typo, not a model.
MAX_PARAMETERS = 100e9


def check_dit_args(**args: Any) -> None:
    """One-line errors for DiT sizes that parse but make no sense;
    `args` are SemanticRoutingDiT arguments (any subset)."""
    for key in (
        "sample_size",
        "in_channels",
        "patch_size",
        "hidden_size",
        "depth",
        "num_heads",
        "text_dim",
        "num_text_layers",
        "gate_hidden_dim",
        "text_kv_heads",
    ):
        value = args.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
    ratio = args.get("mlp_ratio")
    if ratio is not None and not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"model.mlp_ratio must be a finite number > 0, got {ratio!r}")
    size, patch = args.get("sample_size"), args.get("patch_size")
    if size is not None and patch is not None and size % patch:
        raise ValueError(
            f"model.sample_size {size} is not divisible by model.patch_size {patch}; pick a resolution that "
            "is a multiple of the patch size"
        )
    width, heads = args.get("hidden_size"), args.get("num_heads")
    if width is not None and heads is not None and (width % heads or (width // heads) % 4):
        raise ValueError(
            f"hidden_size {width} / num_heads {heads} must give a whole head size divisible by 4 "
            f"(the 2D rotary embedding splits it in four), e.g. hidden_size 256 with num_heads 4"
        )
    signal = args.get("gate_signal")
    if signal is not None and signal not in GATE_SIGNALS:
        raise ValueError(f"unknown model.gate_signal {signal!r}; valid: {', '.join(GATE_SIGNALS)}")
    strategy = args.get("strategy")
    if (
        signal == "estimated"
        and strategy is not None
        and not STRATEGY_TABLE[check_strategy(strategy)].depends_on_t
    ):
        raise ValueError(
            f"model.gate_signal 'estimated' feeds the time gates, which strategy {strategy!r} does not have; "
            f"use strategy time or joint (s1, s3), or gate_signal nominal"
        )
    conditioning = args.get("timestep_conditioning")
    if conditioning is not None and conditioning not in TIMESTEP_CONDITIONING:
        raise ValueError(
            f"unknown timestep_conditioning {conditioning!r}; valid: {', '.join(TIMESTEP_CONDITIONING)}"
        )
    if width is not None and args.get("depth") is not None:
        # Attention, MLP, cross-attention/adaLN
        estimate = args["depth"] * width * width * (4 + 2 * (ratio or 4.0) + 6)
        if estimate > MAX_PARAMETERS:
            raise ValueError(
                f"model.depth {args['depth']} x hidden_size {width} makes a DiT of about {estimate:.1e} "
                f"parameters; this is surely a typo (limit {MAX_PARAMETERS:.0e})"
            )


def _zero(layer: nn.Module) -> None:
    """Zero a Linear's (or a conv's) weight and bias."""
    nn.init.zeros_(cast(nn.Linear, layer).weight)
    nn.init.zeros_(cast(nn.Linear, layer).bias)


# ModelMixin and ConfigMixin type config_name differently; diffusers' own models mix the same two.
class SemanticRoutingDiT(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """DiT conditioned on LLM layers fused per block by `LayerFusion` (strategy in the config)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        in_channels: int = 3,
        patch_size: int = 2,
        hidden_size: int = 256,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        mlp_conv: bool = True,
        timestep_conditioning: str = "adaln-zero",
        text_dim: int = 576,
        num_text_layers: int = 30,
        strategy: Strategy = "depth",
        single_layer: int = -2,
        gate_hidden_dim: int = 128,
        gate_signal: str = "nominal",
        text_kv_heads: int | None = None,
        fusion_taps: list[float] | None = None,
    ):
        """text_dim / num_text_layers: the width and count of the text feature entries: the LLM's hidden size
        and routed layers, or with strategy deep one entry per block of width 2 x text_kv_heads x head size
        (its keys and values). text_kv_heads: the LLM's key/value heads (deep fusion only; the text encoder
        gives them). fusion_taps: relative depths of the layers strategies concat and layer_attention read
        (default: the strategy's published choice, mapped onto the layers given)."""
        super().__init__()
        check_dit_args(
            sample_size=sample_size,
            in_channels=in_channels,
            patch_size=patch_size,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            timestep_conditioning=timestep_conditioning,
            text_dim=text_dim,
            num_text_layers=num_text_layers,
            gate_hidden_dim=gate_hidden_dim,
            strategy=strategy,
            gate_signal=gate_signal,
            text_kv_heads=text_kv_heads,
        )
        self.grid_size = sample_size // patch_size
        adaln = timestep_conditioning == "adaln-zero"
        self.fusion = LayerFusion(
            num_text_layers,
            depth,
            strategy,
            single_layer,
            gate_hidden_dim=gate_hidden_dim,
            taps=fusion_taps,
            text_dim=text_dim,
        )
        deep = self.fusion.spec.text_features == "keys_values"
        if deep:
            check_deep_layout(hidden_size, num_heads, text_dim, text_kv_heads)
        self.context_embedder = (
            None if deep else ContextEmbedder(self.fusion.output_dim(text_dim), hidden_size)
        )
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size) if adaln else None
        self.noise_head = NoiseLevelHead(in_channels, patch_size) if gate_signal == "estimated" else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, self.grid_size, mlp_conv, adaln, deep)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, adaln)
        self.gradient_checkpointing = False  # enable_gradient_checkpointing() (diffusers) turns it on
        cos, sin = rope_2d(self.grid_size, self.grid_size, hidden_size // num_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(cast(torch.Tensor, self.patch_embed.bias))
        # adaLN-zero: every block starts as the identity; the output starts at zero velocity.
        for adaln in [block.adaln for block in self.dit_blocks] + [self.final_layer.adaln]:
            if adaln is not None:
                _zero(adaln[-1])
        _zero(self.final_layer.proj)
        if self.t_embedder is not None:
            for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
                nn.init.normal_(cast(nn.Linear, linear).weight, std=0.02)

    def routing_weights(self) -> torch.Tensor | None:
        """What each block takes from each LLM layer, (D, L), for t-independent strategies (None otherwise):
        the fusion's weights; for layer attention their running mean over training tokens; for concat, the
        share of the context projection's squared weight that falls on each tap's channels (what it learned
        to read from each, the taps being stacked rather than mixed)."""
        fusion = self.fusion
        if fusion.depends_on_t:
            return None
        if fusion.spec.logits != "taps" or self.context_embedder is None:
            return fusion.layer_weights().detach()
        w = self.context_embedder.proj.weight.detach().float()  # (H, k C), the taps' channels side by side
        energy = w.square().view(w.shape[0], len(fusion.taps), -1).sum((0, 2))
        shares = torch.zeros(fusion.num_layers, device=w.device)
        shares[fusion.taps] = energy / energy.sum()
        return shares.expand(fusion.num_blocks, -1)

    @property
    def dit_blocks(self) -> list[DiTBlock]:
        """`blocks` as their class (a ModuleList yields plain Modules to a type checker)."""
        return cast("list[DiTBlock]", list(self.blocks))

    def route_text(
        self,
        text_hidden_states: torch.Tensor,
        text_mask: torch.Tensor,
        t: torch.Tensor | None = None,
        normalized: bool = False,
    ) -> RoutedContext:
        """Fuse the LLM layers for every block and project each block's cross-attention keys/values.

        text_hidden_states: (L, B, S, C); text_mask: (B, S); t: (B,), needed when the fusion depends on t.
        For t-independent strategies the result is valid for every sampling step of these prompts.
        With deep fusion the text features are the paired layers' packed keys/values (`pack_keys_values`):
        each block gets its own, unchanged (nothing of the DiT acts on the text side).
        """
        fused = self.fusion(text_hidden_states, t, normalized=normalized, mask=text_mask)  # (G, B, S, C)
        if self.context_embedder is None:
            return RoutedContext(unpack_keys_values(fused, self.config["text_kv_heads"]), text_mask.bool())
        # (the meta device, used to count FLOPs, has no autocast)
        if fused.device.type == "meta" or not torch.is_autocast_enabled(fused.device.type):
            fused = fused.to(self.context_embedder.proj.weight.dtype)  # e.g. bf16 cached features, fp32 model
        context = self.context_embedder(fused)  # (G, B, S, H)
        kv = [
            cast(CrossAttention, block.cross_attn).keys_values(context[min(d, len(context) - 1)])
            for d, block in enumerate(self.dit_blocks)
        ]
        return RoutedContext(kv, text_mask.bool())

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_hidden_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        context: RoutedContext | None = None,
        text_normalized: bool = False,
        gate_t: torch.Tensor | None = None,
        return_noise_level: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict the flow velocity.

        x: (B, C, H, W) noisy sample; t: (B,) time in [0, 1] (1 = pure noise)
        text_hidden_states: (L, B, S, C) LLM layers and text_mask (B, S), or a precomputed `context`
        gate_t: (B,) what nominal time gates read instead of t (a shifted t at sampling); None reads t.
            Gates with gate_signal 'estimated' read the noise head's estimate from x instead.
        return_noise_level: also return the noise head's estimate (B,) (training fits it to t).
        returns: (B, C, H, W), or (velocity, noise level) with return_noise_level
        """
        level = self.noise_head(x) if self.noise_head is not None else None
        if return_noise_level and level is None:
            raise ValueError("this DiT has no noise-level head (model.gate_signal is not 'estimated')")
        if context is None:
            if text_hidden_states is None or text_mask is None:
                raise ValueError("pass text_hidden_states and text_mask, or a precomputed context")
            # The estimate is detached: the head learns from its own loss only, the gates take it as an input.
            signal = level.detach() if level is not None else (t if gate_t is None else gate_t)
            context = self.route_text(text_hidden_states, text_mask, signal, normalized=text_normalized)
        elif self.fusion.depends_on_t:
            raise ValueError(
                f"strategy {self.fusion.strategy!r} depends on t: its context cannot be reused across steps"
            )
        B, _, H, W = x.shape
        p = self.config["patch_size"]
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, hidden)
        c = self.t_embedder(t) if self.t_embedder is not None else None
        rope = (self.rope_cos, self.rope_sin)
        # The attention mask over text tokens, made once for every block (None where nothing is padded).
        mask = context.attention_mask(h.shape[1], deep=self.context_embedder is None)
        for block, kv in zip(self.blocks, context.keys_values, strict=True):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # Set by diffusers' enable_gradient_checkpointing (typed None until then).
                h = self._gradient_checkpointing_func(block, h, c, rope, kv, mask)  # type: ignore[misc]
            else:
                h = block(h, c, rope, kv, mask)
        h = self.final_layer(h, c)  # (B, N, p * p * C)
        h = h.view(B, H // p, W // p, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        velocity = h.reshape(B, -1, H, W)
        return (velocity, level) if return_noise_level and level is not None else velocity


# The CPU shapes demo's DiT, and the base of its t-free variant.
_CPU_SMALL = dict(
    sample_size=16,
    in_channels=3,
    patch_size=2,
    hidden_size=192,
    depth=6,
    num_heads=3,
    mlp_ratio=2.0,
    mlp_conv=True,
    timestep_conditioning="adaln-zero",
)
# Named presets; the CLI and configs use the keys as `model.preset` choices.
DIT_PRESETS: dict[str, dict] = {
    # The paper's DiT: 24 blocks x 2048 on SD3-VAE latents (256 px -> 32x32x16), no timestep embedding.
    "paper": dict(
        sample_size=32,
        in_channels=16,
        patch_size=2,
        hidden_size=2048,
        depth=24,
        num_heads=16,
        mlp_ratio=4.0,
        mlp_conv=False,
        timestep_conditioning="none",
    ),
    # The CPU shapes demo: 16x16 pixels, patch 2, 6 x 192, gated MLP 2x with a conv, adaLN-zero.
    # Measured on 2 cores in bf16: 2.2x the training throughput of 6 x 256 with a 4x MLP.
    "cpu-small": _CPU_SMALL,
    # The paper's setting at CPU scale: cpu-small without any timestep input. The DiT must infer the noise
    # level from x_t, and in S1/S3 the fusion gate is the only place t enters (the trajectory experiment).
    "cpu-small-tfree": {**_CPU_SMALL, "timestep_conditioning": "none"},
    # Unit tests.
    "tiny": dict(
        sample_size=8,
        in_channels=3,
        patch_size=2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        mlp_conv=True,
        timestep_conditioning="adaln-zero",
        gate_hidden_dim=16,
    ),
}

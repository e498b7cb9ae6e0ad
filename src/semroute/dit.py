"""Diffusion Transformer whose cross-attention reads a per-block routed mix of LLM layers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import attention, cross_mask, current_attention, joint_mask
from .fusion import (
    STRATEGY_TABLE,
    LayerFusion,
    Strategy,
    check_strategy,
    sinusoidal_embedding,
    unpack_keys_values,
)

TIMESTEP_CONDITIONING = ("none", "adaln-zero")
# What the time gates of the `time` and `joint` strategies read: the nominal t of the schedule (the paper), or
# the noise level a small head estimates from x_t itself (trajectory-aware; trained jointly with the DiT).
GATE_SIGNALS = ("nominal", "estimated")


def rope_2d(
    grid_h: int, grid_w: int, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for 2D rotary embeddings: half the head rotates with the row, half with the column.

    returns two (N, head_dim // 2) tensors for N = grid_h * grid_w tokens in row-major order
    """
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    angles = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, heads, N, d) by the angles in cos/sin (N, d/2).

    As x cos + [x_2, x_1] [-sin, sin]: a roll and two multiply(-add)s over x, no split and concatenation."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    cos_full, sin_signed = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # (N, d), small
    return torch.addcmul(x * cos_full, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward; on CPU it is several times faster than autograd's decomposition.

    The mean square is accumulated in fp32 without materialising an fp32 copy of x.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        norm = torch.linalg.vector_norm(
            x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32)
        )
        rstd = torch.rsqrt(norm.square() / x.shape[-1] + eps).to(x.dtype)
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat if weight is None else x_hat * weight

    @staticmethod
    def backward(ctx, grad):
        x_hat, rstd, weight = ctx.saved_tensors
        grad_weight = None
        if weight is not None:
            grad_weight = (grad * x_hat).reshape(-1, grad.shape[-1]).sum(0)
            grad = grad * weight
        grad_x = (grad - x_hat * (grad * x_hat).mean(-1, keepdim=True)) * rstd
        return grad_x, grad_weight, None


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in the input dtype (autocast-friendly) with a faster backward; without gradients in
    fp32, PyTorch's own fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (weight is not None and weight.requires_grad)
        )
        if not needs_grad and x.dtype in (torch.float32, torch.float64):
            return F.rms_norm(
                x, self.normalized_shape, weight, self.eps
            )  # PyTorch's fused forward (sampling)
        return _RMSNormFunction.apply(x, weight, self.eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, H) * (1 + scale) + shift, per sample: one fused multiply-add over x."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by an MLP (used only with adaLN-zero conditioning)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class ContextEmbedder(nn.Module):
    """RMSNorm + Linear from LLM width to DiT width, shared by all blocks (as in the paper)."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.norm = RMSNorm(text_dim, eps=1e-6)
        self.proj = nn.Linear(text_dim, hidden_size)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(context))


class SelfAttention(nn.Module):
    """Multi-head self-attention over image tokens with qk-norm and 2D RoPE."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = RMSNorm(head_dim, eps=1e-6)
        self.k_norm = RMSNorm(head_dim, eps=1e-6)
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        text_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, N, H). text_kv: deep fusion (FuseDiT): an LLM layer's own keys and values (B, kv_heads, S,
        d), which the image queries attend over together with the image tokens; each of the LLM's key/value
        heads serves heads / kv_heads query heads (its grouped-query layout). text_mask: (B, S) bool, True =
        real token, or the attention mask `attention.joint_mask` made of it (the DiT makes it once per
        forward)."""
        B, N, H = x.shape
        # Split, not unbound: the backward then concatenates three gradients instead of filling a buffer.
        q, k, v = (
            part.view(B, N, self.num_heads, -1).transpose(1, 2) for part in self.qkv(x).split(H, dim=-1)
        )
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        mask = None
        if text_kv is not None:
            text_k, text_v = text_kv
            groups = self.num_heads // text_k.shape[1]
            if text_k.shape[1] * groups != self.num_heads or text_k.shape[-1] != q.shape[-1]:
                raise ValueError(
                    f"the LLM's keys/values have {text_k.shape[1]} heads of size {text_k.shape[-1]}; this "
                    f"DiT has {self.num_heads} query heads of size {q.shape[-1]}: the heads must group "
                    "evenly over the LLM's and have its head size"
                )
            k = torch.cat([text_k.repeat_interleave(groups, dim=1).to(k.dtype), k], dim=2)
            v = torch.cat([text_v.repeat_interleave(groups, dim=1).to(v.dtype), v], dim=2)
            mask = joint_mask(text_mask, N) if text_mask is not None and text_mask.dim() == 2 else text_mask
        x = attention(q, k, v, mask)
        return self.out(x.transpose(1, 2).reshape(B, N, H))


class CrossAttention(nn.Module):
    """Image tokens attend to the block's routed text context; keys/values can be precomputed."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.q_norm = RMSNorm(head_dim, eps=1e-6)
        self.k_norm = RMSNorm(head_dim, eps=1e-6)
        self.out = nn.Linear(hidden_size, hidden_size)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, H) embedded context -> keys and values, each (B, heads, S, d)."""
        B, S, _ = context.shape
        k, v = self.kv(context).view(B, S, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.k_norm(k), v

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x: (B, N, H); kv from `keys_values`; mask: (B, S) bool, True = real text token, or the attention
        mask `attention.cross_mask` made of it (None: nothing padded; the DiT makes it once per forward)."""
        B, N, H = x.shape
        q = self.q_norm(self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2))
        k, v = kv
        if mask is not None and mask.dim() == 2:
            mask = cross_mask(mask)
        x = attention(q, k.to(q.dtype), v.to(q.dtype), mask)
        return self.out(x.transpose(1, 2).reshape(B, N, H))


class GatedMLP(nn.Module):
    """Gated-GELU MLP; optionally a 3x3 depthwise conv on the token grid first lets tokens see their
    neighbours.

    On tiny images the conv is what makes whole objects learnable in minutes (CALIBRATION.md); it runs
    on the block width rather than the 2 x 4 x wider inner width, where its backward pass costs 10x more.
    """

    def __init__(self, hidden_size: int, mlp_ratio: float, grid_size: int, conv: bool):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.grid_size = grid_size
        self.conv = nn.Conv2d(hidden_size, hidden_size, 3, padding=1, groups=hidden_size) if conv else None
        self.fc1 = nn.Linear(hidden_size, 2 * inner)
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            B, N, C = x.shape
            grid = x.transpose(1, 2).reshape(B, C, self.grid_size, self.grid_size)
            x = self.conv(grid).reshape(B, C, N).transpose(1, 2)
        a, b = self.fc1(x).chunk(2, dim=-1)  # (B, N, inner) each
        return self.fc2(F.gelu(a, approximate="tanh") * b)


class DiTBlock(nn.Module):
    """Self-attention, then cross-attention to the routed text, then gated MLP; pre-norm residuals.

    deep: deep fusion (FuseDiT): no cross-attention; the self-attention reads the block's LLM layer's own
    keys/values beside the image tokens' (`SelfAttention` with text_kv).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        grid_size: int,
        mlp_conv: bool,
        adaln: bool,
        deep: bool = False,
    ):
        super().__init__()
        affine = not adaln
        self.norm1 = RMSNorm(hidden_size, eps=1e-6, elementwise_affine=affine)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.norm2 = None if deep else RMSNorm(hidden_size, eps=1e-6)
        self.cross_attn = None if deep else CrossAttention(hidden_size, num_heads)
        self.norm3 = RMSNorm(hidden_size, eps=1e-6, elementwise_affine=affine)
        self.mlp = GatedMLP(hidden_size, mlp_ratio, grid_size, mlp_conv)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size)) if adaln else None

    def forward(self, x, c, rope, kv, mask):
        """x: (B, N, H); c: (B, H) timestep embedding or None; kv/mask: this block's text context (its
        cross-attention keys/values, or with deep fusion its LLM layer's keys/values) and the text mask, (B,
        S) bool or as an attention mask (`attention.cross_mask` / `joint_mask`)."""
        deep = self.cross_attn is None
        text = (kv, mask) if deep else (None, None)
        if self.adaln is None:
            x = x + self.attn(self.norm1(x), rope, *text)
        else:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c).chunk(6, dim=-1)
            x = torch.addcmul(
                x, gate1[:, None], self.attn(modulate(self.norm1(x), shift1, scale1), rope, *text)
            )
        if not deep:
            x = x + self.cross_attn(self.norm2(x), kv, mask)
        if self.adaln is None:
            return x + self.mlp(self.norm3(x))
        return torch.addcmul(x, gate2[:, None], self.mlp(modulate(self.norm3(x), shift2, scale2)))


class FinalLayer(nn.Module):
    """Norm (adaLN-modulated if enabled) and a zero-initialised projection back to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaln: bool):
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps=1e-6, elementwise_affine=not adaln)
        self.proj = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size)) if adaln else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        x = self.norm(x)
        if self.adaln is not None:
            shift, scale = self.adaln(c).chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        return self.proj(x)


class NoiseLevelHead(nn.Module):
    """Estimates the noise level t of x_t from the sample itself: an MLP on each raw patch, averaged, then a
    sigmoid.

    The per-patch MLP can compute local energy and differences (what separates noise from shapes); the mean
    over patches makes the estimate global and cheap: (C p^2 x 64 + 64 x 64) multiply-adds per patch, far
    below one DiT block. (B, C, H, W) -> (B,) in (0, 1).
    """

    def __init__(self, in_channels: int, patch_size: int, hidden: int = 64):
        super().__init__()
        self.patch_size = patch_size
        self.mlp = nn.Sequential(
            nn.Linear(in_channels * patch_size**2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, N, C p p)
        return torch.sigmoid(self.out(self.mlp(patches.to(self.out.weight.dtype)).mean(1)).float()).squeeze(
            -1
        )


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


def check_dit_args(**args) -> None:
    """One-line errors for DiT sizes that parse but make no sense; `args` are SemanticRoutingDiT arguments
    (any subset)."""
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
        raise ValueError(f"sample_size {size} is not divisible by patch_size {patch}")
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
        estimate = (
            args["depth"] * width * width * (4 + 2 * (ratio or 4.0) + 6)
        )  # attention, MLP, cross-attention/adaLN
        if estimate > MAX_PARAMETERS:
            raise ValueError(
                f"model.depth {args['depth']} x hidden_size {width} makes a DiT of about {estimate:.1e} "
                f"parameters; this is surely a typo (limit {MAX_PARAMETERS:.0e})"
            )


class SemanticRoutingDiT(ModelMixin, ConfigMixin):
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
    ):
        """text_dim / num_text_layers: the width and count of the text feature entries: the LLM's hidden size
        and routed layers, or with strategy deep one entry per block of width 2 x text_kv_heads x head size
        (its keys and values). text_kv_heads: the LLM's key/value heads (deep fusion only; the text encoder
        gives them)."""
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
            num_text_layers, depth, strategy, single_layer, gate_hidden_dim=gate_hidden_dim
        )
        deep = self.fusion.spec.text_features == "keys_values"
        if deep:
            check_deep_layout(hidden_size, num_heads, text_dim, text_kv_heads)
        self.context_embedder = None if deep else ContextEmbedder(text_dim, hidden_size)
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
        nn.init.zeros_(self.patch_embed.bias)
        # adaLN-zero: every block starts as the identity; the output starts at zero velocity.
        for block in self.blocks:
            if block.adaln is not None:
                nn.init.zeros_(block.adaln[-1].weight)
                nn.init.zeros_(block.adaln[-1].bias)
        if self.final_layer.adaln is not None:
            nn.init.zeros_(self.final_layer.adaln[-1].weight)
            nn.init.zeros_(self.final_layer.adaln[-1].bias)
        nn.init.zeros_(self.final_layer.proj.weight)
        nn.init.zeros_(self.final_layer.proj.bias)
        if self.t_embedder is not None:
            for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)

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
        fused = self.fusion(text_hidden_states, t, normalized=normalized)  # (G, B, S, C)
        if self.context_embedder is None:
            return RoutedContext(unpack_keys_values(fused, self.config.text_kv_heads), text_mask.bool())
        # (the meta device, used to count FLOPs, has no autocast)
        if fused.device.type == "meta" or not torch.is_autocast_enabled(fused.device.type):
            fused = fused.to(self.context_embedder.proj.weight.dtype)  # e.g. bf16 cached features, fp32 model
        context = self.context_embedder(fused)  # (G, B, S, H)
        kv = [
            block.cross_attn.keys_values(context[min(d, len(context) - 1)])
            for d, block in enumerate(self.blocks)
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
        p = self.config.patch_size
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, hidden)
        c = self.t_embedder(t) if self.t_embedder is not None else None
        rope = (self.rope_cos, self.rope_sin)
        # The attention mask over text tokens, made once for every block (None where nothing is padded).
        mask = context.attention_mask(h.shape[1], deep=self.context_embedder is None)
        for block, kv in zip(self.blocks, context.keys_values, strict=True):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = self._gradient_checkpointing_func(block, h, c, rope, kv, mask)
            else:
                h = block(h, c, rope, kv, mask)
        h = self.final_layer(h, c)  # (B, N, p * p * C)
        h = h.view(B, H // p, W // p, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        velocity = h.reshape(B, -1, H, W)
        return (velocity, level) if return_noise_level else velocity


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
    "cpu-small": dict(
        sample_size=16,
        in_channels=3,
        patch_size=2,
        hidden_size=192,
        depth=6,
        num_heads=3,
        mlp_ratio=2.0,
        mlp_conv=True,
        timestep_conditioning="adaln-zero",
    ),
    # The paper's setting at CPU scale: cpu-small without any timestep input. The DiT must infer the noise
    # level from x_t, and in S1/S3 the fusion gate is the only place t enters (the trajectory experiment).
    "cpu-small-tfree": dict(
        sample_size=16,
        in_channels=3,
        patch_size=2,
        hidden_size=192,
        depth=6,
        num_heads=3,
        mlp_ratio=2.0,
        mlp_conv=True,
        timestep_conditioning="none",
    ),
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

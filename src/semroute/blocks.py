"""The DiT's building blocks: 2D rotary embedding, norms, embedders, self- and cross-attention, the gated
MLP, the block, the final layer and the noise-level head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, cross_mask, joint_mask
from .fusion import sinusoidal_embedding


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
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        norm = torch.linalg.vector_norm(
            x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32)
        )
        rstd = torch.rsqrt(norm.square() / x.shape[-1] + eps).to(x.dtype)
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat if weight is None else x_hat * weight

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
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
            # PyTorch's fused forward (sampling)
            return F.rms_norm(x, self.normalized_shape, weight, self.eps)
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
        return self.mlp(sinusoidal_embedding(t, self.freq_dim).to(next(self.mlp.parameters()).dtype))


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

    # The submodules `keys_values` runs: the DiT calls it for every block at once, outside the blocks' forward
    # (`SemanticRoutingDiT.route_text`), so FSDP keeps them with the text side, not in the block's shard unit.
    TEXT_SIDE = ("kv", "k_norm")

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

    On tiny images the conv is what makes whole objects learnable in minutes (docs/demo.md, calibration); it
    runs on the block width rather than the 2 x 4 x wider inner width, where its backward pass costs 10x
    more.
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

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: Any,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
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
        if self.cross_attn is not None and self.norm2 is not None:  # None with deep fusion (text is in attn)
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

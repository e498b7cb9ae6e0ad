"""Scaled dot-product attention as the DiT calls it, with the kernel and mask form this machine runs fastest.

The choice is process-wide, like torch.backends flags: `use_attention` sets it (from `speed.attention_choice`,
a short probe timed once per machine); until then PyTorch picks its own kernel and masks are boolean.
A mask over text tokens is built once per routed context (`cross_mask`), not once per block and step, and is
dropped altogether where no token is padded.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# default: whatever PyTorch's dispatcher picks (flash attention on CPU where it applies); math: the reference
# kernel (explicit matmul + softmax). On CUDA only `default` is offered: its own selection is well tuned.
ATTENTION_BACKENDS = ("default", "math")
# How padded text tokens are excluded: a boolean mask, or an additive one (0 / -inf) in the queries' dtype.
MASK_FORMS = ("bool", "additive")
_BACKENDS = {"default": None, "math": SDPBackend.MATH}


@dataclass(frozen=True)
class AttentionChoice:
    backend: str = "default"
    mask: str = "bool"
    # Pass no mask at all where no text token is padded.
    skip_unpadded: bool = True

    def __post_init__(self) -> None:
        if self.backend not in ATTENTION_BACKENDS or self.mask not in MASK_FORMS:
            raise ValueError(
                f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)} and mask one of "
                f"{', '.join(MASK_FORMS)}, got {self.backend!r}, {self.mask!r}"
            )


_current = AttentionChoice()


def use_attention(choice: AttentionChoice) -> None:
    """Make `choice` the kernel and mask form of every later `attention` call in this process."""
    global _current
    _current = choice


def current_attention() -> AttentionChoice:
    return _current


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """scaled_dot_product_attention on (B, heads, N, d)
    queries; mask from `cross_mask` / `joint_mask` (or None)."""
    backend = _BACKENDS[_current.backend] if q.device.type == "cpu" else None
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    with nullcontext() if backend is None else sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _form(keep: torch.Tensor, form: str) -> torch.Tensor:
    """A (B, S) bool keep-mask as an attention mask (B, 1, 1, S) in the given form."""
    keep = keep[:, None, None, :]
    if form == "bool":
        return keep
    return torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill_(~keep, float("-inf"))


def cross_mask(mask: torch.Tensor, choice: AttentionChoice | None = None) -> torch.Tensor | None:
    """The cross-attention mask for text tokens (B, S) (True = real), in the chosen form; None where nothing
    is padded (unless the probe found the unmasked kernel slower)."""
    choice = choice or _current
    mask = mask.bool()
    if choice.skip_unpadded and mask.device.type != "meta" and bool(mask.all()):
        return None
    return _form(mask, choice.mask)


def joint_mask(
    mask: torch.Tensor, image_tokens: int, choice: AttentionChoice | None = None
) -> torch.Tensor | None:
    """Deep fusion's self-attention mask over [text tokens; image tokens] (image tokens are never padded)."""
    choice = choice or _current
    if cross_mask(mask, choice) is None:  # nothing padded: image tokens never are either
        return None
    image = torch.ones(mask.shape[0], image_tokens, dtype=torch.bool, device=mask.device)
    return _form(torch.cat([mask.bool(), image], dim=1), choice.mask)

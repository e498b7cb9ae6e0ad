"""Text features: prompts -> LayerNorm'd LLM layers (or deep fusion's keys/values), computed once and indexed
per batch.

Every fusion strategy mixes the same thing, LN(H_l) for the chosen layers, so they are computed
once per prompt (and the null prompt of classifier-free guidance) and reused by training,
sampling and caches alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .text_encoder import EncoderInfo, TextEncoder

NULL_PROMPT = ""  # the unconditional prompt of classifier-free guidance (caption dropout target)


def dit_text_args(info: EncoderInfo) -> dict:
    """The DiT arguments that come from the text encoder (config.DERIVED_MODEL_KEYS)."""
    return {
        "text_dim": info.feature_dim,
        "num_text_layers": info.num_layers,
        "text_kv_heads": info.kv_heads if info.feature_kind == "keys_values" else None,
    }


@dataclass
class PromptFeatures:
    """LayerNorm'd LLM features of N prompts, padded to one length: computed once, indexed per batch."""

    hidden: torch.Tensor  # (N, L, S, C), stored layer-major (see __post_init__)
    mask: torch.Tensor  # (N, S) bool

    def __post_init__(self) -> None:
        # Layer-major storage, (L, N, S, C) in memory: `select` then gathers whole (S, C) rows straight into
        # the (L, B, S, C) batch the fusion reads, instead of copying the whole table first.
        if not self.hidden.transpose(0, 1).is_contiguous():
            self.hidden = self.hidden.transpose(0, 1).contiguous().transpose(0, 1)

    def select(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of prompts `ids` (B,) as the DiT takes them: (L, B, S, C), contiguous, and (B, S).

        Gathered straight into the layer-major layout, so the fusion never copies them again."""
        return self.hidden.transpose(0, 1).index_select(1, ids), self.mask[ids]

    def to(self, dtype: torch.dtype) -> PromptFeatures:
        return PromptFeatures(self.hidden.to(dtype), self.mask)


def encode_prompts(
    encoder: TextEncoder,
    prompts: list[str],
    batch_size: int = 32,
    dtype: torch.dtype | None = torch.float32,
    progress: bool = False,
) -> PromptFeatures:
    """Run the LLM once per prompt and keep what the DiT reads (`TextEncoder.features`): the LayerNorm'd
    layers every fusion strategy mixes, or deep fusion's per-layer keys/values."""
    hidden, masks = [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc="encoding prompts", disable=not progress):
        h, m = encoder.features(prompts[i : i + batch_size])
        hidden.append(h.to(dtype).transpose(0, 1))  # (b, L, S, C)
        masks.append(m)
    length = max(m.shape[1] for m in masks)
    return PromptFeatures(
        torch.cat([F.pad(h, (0, 0, 0, length - h.shape[2])) for h in hidden]),
        torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks]),
    )


def prompt_table(
    encoder: TextEncoder, captions: list[str], dtype: torch.dtype, progress: bool
) -> PromptFeatures:
    """Features of every training caption plus the null prompt (last row), computed once.

    Stored in the training precision's dtype: LayerNorm'd features are O(1), so bf16/fp16 lose nothing
    that matters, and features in fp32 keep an fp32 run free of (possibly emulated) bf16 arithmetic.
    """
    return encode_prompts(encoder, captions + [NULL_PROMPT], dtype=dtype, progress=progress)


def drop_captions(
    text: torch.Tensor,
    mask: torch.Tensor,
    null_text: torch.Tensor,
    null_mask: torch.Tensor,
    drop: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption dropout: the features of the prompts where `drop` (B,) is True become the null prompt's.

    text (L, B, S, C), mask (B, S); null_text (L, S', C), null_mask (S',). Both are padded to the longer
    length first (padding is masked out, so it changes nothing the DiT sees). Only the dropped rows are
    written, in place: `text` and `mask` must be the caller's own (a `BatchSource.condition` result is).
    """
    length = max(text.shape[2], null_text.shape[1])
    if length > text.shape[2]:
        text, mask = F.pad(text, (0, 0, 0, length - text.shape[2])), F.pad(mask, (0, length - mask.shape[1]))
    null_text = F.pad(null_text, (0, 0, 0, length - null_text.shape[1])).to(text.device, text.dtype)
    null_mask = F.pad(null_mask, (0, length - null_mask.shape[0])).to(mask.device)
    rows = drop.to(text.device).nonzero().flatten()
    if len(rows):
        text[:, rows] = null_text[:, None]
        mask[rows] = null_mask
    return text, mask

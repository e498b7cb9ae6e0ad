"""Text features: prompts -> LayerNorm'd LLM layers (or deep fusion's keys/values), computed once and indexed
per batch.

Every fusion strategy mixes the same thing, LN(H_l) for the chosen layers, so they are computed
once per prompt (and the null prompt of classifier-free guidance) and reused by training,
sampling and caches alike.
"""

from __future__ import annotations

from collections.abc import Callable
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

        S is the longest selected prompt's length, not the table's: a batch of short prompts costs what short
        prompts cost. Gathered straight into the layer-major layout, so the fusion never copies them again."""
        mask = self.mask[ids]
        used = mask.any(0).nonzero()
        length = int(used[-1]) + 1 if len(used) else 0
        return self.hidden[:, :, :length].transpose(0, 1).index_select(1, ids), mask[:, :length]

    def to(self, dtype: torch.dtype) -> PromptFeatures:
        return PromptFeatures(self.hidden.to(dtype), self.mask)


def encode_ragged(
    encoder: TextEncoder,
    prompts: list[str],
    batch_size: int = 32,
    dtype: torch.dtype | None = torch.float32,
    progress: bool = False,
    on_chunk: Callable[[int], object] | None = None,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """What the DiT reads for each prompt (`TextEncoder.features`), its real tokens only: (L, n_i, C) per
    prompt, in the prompts' order.

    The LLM runs on chunks of prompts sorted by token count, so a chunk is padded to about its own length
    rather than to the longest prompt of the whole list. Right padding under causal attention leaves a
    prompt's tokens as they are alone, so the order changes the cost and nothing else.
    on_chunk: called with the number of prompts of each chunk once it is encoded (progress bars).
    device: where the rows are kept (default: where the LLM ran); a chunk is moved as soon as it is encoded.
    """
    counts = encoder.token_counts(prompts)
    order = sorted(range(len(prompts)), key=lambda i: counts[i])
    rows: list[torch.Tensor | None] = [None] * len(prompts)
    for start in tqdm(range(0, len(prompts), batch_size), desc="encoding prompts", disable=not progress):
        chunk = order[start : start + batch_size]
        hidden, mask = encoder.features([prompts[i] for i in chunk])  # (L, b, S, C), (b, S)
        hidden = hidden.to(device or hidden.device, dtype)
        mask = mask.to(hidden.device)
        for b, i in enumerate(chunk):
            rows[i] = hidden[:, b, mask[b]]
        if on_chunk is not None:
            on_chunk(len(chunk))
    return [row for row in rows if row is not None]


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows (L, n_i, C) -> (N, L, S, C) zero-padded to the longest, and the mask (N, S).

    The padded tensor is stored layer-major ((L, N, S, C) in memory, what `PromptFeatures` keeps and the DiT
    reads): `.transpose(0, 1)` of it is contiguous."""
    length = max(row.shape[1] for row in rows)
    first = rows[0]
    hidden = first.new_zeros(first.shape[0], len(rows), length, first.shape[2])
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        hidden[:, i, : row.shape[1]] = row
        mask[i, : row.shape[1]] = True
    return hidden.transpose(0, 1), mask


def encode_prompts(
    encoder: TextEncoder,
    prompts: list[str],
    batch_size: int = 32,
    dtype: torch.dtype | None = torch.float32,
    progress: bool = False,
) -> PromptFeatures:
    """Run the LLM once per prompt and keep what the DiT reads (`TextEncoder.features`): the LayerNorm'd
    layers every fusion strategy mixes, or deep fusion's per-layer keys/values (`encode_ragged`)."""
    return PromptFeatures(*pad_rows(encode_ragged(encoder, prompts, batch_size, dtype, progress)))


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

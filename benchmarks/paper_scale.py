"""What routing costs at the paper's scale, counted on the `meta` device (no weights, no memory, seconds).

The text encoder is Qwen3-VL-4B-sized (its Qwen3 text tower: 36 layers, hidden 2560); the DiT is the
`paper` preset (24 x 2048) on 256 px SD3-VAE latents (32 x 32 x 16 -> 256 tokens), prompts 512 tokens.
FLOPs are counted by torch.utils.flop_counter (matrix products and attention; element-wise work is
not counted) for ONE image:

    train step      DiT forward + backward; plus the LLM forward when text features are not cached
    sampling step   with CFG (2 DiT passes). "cached": the text side (fusion, context projection,
                    every block's cross-attention K/V) runs once per prompt and is spread over the
                    steps; "recomputed": the text side runs in every step, as a design that does not
                    cache it would. S1/S3 must recompute (their mix depends on t).

Rows: B1, FuseDiT deep fusion, S2 and S1. FuseDiT's 24 blocks read the keys/values of LLM layers 6..29
(0-based) of 36, the paper's pairing: 8 key/value heads of 128, which the paper DiT's 16 heads of 128
group over (two query heads per LLM head); it has no cross-attention and no context embedder, and its
text side is only the LLM's own keys/values (no DiT FLOPs at all).

    python benchmarks/paper_scale.py [--steps 25] [--text-tokens 512]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from semroute.dit import DIT_PRESETS, SemanticRoutingDiT
from semroute.fusion import STRATEGY_TABLE

QWEN3_VL_4B_TEXT = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def show(key: str, value: str) -> None:
    print(f"{key:<30} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--text-tokens", type=int, default=512, help="prompt length (the paper pads to 512)")
    args = parser.parse_args()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    S, L, C = args.text_tokens, QWEN3_VL_4B_TEXT["num_hidden_layers"], QWEN3_VL_4B_TEXT["hidden_size"]
    with torch.device("meta"):
        llm = Qwen3ForCausalLM(Qwen3Config(**QWEN3_VL_4B_TEXT))
        ids = torch.zeros(1, S, dtype=torch.long)
        llm_flops = flops(lambda: llm.model(input_ids=ids, output_hidden_states=True))
    show("llm_params", f"{count(llm) / 1e9:.3f} B")
    show("llm_forward_gflops", f"{llm_flops / 1e9:.1f}   (one prompt of {S} tokens)")
    rows = {}
    depth = DIT_PRESETS["paper"]["depth"]
    kv_heads, head_dim = QWEN3_VL_4B_TEXT["num_key_value_heads"], QWEN3_VL_4B_TEXT["head_dim"]
    text_args = {
        "hidden_states": dict(text_dim=C, num_text_layers=L),
        # One entry per block: its layer's keys and values, 2 x 8 heads x 128.
        "keys_values": dict(text_dim=2 * kv_heads * head_dim, num_text_layers=depth, text_kv_heads=kv_heads),
    }
    for sid, strategy in (("b1", "single"), ("fusedit", "deep"), ("s2", "depth"), ("s1", "time")):
        args_ = text_args[STRATEGY_TABLE[strategy].text_features]
        with torch.device("meta"):
            dit = SemanticRoutingDiT(**DIT_PRESETS["paper"], strategy=strategy, **args_)
            size = dit.config.sample_size
            x = torch.randn(1, dit.config.in_channels, size, size)
            t = torch.rand(1)
            entries, width = args_["num_text_layers"], args_["text_dim"]
            text, mask = torch.randn(entries, 1, S, width), torch.ones(1, S, dtype=torch.bool)
            x2, t2, text2, mask2 = (
                torch.cat([x, x]),
                torch.cat([t, t]),
                torch.cat([text, text], 1),
                torch.cat([mask, mask]),
            )

            def train_step():
                dit(x.requires_grad_(False), t, text, mask).square().mean().backward()

            train = flops(train_step)
            # CFG: both branches in one batch of 2 (as the pipeline does).
            text_side = flops(lambda: dit.route_text(text2, mask2, t2, normalized=True))
            with torch.no_grad():
                context = (
                    dit.route_text(text2, mask2, t2, normalized=True) if not dit.fusion.depends_on_t else None
                )
                full = flops(lambda: dit(x2, t2, text2, mask2, text_normalized=True))
        image_side = full - text_side
        rows[sid] = dict(
            params=count(dit),
            fusion_params=count(dit.fusion),
            train=train,
            text_side=text_side,
            image_side=image_side,
            cached=image_side + text_side / args.steps if context is not None else None,
            recomputed=full,
        )
    for sid, r in rows.items():
        show(f"{sid}_dit_params", f"{r['params'] / 1e9:.4f} B  (fusion {r['fusion_params']:,})")
        if sid == "fusedit":
            show(
                f"{sid}_paired_llm_layers",
                f"6..29 of {L} (0-based), {kv_heads} key/value heads of {head_dim}",
            )
        show(
            f"{sid}_train_step_gflops",
            f"{r['train'] / 1e9:.1f}   (+ {llm_flops / 1e9:.1f} LLM forward if features are not cached)",
        )
        show(
            f"{sid}_text_side_gflops", f"{r['text_side'] / 1e9:.2f}   (CFG pair, once per prompt when cached)"
        )
        show(f"{sid}_sample_step_recomputed", f"{r['recomputed'] / 1e9:.1f} GFLOPs")
        if r["cached"] is not None:
            show(
                f"{sid}_sample_step_cached",
                f"{r['cached'] / 1e9:.1f} GFLOPs  (text side / {args.steps} steps)",
            )
            show(f"{sid}_recomputed_over_cached", f"{r['recomputed'] / r['cached']:.4f}")
        else:
            show(f"{sid}_sample_step_cached", "n/a (the mix depends on t)")
    b1, s2, deep = rows["b1"], rows["s2"], rows["fusedit"]
    show("train_ratio_s2_over_b1", f"{s2['train'] / b1['train']:.4f}")
    show("train_ratio_fusedit_over_b1", f"{deep['train'] / b1['train']:.4f}")
    show("params_ratio_fusedit_over_b1", f"{deep['params'] / b1['params']:.4f}")
    show("sample_ratio_s2_over_b1", f"{s2['cached'] / b1['cached']:.4f}  (both cached)")
    show("sample_ratio_fusedit_over_b1", f"{deep['cached'] / b1['cached']:.4f}  (both cached)")
    show(
        "sample_ratio_s1_over_s2",
        f"{rows['s1']['recomputed'] / s2['cached']:.4f}  (S1 must recompute; S2 cached)",
    )


if __name__ == "__main__":
    main()

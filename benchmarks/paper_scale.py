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

    python benchmarks/paper_scale.py [--steps 25] [--text-tokens 512]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from semroute.dit import DIT_PRESETS, SemanticRoutingDiT

QWEN3_VL_4B_TEXT = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=True,
)


def flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--text-tokens", type=int, default=512, help="prompt length (the paper pads to 512)")
    args = parser.parse_args()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    S, L, C = args.text_tokens, QWEN3_VL_4B_TEXT["num_hidden_layers"], QWEN3_VL_4B_TEXT["hidden_size"]
    with torch.device("meta"):
        llm = Qwen3ForCausalLM(Qwen3Config(**QWEN3_VL_4B_TEXT))
        ids = torch.zeros(1, S, dtype=torch.long)
        llm_flops = flops(lambda: llm.model(input_ids=ids, output_hidden_states=True))
    print(f"llm_params                 {count(llm) / 1e9:.3f} B")
    print(f"llm_forward_gflops         {llm_flops / 1e9:.1f}   (one prompt of {S} tokens)")
    rows = {}
    for sid, strategy in (("b1", "single"), ("s2", "depth"), ("s1", "time")):
        with torch.device("meta"):
            dit = SemanticRoutingDiT(**DIT_PRESETS["paper"], text_dim=C, num_text_layers=L, strategy=strategy)
            size = dit.config.sample_size
            x = torch.randn(1, dit.config.in_channels, size, size)
            t = torch.rand(1)
            text, mask = torch.randn(L, 1, S, C), torch.ones(1, S, dtype=torch.bool)
            x2, t2, text2, mask2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, text], 1), torch.cat([mask, mask])

            def train_step():
                dit(x.requires_grad_(False), t, text, mask).square().mean().backward()

            train = flops(train_step)
            # CFG: both branches in one batch of 2 (as the pipeline does).
            text_side = flops(lambda: dit.route_text(text2, mask2, t2, normalized=True))
            with torch.no_grad():
                context = dit.route_text(text2, mask2, t2, normalized=True) if not dit.fusion.depends_on_t else None
                full = flops(lambda: dit(x2, t2, text2, mask2, text_normalized=True))
        image_side = full - text_side
        rows[sid] = dict(
            params=count(dit), fusion_params=count(dit.fusion), train=train, text_side=text_side, image_side=image_side,
            cached=image_side + text_side / args.steps if context is not None else None, recomputed=full,
        )
    for sid, r in rows.items():
        print(f"{sid}_dit_params               {r['params'] / 1e9:.4f} B  (fusion {r['fusion_params']:,})")
        print(f"{sid}_train_step_gflops        {r['train'] / 1e9:.1f}   (+ {llm_flops / 1e9:.1f} LLM forward if features are not cached)")
        print(f"{sid}_text_side_gflops         {r['text_side'] / 1e9:.2f}   (CFG pair, once per prompt when cached)")
        print(f"{sid}_sample_step_recomputed   {r['recomputed'] / 1e9:.1f} GFLOPs")
        if r["cached"] is not None:
            print(f"{sid}_sample_step_cached       {r['cached'] / 1e9:.1f} GFLOPs  (text side / {args.steps} steps)")
            print(f"{sid}_recomputed_over_cached   {r['recomputed'] / r['cached']:.4f}")
        else:
            print(f"{sid}_sample_step_cached       n/a (the mix depends on t)")
    b1, s2 = rows["b1"], rows["s2"]
    print(f"train_ratio_s2_over_b1     {s2['train'] / b1['train']:.4f}")
    print(f"sample_ratio_s2_over_b1    {s2['cached'] / b1['cached']:.4f}  (both cached)")
    print(f"sample_ratio_s1_over_s2    {rows['s1']['recomputed'] / s2['cached']:.4f}  (S1 must recompute; S2 cached)")


if __name__ == "__main__":
    main()

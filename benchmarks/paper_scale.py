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

Rows: B1, FuseDiT deep fusion, S2 and S1, then the schemes of released models: tap concat (FLUX.2: layers
at 1/4, 1/2, 3/4 of the depth stacked along channels), layer attention (UniFusion: every layer) and hard
per-block routing (HiDream-I1). FuseDiT's 24 blocks read the keys/values of LLM layers 6..29
(0-based) of 36, the paper's pairing: 8 key/value heads of 128, which the paper DiT's 16 heads of 128
group over (two query heads per LLM head); it has no cross-attention and no context embedder, and its
text side is only the LLM's own keys/values (no DiT FLOPs at all).

Then the cost of padding, over a real prompt-length distribution (`--prompts`, default GenAI-Bench's 527
prompts from ../shared/eval, wrapped in the embedded encoder's chat template and counted with its tokenizer,
cut at --max-length 512): per image, the padded design (every prompt padded to max_length, the paper's and
the authors' code), semroute's variable-length design (a batch of --batch random prompts padded to its own
longest), and its lower bound (each prompt at its own length, what length-grouped batches approach). FLOPs
are a polynomial of degree 2 in the text length S (attention is S x S in the LLM and (N + S) x (N + S) in
deep fusion, linear elsewhere): each is counted exactly at three lengths, the polynomial is checked at a
fourth, then evaluated at every prompt's length. Cache bytes are bf16 rows of every LLM layer (36 x 2560).

    python benchmarks/paper_scale.py [--steps 25] [--text-tokens 512] [--prompts FILE] [--batch 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from semroute.bench.public import read_prompts
from semroute.dit import DIT_PRESETS, SemanticRoutingDiT
from semroute.fusion import STRATEGY_TABLE
from semroute.text_encoder import TextEncoderConfig, TokenCounter

GENAI_BENCH = Path(__file__).resolve().parents[2] / "shared" / "eval" / "genaibench" / "genai_image_527.json"

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


ROWS = {  # id -> strategy: the paper's rows, then the schemes of released models
    "b1": "single",
    "fusedit": "deep",
    "s2": "depth",
    "s1": "time",
    "flux2": "concat",
    "unifusion": "layer_attention",
    "hidream": "hard",
}


def measure(S: int, steps: int, rows_wanted: tuple[str, ...] = tuple(ROWS)) -> tuple[int, dict[str, dict]]:
    """FLOPs of one image at text length S: the LLM forward, and per strategy the DiT's training step and
    sampling steps (text side cached or recomputed)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        llm = Qwen3ForCausalLM(Qwen3Config(**QWEN3_VL_4B_TEXT))
        ids = torch.zeros(1, S, dtype=torch.long)
        llm_flops = flops(lambda: llm.model(input_ids=ids, output_hidden_states=True))
    rows = {"llm": {"params": count(llm)}}
    L, C = QWEN3_VL_4B_TEXT["num_hidden_layers"], QWEN3_VL_4B_TEXT["hidden_size"]
    depth = DIT_PRESETS["paper"]["depth"]
    kv_heads, head_dim = QWEN3_VL_4B_TEXT["num_key_value_heads"], QWEN3_VL_4B_TEXT["head_dim"]
    text_args = {
        "hidden_states": dict(text_dim=C, num_text_layers=L),
        # One entry per block: its layer's keys and values, 2 x 8 heads x 128.
        "keys_values": dict(text_dim=2 * kv_heads * head_dim, num_text_layers=depth, text_kv_heads=kv_heads),
    }
    for sid in rows_wanted:
        strategy = ROWS[sid]
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
                full = flops(lambda: dit(x2, t2, text2, mask2, text_normalized=True))
        image_side = full - text_side
        rows[sid] = dict(
            params=count(dit),
            fusion_params=count(dit.fusion),
            train=train,
            text_side=text_side,
            image_side=image_side,
            cached=image_side + text_side / steps if not dit.fusion.depends_on_t else None,
            recomputed=full,
        )
    return llm_flops, rows


def at_paper_length(args: argparse.Namespace) -> None:
    """Every strategy's cost at one text length (--text-tokens)."""
    S, L = args.text_tokens, QWEN3_VL_4B_TEXT["num_hidden_layers"]
    kv_heads, head_dim = QWEN3_VL_4B_TEXT["num_key_value_heads"], QWEN3_VL_4B_TEXT["head_dim"]
    llm_flops, rows = measure(S, args.steps)
    show("llm_params", f"{rows.pop('llm')['params'] / 1e9:.3f} B")
    show("llm_forward_gflops", f"{llm_flops / 1e9:.1f}   (one prompt of {S} tokens)")
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
    for sid in ("flux2", "unifusion", "hidream"):
        r = rows[sid]
        show(f"train_ratio_{sid}_over_b1", f"{r['train'] / b1['train']:.4f}")
        show(f"params_ratio_{sid}_over_b1", f"{r['params'] / b1['params']:.4f}")
        show(f"sample_ratio_{sid}_over_b1", f"{r['cached'] / b1['cached']:.4f}  (both cached)")


def cost_curves(steps: int, max_length: int) -> dict[str, np.poly1d]:
    """Each per-image cost as an exact polynomial of degree 2 in S: fitted at 3 lengths, checked at a 4th."""
    fit_at, check_at = (16, 128, max_length), 64
    counted = {S: measure(S, steps, ("b1", "fusedit", "s2")) for S in (*fit_at, check_at)}

    def figures(S: int) -> dict[str, float]:
        llm, rows = counted[S]
        return {
            "llm": llm,
            **{f"{sid}_train": rows[sid]["train"] for sid in ("b1", "s2", "fusedit")},
            **{f"{sid}_sample": rows[sid]["cached"] for sid in ("b1", "s2", "fusedit")},
        }

    curves = {}
    for key in figures(fit_at[0]):
        curve = np.poly1d(np.polyfit(fit_at, [figures(S)[key] for S in fit_at], 2))
        counted_value = figures(check_at)[key]
        if abs(curve(check_at) - counted_value) > 1e-6 * counted_value:
            raise AssertionError(
                f"{key} is not quadratic in S: {curve(check_at)} vs {counted_value} at {check_at}"
            )
        curves[key] = curve
    return curves


def padding_cost(args: argparse.Namespace) -> None:
    """Padded against variable-length text over a real prompt-length distribution."""
    counter = TokenCounter(TextEncoderConfig(max_length=args.max_length))
    prompts = [p.prompt for p in read_prompts("genaibench", args.prompts)]
    lengths = np.array(counter.token_counts(prompts))
    template = counter.token_counts([""])[0]
    rng = np.random.default_rng(0)
    batch_max = np.concatenate(  # a batch of random prompts is padded to its longest: 100 shuffled epochs
        [
            np.maximum.reduceat(perm, np.arange(0, len(perm) - args.batch + 1, args.batch))
            for perm in (rng.permutation(lengths) for _ in range(100))
        ]
    )
    print()
    show("prompts", f"{len(prompts)} from {args.prompts.name}")
    show(
        "prompt_tokens",
        f"mean {lengths.mean():.1f}, p90 {np.quantile(lengths, 0.9):.0f}, max {lengths.max()} "
        f"(template alone "
        f"{template}: {counter.config.template} of the embedded encoder; cut at {args.max_length})",
    )
    show(f"batch_of_{args.batch}_longest", f"mean {batch_max.mean():.1f} tokens")
    curves = cost_curves(args.steps, args.max_length)
    designs = {
        f"padded to {args.max_length}": lambda f: f(args.max_length),
        f"batch of {args.batch} padded to its longest": lambda f: f(batch_max).mean(),
        "each prompt at its own length": lambda f: f(lengths).mean(),
    }
    per_token = QWEN3_VL_4B_TEXT["num_hidden_layers"] * QWEN3_VL_4B_TEXT["hidden_size"] * 2  # bf16
    padded_bytes = args.max_length * per_token
    print()
    print(f"| per image | {' | '.join(designs)} | ratio (batch / padded) | ratio (own length / padded) |")
    print("|---|" + "---|" * (len(designs) + 2))
    cache = [padded_bytes, lengths.mean() * per_token, lengths.mean() * per_token]
    print(
        f"| one cached row, MB (bf16, 36 x 2560) | {' | '.join(f'{c / 1e6:.2f}' for c in cache)} | "
        f"{cache[1] / cache[0]:.3f} | {cache[2] / cache[0]:.3f} |"
    )
    rows = {
        "S2 training step, features cached (DiT fwd+bwd), GFLOPs": curves["s2_train"],
        "S2 training step, LLM run online, GFLOPs": curves["s2_train"] + curves["llm"],
        "B1 training step, features cached, GFLOPs": curves["b1_train"],
        "FuseDiT training step, features cached, GFLOPs": curves["fusedit_train"],
        "LLM forward, GFLOPs": curves["llm"],
        f"S2 sampling step (CFG, text side cached over {args.steps} steps), GFLOPs": curves["s2_sample"],
    }
    ratios = {}
    for name, curve in rows.items():
        values = [design(curve) for design in designs.values()]
        ratios[name] = (values[1] / values[0], values[2] / values[0])
        print(
            f"| {name} | {' | '.join(f'{v / 1e9:.0f}' for v in values)} | {ratios[name][0]:.3f} | "
            f"{ratios[name][1]:.3f} |"
        )
    print()
    show("target_cache_bytes", f"{cache[1] / cache[0]:.3f} of padded (target <= 0.12)")
    cached = ratios["S2 training step, features cached (DiT fwd+bwd), GFLOPs"][0]
    online = ratios["S2 training step, LLM run online, GFLOPs"][0]
    show("target_s2_step_cached", f"{cached:.3f} of padded (target <= 0.80; batches of {args.batch})")
    show("target_s2_step_llm_online", f"{online:.3f} of padded (target <= 0.45; batches of {args.batch})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--text-tokens", type=int, default=512, help="prompt length (the paper pads to 512)")
    parser.add_argument("--prompts", type=Path, default=GENAI_BENCH, help="GenAI-Bench-format prompt file")
    parser.add_argument("--max-length", type=int, default=512, help="the padded design's length")
    parser.add_argument("--batch", type=int, default=32, help="prompts per training batch")
    parser.add_argument("--skip-strategies", action="store_true", help="only the padding comparison")
    args = parser.parse_args()
    if not args.skip_strategies:
        at_paper_length(args)
    padding_cost(args)


if __name__ == "__main__":
    main()

"""The GPU check: one command that measures what semroute does on whatever device it gets, in minutes.

    python benchmarks/gpu_check.py [--size auto|paper|tiny] [--out FILE.json]

No network and no downloads: the text tower is a randomly initialised Qwen3 (at `paper` size shaped like
Qwen3-VL-4B's text tower, 36 x 2560, 8 key/value heads of 128) and the DiT is the `paper` preset (24 x 2048
on 32 x 32 x 16 latents, 256 px through an SD3/FLUX VAE). Prompts have realistic lengths: 27 to 59 tokens,
GenAI-Bench's range with a chat template (`benchmarks/paper_scale.py` measures the distribution), so every
batch is padded to its own longest prompt, as semroute trains. `--size auto` is `paper` on CUDA and `tiny`
elsewhere: CI runs the tiny size on the CPU so that this script cannot rot.

It prints one line per figure:
  * the LLM forward (img/s: prompts per second), and per strategy (B1, S2, FuseDiT) a training step in the
    precision `auto` resolves to (bf16 on a GPU that has it): img/s, model FLOPs per image
    (torch.utils.flop_counter), MFU against the device's bf16 peak (its data sheet's, where the device is
    known) and against a measured large bf16 matrix product, and peak memory;
  * sampling img/s with the text side cached (S2, classifier-free guidance, 25 Euler steps), eager and with
    the DiT blocks under torch.compile (and the compile time);
  * a short end-to-end run through `semroute.train` on the device (shapes task, a small random Qwen3 with a
    word-level tokenizer written to a temporary directory): the loss falls, and a run stopped halfway and
    resumed from its checkpoint ends where the uninterrupted run ends.

On the device machine (torch there, no diffusers): carry a diffusers wheel, made here with
`python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==<version>`,
then `python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:src
python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runnable from a bare checkout

from paper_scale import QWEN3_VL_4B_TEXT  # noqa: E402  (the same Qwen3-VL-4B text tower)
from semroute.dit import DIT_PRESETS, SemanticRoutingDiT  # noqa: E402
from semroute.flow import RectifiedFlow, SampleConfig  # noqa: E402
from semroute.fusion import LayerFusion, pack_keys_values  # noqa: E402
from semroute.runtime import resolve_precision  # noqa: E402

# Dense bf16 tensor-core peaks from the data sheets (FLOP/s), by a name torch reports.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}
QWEN3 = {
    "paper": QWEN3_VL_4B_TEXT,
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
    ),
}
SIZES = {
    # DiT preset, training batch, sampling batch, timed steps, sampling steps, end-to-end steps
    "paper": dict(dit="paper", batch=32, sample_batch=32, steps=6, sample_steps=25, run_steps=40),
    "tiny": dict(dit="tiny", batch=4, sample_batch=4, steps=3, sample_steps=4, run_steps=6),
}
PROMPT_TOKENS = (27, 59)
STRATEGIES = {"b1": "single", "s2": "depth", "fusedit": "deep"}


def show(name: str, value: float | str, unit: str = "", note: str = "") -> None:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    print(f"{name:<34} {text} {unit}".rstrip() + (f"  ({note})" if note else ""), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product in `dtype` on this device (what the hardware gives here)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, 10 if device.type == "cuda" else 3)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a on this device"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def text_batch(llm, batch: int, device: torch.device, generator: torch.Generator, deep_layers: list[int]):
    """Random prompts of realistic lengths through the LLM: LN'd hidden states of every layer, deep fusion's
    packed keys/values of `deep_layers` (0-based decoder layers), the mask; right-padded to the longest."""
    lengths = torch.randint(PROMPT_TOKENS[0], PROMPT_TOKENS[1] + 1, (batch,), generator=generator)
    S = int(lengths.max())
    ids = torch.randint(0, llm.config.vocab_size, (batch, S), generator=generator).to(device)
    mask = (torch.arange(S)[None] < lengths[:, None]).to(device)
    with torch.no_grad():
        out = llm(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True, use_cache=True)
    hidden = LayerFusion.normalize(torch.stack(out.hidden_states[1:]))  # (L, B, S, C)
    cache = out.get("cache") or out.past_key_values  # transformers 5's name, and the older one
    keys = torch.stack([cache.layers[i].keys for i in deep_layers]).float()
    values = torch.stack([cache.layers[i].values for i in deep_layers]).float()
    return hidden, pack_keys_values(keys, values), mask


def check_steps(args: argparse.Namespace, device: torch.device, size: dict, results: dict) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    precision = resolve_precision("auto", device)
    autocast = precision.autocast_dtype
    show("device", torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({precision.name})")
    show("precision", precision.name, note=precision.describe())
    measured_peak = matmul_peak(device, autocast or torch.float32)
    sheet_peak = next(
        (
            peak
            for name, peak in BF16_PEAK.items()
            if device.type == "cuda" and name in torch.cuda.get_device_name()
        ),
        None,
    )
    show("matmul_peak_tflops", measured_peak / 1e12, "TFLOP/s", f"{'bf16' if autocast else 'fp32'}, measured")
    results.update(precision=precision.name, matmul_peak=measured_peak, sheet_peak=sheet_peak)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    llm_config = Qwen3Config(**QWEN3[args.size])
    llm = Qwen3ForCausalLM(llm_config).to(device, dtype=autocast or torch.float32).eval()
    preset = DIT_PRESETS[size["dit"]]
    depth = preset["depth"]
    n_layers = llm_config.num_hidden_layers
    deep_layers = list(range(n_layers - depth - 1, n_layers - 1))  # default_deep_layers, 0-based
    B = size["batch"]
    seconds = timed(partial(text_batch, llm, B, device, generator, deep_layers), device, 3)
    show(
        "llm_forward_img_per_s", B / seconds, "prompts/s", f"{n_layers} x {llm_config.hidden_size}, batch {B}"
    )
    hidden, packed, mask = text_batch(llm, B, device, generator, deep_layers)
    del llm
    kv_heads = llm_config.num_key_value_heads
    text_args = {
        "hidden_states": (dict(text_dim=llm_config.hidden_size, num_text_layers=n_layers), hidden),
        "keys_values": (
            dict(text_dim=packed.shape[-1], num_text_layers=depth, text_kv_heads=kv_heads),
            packed,
        ),
    }
    flow = RectifiedFlow()
    context = torch.autocast(device.type, dtype=autocast) if autocast else nullcontext()
    for sid, strategy in STRATEGIES.items():
        kind = "keys_values" if strategy == "deep" else "hidden_states"
        dit_args, text = text_args[kind]
        torch.manual_seed(0)
        model = SemanticRoutingDiT(**preset, strategy=strategy, **dit_args).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        channels, side = model.config.in_channels, model.config.sample_size
        x0 = torch.randn(B, channels, side, side, device=device)
        text = text.to(device, autocast or torch.float32)

        def step(model=model, optimizer=optimizer, x0=x0, text=text) -> None:
            with context:
                loss = flow.loss(lambda x, t: model(x, t, text, mask, text_normalized=True), x0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        per_step = timed(step, device, size["steps"])
        flops = count_flops(step) / B
        rate = B / per_step
        show(f"{sid}_train_img_per_s", rate, "img/s", f"batch {B}, {text.shape[2]} text tokens")
        show(f"{sid}_train_gflops_per_img", flops / 1e9, "GFLOP")
        show(f"{sid}_mfu_vs_measured_matmul", flops * rate / measured_peak)
        if sheet_peak:
            show(f"{sid}_mfu_vs_data_sheet", flops * rate / sheet_peak)
        show(f"{sid}_train_peak_memory", peak_memory(device))
        results[sid] = dict(img_per_s=rate, flops_per_img=flops, mfu_measured=flops * rate / measured_peak)
        if strategy == "depth":
            check_sampling(model, text, mask, device, size, autocast, results)
        del model, optimizer


def check_sampling(model, text, mask, device, size, autocast, results) -> None:
    """S2 sampling with the text side routed once per prompt (CFG), eager and with compiled blocks."""
    n = size["sample_batch"]
    config = SampleConfig(steps=size["sample_steps"])
    scheduler = config.make_scheduler()
    model.eval()
    ids = torch.arange(n) % text.shape[1]
    cond, cmask = text[:, ids], mask[ids]
    null, nmask = torch.zeros_like(cond[:, :, :1]), torch.ones_like(cmask[:, :1])
    both = torch.cat([cond, torch.nn.functional.pad(null, (0, 0, 0, cond.shape[2] - 1))], dim=1)
    both_mask = torch.cat([cmask, torch.nn.functional.pad(nmask, (0, cmask.shape[1] - 1))])
    noise = torch.randn(n, model.config.in_channels, model.config.sample_size, model.config.sample_size)
    noise = noise.to(device)
    context = torch.autocast(device.type, dtype=autocast) if autocast else nullcontext()

    @torch.no_grad()
    def sample() -> torch.Tensor:
        with context:
            routed = model.route_text(both, both_mask, normalized=True)
            return RectifiedFlow.sample(
                lambda x, t: model(x, t, context=routed), noise, scheduler, config.steps, 3.0
            )

    eager = timed(sample, device, 2)
    show("s2_sample_img_per_s_eager", n / eager, "img/s", f"{config.steps} steps, CFG, batch {n}")
    blocks = list(model.blocks)
    start = time.perf_counter()
    try:
        for block in blocks:
            block.forward = torch.compile(block.forward)
        sample()
        sync(device)
        compile_s = time.perf_counter() - start
        compiled = timed(sample, device, 2)
    except Exception as err:  # a device or toolchain without a working compiler: say so, carry on
        show("s2_sample_img_per_s_compiled", "failed", note=str(err).splitlines()[0][:200])
        results["sample"] = dict(eager=n / eager)
        return
    finally:
        for block in blocks:
            vars(block).pop("forward", None)
    show("s2_sample_img_per_s_compiled", n / compiled, "img/s", f"compiled in {compile_s:.0f} s")
    show("s2_sample_compiled_over_eager", eager / compiled)
    results["sample"] = dict(eager=n / eager, compiled=n / compiled, compile_s=compile_s)


def write_tiny_qwen3(directory: Path, size: str) -> Path:
    """A random Qwen3 and a word-level tokenizer of the shapes vocabulary, saved like a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from semroute.data.shapes import COLOURS, NUMBERS, SHAPES

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    words = ["user", "and", "an", "image", "of", "a", *NUMBERS, *COLOURS, *SHAPES, *(s + "s" for s in SHAPES)]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    hidden = 256 if size == "paper" else 32
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=128,
        pad_token_id=vocab["<pad>"],
    )
    Qwen3ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def check_run(args: argparse.Namespace, device: torch.device, size: dict, results: dict) -> None:
    """semroute.train end to end on the device: the loss falls, and a run resumed halfway ends where the
    uninterrupted one ends."""
    from semroute.config import load_config
    from semroute.train import train

    n = size["run_steps"]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        llm = write_tiny_qwen3(work / "llm", args.size)
        raw = {
            "model": {"preset": "cpu-small" if args.size == "paper" else "tiny", "strategy": "depth"},
            "text_encoder": {"model": str(llm), "max_length": 16, "template": "<|im_start|>user {prompt}"},
            "train": {
                "batch_size": 64 if args.size == "paper" else 8,
                "max_steps": n,
                "log_every": max(1, n // 6),
                "checkpoint_every": n // 2,
                "warmup_steps": 2,
                "lr": 3e-3,
                "sample_grids": False,
            },
        }
        if args.size == "tiny":
            raw["model"]["sample_size"] = 12
            raw["data"] = {
                "image_size": 12,
                "counts": [1, 2],
                "colours": ["red", "blue"],
                "shapes": ["square"],
            }
        config = load_config(raw)
        on = str(device)
        start = time.perf_counter()
        whole = train(config, work / "whole", progress=False, device=on)
        seconds = time.perf_counter() - start
        losses = [
            json.loads(line)["loss"] for line in (work / "whole" / "log.jsonl").read_text().splitlines()
        ]
        show(
            "run_loss_first_to_last",
            f"{losses[0]:.4f} -> {losses[-1]:.4f}",
            note=f"{n} steps in {seconds:.0f} s",
        )
        show("run_loss_falls", "yes" if losses[-1] < losses[0] else "NO")
        train(config, work / "resumed", max_steps=n // 2, progress=False, device=on)
        resumed = train(config, work / "resumed", progress=False, device=on)
        a, b = whole.model.state_dict(), resumed.model.state_dict()
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        scale = max(float(a[k].float().abs().max()) for k in a)
        show(
            "run_resume_max_weight_diff",
            diff,
            note=f"largest weight {scale:.3g}; step {resumed.steps} of {n}",
        )
        show("run_resume_matches", "yes" if resumed.steps == n and diff <= 1e-3 * scale else "NO")
        results["run"] = dict(losses=losses, resume_diff=diff, steps=resumed.steps)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=("auto", "paper", "tiny"), default="auto")
    parser.add_argument("--device", default=None, help="default: cuda where present, else cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.size == "auto":
        args.size = "paper" if device.type == "cuda" else "tiny"
    size = SIZES[args.size]
    results: dict = {"size": args.size, "torch": torch.__version__}
    started = time.perf_counter()
    show(
        "size",
        args.size,
        note=f"DiT preset {size['dit']}, Qwen3 {QWEN3[args.size]['num_hidden_layers']} x "
        f"{QWEN3[args.size]['hidden_size']}, torch {torch.__version__}",
    )
    check_steps(args, device, size, results)
    check_run(args, device, size, results)
    show("total_seconds", time.perf_counter() - started, "s")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1, default=lambda v: None if math.isnan(v) else v))
    failed = [k for k in ("run",) if k not in results]
    if failed or results["run"]["losses"][-1] >= results["run"]["losses"][0]:
        sys.exit(1)


if __name__ == "__main__":
    main()

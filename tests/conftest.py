"""Shared fixtures: a tiny random Llama with a word-level tokenizer, built and saved in the test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from semroute.data.shapes import COLOURS, NUMBERS, SHAPES

SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
)


def make_tiny_llama(directory: Path, num_layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """Save a randomly initialised Llama and a word-level tokenizer that knows the shapes vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["user", "and", "an", "image", "of", "a", "hello", "world", *NUMBERS, *COLOURS, *SHAPES]
    words += [s + "s" for s in SHAPES]
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<|im_start|>"],
        eos_token_id=vocab["<|im_end|>"],
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_llama_dir):
    from semroute.text_encoder import TextEncoder, TextEncoderConfig

    return TextEncoder(TextEncoderConfig(model=str(tiny_llama_dir), max_length=16))


def tiny_run_config(tiny_llama_dir: Path, strategy: str = "depth", **train) -> dict:
    """A complete run config for a 12x12 shapes task that trains in seconds."""
    return {
        "model": {"preset": "tiny", "strategy": strategy, "sample_size": 12},
        "text_encoder": {"model": str(tiny_llama_dir), "max_length": 16},
        "data": {
            "image_size": 12,
            "counts": [1, 2],
            "colours": ["red", "blue"],
            "shapes": ["square", "circle"],
        },
        "train": {
            "batch_size": 16,
            "max_steps": 20,
            "log_every": 5,
            "checkpoint_every": 10,
            "warmup_steps": 2,
            "mixed_precision": "no",
            "lr": 3e-3,
            **train,
        },
        "sample": {"steps": 4, "guidance_scale": 2.0, "images_per_prompt": 2},
    }


def make_tiny_vae(directory: Path, seed: int = 0) -> Path:
    """A random AutoencoderKL that downsamples by 2 into 4 channels, with SD3-style shift and scale."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=1.5,
        shift_factor=0.1,
    )
    vae.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("tiny_vae"))


def write_image_folder(root: Path, n: int = 6, size: tuple[int, int] = (20, 14)) -> list[dict]:
    """n small random RGB images and manifest rows for them (odd rows carry two captions)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / "img" / f"{i}.png"
        )
        text = f"{['one', 'two', 'three'][i % 3]} red squares"
        rows.append({"image": f"img/{i}.png", "text": [text, "a blue circle"] if i % 2 else text})
    return rows


@pytest.fixture
def manifest(tmp_path):
    """A JSONL manifest of a few tiny captioned images."""
    rows = write_image_folder(tmp_path)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path

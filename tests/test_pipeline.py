import json

import pytest
import torch

from semroute.dit import DIT_PRESETS, SemanticRoutingDiT
from semroute.features import encode_prompts
from semroute.pipeline import SemanticRoutingPipeline, check_compatible
from semroute.text_encoder import TextEncoder, TextEncoderConfig

PROMPTS = ["two red circles", "one blue square"]


def make_pipeline(encoder, strategy, **kwargs):
    torch.manual_seed(0)
    model = SemanticRoutingDiT(
        **DIT_PRESETS["tiny"],
        text_dim=encoder.hidden_size,
        num_text_layers=encoder.num_layers,
        strategy=strategy,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return SemanticRoutingPipeline.from_parts(model, encoder, **{"precision": "fp32", **kwargs})


@pytest.mark.parametrize("strategy", ["single", "uniform", "static", "depth"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_context_gives_the_same_images(tiny_encoder, strategy, precision):
    pipe = make_pipeline(tiny_encoder, strategy, precision=precision)
    cached = pipe.generate(PROMPTS, num_inference_steps=4, guidance_scale=3.0, seed=1)
    uncached = pipe.generate(PROMPTS, num_inference_steps=4, guidance_scale=3.0, seed=1, reuse_context=False)
    assert cached.shape == (2, 3, 8, 8)
    assert cached.min() >= 0 and cached.max() <= 1
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


def test_context_is_routed_once_for_depth_and_every_step_for_time(tiny_encoder, monkeypatch):
    calls = {}
    for strategy, expected in (("depth", 1), ("joint", 5)):
        pipe = make_pipeline(tiny_encoder, strategy)
        original = pipe.transformer.route_text
        calls[strategy] = 0

        def counting(*args, _orig=original, _s=strategy, **kwargs):
            calls[_s] += 1
            return _orig(*args, **kwargs)

        monkeypatch.setattr(pipe.transformer, "route_text", counting)
        pipe.generate(PROMPTS, num_inference_steps=5, guidance_scale=2.0)
        assert calls[strategy] == expected


def test_sampling_is_deterministic_by_seed(tiny_encoder):
    pipe = make_pipeline(tiny_encoder, "time")
    a = pipe.generate(PROMPTS, 3, 2.0, seed=5)
    torch.testing.assert_close(a, pipe.generate(PROMPTS, 3, 2.0, seed=5), rtol=0, atol=0)
    assert not torch.equal(a, pipe.generate(PROMPTS, 3, 2.0, seed=6))


@pytest.mark.parametrize("strategy", ["single", "uniform", "static", "time", "depth", "joint"])
def test_a_pipeline_cast_as_a_whole_samples_in_that_dtype(tiny_encoder, strategy):
    """pipe.to(dtype=...) (float64 for checks, bf16 on GPUs) works for every strategy, time gates included."""
    import copy

    encoder = TextEncoder(
        tiny_encoder.config, model=copy.deepcopy(tiny_encoder.model), tokenizer=tiny_encoder.tokenizer
    )
    pipe = make_pipeline(encoder, strategy)
    reference = pipe.generate(PROMPTS, 3, 2.0, seed=1)
    pipe.to(dtype=torch.float64)
    assert pipe.transformer.dtype == torch.float64 and pipe.text_encoder.dtype == torch.float64
    double = pipe.generate(PROMPTS, 3, 2.0, seed=1)
    torch.testing.assert_close(double.float(), reference, rtol=0, atol=1e-4)
    pipe.to(dtype=torch.bfloat16)
    half = pipe.generate(PROMPTS, 3, 2.0, seed=1)
    assert torch.isfinite(half).all() and (half.float() - reference).abs().max() < 0.1


def test_prompt_features_are_padded_and_layernormed(tiny_encoder):
    feats = encode_prompts(
        tiny_encoder, ["one red circle", "two blue squares and one red circle", ""], batch_size=2
    )
    assert feats.hidden.shape[:2] == (3, 4)
    assert feats.mask.sum(1).tolist()[1] == feats.hidden.shape[2]
    real = feats.hidden[0][:, feats.mask[0]]
    torch.testing.assert_close(real.mean(-1), torch.zeros(real.shape[:-1]), atol=1e-4, rtol=0)
    text, mask = feats.select(torch.tensor([2, 0]))
    # A batch is as long as its longest prompt, not the table's longest.
    n = int(feats.mask[[2, 0]].sum(1).max())
    assert n < feats.hidden.shape[2] and text.shape[:3] == (4, 2, n)
    assert torch.equal(mask[1], feats.mask[0, :n]) and torch.equal(text[:, 1], feats.hidden[0, :, :n])


def test_mismatched_encoder_names_both_numbers(tiny_encoder, tiny_llama_dir):
    model = SemanticRoutingDiT(**DIT_PRESETS["tiny"], text_dim=tiny_encoder.hidden_size, num_text_layers=30)
    with pytest.raises(ValueError, match="30 LLM layers but the text encoder gives 4"):
        check_compatible(model, tiny_encoder)
    model = SemanticRoutingDiT(**DIT_PRESETS["tiny"], text_dim=576, num_text_layers=4)
    with pytest.raises(ValueError, match="hidden size 576 but the text encoder has 32"):
        check_compatible(model, tiny_encoder)
    fewer = TextEncoder(TextEncoderConfig(model=str(tiny_llama_dir), layers=[1, 2]))
    with pytest.raises(ValueError, match="4 LLM layers but the text encoder gives 2"):
        SemanticRoutingPipeline.from_parts(
            SemanticRoutingDiT(**DIT_PRESETS["tiny"], text_dim=32, num_text_layers=4), fewer
        )


def test_diffusers_save_and_from_pretrained_round_trip(tmp_path, tiny_encoder, tiny_vae_dir):
    from PIL import Image

    from semroute.latent import load_vae

    torch.manual_seed(0)
    model = SemanticRoutingDiT(
        **{**DIT_PRESETS["tiny"], "in_channels": 4, "sample_size": 8},
        text_dim=tiny_encoder.hidden_size,
        num_text_layers=tiny_encoder.num_layers,
        strategy="time",
    )
    for p in model.parameters():  # adaLN-zero starts at a zero output; make the round trip see real weights
        torch.nn.init.normal_(p, std=0.05)
    pipe = SemanticRoutingPipeline.from_parts(model, tiny_encoder, vae=load_vae(tiny_vae_dir))
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert (
        index["transformer"] == ["semroute.dit", "SemanticRoutingDiT"] and index["vae"][1] == "AutoencoderKL"
    )
    loaded = SemanticRoutingPipeline.from_pretrained(tmp_path / "pipe")
    assert (
        loaded.config.text_layers == tiny_encoder.layers
        and loaded.config.max_length == tiny_encoder.config.max_length
    )
    out = loaded("two red circles", num_inference_steps=3, guidance_scale=2.0, num_images_per_prompt=2)
    assert len(out.images) == 2 and all(
        isinstance(im, Image.Image) and im.size == (16, 16) for im in out.images
    )
    reference = pipe(
        ["two red circles"] * 2, num_inference_steps=3, guidance_scale=2.0, output_type="pt"
    ).images
    again = loaded(
        ["two red circles"] * 2, num_inference_steps=3, guidance_scale=2.0, output_type="pt"
    ).images
    torch.testing.assert_close(again, reference, rtol=0, atol=1e-6)
    assert reference.std() > 0.01
    with pytest.raises(ValueError, match="output_type"):
        loaded("x", output_type="latent")


def test_gradient_checkpointing_gives_the_same_gradients(tiny_encoder):
    torch.manual_seed(0)
    model = SemanticRoutingDiT(
        **DIT_PRESETS["tiny"], text_dim=tiny_encoder.hidden_size, num_text_layers=tiny_encoder.num_layers
    )
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    text, mask = tiny_encoder(PROMPTS)
    x, t = torch.randn(len(PROMPTS), 3, 8, 8), torch.rand(len(PROMPTS))

    def grads():
        model.zero_grad()
        model(x, t, text, mask).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)

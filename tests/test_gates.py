"""What time gates read: the nominal t, a shifted t at sampling, or a noise level estimated from x_t."""

from __future__ import annotations

import pytest
import torch

from semroute.config import load_config
from semroute.dit import DIT_PRESETS, SemanticRoutingDiT
from semroute.flow import shift_time

from .conftest import tiny_run_config

TFREE_TINY = {**DIT_PRESETS["tiny"], "timestep_conditioning": "none"}


def tiny_dit(strategy: str = "time", gate_signal: str = "nominal", seed: int = 0) -> SemanticRoutingDiT:
    torch.manual_seed(seed)
    model = SemanticRoutingDiT(
        **TFREE_TINY, text_dim=32, num_text_layers=4, strategy=strategy, gate_signal=gate_signal
    )
    with (
        torch.no_grad()
    ):  # leave the zero init, so that the gates and the output actually depend on their inputs
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    text = torch.randn(4, batch, 5, 32, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    return x, text, mask


@pytest.mark.parametrize("strategy", ["time", "joint"])
def test_estimated_gates_read_the_heads_estimate_exactly(strategy):
    """An estimated-gate DiT equals a nominal-gate DiT with
    the same weights that is handed t = the estimate."""
    estimated = tiny_dit(strategy, "estimated")
    nominal = tiny_dit(strategy, "nominal")
    missing, unexpected = nominal.load_state_dict(estimated.state_dict(), strict=False)
    assert not missing and all(k.startswith("noise_head.") for k in unexpected)
    x, text, mask = inputs()
    with torch.no_grad():
        v, level = estimated(x, torch.rand(3), text, mask, return_noise_level=True)
        torch.testing.assert_close(v, nominal(x, level, text, mask), rtol=1e-5, atol=1e-6)
        # Without a timestep input, nothing else reads t: the output does not depend on it at all.
        torch.testing.assert_close(v, estimated(x, torch.rand(3), text, mask), rtol=0, atol=0)
    assert level.shape == (3,) and ((level > 0) & (level < 1)).all()


def test_both_guidance_branches_get_one_estimate():
    model = tiny_dit("time", "estimated")
    x, text, mask = inputs()
    doubled = torch.cat([x, x])  # how the sampler batches [conditional; unconditional]
    with torch.no_grad():
        _, level = model(
            doubled,
            torch.rand(6),
            torch.cat([text, text], 1),
            torch.cat([mask, mask]),
            return_noise_level=True,
        )
    torch.testing.assert_close(level[:3], level[3:], rtol=0, atol=0)


def test_a_gate_time_reaches_only_the_gates():
    """gate_t replaces t in the gates; in a t-free DiT that is the only place t enters."""
    model = tiny_dit("time", "nominal")
    x, text, mask = inputs()
    t = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        shifted = model(x, t, text, mask, gate_t=shift_time(t, 3.0))
        torch.testing.assert_close(shifted, model(x, shift_time(t, 3.0), text, mask), rtol=0, atol=0)
        assert not torch.allclose(shifted, model(x, t, text, mask))


def test_shift_time_matches_the_schedulers_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    # The training-time sigmas (before set_timesteps): diffusers applies its shift to the same linear grid.
    torch.testing.assert_close(
        shift_time(plain.sigmas.double(), 3.0), scheduler.sigmas.double(), rtol=1e-5, atol=1e-6
    )


def test_gate_signal_errors_name_the_fix(tiny_llama_dir):
    raw = tiny_run_config(tiny_llama_dir)
    raw["model"]["gate_signal"] = "estimated"  # with strategy depth
    with pytest.raises(ValueError, match="use strategy time or joint"):
        load_config(raw)
    raw["model"]["gate_signal"] = "guessed"
    with pytest.raises(ValueError, match="unknown model.gate_signal 'guessed'; valid: nominal, estimated"):
        load_config(raw)


def test_a_pipeline_samples_with_a_gate_shift_and_refuses_one_that_would_do_nothing(tiny_encoder):
    from semroute.pipeline import SemanticRoutingPipeline

    def pipe(model):
        return SemanticRoutingPipeline.from_parts(model, tiny_encoder, precision="fp32")

    time_pipe = pipe(tiny_dit("time", "nominal"))
    base = time_pipe.generate(["one red square"], num_inference_steps=3, seed=0)
    time_pipe.use_gate_shift(3.0)
    assert time_pipe.sampling().gate_shift == 3.0
    assert not torch.allclose(time_pipe.generate(["one red square"], num_inference_steps=3, seed=0), base)
    time_pipe.use_gate_shift(1.0)
    torch.testing.assert_close(
        time_pipe.generate(["one red square"], num_inference_steps=3, seed=0), base, rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="strategy 'depth' has none"):
        pipe(tiny_dit("depth", "nominal")).use_gate_shift(2.0)
    with pytest.raises(ValueError, match="estimates from x_t"):
        pipe(tiny_dit("time", "estimated")).use_gate_shift(2.0)


def test_the_noise_head_learns_the_noise_level_and_survives_save_load(tiny_llama_dir, tmp_path):
    """Trained jointly for 60 steps on the shapes task, the
    head's error on held-out x_t falls well below chance."""
    from semroute.data.shapes import ShapesDataset, ShapesTask
    from semroute.train import train

    raw = tiny_run_config(tiny_llama_dir, strategy="time", max_steps=60, checkpoint_every=100, lr=3e-3)
    raw["model"].update(timestep_conditioning="none", gate_signal="estimated")
    config = load_config(raw)
    result = train(config, tmp_path / "run", progress=False)
    loaded = SemanticRoutingDiT.from_pretrained(result.checkpoint)
    assert loaded.noise_head is not None and loaded.config.gate_signal == "estimated"
    data = ShapesDataset(ShapesTask(config.data), seed=123)
    x0 = torch.stack([data[i][0] for i in range(64)])
    g = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=g)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        error = (loaded.noise_head(x_t) - t).abs().mean().item()
    # Guessing 0.5 for t uniform in [0, 1] errs by 0.25 on average.
    assert error < 0.12, error

"""The effective-noise-level estimators against trajectories whose level is known exactly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from semroute.bench.trajectory import effective_level, suggest_gate_shift, trace
from semroute.cli import main
from semroute.flow import RectifiedFlow, SampleConfig, shift_time

from .conftest import tiny_run_config


def test_effective_level_recovers_a_known_mix():
    g = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.0, 0.1, 0.5, 0.8, 1.0])
    x = (1 - sigma.view(-1, 1, 1, 1)) * clean + sigma.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(effective_level(x, clean, noise), sigma, rtol=0, atol=1e-5)
    # A sample that is less noisy than it should be at scale 2 overall still reads its mix ratio.
    torch.testing.assert_close(effective_level(2 * x, clean, noise), sigma, rtol=0, atol=1e-5)


class StraightLine:
    """A pipeline whose guided velocity moves every sample on the straight line to a fixed target, whose
    noise level is then shift_time(t, drift) at nominal t: 1 is exact, > 1 noisier than nominal."""

    vae = None

    def __init__(self, drift: float = 1.0):
        self.scheduler = SampleConfig().make_scheduler()
        self.drift = drift
        self.transformer = type("T", (), {"noise_head": None})()

    def generate(self, prompts, steps, guidance_scale, seed, on_state):
        target = torch.linspace(-0.9, 0.9, 3 * 8 * 8).view(1, 3, 8, 8).expand(len(prompts), -1, -1, -1)
        noise = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seed])

        def velocity(x, t):
            # x = (1 - s) target + s noise with s = shift_time(t, drift): move s along with t.
            tt = t[: len(target)]
            ds_dt = self.drift / (1 + (self.drift - 1) * tt) ** 2
            v = ds_dt.view(-1, 1, 1, 1) * (noise - target)
            return torch.cat([v, v]) if len(t) > len(target) else v

        x = RectifiedFlow.sample(
            velocity,
            shift_time(torch.tensor(1.0), self.drift) * noise
            + (1 - shift_time(torch.tensor(1.0), self.drift)) * target,
            self.scheduler,
            steps or 200,
            guidance_scale,
            on_state=on_state,
        )
        return (x + 1) / 2


@pytest.mark.parametrize("drift", [1.0, 2.0, 0.5])
def test_trace_reads_the_level_of_a_known_trajectory(drift):
    result = trace(StraightLine(drift), ["a", "b"], 2, [1.0, 3.0], steps=200)
    t = torch.tensor(result["t"])
    for entry in result["scales"].values():
        # The endpoint fit is exact for any straight trajectory; the x0-prediction fit assumes the velocity is
        # a model's (noise - x0 at the nominal t), which this synthetic one is only without drift.
        for name in ("endpoint", "x0-prediction") if drift == 1.0 else ("endpoint",):
            levels = torch.tensor(entry["levels"][name])
            # Euler on a curved schedule: within a few steps' worth of error of the exact level.
            torch.testing.assert_close(levels, shift_time(t, drift).float(), rtol=0, atol=0.03)
        assert entry["suggested_gate_shift"] == pytest.approx(drift, rel=0.1)


def test_suggest_gate_shift_inverts_shift_time():
    t = torch.linspace(1, 0.02, 25)
    assert suggest_gate_shift(t.tolist(), shift_time(t, 0.4).tolist()) == pytest.approx(0.4, rel=0.01)


def test_cli_trajectory_on_a_trained_run(tiny_llama_dir, tmp_path, capsys):
    raw = tiny_run_config(tiny_llama_dir, strategy="time", max_steps=2)
    raw["model"].update(timestep_conditioning="none", gate_signal="estimated")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "trajectory",
                "--checkpoint",
                str(tmp_path / "run"),
                "--cfg",
                "1.5,3",
                "--n",
                "1",
                "--prompts-limit",
                "3",
                "--steps",
                "4",
                "--out",
                str(tmp_path / "traj"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "traj" / "trajectory.json").read_text())
    for scale, entry in saved["scales"].items():  # a fitted shift, or (this 2-step model) why there is none
        if entry["suggested_gate_shift"] is None:
            assert f"CFG {scale}:" in printed and "no gate shift can be fitted" in printed
            assert entry["no_gate_shift_because"]
        else:
            assert "gate shift that fits best" in printed and 0.1 < entry["suggested_gate_shift"] < 10
    assert list(saved["scales"]) == ["1.5", "3"] and len(saved["t"]) == 4
    assert len(saved["scales"]["3"]["head"]) == 4  # the estimated gate's own reading
    assert (tmp_path / "traj" / "trajectory.png").stat().st_size > 5000
    assert (
        main(
            [
                "trajectory",
                "--checkpoint",
                str(tmp_path / "run"),
                "--scheduler",
                "FlowMatchHeunDiscreteScheduler",
                "--out",
                str(tmp_path / "t2"),
            ]
        )
        == 2
    )

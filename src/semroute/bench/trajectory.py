"""How far the noise level of a guided sampling trajectory drifts from the nominal t its time gates read.

The sampler hands the DiT (and its time gates) the nominal t of its schedule. Under classifier-free
guidance the sample x_t need not hold that much noise. Two estimators of the effective level, each a
least-squares fit per image of x_t = a * clean + b * noise, sigma_eff = b / (a + b):

    endpoint:      clean = the trajectory's own final sample, noise = its starting noise (exact for a
                   sample that moves on the straight line between them; pixel-space models only)
    x0-prediction: clean = the model's own prediction of x0 at that step, x_t - t v, with v the guided
                   velocity the sampler used (read off consecutive Euler states); works for latents too, and
                   rests on the model's parameterisation v = noise - x0 at the nominal t

A DiT with an estimated gate also reports its noise head's estimate on the same x_t.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..flow import shift_time
from ..plots import plt, save_figure
from .sampling import image_seed

if TYPE_CHECKING:
    from ..pipeline import SemanticRoutingPipeline

ESTIMATORS = {
    "endpoint": "fit x_t = a x_final + b noise; sigma = b / (a + b)",
    "x0-prediction": "fit x_t = a (x_t - t v) + b noise; sigma = b / (a + b)",
}


def effective_level(x_t: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per image, the least-squares (a, b) of x_t = a clean + b noise, and sigma = b / (a + b). -> (B,)"""
    basis = torch.stack([clean.flatten(1), noise.flatten(1)], dim=-1).double()  # (B, P, 2)
    target = x_t.flatten(1).double().unsqueeze(-1)  # (B, P, 1)
    coef = torch.linalg.lstsq(basis, target).solution.squeeze(-1)  # (B, 2)
    return (coef[:, 1] / coef.sum(-1)).float()


def _keep_state(states: list[tuple[float, torch.Tensor]], t: torch.Tensor, x: torch.Tensor) -> None:
    states.append((float(t[0]), x.detach().float().cpu()))


def trace(
    pipeline: SemanticRoutingPipeline,
    prompts: list[str],
    images_per_prompt: int,
    scales: list[float],
    steps: int | None = None,
    seed: int = 0,
) -> dict:
    """Sample every prompt at every guidance scale and estimate the effective noise level at every step.

    Returns {"t": nominal times, "scales": {g: {estimator: mean sigma per step, "spread": ..., "head": ...}}}.
    Velocities are read off consecutive states, which is exact for a first-order (Euler) scheduler.
    """

    if type(pipeline.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(
            "trajectory reads the guided velocity off consecutive states, exact only for "
            "FlowMatchEulerDiscreteScheduler; pass --scheduler FlowMatchEulerDiscreteScheduler"
        )
    model = pipeline.transformer
    pixel_space = pipeline.vae is None
    seeds = [image_seed(seed, i, k) for i in range(len(prompts)) for k in range(images_per_prompt)]
    batch = [p for p in prompts for _ in range(images_per_prompt)]
    result: dict[str, Any] = {
        "estimators": {k: v for k, v in ESTIMATORS.items() if pixel_space or k != "endpoint"},
        "scales": {},
    }
    for scale in scales:
        states: list[tuple[float, torch.Tensor]] = []
        images = pipeline.generate(
            batch,
            steps,
            scale,
            seed=seeds,
            on_state=functools.partial(_keep_state, states),
        )
        final = images.float().cpu() * 2 - 1 if pixel_space else None
        noise = states[0][1]
        times = [t for t, _ in states] + [0.0]
        xs = [x for _, x in states]
        levels: dict[str, list[float]] = {name: [] for name in result["estimators"]}
        spreads: dict[str, list[float]] = {name: [] for name in result["estimators"]}
        head: list[float] | None = [] if model.noise_head is not None else None
        for k, (t, x) in enumerate(states):
            # The last step lands on the final sample (pixel space: the image itself; latents: not observed).
            following = xs[k + 1] if k + 1 < len(xs) else final
            estimates = {}
            if following is not None:
                velocity = (following - x) / (times[k + 1] - t)
                estimates["x0-prediction"] = effective_level(x, x - t * velocity, noise)
            if final is not None:
                estimates["endpoint"] = effective_level(x, final, noise)
            for name in levels:
                sigma = estimates.get(name)
                levels[name].append(float(sigma.mean()) if sigma is not None else math.nan)
                spreads[name].append(float(sigma.std()) if sigma is not None and len(sigma) > 1 else 0.0)
            if head is not None:
                with torch.no_grad():
                    head.append(float(model.noise_head(x.to(model.device, model.dtype)).mean()))
        entry: dict[str, Any] = {"levels": levels, "spread": spreads, "head": head}
        fitted, why = gate_shift_fit(times[:-1], levels["endpoint" if final is not None else "x0-prediction"])
        entry["suggested_gate_shift"] = fitted
        if fitted is None:
            entry["no_gate_shift_because"] = why
        result["scales"][scale] = entry
        result["t"] = times[:-1]
    return result


SHIFT_GRID = (0.1, 10.0)  # the gate shifts searched (log-spaced)
MIN_FIT_POINTS = 3  # interior times (0 < t < 1) a fit needs: the ends read t whatever the shift


def gate_shift_fit(nominal: list[float], effective: list[float]) -> tuple[float | None, str]:
    """The gate shift s whose shift_time(t, s) is closest to the effective levels (least squares over a log
    grid), or None and why not: too few informative points (t = 0 and t = 1 read the same under every
    shift), or a best fit at the edge of the searched range (the true value lies beyond it)."""
    t = torch.tensor(nominal, dtype=torch.float64)
    target = torch.tensor(effective, dtype=torch.float64)
    known = torch.isfinite(target) & (t > 1e-3) & (t < 1 - 1e-3)
    t, target = t[known], target[known]
    if len(t) < MIN_FIT_POINTS:
        return None, (
            f"only {len(t)} sampling step(s) with 0 < t < 1 carry a measured level; a fit needs at least "
            f"{MIN_FIT_POINTS} (sample with more --steps)"
        )
    low, high = SHIFT_GRID
    grid = torch.exp(torch.linspace(math.log(low), math.log(high), 801, dtype=torch.float64))
    errors = torch.stack([((shift_time(t, float(s)) - target) ** 2).sum() for s in grid])
    best = int(errors.argmin())
    if best in (0, len(grid) - 1):
        return None, f"the best fit lies at the edge of the searched range {low:g}..{high:g}, not inside it"
    return float(grid[best]), ""


def suggest_gate_shift(nominal: list[float], effective: list[float]) -> float | None:
    """`gate_shift_fit`'s value alone (None where no shift can be fitted)."""
    return gate_shift_fit(nominal, effective)[0]


def _fit_words(entry: dict) -> str:
    shift = entry.get("suggested_gate_shift")
    return f"gate shift fit {shift:.2f}" if shift is not None else "no gate shift fitted"


def plot_trajectory(result: dict, path: Path, title: str) -> None:
    """Effective noise level against the nominal t, one line
    per guidance scale, the estimators stated on the figure."""
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    t = result["t"]
    ax.plot([0, 1], [0, 1], ":", color="grey", label="effective = nominal")
    colours = plt.cm.viridis([i / max(1, len(result["scales"]) - 1) for i in range(len(result["scales"]))])
    styles = {"endpoint": "-", "x0-prediction": "--"}
    for colour, (scale, entry) in zip(colours, result["scales"].items(), strict=True):
        for name, levels in entry["levels"].items():
            ax.plot(
                t,
                levels,
                styles[name],
                color=colour,
                marker="o",
                markersize=2.5,
                label=f"CFG {scale:g}, {name} ({_fit_words(entry)})"
                if name == next(iter(entry["levels"]))
                else f"CFG {scale:g}, {name}",
            )
        if entry["head"] is not None:
            ax.plot(
                t,
                entry["head"],
                ":",
                color=colour,
                marker="x",
                markersize=3,
                label=f"CFG {scale:g}, noise head",
            )
    ax.set_xlabel("nominal t (what the time gates read)")
    ax.set_ylabel("effective noise level of x_t")
    ax.set_xlim(1.02, -0.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    stated = "\n".join(f"{name}: {text}" for name, text in result["estimators"].items())
    ax.text(
        0.98,
        0.02,
        stated,
        transform=ax.transAxes,
        fontsize=7,
        ha="right",
        va="bottom",
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
    )
    save_figure(fig, path, title)

"""Pictures: sample grids, what the router learned (block
x LLM-layer weights, weights vs t), bars and intervals."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .fusion import LayerFusion  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DPI = 120  # every figure semroute writes


def save_figure(fig: Figure, path: Path, title: str = "") -> Path:
    """The one way figures are written: a suptitle if given, tight layout, DPI dots per inch, closed."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


GRID_COLUMNS = 8  # images of one prompt wrap onto further rows past this


def save_sample_grid(
    images: torch.Tensor, prompts: list[str], per_prompt: int, path: Path, title: str = ""
) -> Path:
    """images: (len(prompts) * per_prompt, C, H, W) in [0,
    1], grouped by prompt -> rows of at most 8 per prompt."""
    columns = min(per_prompt, GRID_COLUMNS)
    rows_each = -(-per_prompt // columns)
    rows = len(prompts) * rows_each
    fig, axes = plt.subplots(rows, columns, figsize=(1.1 * columns + 2.2, 1.1 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    for p, prompt in enumerate(prompts):
        for k in range(per_prompt):
            ax = axes[p * rows_each + k // columns][k % columns]
            ax.axis("on")
            ax.imshow(
                images[p * per_prompt + k].permute(1, 2, 0).float().cpu().numpy(), interpolation="nearest"
            )
        axes[p * rows_each][0].set_ylabel(prompt, rotation=0, ha="right", va="center", fontsize=8)
    return save_figure(fig, path, title)


def captioned_grid(
    columns: dict[str, torch.Tensor], captions: list[str], path: Path, title: str = "", wrap: int = 28
) -> Path:
    """One row per caption (the caption wrapped in a column of its own on the left), one column per named
    image set: e.g. the real image beside what each model drew for it. Each tensor: (len(captions), 3, H, W)
    in [0, 1]."""
    import textwrap

    names = list(columns)
    fig, axes = plt.subplots(
        len(captions),
        len(names) + 1,
        figsize=(1.2 * len(names) + 2.2, 1.2 * len(captions) + 0.5),
        squeeze=False,
        gridspec_kw={"width_ratios": [1.8] + [1.0] * len(names)},
    )
    for i, caption in enumerate(captions):
        axes[i][0].axis("off")
        axes[i][0].text(1.0, 0.5, textwrap.fill(caption, wrap), ha="right", va="center", fontsize=7)
    for j, name in enumerate(names, start=1):
        axes[0][j].set_title(name, fontsize=8)
        for i in range(len(captions)):
            ax = axes[i][j]
            ax.imshow(columns[name][i].permute(1, 2, 0).clamp(0, 1).float().cpu().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
    return save_figure(fig, path, title)


def _heatmap(ax: Axes, weights: np.ndarray, layer_ids: list[int], title: str) -> Any:
    im = ax.imshow(weights, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("DiT block")
    step = max(1, len(layer_ids) // 10)
    ax.set_xticks(range(0, len(layer_ids), step), [str(layer_ids[i]) for i in range(0, len(layer_ids), step)])
    ax.set_title(title, fontsize=9)
    return im


ROUTING_CAPTIONS = {  # what the heatmap of a t-independent strategy shows, by where its logits come from
    "pairing": "fixed pairing: each block reads one layer",
    "taps": "share of the context projection's weight on each tap (stacked, not mixed)",
    "attention": "mean attention over layers (running mean over training tokens)",
}


def plot_routing(
    fusion: LayerFusion,
    path: Path,
    layer_ids: list[int] | None = None,
    title: str = "",
    weights: torch.Tensor | None = None,
) -> Path:
    """Heatmap of block x layer weights; for t-dependent strategies
    also heatmaps at three times and weight-vs-t curves.

    weights: (D, L) to draw instead of the fusion's own (`SemanticRoutingDiT.routing_weights`)."""
    layer_ids = layer_ids or list(range(1, fusion.num_layers + 1))
    uniform = 1.0 / fusion.num_layers
    with torch.no_grad():
        if not fusion.depends_on_t:
            drawn = (weights if weights is not None else fusion.layer_weights()).cpu().numpy()
            fig, ax = plt.subplots(figsize=(7, 0.35 * fusion.num_blocks + 1.8))
            what = ROUTING_CAPTIONS.get(fusion.spec.logits, f"weights (uniform = {uniform:.3f})")
            if fusion.spec.features == "keys_values":
                what = "fixed pairing: each block attends over its layer's keys/values"
            im = _heatmap(ax, drawn, layer_ids, f"{fusion.strategy}: {what}")
            fig.colorbar(im, ax=ax)
        else:
            times = torch.tensor([0.0, 0.5, 1.0])
            ts = torch.linspace(0, 1, 51)
            weights_t = fusion.layer_weights(times.to(fusion._anchor.device)).cpu().numpy()  # (3, D, L)
            # (T, L), mean over blocks
            curves = fusion.layer_weights(ts.to(fusion._anchor.device)).mean(1).cpu().numpy()
            fig, axes = plt.subplots(1, 4, figsize=(18, 0.35 * fusion.num_blocks + 2.2))
            vmax = weights_t.max()
            for ax, t, w in zip(axes[:3], times.tolist(), weights_t, strict=True):
                im = _heatmap(ax, w, layer_ids, f"{fusion.strategy}: weights at t = {t:.1f}")
                im.set_clim(0, vmax)
            fig.colorbar(im, ax=axes[2])
            colours = plt.cm.viridis(np.linspace(0, 1, fusion.num_layers))
            for layer in range(fusion.num_layers):
                axes[3].plot(ts.numpy(), curves[:, layer], color=colours[layer], lw=1)
            axes[3].axhline(uniform, color="grey", ls="--", lw=0.8)
            axes[3].set_xlabel("t (1 = noise)")
            axes[3].set_ylabel("weight (mean over blocks)")
            axes[3].set_title("weight vs t; colour = LLM layer (dark = early)", fontsize=9)
    return save_figure(fig, path, title)


def plot_gate_readings(
    fusion: LayerFusion,
    nominal: list[float],
    readings: list[float],
    path: Path,
    layer_ids: list[int] | None = None,
    title: str = "",
) -> Path:
    """What a time-gated fusion read along one sampling trajectory: left, the noise level its gates read at
    every step against the schedule's t (they differ with an estimated signal or a gate shift); right, the
    weights on each LLM layer (mean over blocks) at those readings, step by step."""
    if not fusion.depends_on_t:
        raise ValueError(
            f"strategy {fusion.strategy!r} has no time gates: its routing is the same every step"
        )
    if len(nominal) != len(readings) or not readings:
        raise ValueError(
            f"got {len(nominal)} times and {len(readings)} gate readings; need as many, at least 1"
        )
    layer_ids = layer_ids or list(range(1, fusion.num_layers + 1))
    with torch.no_grad():
        at = torch.tensor(readings, dtype=torch.float32, device=fusion._anchor.device)
        weights = fusion.layer_weights(at).mean(1).float().cpu().numpy()  # (steps, L)
    steps = np.arange(1, len(readings) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6), width_ratios=[1, 1.6])
    left.plot(steps, nominal, "o-", color="grey", ms=3, label="schedule's t")
    left.plot(steps, readings, "o-", color="C1", ms=3, label="what the gates read")
    left.set_xlabel("sampling step")
    left.set_ylabel("noise level (1 = noise)")
    left.set_ylim(-0.05, 1.05)
    left.legend(fontsize=8)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    im = right.imshow(weights.T, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
    right.set_xlabel("sampling step")
    right.set_ylabel("LLM layer")
    tick = max(1, len(layer_ids) // 8)
    right.set_yticks(
        range(0, len(layer_ids), tick), [str(layer_ids[i]) for i in range(0, len(layer_ids), tick)]
    )
    columns = range(0, len(steps), max(1, len(steps) // 10))
    right.set_xticks(columns, [str(steps[i]) for i in columns])
    right.set_title(f"{fusion.strategy}: weight on each layer at each step (mean over blocks)", fontsize=9)
    fig.colorbar(im, ax=right)
    return save_figure(fig, path, title)


def bar_chart(
    labels: list[str], stats: dict[str, list[tuple[float, float]]], path: Path, title: str = ""
) -> Path:
    """Grouped bars: one group per metric, one bar per label, (mean, std) in [0, 1] shown in percent."""
    metrics = list(stats)
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(1.6 * len(metrics) + 2, 3.6))
    for i, label in enumerate(labels):
        means = [100 * stats[m][i][0] for m in metrics]
        stds = [100 * stats[m][i][1] for m in metrics]
        ax.bar(
            np.arange(len(metrics)) + (i - (len(labels) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            label=label,
            capsize=2,
        )
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=min(3, len(labels)))
    return save_figure(fig, path, title)


def interval_panels(
    panels: dict[str, list[tuple[float, float, float, float]]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Path:
    """One panel per name: points (x, value, low, high) with their intervals as error bars, and 0 marked."""
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, (name, points) in zip(axes.flat, panels.items(), strict=False):  # spare axes stay empty
        xs, values, lows, highs = (list(column) for column in zip(*points, strict=True))
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.errorbar(
            xs,
            values,
            yerr=[
                [v - lo for v, lo in zip(values, lows, strict=True)],
                [hi - v for v, hi in zip(values, highs, strict=True)],
            ],
            marker="o",
            capsize=3,
        )
        ax.set_title(name, fontsize=9)
        ax.set_xticks(xs)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    return save_figure(fig, path, title)

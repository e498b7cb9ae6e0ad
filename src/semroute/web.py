"""`semroute serve`: a web page to try checkpoints side by side, with what each one's router reads.

The page (gradio, the optional extra `pip install 'semroute[web]'`) takes a prompt, a seed, steps, guidance
and a number of images; every loaded checkpoint samples the same prompt from the same seeds, so B1 and S2
are compared in one click. Beside each one's images: its learned block x layer weights, and for the
time-gated strategies the weights its gates read at every step of this request's trajectory (with an
estimated gate signal, the noise level its head read off x_t against the schedule's t).

What is not gradio lives here too and is tested without a browser: `check_request` (every bound the page
enforces), `ServedModel` (one checkpoint, its lock and its figures), `respond` (one request, all models).
"""

from __future__ import annotations

import atexit
import logging
import math
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .base import INT_LIMIT, check_guidance, one_line
from .flow import shift_time
from .latent import vae_downsample
from .pipeline import load_pipeline
from .plots import plot_gate_readings, plot_routing

if TYPE_CHECKING:
    from PIL import Image

    from .pipeline import SemanticRoutingPipeline

logger = logging.getLogger("semroute")

WEB_EXTRA = "pip install 'semroute[web]'"
DEFAULT_MAX_IMAGES = 8  # per checkpoint and request: one visitor cannot hold more activations than this
MAX_IMAGES_LIMIT = 64  # the most --max-images may allow
MAX_STEPS = 200  # sampling steps per request; flow-matching samplers converge far below this
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 2000  # far past any text encoder's max_length; longer text is an error, not a truncation
EXAMPLES = 6


def require_gradio() -> Any:
    """The gradio module, or a one-line error naming the extra that installs it."""
    try:
        import gradio
    except ImportError:
        raise ValueError(f"semroute serve needs gradio, which is not installed: {WEB_EXTRA}") from None
    return gradio


@dataclass(frozen=True)
class Request:
    """One visitor's request, checked: every value within the page's bounds."""

    prompt: str
    seed: int
    steps: int
    guidance: float
    images: int


def _whole(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {str(value)[:40]!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value}")
    if not low <= number <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {int(number)}")
    return int(number)


def check_request(
    prompt: Any, seed: Any, steps: Any, guidance: Any, images: Any, max_images: int = DEFAULT_MAX_IMAGES
) -> Request:
    """The request as values, or ValueError naming the field, its bounds and what was given."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: type what the images should show")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are read")
    try:
        scale = float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"guidance must be a number, got {str(guidance)[:40]!r}") from None
    check_guidance(scale, "guidance")
    if scale > MAX_GUIDANCE:
        raise ValueError(f"guidance must be at most {MAX_GUIDANCE:g}, got {scale:g}")
    return Request(
        prompt=prompt.strip(),
        seed=_whole(seed, "seed", 0, INT_LIMIT),
        steps=_whole(steps, "steps", 1, MAX_STEPS),
        guidance=scale,
        images=_whole(images, "images", 1, max_images),
    )


class ServedModel:
    """One checkpoint on the page: its pipeline, a lock (one request at a time) and its routing figures."""

    def __init__(self, pipeline: SemanticRoutingPipeline, name: str, figures: Path):
        self.pipeline = pipeline
        self.name = name
        self.lock = threading.Lock()
        self.figures = figures
        figures.mkdir(parents=True, exist_ok=True)
        model = pipeline.transformer
        self.fusion = model.fusion
        self.layer_ids = list(pipeline.encoder.layers)
        self.routing = plot_routing(
            self.fusion,
            figures / "routing.png",
            self.layer_ids,
            title=f"{name}: learned routing",
            weights=model.routing_weights(),
        )
        latent = int(model.config["sample_size"])
        self.image_size = latent * vae_downsample(pipeline.vae) if pipeline.vae is not None else latent
        self._calls = 0

    @classmethod
    def load(cls, path: Path, device: str, precision: str, figures: Path) -> ServedModel:
        return cls(load_pipeline(path, device=device, precision=precision), _label(path), figures)

    @property
    def strategy(self) -> str:
        return self.fusion.strategy

    @property
    def time_gated(self) -> bool:
        return bool(self.fusion.depends_on_t)

    def describe(self) -> str:
        settings = self.pipeline.sampling()
        gates = ""
        if self.time_gated:
            signal = self.pipeline.transformer.config.get("gate_signal", "nominal")
            gates = f", time gates read the {signal} noise level"
        return (
            f"**{self.name}**: strategy `{self.strategy}`{gates}; its own settings: {settings.steps} steps, "
            f"guidance {settings.guidance_scale:g}; {self.image_size} px"
        )

    def sample(self, request: Request, on_step: Callable[[], None] | None = None) -> Sampled:
        """The request's images (image k from seed + k, whatever the batch) and, for time-gated strategies,
        what the gates read at every step, drawn."""
        model = self.pipeline.transformer
        gate_shift = self.pipeline.sampling().gate_shift
        nominal: list[float] = []
        readings: list[float] = []

        def on_state(t: torch.Tensor, x: torch.Tensor) -> None:
            nominal.append(float(t[0]))
            if model.noise_head is not None:  # the gates read the head's estimate from x_t (mean over images)
                readings.append(float(model.noise_head(x.to(model.device, model.dtype)).float().mean()))
            else:
                readings.append(float(shift_time(t[:1].double(), gate_shift)[0]))

        with self.lock:
            images = self.pipeline.generate(
                [request.prompt] * request.images,
                request.steps,
                request.guidance,
                seed=[request.seed + k for k in range(request.images)],
                on_step=on_step,
                on_state=on_state if self.time_gated else None,
            )
            self._calls += 1
            figure = None
            if self.time_gated:
                figure = plot_gate_readings(
                    self.fusion,
                    nominal,
                    readings,
                    self.figures / f"gates-{self._calls}.png",
                    self.layer_ids,
                    title=f"{self.name}: what the gates read for this prompt",
                )
        pictures = self.pipeline.numpy_to_pil(images.permute(0, 2, 3, 1).float().cpu().numpy())
        return Sampled(pictures, nominal, readings, figure)


@dataclass
class Sampled:
    """One model's answer to a request; nominal and readings are empty for time-independent strategies."""

    images: list[Image.Image]
    nominal: list[float]
    readings: list[float]
    figure: Path | None


def _label(path: Path) -> str:
    """A short name for a checkpoint: its run directory's name (and the step directory, if one was named)."""
    path = Path(path)
    if path.name.startswith("step_") and path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.name}"
    return path.name or str(path)


def unique_names(models: Sequence[ServedModel]) -> None:
    """Two checkpoints named alike (two runs' `step_000500`) get their position appended."""
    seen: dict[str, int] = {}
    for model in models:
        seen[model.name] = seen.get(model.name, 0) + 1
    for i, model in enumerate(models):
        if seen[model.name] > 1:
            model.name = f"{model.name} ({i + 1})"


@dataclass
class Reply:
    """What one request shows: per model its images (with captions) and its gate figure, and a status."""

    galleries: list[list[tuple[Image.Image, str]]]
    gate_figures: list[Path | None]
    status: str


def respond(
    models: Sequence[ServedModel],
    request: Request,
    progress: Callable[[int, int, str], None] | None = None,
) -> Reply:
    """Sample the request with every model in turn; progress(done, total, what) after every step."""
    total = len(models) * request.steps
    done = 0
    galleries, figures = [], []
    started = time.perf_counter()
    for model in models:

        def step(model: ServedModel = model) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total, f"{model.name}: step {done % request.steps or request.steps}")

        sampled = model.sample(request, on_step=step)
        galleries.append([(im, f"seed {request.seed + k}") for k, im in enumerate(sampled.images)])
        figures.append(sampled.figure)
    seconds = time.perf_counter() - started
    status = (
        f"{request.images} image{'s' if request.images > 1 else ''} per checkpoint from seed {request.seed}, "
        f"{request.steps} steps, guidance {request.guidance:g}: {seconds:.1f} s"
    )
    return Reply(galleries, figures, status)


def example_prompts(pipeline: SemanticRoutingPipeline, checkpoint: Path, count: int = EXAMPLES) -> list[str]:
    """Prompts the checkpoint was made for: ShapesBench's for a shapes run; for a run on a real-image
    set, the held-out captions beside its manifest (or the manifest's own); else none."""
    from .checkpoint import RUN_CONFIG_FILE, resolve_checkpoint
    from .config import load_config

    try:
        config = load_config(resolve_checkpoint(checkpoint) / RUN_CONFIG_FILE)
    except (ValueError, OSError):
        return []  # an exported pipeline keeps no run config
    if not config.dataset.active:
        from .bench import bench_prompts

        prompts = bench_prompts(config.data)
        step = max(1, len(prompts) // count)
        return [p.text for p in prompts[::step]][:count]
    manifest = config.dataset.manifest
    if not manifest:
        return []
    from .data.images import read_manifest

    for candidate in (Path(manifest).parent / "heldout.jsonl", Path(manifest)):
        try:
            rows = read_manifest(candidate)
        except (ValueError, OSError):
            continue
        return [str(row["text"]) for row in rows[:count]]
    return []


def build_app(models: Sequence[ServedModel], examples: Sequence[str], max_images: int) -> Any:
    """The gradio Blocks of the page (queued: one request at a time)."""
    gr = require_gradio()
    first = models[0].pipeline.sampling()
    with gr.Blocks(title="semroute", analytics_enabled=False) as app:
        gr.Markdown(
            "# semroute\nThe same prompt and seeds through every checkpoint. Beside each: the LLM layers "
            "its DiT blocks read."
        )
        with gr.Row():
            prompt = gr.Textbox(label="prompt", elem_id="prompt", scale=4, max_lines=3)
            button = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
        with gr.Row():
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=INT_LIMIT, label="seed", elem_id="seed")
            steps = gr.Slider(1, MAX_STEPS, value=first.steps, step=1, label="steps", elem_id="steps")
            guidance = gr.Slider(
                1, MAX_GUIDANCE, value=first.guidance_scale, step=0.5, label="guidance", elem_id="guidance"
            )
            count = gr.Slider(
                1, max_images, value=min(4, max_images), step=1, label="images", elem_id="count"
            )
        if examples:
            gr.Examples(examples=[[e] for e in examples], inputs=[prompt], label="examples")
        status = gr.Markdown("", elem_id="status")
        galleries, gate_images = [], []
        with gr.Row(equal_height=False):
            for i, model in enumerate(models):
                with gr.Column(min_width=260):
                    gr.Markdown(model.describe(), elem_id=f"about-{i}")
                    galleries.append(
                        gr.Gallery(
                            label=model.name,
                            elem_id=f"images-{i}",
                            columns=4,
                            object_fit="contain",
                            height=250,
                            interactive=False,
                            elem_classes=["samples"],
                            format="png",
                        )
                    )
                    gr.Image(
                        value=str(model.routing),
                        label="learned routing",
                        elem_id=f"routing-{i}",
                        interactive=False,
                        type="filepath",
                    )
                    gate_images.append(
                        gr.Image(
                            label="what the gates read along this trajectory",
                            elem_id=f"gates-{i}",
                            interactive=False,
                            type="filepath",
                            visible=model.time_gated,
                        )
                    )

        def handler(
            prompt_text: Any,
            seed_value: Any,
            steps_value: Any,
            scale: Any,
            images: Any,
            progress: Any = gr.Progress(),  # noqa: B008 (gradio's way: the default marks the progress argument)
        ) -> list[Any]:
            try:
                request = check_request(prompt_text, seed_value, steps_value, scale, images, max_images)
            except ValueError as err:
                raise gr.Error(str(err), print_exception=False) from None
            try:
                reply = respond(models, request, lambda done, total, what: progress((done, total), desc=what))
            except Exception as err:  # the server's boundary: one request fails, the page keeps answering
                logger.error("semroute serve: a request failed:\n%s", traceback.format_exc())
                memory = isinstance(err, MemoryError) or "out of memory" in str(err).lower()
                hint = "ask for fewer images or steps" if memory else "the server's log has the traceback"
                raise gr.Error(
                    f"sampling failed: {one_line(err, 200)}; {hint}", print_exception=False
                ) from None
            return [*reply.galleries, *[str(f) if f else None for f in reply.gate_figures], reply.status]

        inputs = [prompt, seed, steps, guidance, count]
        outputs = [*galleries, *gate_images, status]
        button.click(handler, inputs, outputs, concurrency_limit=1, api_name="generate")
        prompt.submit(handler, inputs, outputs, concurrency_limit=1, api_name=False)
    app.queue(max_size=32, default_concurrency_limit=1)
    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS's choice)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def serve(
    checkpoints: Sequence[Path],
    device: str = "auto",
    precision: str = "auto",
    host: str = "127.0.0.1",
    port: int | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    block: bool = True,
) -> Any:
    """Load every checkpoint, build the page and serve it on host:port (port None or 0: a free one); returns
    the launched app (block=False: at once; app.local_url is its address, app.close() stops it)."""
    require_gradio()  # before minutes of loading: a missing extra is the first thing said
    if not checkpoints:
        raise ValueError("pass at least one --checkpoint")
    if not 1 <= max_images <= MAX_IMAGES_LIMIT:
        raise ValueError(f"--max-images must be in 1..{MAX_IMAGES_LIMIT}, got {max_images}")
    figures = Path(tempfile.mkdtemp(prefix="semroute-serve-"))
    atexit.register(shutil.rmtree, figures, ignore_errors=True)
    models = [
        ServedModel.load(Path(path), device, precision, figures / f"model-{i}")
        for i, path in enumerate(checkpoints)
    ]
    unique_names(models)
    examples: list[str] = []
    for path, model in zip(checkpoints, models, strict=True):
        examples += [e for e in example_prompts(model.pipeline, Path(path)) if e not in examples]
    app = build_app(models, examples[: 2 * EXAMPLES], max_images)
    app.served_models = models  # what the page shows, in its order (tests read it)
    app.launch(
        server_name=host,
        server_port=port or free_port(host),
        prevent_thread_lock=not block,
        show_error=True,
        quiet=not block,
        allowed_paths=[str(figures)],
        footer_links=[],
        css=PAGE_CSS,
    )
    return app


# Samples are small (tens of pixels): the page enlarges them, drawing their pixels rather than a blur.
PAGE_CSS = ".samples img { image-rendering: pixelated; }"

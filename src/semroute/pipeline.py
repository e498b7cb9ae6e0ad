"""Prompts -> images: encode once, route once (where the strategy allows), integrate the flow."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from .base import one_line
from .checkpoint import resolve_checkpoint
from .dit import SemanticRoutingDiT
from .features import NULL_PROMPT, PromptFeatures, encode_prompts
from .flow import RectifiedFlow, SampleConfig, shift_time
from .latent import check_vae_matches, decode_latents, vae_downsample
from .loading import checkpoint_parts, pipeline_problem, recorded_fingerprint
from .runtime import Precision, resolve_device, resolve_precision
from .speed import configure
from .text_encoder import TextEncoder, TextEncoderConfig, fingerprint_differences, llm_dtype

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

logger = logging.getLogger(__name__)


def check_compatible(transformer: SemanticRoutingDiT, encoder: TextEncoder) -> None:
    """The DiT must read the kind of text features it was
    trained on, from as many LLM layers, of the same width."""
    trained = transformer.config  # what the DiT was trained on
    wanted = transformer.fusion.spec.text_features
    if encoder.feature_kind != wanted:
        raise ValueError(
            f"the checkpoint ({transformer.fusion.strategy}) reads the LLM's {wanted} but the text encoder "
            f"gives {encoder.feature_kind}; set text_encoder.features to {wanted}"
        )
    if trained["num_text_layers"] != encoder.num_layers:
        raise ValueError(
            f"the checkpoint routes {trained['num_text_layers']} LLM layers but the text encoder gives "
            f"{encoder.num_layers}; use the text encoder and layers it was trained with"
        )
    if trained["text_dim"] != encoder.feature_dim:
        what = (
            "LLM hidden size" if wanted == "hidden_states" else "key/value width (2 x kv heads x head size)"
        )
        raise ValueError(
            f"the checkpoint expects {what} {trained['text_dim']} but the text encoder has "
            f"{encoder.feature_dim}; use the text encoder it was trained with"
        )
    if wanted == "keys_values" and trained["text_kv_heads"] != encoder.kv_heads:
        raise ValueError(
            f"the checkpoint groups its heads over {trained['text_kv_heads']} LLM key/value heads but the "
            f"text encoder has {encoder.kv_heads}; use the text encoder it was trained with"
        )


def check_gate_shift(transformer: SemanticRoutingDiT) -> None:
    """A gate shift changes only nominal time gates: refuse it where it would silently do nothing."""
    fusion = transformer.fusion
    if not fusion.depends_on_t:
        raise ValueError(
            f"a gate shift changes time gates; strategy {fusion.strategy!r} has none (use time or joint)"
        )
    if transformer.noise_head is not None:
        raise ValueError(
            "this DiT's gates read a noise level it estimates from x_t, not t: a gate shift would not apply"
        )


class SemanticRoutingPipeline(DiffusionPipeline):
    """A diffusers pipeline: causal LM + tokenizer -> routed DiT -> flow-matching Euler sampler -> (VAE) ->
    images.

    `SemanticRoutingPipeline.from_pretrained(DIR)(prompt, num_inference_steps=.., guidance_scale=..)`
    returns PIL images like any diffusers pipeline; `generate` returns tensors for library code.
    text_layers / max_length / template say how the LLM is read (what the DiT was trained on).
    """

    # diffusers declares this None in DiffusionPipeline and sets it per pipeline, as here.
    model_cpu_offload_seq = "text_encoder->transformer->vae"  # type: ignore[assignment]
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: SemanticRoutingDiT,
        scheduler: Any,  # any diffusers flow-matching scheduler
        text_encoder: Any,
        tokenizer: Any,
        vae: AutoencoderKL | None = None,
        text_layers: list[int] | None = None,
        max_length: int = 64,
        template: str = "chat",
        steps: int = SampleConfig.steps,
        guidance_scale: float = SampleConfig.guidance_scale,
        gate_shift: float = SampleConfig.gate_shift,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=vae,
        )
        layers = list(text_layers or [])
        # steps / guidance_scale: the sampling defaults of the run (its SampleConfig); the scheduler carries
        # the shift.
        self.register_to_config(
            text_layers=layers,
            max_length=max_length,
            template=template,
            steps=steps,
            guidance_scale=guidance_scale,
            gate_shift=gate_shift,
        )
        config = TextEncoderConfig(
            model=getattr(text_encoder, "name_or_path", ""),
            layers=layers,
            max_length=max_length,
            template=template,
            features=transformer.fusion.spec.text_features,
        )
        self.encoder = TextEncoder(config, model=text_encoder, tokenizer=tokenizer)
        check_compatible(transformer, self.encoder)
        if vae is not None:
            check_vae_matches(
                vae,
                transformer.config["in_channels"],
                transformer.config["sample_size"],
                transformer.config["sample_size"] * vae_downsample(vae),
            )
        transformer.eval()
        # The DiT's sampling precision: auto | fp32 | bf16 | fp16, resolved for its device when sampling.
        self.precision = "auto"
        # Whether the batched sampler (bench.sampling) may compile the DiT blocks: auto | on | off
        # (speed.StepCompiler).
        self.compile = "auto"
        self._resolved: dict[tuple[str, str], Precision] = {}

    @classmethod
    def from_parts(
        cls,
        transformer: SemanticRoutingDiT,
        encoder: TextEncoder,
        vae: AutoencoderKL | None = None,
        sample: SampleConfig | None = None,
        precision: str = "auto",
    ) -> SemanticRoutingPipeline:
        """Build from a loaded `TextEncoder` wrapper (its resolved layers become the pipeline's text_layers).

        sample: the run's sampling settings (scheduler, steps, guidance, shift), the pipeline's defaults.
        """
        c, sample = encoder.config, sample or SampleConfig()
        pipe = cls(
            transformer,
            sample.make_scheduler(),
            encoder.model,
            encoder.tokenizer,
            vae,
            text_layers=encoder.layers,
            max_length=c.max_length,
            template=c.template,
            steps=sample.steps,
            guidance_scale=sample.guidance_scale,
            gate_shift=sample.gate_shift,
        )
        pipe.encoder = encoder
        pipe.precision = precision
        return pipe

    def use_scheduler(self, name: str) -> None:
        """Sample with another diffusers flow-matching
        scheduler class, keeping this one's settings (shift)."""
        SampleConfig(scheduler=name)  # checks the name
        self.register_modules(scheduler=getattr(diffusers, name).from_config(self.scheduler.config))

    def use_gate_shift(self, shift: float) -> None:
        """Time gates read shift_time(t, shift) when sampling
        (the paper's manual repair); 1 restores the nominal t."""
        SampleConfig(gate_shift=shift)  # checks the value
        if shift != 1.0:
            check_gate_shift(self.transformer)
        self.register_to_config(gate_shift=float(shift))

    def sampling(
        self,
        steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        scheduler: str | None = None,
    ) -> SampleConfig:
        """The settings a `generate` call uses: the given
        ones, else the pipeline's own (its run's `sample:`)."""
        current = type(self.scheduler).__name__
        return SampleConfig(
            scheduler=scheduler or current,
            steps=self.config["steps"] if steps is None else steps,
            guidance_scale=self.config["guidance_scale"] if guidance_scale is None else guidance_scale,
            shift=self.scheduler.config["shift"] if shift is None else shift,
            gate_shift=self.config.get("gate_shift", 1.0),
        )

    def sampling_precision(self) -> Precision:
        """`precision` resolved for the transformer's device (measured once per machine, logged once), with
        the device's other speed settings (`speed.configure`)."""
        device = self.transformer.device
        key = (str(device), self.precision)
        if key not in self._resolved:
            configure(device)  # the attention kernel measured for this device
            self._resolved[key] = resolve_precision(self.precision, device)
            logger.info("sampling in %s on %s", self._resolved[key].describe(), device)
        return self._resolved[key]

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        text_encoder: str | None = None,
        device: str | torch.device = "auto",
        precision: str = "auto",
    ) -> SemanticRoutingPipeline:
        """Load a checkpoint directory written by `semroute train`; `text_encoder` overrides the model path.

        device: where the DiT, the LLM and the VAE run (auto = cuda, then mps, then cpu).
        """
        transformer, encoder_config, vae, sample = checkpoint_parts(Path(path), text_encoder)
        device = resolve_device(device)
        configure(device)
        encoder = TextEncoder(encoder_config, device=device)
        pipe = cls.from_parts(transformer, encoder, vae, sample=sample, precision=precision)  # checks shapes
        recorded = recorded_fingerprint(Path(path))
        if recorded is not None:
            differences = fingerprint_differences(recorded, encoder.fingerprint())
            if differences:
                raise ValueError(
                    f"the text encoder {encoder_config.model!r} is not the LLM the checkpoint {path} was "
                    f"trained with: {'; '.join(differences)}; pass --text-encoder with that model (the same "
                    "model, moved, is accepted)"
                )
        return pipe.to(device)

    def encode(self, prompts: list[str]) -> PromptFeatures:
        return encode_prompts(self.encoder, list(prompts) + [NULL_PROMPT])

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        seed: int | list[int] = 0,
        reuse_context: bool = True,
        features: PromptFeatures | None = None,
        on_step: Callable[[], None] | None = None,
        on_state: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Generate one image per prompt: (B, 3, H, W) in [0, 1].

        num_inference_steps / guidance_scale / shift: None takes the pipeline's own (`sampling()`); a shift
        makes a copy of the pipeline's scheduler (of the same class) with that shift.
        seed: one seed for the whole batch, or one per prompt (each image's noise then does not depend
        on what else is in the batch).
        features: precomputed `encode(prompts)` (the prompts followed by the null prompt), to encode once
        when sampling the same prompts many times. reuse_context=False recomputes the routed
        context every step even when the strategy allows reuse (for testing and timing).
        on_step: called after every denoising step (progress bars).
        on_state: called with (t, x_t) before each model evaluation (`semroute trajectory` traces with it).
        The time gates read `sampling().gate_shift`-shifted times (see `use_gate_shift`).

        Precision: `self.precision` under autocast, unless the transformer was cast as a whole to
        another dtype (`pipe.to(dtype=torch.bfloat16)`, or float64 for checks): then it runs in that dtype.
        """
        settings = self.sampling(num_inference_steps, guidance_scale, shift)
        guidance_scale = settings.guidance_scale
        model = self.transformer
        device = model.device
        features = features or self.encode(prompts)
        n = len(prompts)
        if features.hidden.shape[0] != n + 1:
            raise ValueError(
                f"features hold {features.hidden.shape[0]} prompts; expected {n} prompts + the null prompt"
            )
        ids = torch.arange(n)
        if guidance_scale != 1.0:
            ids = torch.cat([ids, torch.full((n,), n)])  # [conditional; unconditional]
        weights = next(model.parameters()).dtype
        autocast = self.sampling_precision().autocast_dtype if weights == torch.float32 else None
        text, mask = features.select(ids)
        text, mask = text.to(device, weights), mask.to(device)
        shape = (model.config["in_channels"], model.config["sample_size"], model.config["sample_size"])
        if isinstance(seed, int):
            noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
        else:
            if len(seed) != n:
                raise ValueError(f"got {len(seed)} seeds for {n} prompts")
            noise = torch.stack(
                [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seed]
            )
        noise = noise.to(device, weights)
        scheduler = (
            self.scheduler
            if shift is None
            else type(self.scheduler).from_config(self.scheduler.config, shift=shift)
        )
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            context = None
            if reuse_context and not model.fusion.depends_on_t:
                # Once for every step and both branches
                context = model.route_text(text, mask, normalized=True)

            gate_shift = settings.gate_shift

            def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                x, t = x.to(weights), t.to(weights)
                if context is not None:
                    return model(x, t, context=context)
                gate_t = shift_time(t, gate_shift) if gate_shift != 1.0 else None
                return model(x, t, text, mask, text_normalized=True, gate_t=gate_t)

            x = RectifiedFlow.sample(
                velocity, noise, scheduler, settings.steps, guidance_scale, on_step=on_step, on_state=on_state
            )
        if self.vae is not None:
            x = decode_latents(self.vae, x)
        return ((x + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | list[int] = 0,
        shift: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """diffusers-style call: a prompt or prompts -> `ImagePipelineOutput` (PIL images by default).

        output_type: "pil", "np" (B, H, W, 3 floats in [0, 1]) or "pt" (B, 3, H, W in [0, 1]).
        num_inference_steps / guidance_scale: None takes the pipeline's own (its run's sample settings).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        images = self.generate(prompts, num_inference_steps, guidance_scale, shift, seed)
        output: Any = images
        if output_type != "pt":
            output = images.permute(0, 2, 3, 1).float().cpu().numpy()
            if output_type == "pil":
                output = self.numpy_to_pil(output)
        return ImagePipelineOutput(images=output) if return_dict else (output,)


def load_pipeline(
    path: str | Path,
    text_encoder: str | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> SemanticRoutingPipeline:
    """A diffusers pipeline directory (model_index.json), a
    semroute checkpoint, or a run directory (newest checkpoint)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        device = resolve_device(device)
        configure(device)
        problem = pipeline_problem(path)
        if problem:
            raise ValueError(f"{problem}; export the checkpoint again into a new directory")
        try:
            pipe = SemanticRoutingPipeline.from_pretrained(path)
        except Exception as err:  # diffusers and transformers raise many types for a damaged directory
            raise ValueError(
                f"the pipeline in {path} cannot be loaded ({one_line(err, 200)}); "
                f"export the checkpoint again into a new directory"
            ) from None
        if device.type == "cuda":
            pipe.text_encoder.to(llm_dtype(device))
        pipe.precision = precision
        return pipe.to(device)
    return SemanticRoutingPipeline.from_checkpoint(
        resolve_checkpoint(path), text_encoder=text_encoder, device=device, precision=precision
    )

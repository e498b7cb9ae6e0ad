"""The run configuration: one typed object, loaded strictly from YAML and saved with every checkpoint."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import reprlib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .base import COMPILE_CHOICES, INT_LIMIT, MAX_SEED, check_choice, check_size, one_line
from .data.images import DatasetConfig
from .data.shapes import ShapesConfig
from .dit import DIT_PRESETS, SemanticRoutingDiT, check_dit_args
from .fileio import write_text
from .flow import SampleConfig
from .fusion import STRATEGY_TABLE, Strategy, check_strategy
from .runtime import check_precision
from .text_encoder import TextEncoderConfig, default_deep_layers

# DiT arguments that come from the text encoder, never from the config file.
DERIVED_MODEL_KEYS = ("text_dim", "num_text_layers", "text_kv_heads")
_YAML11_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
# accelerate trackers the training metrics can also go to (train.report_to).
TRACKERS = ("none", "tensorboard", "wandb")
# YAML aliases can make a small file expand into a huge document ("billion laughs"): a bound on its expanded
# nodes.
MAX_YAML_NODES = 100_000
_SHORT = reprlib.Repr()  # values as errors show them: short, whatever their size
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = 4
_SHORT.maxlevel = 2


@dataclass
class ModelConfig:
    """The DiT of a run: a named preset, overridden key by
    key (None: the preset's value, else the DiT's default)."""

    preset: str | None = None
    sample_size: int | None = None
    in_channels: int | None = None
    patch_size: int | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    mlp_conv: bool | None = None
    timestep_conditioning: str | None = None
    # One of the paper's strategies (single, uniform, static, deep, time, depth, joint) or its id (b1..s3,
    # fusedit).
    strategy: Strategy | None = None
    single_layer: int | None = None
    gate_hidden_dim: int | None = None
    # What the time gates (strategies time, joint) read: nominal (the schedule's t, the paper) or estimated
    # (a noise-level head's estimate from x_t, trained jointly; see train.noise_level_weight).
    gate_signal: str | None = None
    # Strategies concat and layer_attention: relative depths in (0, 1] of the LLM layers they read, mapped
    # onto the layers given (null: the strategy's published choice: 0.25, 0.5, 0.75 for concat, as FLUX.2;
    # every layer for layer_attention, as UniFusion).
    fusion_taps: list[float] | None = None

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in DIT_PRESETS:
            raise ValueError(f"unknown model.preset {self.preset!r}; valid: {', '.join(DIT_PRESETS)}")
        if self.strategy is not None:
            self.strategy = check_strategy(self.strategy)
        # The preset and the overrides together (heads must divide the width)
        check_dit_args(**self.settings())

    def overrides(self) -> dict:
        """The keys this config sets explicitly (what a run config file holds under `model:`)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def dit_kwargs(self) -> dict:
        """SemanticRoutingDiT arguments: the preset, overridden by explicit keys."""
        explicit = self.overrides()
        explicit.pop("preset", None)
        return {**(DIT_PRESETS[self.preset] if self.preset else {}), **explicit}

    def settings(self) -> dict:
        """Every SemanticRoutingDiT argument this config gives (defaults filled in)."""
        return {**_dit_defaults(), **self.dit_kwargs()}


def text_encoder_for(text: TextEncoderConfig, strategy: str, depth: int) -> TextEncoderConfig:
    """`text` with what the strategy reads filled in: deep fusion reads keys/values, by default of the layers
    `default_deep_layers` pairs with the blocks; every other strategy reads hidden states. A copy, never
    `text` itself."""
    wanted = STRATEGY_TABLE[check_strategy(strategy)].text_features
    if text.features not in (None, wanted):
        raise ValueError(
            f"text_encoder.features {text.features!r} does not fit model.strategy {strategy!r}, which reads "
            f"{wanted}; remove text_encoder.features (it follows the strategy)"
        )
    layers = list(text.layers)
    if wanted == "keys_values" and not layers:
        layers = default_deep_layers(depth)
    if wanted == "keys_values" and len(layers) != depth:
        raise ValueError(
            f"deep fusion pairs each of the {depth} DiT blocks with one LLM layer, but text_encoder.layers "
            f"names {len(layers)}; give {depth} layers or none (the default pairing)"
        )
    return dataclasses.replace(text, features=wanted, layers=layers)


def _dit_defaults() -> dict:
    params = inspect.signature(SemanticRoutingDiT.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


@dataclass
class TrainConfig:
    """Optimisation, budget and bookkeeping of a training run."""

    # Global batch per micro-step, split across processes (must divide by the process count).
    batch_size: int = 64
    # Micro-steps per optimizer step: the optimizer sees batch_size x gradient_accumulation_steps images.
    gradient_accumulation_steps: int = 1
    # Recompute each block's activations in the backward pass: less memory, about 30% more compute.
    gradient_checkpointing: bool = False
    lr: float = 1e-3
    # The fusion gates get their own learning rate: at the DiT's lr their logits barely move.
    fusion_lr: float = 3e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    # auto | fp32 | bf16 | fp16. auto: bf16 where it is measured faster than fp32 on this machine
    # (CUDA with bf16, CPUs with native bf16), fp16 with loss scaling on older GPUs, else fp32.
    mixed_precision: str = "auto"
    max_steps: int = 1000
    # Wall-clock budget for the optimisation loop; the run stops at whichever limit comes first.
    minutes: float | None = None
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    # Sample the display prompts with the EMA weights at every checkpoint (shapes task).
    sample_grids: bool = True
    # Checkpoints kept on disk (the newest K; the newest good one is never deleted).
    keep_checkpoints: int = 3
    # A step with a non-finite loss or gradient is skipped and counted; this many in a row stop the run.
    max_nonfinite_steps: int = 10
    # Learned fusion weights frozen after this many optimizer steps (GRAN-TED's schedule: learn the layer
    # weights early, then train the DiT against fixed ones); 0: never. Strategies with learned fusion only.
    freeze_fusion_after: int = 0
    # From a cache (dataset.cache): group rows of similar text length into batches, so that a batch pads
    # little. K > 0 sorts each run of K batches of the epoch's shuffled order by length, cuts it into
    # batches and shuffles the batches; an epoch still visits the same rows. 0: plain shuffled batches.
    length_grouping: int = 0
    # Under `accelerate launch` on several processes: shard the DiT's weights, gradients, optimizer state and
    # EMA over them (torch's fully_shard, FSDP2) instead of copying them to each (DDP). Same results, 1/N of
    # the memory per process; checkpoints are the same either way (see semroute.sharding).
    fsdp: bool = False
    # CPU threads for torch; null uses every core.
    threads: int | None = None
    # torch.compile the DiT blocks: auto (where this run's own timed steps show it pays back its compile
    # cost), on or off (YAML's on/off booleans read as on/off). See semroute.speed.
    compile: str | bool = "auto"
    # Also send the logged metrics to accelerate's trackers (rank 0 only); log.jsonl is always written.
    report_to: str = "none"
    # Weight of the noise-level head's loss, MSE(estimate, t), for model.gate_signal: estimated.
    noise_level_weight: float = 1.0

    def __post_init__(self) -> None:
        positive = {
            "batch_size": self.batch_size,
            "max_steps": self.max_steps,
            "log_every": self.log_every,
            "checkpoint_every": self.checkpoint_every,
            "lr": self.lr,
            "fusion_lr": self.fusion_lr,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "keep_checkpoints": self.keep_checkpoints,
            "max_nonfinite_steps": self.max_nonfinite_steps,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ValueError(f"train.{key} must be > 0, got {value}")
        for key in ("batch_size", "gradient_accumulation_steps", "keep_checkpoints", "length_grouping"):
            check_size(getattr(self, key), f"train.{key}", key)
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"train.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"train.warmup_steps and train.weight_decay must be >= 0 and train.grad_clip > 0, "
                f"got {self.warmup_steps}, {self.weight_decay}, {self.grad_clip}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.freeze_fusion_after < 0:
            raise ValueError(
                f"train.freeze_fusion_after must be >= 0 (0 = never), got {self.freeze_fusion_after}"
            )
        if self.length_grouping < 0:
            raise ValueError(f"train.length_grouping must be >= 0 (0 = off), got {self.length_grouping}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"train.threads must be >= 1 or null, got {self.threads}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"train.minutes must be > 0 or null, got {self.minutes}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"train.seed must be in 0..{MAX_SEED}, got {self.seed}")
        self.mixed_precision = check_precision(self.mixed_precision, "train.mixed_precision")
        if isinstance(self.compile, bool):  # YAML reads on/off as booleans
            self.compile = "on" if self.compile else "off"
        self.compile = check_choice(self.compile, COMPILE_CHOICES, "train.compile")
        if self.noise_level_weight < 0:
            raise ValueError(f"train.noise_level_weight must be >= 0, got {self.noise_level_weight}")
        check_choice(self.report_to, TRACKERS, "train.report_to")


@dataclass
class RunConfig:
    """Everything a run needs: the DiT, the text encoder, the data, training and sampling."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="cpu-small"))
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    data: ShapesConfig = field(default_factory=ShapesConfig)
    # Real image-caption data; when it names a manifest, a saved HF dataset or a cache, `data` is unused.
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        model = self.model.settings()
        self.text_encoder = text_encoder_for(self.text_encoder, model["strategy"], model["depth"])
        if self.dataset.active:
            pixel_space = self.dataset.vae is None and self.dataset.cache is None
            if pixel_space and (model["sample_size"], model["in_channels"]) != (self.dataset.resolution, 3):
                raise ValueError(
                    f"pixel-space training at dataset.resolution {self.dataset.resolution} needs "
                    f"model.sample_size {self.dataset.resolution} and model.in_channels 3 (got "
                    f"{model['sample_size']}, {model['in_channels']}); or set dataset.vae to train on latents"
                )
        elif model["sample_size"] != self.data.image_size:
            raise ValueError(
                f"model.sample_size {model['sample_size']} differs from data.image_size "
                f"{self.data.image_size}; make them equal"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "model": self.model.overrides()}

    def save(self, path: Path) -> None:
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Coerce ints to floats where a float is expected; reject anything else of the wrong type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        kinds = [a for a in options if a is not type(None)]
        if len(kinds) > 1:  # e.g. str | bool: the first kind the value passes as
            for kind in kinds:
                try:
                    return _check_type(value, kind, where)
                except ValueError:
                    pass
            names = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
            raise ValueError(f"{where} must be of type {names}, got {_SHORT.repr(value)}")
        annotation = kinds[-1]
        origin = typing.get_origin(annotation)
    if origin is typing.Literal:  # which of the values: checked where the field knows the valid ones
        annotation, origin = str, None
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {_SHORT.repr(value)}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if (
        annotation in (int, float)
        and isinstance(value, int)
        and not isinstance(value, bool)
        and abs(value) > INT_LIMIT
    ):
        raise ValueError(f"{where} is out of range: {_SHORT.repr(value)} is beyond {INT_LIMIT:,}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if annotation is float and isinstance(value, str) and _YAML11_EXPONENT.match(value):
        value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value}")
    if annotation is dict and isinstance(value, dict):
        return value
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ValueError(f"{where} must be of type {annotation.__name__}, got {_SHORT.repr(value)}")
    return value


def _shown(key: object) -> str:
    """A key as an error message shows it: plain names as
    they are, anything else quoted (one line, visible)."""
    return key if isinstance(key, str) and key.isidentifier() else repr(key)


def _build(cls: Any, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(
            f"{where or 'the config'} must be a mapping of keys to values, got {_SHORT.repr(data)}"
        )
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{_shown(key)}" if where else _shown(key)
        if cls is ModelConfig and key in DERIVED_MODEL_KEYS:
            raise ValueError(f"model.{key} is set from the text encoder; remove it from the config")
        if key not in fields:
            raise ValueError(f"unknown config key {name}; valid: {', '.join(fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, name)
        else:
            kwargs[key] = _check_type(value, hint, name)
    return cls(**kwargs)


def load_yaml(text: str, what: str) -> Any:
    """YAML (safe types only) whose aliases expand to at most
    MAX_YAML_NODES nodes; errors are one line naming `what`."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, set())
        if size > MAX_YAML_NODES:
            raise ValueError(
                f"{what} expands to more than {MAX_YAML_NODES:,} YAML nodes through its aliases (&/*); "
                f"write the values out instead"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ValueError(f"{what} is not valid UTF-8 YAML: {one_line(err)}") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply or refers to itself through an alias") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict, open_nodes: set) -> int:
    """Nodes of the document once every alias is expanded, counted with each shared node measured once."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise RecursionError  # an alias to a node that contains it
    open_nodes.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            size += _expanded_size(child, sizes, open_nodes)
            if size > MAX_YAML_NODES:
                break
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            size += _expanded_size(k, sizes, open_nodes) + _expanded_size(v, sizes, open_nodes)
            if size > MAX_YAML_NODES:
                break
    open_nodes.discard(key)
    sizes[key] = size
    return size


def load_config(source: Path | str | dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a RunConfig from a YAML file or a dict; every unknown key or wrong type is an error.

    overrides: `section.key=value` strings (`--set model.strategy=depth`), applied on top; values are
    read as YAML (`train.lr=3e-4`, `data.counts=[1,2]`) and checked like the file's.
    """
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            if path.exists():
                raise ValueError(f"config file {path} is not a regular file; point --config at a YAML file")
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = load_yaml(path.read_text(encoding="utf-8"), f"config file {path}")
        except UnicodeDecodeError as err:
            raise ValueError(f"config file {path} is not valid UTF-8 YAML: {one_line(err)}") from None
        data = data or {}
    for override in overrides:
        data = _override(data, override)
    return _build(RunConfig, data, "")


def _override(data: dict, override: str) -> dict:
    """A copy of `data` with one `dotted.key=value` applied."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set takes section.key=value (e.g. model.strategy=depth), got {override!r}")
    value = load_yaml(text, f"--set {override!r}: the value")
    if not isinstance(data, dict):
        raise ValueError(f"the config must be a mapping of keys to values, got {_SHORT.repr(data)}")
    data = dict(data)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ValueError(f"--set {override!r}: {part} is not a section of the config")
        node[part] = dict(child)
        node = node[part]
    node[parts[-1]] = value
    return data

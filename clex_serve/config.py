"""One validated model configuration, read from a Hugging Face ``config.json``.

The released CLEX configs are not strict JSON (one has a trailing comma) and omit keys the official code
defaults (``act``, ``time_dt``); transformers 5 moved ``rope_scaling``/``rope_theta`` into ``rope_parameters``.
All of that is normalised here, once, so the rest of the engine reads plain attributes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "PhiForCausalLM": "phi",
    "MixtralForCausalLM": "mixtral",
}
ROPE_TYPES = ("default", "clex", "linear", "dynamic", "yarn", "llama3")
CLEX_ACTIVATIONS = ("silu", "tanh")


def typed(value: Any, kind: type, name: str) -> Any:
    """``value`` as an int or a float, or a one-line error naming the config key it came from."""
    wanted = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"config.json: {name} must be {wanted}, got {value!r}")
    try:
        number = float(value)
        if kind is int:
            if not number.is_integer():
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"config.json: {name} must be {wanted}, got {value!r}") from None


@dataclass(frozen=True)
class RopeScaling:
    """The ``rope_scaling`` block: its type plus the type's own parameters, kept verbatim."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)

    @property
    def factor(self) -> float:
        return typed(self.params.get("factor", 1.0), float, "rope_scaling.factor")

    # CLEX parameters, with the defaults the official code applies when a released config omits them.
    @property
    def max_factor(self) -> int:
        return typed(self.params["max_factor"], int, "rope_scaling.max_factor")

    @property
    def param_factor(self) -> int:
        return typed(self.params.get("param_factor", 1), int, "rope_scaling.param_factor")

    @property
    def time_dt(self) -> float:
        return typed(self.params.get("time_dt", 0.01), float, "rope_scaling.time_dt")

    @property
    def act(self) -> str:
        return str(self.params.get("act", "silu"))


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    log_scale: bool = False
    tie_word_embeddings: bool = False
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; clex-serve runs "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"config.json: partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.family == "mixtral" and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError("config.json: Mixtral needs 0 < num_experts_per_tok <= num_local_experts")
        if self.rope_scaling is not None:
            self._validate_rope_scaling(self.rope_scaling)

    def _validate_rope_scaling(self, scaling: RopeScaling) -> None:
        if scaling.type not in ROPE_TYPES:
            raise ValueError(
                f"config.json: rope_scaling type {scaling.type!r} is not supported; use one of {', '.join(ROPE_TYPES)}"
            )
        if scaling.type == "clex":
            if "max_factor" not in scaling.params:
                raise ValueError("config.json: rope_scaling of type 'clex' needs 'max_factor'")
            if scaling.max_factor < 1 or scaling.param_factor < 1:
                raise ValueError("config.json: clex max_factor and param_factor must be >= 1")
            if scaling.act not in CLEX_ACTIVATIONS:
                raise ValueError(f"config.json: clex act must be one of {CLEX_ACTIVATIONS}, got {scaling.act!r}")
            if scaling.time_dt <= 0:
                raise ValueError("config.json: clex time_dt must be positive")
        elif scaling.type in ("linear", "dynamic", "yarn", "llama3") and scaling.factor <= 0:
            raise ValueError(f"config.json: rope_scaling factor must be positive, got {scaling.factor}")

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def rotary_dim(self) -> int:
        return int(self.partial_rotary_factor * self.head_dim)

    @property
    def is_clex(self) -> bool:
        return self.rope_scaling is not None and self.rope_scaling.type == "clex"

    @property
    def applies_log_scale(self) -> bool:
        """log_scale is a Llama-family feature: Phi-2 and Mixtral ignore it even when their config sets it."""
        return self.log_scale and self.family == "llama"

    @property
    def max_model_len(self) -> int:
        """The longest sequence the model was made for: ``L0 * max_factor`` under CLEX."""
        if self.is_clex:
            return self.max_position_embeddings * self.rope_scaling.max_factor
        return self.max_position_embeddings

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(raw).__name__}")
        architectures = raw.get("architectures") or []
        if isinstance(architectures, str):
            architectures = [architectures]
        if not architectures:
            raise ValueError("config.json names no 'architectures'; clex-serve needs one, e.g. LlamaForCausalLM")
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {architecture!r}; clex-serve runs "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[architecture]
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            if key not in raw:
                raise ValueError(f"config.json lacks the required key {key!r}")

        def integer(key: str, default: Any = None) -> int:
            return typed(raw.get(key) or default, int, key)

        def number(key: str, default: float) -> float:
            value = raw.get(key)
            return typed(default if value is None else value, float, key)

        hidden_size = integer("hidden_size")
        num_heads = integer("num_attention_heads")
        values = dict(
            architecture=architecture,
            vocab_size=integer("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=integer("intermediate_size", 4 * hidden_size),
            num_hidden_layers=integer("num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=integer("num_key_value_heads", num_heads),
            max_position_embeddings=integer("max_position_embeddings"),
        )
        rope_theta, rope_scaling = _read_rope(raw)
        sliding_window = raw.get("sliding_window")
        if architecture == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
            sliding_window = None  # Qwen2 configs carry a window they do not use unless asked
        values.update(
            head_dim=integer("head_dim", 0),
            hidden_act=str(raw.get("hidden_act", "gelu_new" if family == "phi" else "silu")),
            norm_eps=number("layer_norm_eps" if family == "phi" else "rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            partial_rotary_factor=_partial_rotary_factor(raw),
            qkv_bias=_qkv_bias(architecture, raw),
            o_bias=family == "phi" or bool(raw.get("attention_bias", False)),
            mlp_bias=family == "phi" or bool(raw.get("mlp_bias", False)),
            sliding_window=typed(sliding_window, int, "sliding_window") if sliding_window else None,
            log_scale=bool(raw.get("log_scale", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            num_local_experts=integer("num_local_experts", 0),
            num_experts_per_tok=integer("num_experts_per_tok", 0),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_lenient_json(path))


def _partial_rotary_factor(raw: dict[str, Any]) -> float:
    """Top level in transformers 4 configs, inside ``rope_parameters`` in transformers 5 ones."""
    nested = (raw.get("rope_parameters") or {}).get("partial_rotary_factor")
    return typed(raw.get("partial_rotary_factor") or nested or 1.0, float, "partial_rotary_factor")


def _qkv_bias(architecture: str, raw: dict[str, Any]) -> bool:
    if architecture in ("PhiForCausalLM", "Qwen2ForCausalLM"):
        return True
    return bool(raw.get("attention_bias", False))


def _read_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and rope_scaling, from the transformers 4 keys or the transformers 5 ``rope_parameters``."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json: rope_scaling must be an object, got {params!r}")
    params = dict(params)
    rope_theta = typed(raw.get("rope_theta") or params.pop("rope_theta", 10000.0), float, "rope_theta")
    params.pop("rope_theta", None)
    params.pop("partial_rotary_factor", None)
    rope_type = params.pop("type", None) or params.pop("rope_type", None)
    if rope_type is None and params:
        raise ValueError("config.json: rope_scaling has no 'type'")
    if rope_type in (None, "default"):
        return rope_theta, None
    return rope_theta, RopeScaling(type=str(rope_type), params=params)


_TRAILING_COMMA = re.compile(r",(\s*[}\]])")


def read_lenient_json(path: str | Path) -> dict[str, Any]:
    """Parse a config.json (a JSON object), tolerating the trailing commas some released CLEX configs carry."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        try:
            raw = json.loads(_TRAILING_COMMA.sub(r"\1", text))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must hold a JSON object, got a JSON {type(raw).__name__}")
    return raw

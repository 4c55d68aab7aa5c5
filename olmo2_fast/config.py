"""OLMo 2 configuration, read explicitly from a Hugging Face `config.json`.

Both layouts that exist in the wild load: transformers 4.x (top-level `rope_theta`,
`rope_scaling`, `torch_dtype`) and transformers 5.x (`rope_parameters`, `dtype`).
Olmo2Config's class defaults in transformers are OLMo-1 values, so nothing here is
defaulted that a published config.json always carries: a missing required field is an
error, not a silent guess.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import ConfigError

ROPE_TYPES = ("default", "linear")


@dataclass(frozen=True)
class Olmo2Config:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: float = 1.0  # linear RoPE scaling: positions are divided by it
    head_dim_override: int | None = None
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None  # dtype the checkpoint declares ("float32", "bfloat16")
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None
    # config.json's quantization_config as (key, value) pairs, for checkpoints saved quantised by olmo2_fast;
    # olmo2_fast.quantization.checkpoint_method reads it.
    quantization_config: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        positive = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim_override is not None and (isinstance(self.head_dim_override, bool) or not isinstance(
                self.head_dim_override, int) or self.head_dim_override <= 0):
            raise ConfigError(f"head_dim must be a positive integer, got {self.head_dim_override!r}")
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) does not divide "
                              f"hidden_size ({self.hidden_size})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_key_value_heads ({self.num_key_value_heads}) does not divide "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not self.rope_scaling_factor >= 1.0:
            raise ConfigError(f"linear rope scaling factor must be >= 1, got {self.rope_scaling_factor!r}")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def quantization(self) -> str | None:
        """quant_method of a checkpoint saved quantised, else None."""
        return dict(self.quantization_config).get("quant_method")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA); 1 for multi-head attention."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attention = h * (self.q_width + 2 * self.kv_width) + self.q_width * h + self.q_width + self.kv_width
        per_layer = attention + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * per_layer + h + head

    # ------------------------------------------------------------------ I/O

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "Olmo2Config":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type != "olmo2":
            raise ConfigError(f"{source}: model_type is {model_type!r}, not 'olmo2'; olmo2_fast only runs OLMo 2 "
                              "checkpoints (OLMo 1 and OLMo 3 differ in their norms and attention)")
        if raw.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not an OLMo 2 release layout and is not supported")
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ConfigError(f"{source}: hidden_act {hidden_act!r} is not supported (OLMo 2 uses 'silu')")

        def required(name):
            if name not in raw:
                raise ConfigError(f"{source}: missing required field {name!r}")
            return raw[name]

        theta, factor = _rope(raw, source)
        quantization = _quantization_config(raw.get("quantization_config"), source)
        heads = required("num_attention_heads")
        tied = raw.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise ConfigError(f"{source}: tie_word_embeddings must be true or false, got {tied!r}")
        dtype = raw.get("dtype") or raw.get("torch_dtype")
        if dtype is not None and not isinstance(dtype, str):
            raise ConfigError(f"{source}: torch_dtype must be a string such as 'bfloat16', got {dtype!r}")
        return cls(
            hidden_size=required("hidden_size"),
            intermediate_size=required("intermediate_size"),
            num_hidden_layers=required("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            vocab_size=required("vocab_size"),
            max_position_embeddings=required("max_position_embeddings"),
            rms_norm_eps=json_number(required("rms_norm_eps"), "rms_norm_eps", source),
            rope_theta=theta,
            rope_scaling_factor=factor,
            head_dim_override=raw.get("head_dim"),
            tie_word_embeddings=tied,
            torch_dtype=dtype,
            bos_token_id=optional_token_id(raw.get("bos_token_id"), "bos_token_id", source),
            eos_token_id=token_ids(raw.get("eos_token_id"), "eos_token_id", source),
            pad_token_id=optional_token_id(raw.get("pad_token_id"), "pad_token_id", source),
            quantization_config=quantization,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "Olmo2Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(raw, source=str(path))
        except TypeError as e:  # a field of the wrong JSON type, e.g. a string where a number belongs
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict:
        """The transformers 4.x `config.json` layout of the published checkpoints."""
        return {
            "architectures": ["Olmo2ForCausalLM"],
            "model_type": "olmo2",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling_factor == 1.0
            else {"rope_type": "linear", "factor": self.rope_scaling_factor},
            **({"head_dim": self.head_dim_override} if self.head_dim_override else {}),
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype or "float32",
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) > 1
            else (self.eos_token_id[0] if self.eos_token_id else None),
            "pad_token_id": self.pad_token_id,
            **({"quantization_config": dict(self.quantization_config)} if self.quantization_config else {}),
        }

    def with_(self, **changes) -> "Olmo2Config":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


def json_number(value, name: str, source: str) -> float:
    """A JSON number (not a string, not a boolean) as a float, or a ConfigError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: {name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def optional_token_id(value, name: str, source: str) -> int | None:
    """A token id field: a non-negative integer or null."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{source}: {name} must be a non-negative integer or null, got {value!r}")
    return value


def token_ids(value, name: str, source: str) -> tuple[int, ...]:
    """eos_token_id and the like: an integer, a list of integers, or null."""
    if not isinstance(value, list):
        value = optional_token_id(value, name, source)
        return () if value is None else (value,)
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise ConfigError(f"{source}: {name} entry must be a non-negative integer, got {bad[0]!r} in {value!r}")
    return tuple(value)


def _quantization_config(spec, source: str) -> tuple[tuple[str, object], ...]:
    if spec is None:
        return ()
    if not isinstance(spec, dict) or not isinstance(spec.get("quant_method"), str):
        raise ConfigError(f"{source}: quantization_config must be an object with a string quant_method, got {spec!r}")
    return tuple(spec.items())


def _rope(raw: dict, source: str) -> tuple[float, float]:
    """(rope_theta, linear scaling factor) from either config layout; refuses unknown scalings."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object, got {params!r}")
        theta = params.get("rope_theta", raw.get("rope_theta"))
        scaling = params
    else:
        theta = raw.get("rope_theta")
    if theta is None:
        raise ConfigError(f"{source}: missing rope_theta (top level or in rope_parameters)")
    theta = json_number(theta, "rope_theta", source)
    if scaling is None:
        return theta, 1.0
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope scaling type {rope_type!r} is not supported "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return theta, 1.0
    if "factor" not in scaling:
        raise ConfigError(f"{source}: linear rope scaling needs a 'factor'")
    return theta, json_number(scaling["factor"], "rope scaling factor", source)


def _preset(hidden, intermediate, layers, heads, kv_heads) -> Olmo2Config:
    return Olmo2Config(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=100352,
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=500000.0,
        torch_dtype="bfloat16", eos_token_id=(100257,), pad_token_id=100277,
    )


# The published checkpoints' shapes (OLMo-2-0425-1B, -1124-7B, -1124-13B, -0325-32B).
PRESETS: dict[str, Olmo2Config] = {
    "1b": _preset(2048, 8192, 16, 16, 16),
    "7b": _preset(4096, 11008, 32, 32, 32),
    "13b": _preset(5120, 13824, 40, 40, 40),
    "32b": _preset(5120, 27648, 64, 40, 8),
}


def preset(name: str) -> Olmo2Config:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown model size {name!r}; choose one of {', '.join(PRESETS)}") from None

"""Weight-only quantisation of the projections: one object per method, the only place its specifics live.

Loading (checkpoint.expected_shapes / iter_checkpoint), saving (`checkpoint_tensors` of both
engines), the kernel engine (model.py) and the reference engine (reference.py) ask the method
for what they need: which widths it takes, how to quantise a weight, the tensors and shapes
a quantised checkpoint holds, the config.json entry that names it, and its plain-PyTorch
matmul. Adding int8 weight-only is one new class here and a line in METHODS.

Methods quantise the projections (checkpoint.fused_projections: q/k/v, o, gate/up, down),
never the embedding, the norms or lm_head.
"""
from __future__ import annotations

import torch

from .config import Olmo2Config
from .errors import CheckpointError, ConfigError
from .kernels.int4_format import GROUP_SIZE, Int4Weight, int4_matmul_reference, int4_tensors, quantize_int4


class Int4GroupWise:
    """4-bit codes, groups of 128 input features with a scale and a zero each (kernels/int4_format.py)."""

    name = "int4"                        # quantize="int4"
    checkpoint_name = "olmo2_fast_int4"  # quantization_config.quant_method in config.json
    layout = "int32-k8-n"                # packed [K // 8, N] int32 words, 8 codes along K (int4_format)
    legacy_layout = "int32-k8-n"         # what checkpoints saved before config.json named the layout hold
    group_size = GROUP_SIZE

    def check_widths(self, config: Olmo2Config):
        widths = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                  "q width (heads x head_dim)": config.q_width}
        bad = {k: v for k, v in widths.items() if v % self.group_size}
        if bad:
            raise CheckpointError(f"int4 quantisation needs in_features divisible by {self.group_size}; this model has "
                                  + ", ".join(f"{k}={v}" for k, v in bad.items()))

    def quantize(self, weight: torch.Tensor) -> Int4Weight:
        return quantize_int4(weight, self.group_size)

    def tensor_shapes(self, n: int, k: int) -> dict[str, tuple[int, int]]:
        """Checkpoint tensors of one (N, K) weight, by suffix after the projection's name."""
        groups = (k // self.group_size, n)
        return {"qweight": (k // 8, n), "scales": groups, "zeros": groups}

    def is_code_tensor(self, name: str) -> bool:
        """Tensors stored as integer codes (kept as they are when a checkpoint loads)."""
        return name.endswith(".qweight")

    def to_tensors(self, weight: Int4Weight, prefix: str) -> dict[str, torch.Tensor]:
        return int4_tensors(weight, prefix)

    def from_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> Int4Weight:
        try:
            return Int4Weight.from_tensors(tensors, prefix)
        except ValueError as e:
            raise CheckpointError(str(e)) from None

    def columns(self, weight: Int4Weight, start: int, end: int) -> Int4Weight:
        """Output features start..end-1 of a weight (groups run along K, so columns split exactly)."""
        return Int4Weight(weight.packed[:, start:end].contiguous(), weight.scales[:, start:end].contiguous(),
                          weight.zeros[:, start:end].contiguous(), (end - start, weight.shape[1]), weight.group_size)

    def stack(self, weights: list[Int4Weight]) -> Int4Weight:
        """Weights with one K stacked along the output features (the inverse of `columns`)."""
        n = sum(w.shape[0] for w in weights)
        return Int4Weight(*(torch.cat([getattr(w, t) for w in weights], dim=1) for t in ("packed", "scales", "zeros")),
                          (n, weights[0].shape[1]), weights[0].group_size)

    def matmul_reference(self, x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
        """x @ W^T in plain PyTorch with the kernel twin's numerics (dequantise, float32 matmul, one cast)."""
        return int4_matmul_reference(x, weight)

    def config_entry(self) -> dict:
        return {"quant_method": self.checkpoint_name, "bits": 4, "group_size": self.group_size, "layout": self.layout}


INT4 = Int4GroupWise()
METHODS = {m.name: m for m in (INT4,)}


def method(quantize: str | None):
    """The method for a `quantize=` argument (None: no quantisation)."""
    if quantize is None:
        return None
    if quantize not in METHODS:
        raise CheckpointError(f"unsupported quantize={quantize!r}: choose None or one of {', '.join(map(repr, METHODS))}")
    return METHODS[quantize]


def checkpoint_method(config: Olmo2Config):
    """The method a checkpoint was saved with (config.json's quantization_config), or None."""
    if config.quantization is None:
        return None
    entry = dict(config.quantization_config)
    for m in METHODS.values():
        if m.checkpoint_name == config.quantization:
            layout = entry.get("layout", m.legacy_layout)
            if layout != m.layout or entry.get("group_size", m.group_size) != m.group_size:
                raise ConfigError(f"this checkpoint's {m.checkpoint_name} weights are packed as {layout!r} in groups "
                                  f"of {entry.get('group_size', m.group_size)}, but this olmo2_fast reads {m.layout!r} "
                                  f"in groups of {m.group_size}: quantise the original checkpoint again "
                                  f"(quantize={m.name!r})")
            return m
    raise ConfigError(f"quantization_config quant_method {config.quantization!r} is not supported; olmo2_fast loads "
                      "unquantised checkpoints (quantize='int4' at load) and its own "
                      + ", ".join(repr(m.checkpoint_name) for m in METHODS.values()) + " checkpoints")

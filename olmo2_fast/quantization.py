"""Weight-only quantisation of the projections: one object per method, the only place its specifics live.

Loading (checkpoint.expected_shapes / iter_checkpoint), saving (`checkpoint_tensors` of both
engines), the kernel engine (model.py) and the reference engine (reference.py) ask the method
for what they need: which widths it takes, how to quantise a weight, the tensors and shapes
a quantised checkpoint holds, the config.json entry that names it, and its plain-PyTorch
matmul. Adding int8 weight-only is one new class here and a line in METHODS.

Methods quantise the projections (checkpoint.fused_projections: q/k/v, o, gate/up, down) and,
when asked (quantize_lm_head), lm_head; never the embedding or the norms. A tied lm_head is the
embedding: quantising it keeps the embedding dense for the lookup and adds the int4 copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Olmo2Config
from .errors import CheckpointError, ConfigError
from .kernels.int4_format import (GROUP_SIZE, ROW_BLOCK, Int4Weight, int4_matmul_reference, int4_tensors, pack_int4,
                                  quantize_int4)


class Int4GroupWise:
    """4-bit codes, groups of 128 input features with a scale and a zero each (kernels/int4_format.py)."""

    name = "int4"                        # quantize="int4"
    checkpoint_name = "olmo2_fast_int4"  # quantization_config.quant_method in config.json
    layout = "int32-n8k32-rotl3"         # packed [N / 8, K / 32, 8, 4] int32 (int4_format's header)
    group_size = GROUP_SIZE

    def check_widths(self, config: Olmo2Config, lm_head: bool = False):
        """Refuse a model whose quantised weights the format cannot hold: in_features of every projection
        (and of lm_head) a multiple of 128; out_features of lm_head (the vocabulary) a multiple of 8 (the
        projections' are, when their in_features are)."""
        widths = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                  "q width (heads x head_dim)": config.q_width}
        bad = {k: v for k, v in widths.items() if v % self.group_size}
        if bad:
            raise CheckpointError(f"int4 quantisation needs in_features divisible by {self.group_size}; this model has "
                                  + ", ".join(f"{k}={v}" for k, v in bad.items()))
        if lm_head and config.vocab_size % ROW_BLOCK:
            raise CheckpointError(f"an int4 lm_head needs vocab_size divisible by {ROW_BLOCK}; this model has "
                                  f"vocab_size={config.vocab_size}: load it without quantize_lm_head")

    def quantize(self, weight: torch.Tensor) -> Int4Weight:
        return quantize_int4(weight, self.group_size)

    def tensor_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensors of one (N, K) weight, by suffix after the weight's name."""
        groups = (k // self.group_size, n)
        return {"qweight": (n // ROW_BLOCK, k // 32, ROW_BLOCK, 4), "scales": groups, "zeros": groups}

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
        """Output features start..end-1 of a weight (multiples of 8: whole row blocks; groups run along K)."""
        if start % ROW_BLOCK or end % ROW_BLOCK:
            raise ValueError(f"int4 columns split at multiples of {ROW_BLOCK}, got {start}..{end}")
        blocks = slice(start // ROW_BLOCK, end // ROW_BLOCK)
        return Int4Weight(weight.packed[blocks].contiguous(), weight.scales[:, start:end].contiguous(),
                          weight.zeros[:, start:end].contiguous(), (end - start, weight.shape[1]), weight.group_size)

    def stack(self, weights: list[Int4Weight]) -> Int4Weight:
        """Weights with one K stacked along the output features (the inverse of `columns`)."""
        n = sum(w.shape[0] for w in weights)
        return Int4Weight(torch.cat([w.packed for w in weights]), *(torch.cat([getattr(w, t) for w in weights], dim=1)
                                                                    for t in ("scales", "zeros")),
                          (n, weights[0].shape[1]), weights[0].group_size)

    def matmul_reference(self, x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
        """x @ W^T in plain PyTorch with the kernel twin's numerics (dequantise, float32 matmul, one cast)."""
        return int4_matmul_reference(x, weight)

    def config_entry(self, lm_head: bool = False) -> dict:
        """quantization_config for config.json; `lm_head`: the checkpoint's lm_head is quantised too
        (tensors lm_head.qweight / .scales / .zeros in place of lm_head.weight)."""
        return {"quant_method": self.checkpoint_name, "bits": 4, "group_size": self.group_size, "layout": self.layout,
                **({"lm_head": True} if lm_head else {})}


class _Int4LegacyReader(Int4GroupWise):
    """Reads int4 checkpoints saved before the current packing: layout "int32-k8-n" (or no layout entry),
    qweight [K / 8, N] int32 with 8 codes along K in natural nibble order. Loading repacks them (the
    same codes, scales and zeros: lossless); saving writes the current layout."""

    reads_layout = "int32-k8-n"

    def tensor_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        return dict(super().tensor_shapes(n, k), qweight=(k // 8, n))

    def from_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> Int4Weight:
        words = tensors.get(prefix + "qweight")
        if words is None:
            return super().from_tensors(tensors, prefix)  # names what is missing
        if words.dtype != torch.int32 or words.dim() != 2:
            raise CheckpointError(f"{prefix}qweight must be a 2-D int32 tensor in layout {self.reads_layout!r}, got "
                                  f"{words.dtype} {tuple(words.shape)}")
        shifts = 4 * torch.arange(8, device=words.device, dtype=torch.int32).view(1, -1, 1)
        codes = ((words.unsqueeze(1) >> shifts) & 0xF).reshape(-1, words.shape[1]).T  # [N, K]
        return super().from_tensors(dict(tensors, **{prefix + "qweight": pack_int4(codes)}), prefix)


INT4 = Int4GroupWise()
METHODS = {m.name: m for m in (INT4,)}
_READERS = {(INT4.checkpoint_name, INT4.layout): INT4,
            (INT4.checkpoint_name, _Int4LegacyReader.reads_layout): _Int4LegacyReader()}
_FIRST_LAYOUT = {INT4.checkpoint_name: _Int4LegacyReader.reads_layout}  # before config.json named the layout


def method(quantize: str | None):
    """The method for a `quantize=` argument (None: no quantisation)."""
    if quantize is None:
        return None
    if quantize not in METHODS:
        raise CheckpointError(f"unsupported quantize={quantize!r}: choose None or one of {', '.join(map(repr, METHODS))}")
    return METHODS[quantize]


def checkpoint_method(config: Olmo2Config):
    """The method a checkpoint was saved with (config.json's quantization_config), or None. A checkpoint in
    an earlier layout of the method gets a reader that repacks it at load."""
    if config.quantization is None:
        return None
    entry = dict(config.quantization_config)
    for m in METHODS.values():
        if m.checkpoint_name == config.quantization:
            layout = entry.get("layout", _FIRST_LAYOUT[m.checkpoint_name])
            reader = _READERS.get((m.checkpoint_name, layout))
            if reader is None or entry.get("group_size", m.group_size) != m.group_size:
                raise ConfigError(f"this checkpoint's {m.checkpoint_name} weights are packed as {layout!r} in groups "
                                  f"of {entry.get('group_size', m.group_size)}, but this olmo2_fast reads {m.layout!r} "
                                  f"in groups of {m.group_size}: quantise the original checkpoint again "
                                  f"(quantize={m.name!r})")
            return reader
    raise ConfigError(f"quantization_config quant_method {config.quantization!r} is not supported; olmo2_fast loads "
                      "unquantised checkpoints (quantize='int4' at load) and its own "
                      + ", ".join(repr(m.checkpoint_name) for m in METHODS.values()) + " checkpoints")


def checkpoint_quantizes_lm_head(config: Olmo2Config) -> bool:
    """Whether a quantised checkpoint's lm_head is quantised too (quantization_config's "lm_head")."""
    return bool(dict(config.quantization_config).get("lm_head", False))


@dataclass(frozen=True)
class QuantizedLoad:
    """How a checkpoint's weights arrive, for both engines: `quantize` quantises dense projections at
    load (None: they stay dense, or come packed in `saved`'s tensors); `lm_head`: lm_head is quantised
    too (at load by `quantize`, or saved packed under lm_head.*)."""

    quantize: Int4GroupWise | None
    saved: Int4GroupWise | None
    lm_head: bool

    @property
    def method(self):
        """The method of the loaded model's quantised weights, or None."""
        return self.quantize or self.saved


def plan_load(config: Olmo2Config, quantize: str | None, quantize_lm_head: bool = False) -> QuantizedLoad:
    """Check the from_pretrained arguments against the checkpoint: quantize_lm_head needs quantize=; a
    checkpoint saved quantised takes neither (its config.json says what it holds, lm_head included)."""
    if not isinstance(quantize_lm_head, bool):
        raise ConfigError(f"quantize_lm_head must be True or False, got {quantize_lm_head!r}")
    chosen, saved = method(quantize), checkpoint_method(config)
    if saved is not None and (chosen is not None or quantize_lm_head):
        raise CheckpointError(f"this checkpoint is already quantised ({config.quantization}"
                              f"{', lm_head included' if checkpoint_quantizes_lm_head(config) else ''}): load it "
                              "without quantize= and quantize_lm_head=")
    if quantize_lm_head and chosen is None:
        raise CheckpointError("quantize_lm_head=True quantises lm_head with the projections' method: give "
                              f"quantize= too (one of {', '.join(map(repr, METHODS))})")
    if chosen is not None:
        chosen.check_widths(config, lm_head=quantize_lm_head)
    return QuantizedLoad(chosen, saved, quantize_lm_head or (saved is not None and checkpoint_quantizes_lm_head(config)))

"""The model shapes and the grids the benchmarks sweep, real or smoke.

Real runs use a published OLMo 2 shape (`--size 1b|7b|13b|32b`, config.PRESETS). Smoke runs
(no CUDA, or `--smoke`) use SMOKE_CONFIG: tiny, but with GQA, a head_dim the attention
kernels support and widths that are multiples of the int4 group size, so every path runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from olmo2_fast.config import Olmo2Config, preset

SMOKE_CONFIG = Olmo2Config(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=500000.0, torch_dtype="float32",
)


# The kernels `bench kernels` covers (kernel_cases.BUILDERS), in the order of a decoder layer.
KERNELS = ("qk_norm_rope", "attention_prefill", "attention_decode", "residual_rmsnorm", "swiglu", "int4_matmul",
           "decode_gemv", "decode_gemv_int4", "fused_attention_decode")


def model_config(size: str, smoke: bool) -> Olmo2Config:
    return SMOKE_CONFIG if smoke else preset(size)


@dataclass(frozen=True)
class Grid:
    """batches: decode batch sizes (one token per sequence); seqs: prompt lengths (prefill);
    contexts: cached positions a decode step attends to."""
    batches: tuple[int, ...]
    seqs: tuple[int, ...]
    contexts: tuple[int, ...]


KERNEL_GRID = Grid(batches=(1, 4, 16), seqs=(2048,), contexts=(4096,))
KERNEL_SMOKE_GRID = Grid(batches=(2,), seqs=(24,), contexts=(32,))  # 24 > 16: the int4 prefill path
GENERATE_GRID = Grid(batches=(1, 4, 16), seqs=(128, 2048), contexts=())
GENERATE_SMOKE_GRID = Grid(batches=(1, 2), seqs=(8, 16), contexts=())


def resolve_grid(default: Grid, batches=None, seqs=None, contexts=None) -> Grid:
    """The default grid with any list the user gave in its place."""
    return Grid(tuple(batches or default.batches), tuple(seqs or default.seqs), tuple(contexts or default.contexts))

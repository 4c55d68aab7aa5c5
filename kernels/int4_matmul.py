# int4 weight-only matmul: out [M, N] = x [M, K] @ dequantize(W).T, float32 accumulation.
#
# Format (kernels/int4_format.py): W [N, K] as int32 words [N // 8, K // 32, 8, 4] (8-row
# blocks, 32-code units, each word's codes rotated by 3 bits), scales and zeros [K // 128, N]
# in x's dtype, w = (q - 8) * s + z.
#
# Two paths, one per shape of work:
#   * M <= 16 rows (decode, speculative verification, short chunks): the decode GEMV
#     (kernels/decode_gemv.py with no prologue), the one int4 GEMV of the project: CUDA cores
#     at M = 1 (the scales factored out of each group's sums), a dequantised tl.dot on 16-row
#     tiles above; its split-K reduces in the kernel. int4_matmul allocates it a workspace per
#     call (decode_gemv_call_workspace: a memset only where K is split; the fused decode step
#     owns one for all its launches instead).
#   * M > 16 (prefill): a tiled GEMM (grouped program order for L2 reuse); each BLOCK_K step
#     (inside one group) loads the word tile for its BLOCK_N rows, dequantises it in registers
#     to exactly dequantize_int4's dtype weights (kernels/int4_tiles.py int4_dot_weights) and
#     feeds tl.dot (mma / wgmma). Full K per program: no split, no atomics, deterministic.
#
# Configs: launches with M <= FIXED_CONFIG_MAX_M (every decode step: one row per sequence,
# CUDA-graph buckets up to 64 rows) use a config fixed by the path alone, never the
# autotuner: a decode step is captured in a CUDA graph, and autotuning there would
# benchmark and synchronise inside the capture. Only the eager prefill GEMM (M > 64)
# autotunes, keyed on (bucketed M, N, K) and dtypes, so a new prompt length rarely retunes.
# Under TRITON_INTERPRET=1 it has a single config (autotune needs a GPU driver).
#
# Limits: x, scales and zeros share one dtype (float32/float16/bfloat16); group size 128;
# N a multiple of 8 (the format's row blocks; every OLMo 2 width is).
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from olmo2_fast.kernels._launch import launch_device
from olmo2_fast.kernels.decode_gemv import DECODE_MAX_ROWS, WeightFormat, decode_gemv, decode_gemv_call_workspace
from olmo2_fast.kernels.int4_format import INT4_MAGIC, Int4Weight, int4_matmul_reference, int4_weight_bytes  # noqa: F401 (the twin)
from olmo2_fast.kernels.int4_format import validate_int4_weight
from olmo2_fast.kernels.int4_tiles import int4_dot_tile, int4_dot_weights
from olmo2_fast.kernels.roofline import Cost, itemsize

DECODE_MAX_M = DECODE_MAX_ROWS  # rows int4_matmul hands to the decode GEMV
FIXED_CONFIG_MAX_M = 64  # >= the largest CUDA-graph decode bucket (olmo2_fast/graphs.py BUCKETS)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _config(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# The GEMM's configs; tests/test_kernel_int4_matmul.py compiles each for sm_80 and sm_90 (no
# spills, shared memory within limits). BLOCK_K divides the group (128) and holds whole 32-code
# units. For 16 < M <= 64 the first one, whose BLOCK_M = 64 holds every row in one row block (each
# weight read once); above, the autotuner's space. Under the interpreter the autotuner gets the
# config at INTERPRETER_CONFIG.
PREFILL_CONFIGS = [
    _config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
    _config(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
    _config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
]
INTERPRETER_CONFIG = 0


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qw_ptr, scale_ptr, zero_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_om,
    magic_16, magic_256,  # INT4_MAGIC, as arguments (kernels/int4_tiles.py says why)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # M_BUCKET is only the autotuner's key.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks share a column block while it is hot in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    weight_rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # rows past N are computed, never stored
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        words, scales, zeros = int4_dot_tile(qw_ptr, scale_ptr, zero_ptr, weight_rows, k0, K, N, K, BLOCK_K)
        w = int4_dot_weights(words, scales, zeros, magic_16, magic_256)  # [BLOCK_N, BLOCK_K]
        # k0 is a multiple of BLOCK_K: the hint makes the x loads 16 bytes wide.
        xk = tl.load(x_rows + (tl.multiple_of(k0, BLOCK_K) + offs_k)[None, :], mask=mask_m[:, None], other=0.0)
        acc = tl.dot(xk, tl.trans(w), acc, input_precision=DOT_PRECISION)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_prefill_autotuned = triton.autotune(
    configs=PREFILL_CONFIGS[INTERPRETER_CONFIG:INTERPRETER_CONFIG + 1] if _INTERPRETED else PREFILL_CONFIGS,
    key=["M_BUCKET", "N", "K"])(_int4_matmul_kernel)
_SMALL_GEMM_CONFIG = PREFILL_CONFIGS[0]


def _launch_options(config: triton.Config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def m_bucket(m: int) -> int:
    """The autotune bucket of M: next power of two, 32 .. 256 for the GEMM (M > 16)."""
    return min(triton.next_power_of_2(m), 256)


@torch.library.triton_op("olmo2_fast::int4_matmul", mutates_args=())
def _int4_matmul_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = scales.shape[1]
    if m <= DECODE_MAX_M:
        qw = Int4Weight(packed, scales, zeros, (n, k))
        # Under x's device like every launch of this module (decode_gemv guards its own as well).
        with launch_device(x.device):
            return decode_gemv(x, qw, decode_gemv_call_workspace(m, n, k, WeightFormat.INT4, x.dtype, x.device))
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    if m > FIXED_CONFIG_MAX_M:
        kernel, options = _prefill_autotuned, {}
    else:
        kernel, options = _int4_matmul_kernel, _launch_options(_SMALL_GEMM_CONFIG)
    with launch_device(x.device):
        torch.library.wrap_triton(kernel)[grid](
            x, packed, scales, zeros, out, m, n, k, m_bucket(m), x.stride(0), out.stride(0), *INT4_MAGIC,
            # float32 x: exact float32 products, as torch's default matmul (no TF32); the setting
            # does not apply to 16-bit operands.
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **options)
    return out


def int4_matmul(x: torch.Tensor, qw: Int4Weight) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W.T, float32 accumulation, in x.dtype; W: the int4 weight, multiplied as
    dequantize_int4's dtype weights (M > 16) or, by the decode GEMV, within half a dtype ulp of them.

    x: [M, K] float32/float16/bfloat16, stride(-1) == 1, any row stride.
    qw: Int4Weight of shape (N, K) (int4_format.validate_int4_weight), scales/zeros in x.dtype, on x's device.
    Raises TypeError for type and dtype mismatches and ValueError for shape, layout or device ones.
    """
    validate_int4_weight(qw)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if qw.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but the int4 scales/zeros are {qw.scales.dtype}/{qw.zeros.dtype}")
    k = qw.shape[1]
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}] for a weight of shape {qw.shape}, got {tuple(x.shape)}")
    if qw.device != x.device:
        raise ValueError(f"x is on {x.device} but the int4 weight is on {qw.device}")
    if x.stride(-1) != 1:
        raise ValueError(f"x must have stride(-1) == 1, got strides {x.stride()}")
    if x.shape[0] == 0:
        return torch.empty((0, qw.shape[0]), device=x.device, dtype=x.dtype)
    return _int4_matmul_op(x, qw.packed, qw.scales, qw.zeros)


def int4_matmul_cost(m: int, n: int, k: int, act_dtype: torch.dtype) -> Cost:
    """Bytes: packed weights N*K/2, scales+zeros 2*(N*K/128)*itemsize, x M*K and out M*N."""
    return Cost(bytes=int4_weight_bytes(n, k, act_dtype) + (m * k + m * n) * itemsize(act_dtype), flops=2 * m * n * k)

# int4 weight-only matmul: out [M, N] = x [M, K] @ dequantize(W).T, float32 accumulation.
#
# Format (kernels/int4_format.py): W [N, K] as int32 words [K // 8, N] (8 codes along K
# per word, K-major), scales and zeros [K // 128, N] in x's dtype, w = (q - 8) * s + z.
#
# Algorithm: a program owns BLOCK_N output columns (and BLOCK_M rows) and walks down K in
# BLOCK_K steps (BLOCK_K divides the group size 128, so a step sits in one group and needs
# one row of scales and zeros). Each step loads a [BLOCK_K // 8, BLOCK_N] word tile with
# 16-byte loads along N, expands it in registers to [BLOCK_K // 8, 8, BLOCK_N] codes by
# shifting each word by 0, 4, ..., 28 bits (the load is 3-D, [BLOCK_K // 8, 1, BLOCK_N],
# so the compiler keeps the 8 codes of a word in the thread that loaded it: no shuffles),
# and dequantises to x's dtype exactly as dequantize_int4 does (the same bits for
# bf16/fp16; q - 8 comes from a float bit trick, not an int-to-float conversion).
# Three shapes of program, one kernel:
#   * decode, M == 1 (BLOCK_M = 1): multiply-add on CUDA cores; the 8 codes of a word sit
#     in one thread, so the sum over them is in-thread and the cross-thread sum over K
#     happens once, at the end;
#   * decode, 2 <= M <= 16 (BLOCK_M = 16): tl.dot on the dequantised tile, the rows past M
#     masked; the tensor cores have room to spare, CUDA-core FMAs would not;
#   * prefill, M > 16: a tiled GEMM (grouped program order for L2 reuse), tl.dot, full K.
# Decode reads every weight byte once: one program covers all M rows of a column block.
# When the column blocks alone cannot fill the GPU, decode splits K (SPLIT_K programs
# per column block, whole groups each) and writes float32 partials [SPLIT_K, M, N]; a
# tiny kernel sums them in a fixed order. No atomics, so results are deterministic.
#
# Configs: launches with M <= FIXED_CONFIG_MAX_M (every decode step: one row per sequence,
# CUDA-graph buckets up to 64 rows) use a config fixed by the path alone, never the
# autotuner: a decode step is captured in a CUDA graph, and autotuning there would
# benchmark and synchronise inside the capture. Only the eager prefill GEMM (M > 64)
# autotunes, keyed on (bucketed M, N, K) and dtypes, so a new prompt length rarely retunes.
# Under TRITON_INTERPRET=1 it has a single config (autotune needs a GPU driver).
#
# Limits: x, scales and zeros share one dtype (float32/float16/bfloat16); group size 128;
# any N and M, but N % 16 == 0 (true of every OLMo 2 width) is what lets Triton prove
# the word rows 16-byte aligned.
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from olmo2_fast.kernels._launch import launch_device
from olmo2_fast.kernels.int4_format import GROUP_SIZE, Int4Weight, int4_matmul_reference  # noqa: F401 (the twin)
from olmo2_fast.kernels.roofline import Cost, itemsize

DECODE_MAX_M = 16
FIXED_CONFIG_MAX_M = 64  # >= the largest CUDA-graph decode bucket (olmo2_fast/graphs.py BUCKETS)
_DOT_BLOCK_M = 16  # tl.dot needs M >= 16; rows past M are masked
_SPLIT_MAX = 16
_NOMINAL_BLOCK_N = 64  # column-block width the split heuristic assumes
_DEFAULT_SMS = 132  # H100 SXM, for devices without CUDA properties (the interpreter)
_REDUCE_BLOCK = 1024
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _config(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Every config a launch may use; tests/test_kernel_int4_matmul.py compiles each for sm_80
# and sm_90 (no spills, shared memory within limits).
# Decode (M <= 16): one config, fixed. BLOCK_N is the column-block width split_k plans
# with, so the split heuristic's program count is the launch's; BLOCK_K = 128 is one
# group per step (one row of scales and zeros). It is also what the interpreter runs.
DECODE_CONFIGS = [_config(4, 3, BLOCK_N=_NOMINAL_BLOCK_N, BLOCK_K=128)]
# GEMM (M > 16): the autotuner's space for M > FIXED_CONFIG_MAX_M; for 16 < M <= 64 the
# first one, whose BLOCK_M = 64 holds every row in one row block (each weight read once).
# Under the interpreter the autotuner gets the config at INTERPRETER_CONFIG.
PREFILL_CONFIGS = [
    _config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
    _config(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
    _config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
]
INTERPRETER_CONFIG = 0


@triton.jit
def _dequant_step(qw_ptr, scale_ptr, zero_ptr, k0, offs_n, mask_n, stride_wk, stride_sk,
                  BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """Rows k0 .. k0+BLOCK_K of W^T, dequantised: [BLOCK_K // 8, 8, BLOCK_N] in the scale dtype."""
    offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    # Loaded as [BLOCK_K // 8, 1, BLOCK_N] so that the layout chosen for this load
    # (4 words per thread along N) keeps all 8 codes of a word in the thread that loaded it.
    words = tl.load(qw_ptr + offs_w[:, None, None] * stride_wk + offs_n[None, None, :], mask=mask_n[None, None, :], other=0)
    g = k0 // GROUP
    scale = tl.load(scale_ptr + g * stride_sk + offs_n, mask=mask_n, other=0)
    zero = tl.load(zero_ptr + g * stride_sk + offs_n, mask=mask_n, other=0)
    shifts = tl.arange(0, 8) * 4
    # Arithmetic shift keeps the sign of word bit 31; the mask drops it. OR-ing the code
    # into the mantissa of 2^23 makes the float 2^23 + q, so q - 8 costs one subtraction
    # instead of an int-to-float conversion (quarter rate on sm_80/sm_90).
    codes = (words >> shifts[None, :, None]) & 0xF
    q = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8
    w = q * scale.to(tl.float32)[None, None, :] + zero.to(tl.float32)[None, None, :]
    return w.to(scale.dtype)


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qw_ptr, scale_ptr, zero_ptr, out_ptr, part_ptr,
    M, N, K, K_SPLIT, M_BUCKET,
    stride_xm, stride_wk, stride_sk, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GROUP: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # M_BUCKET is only the prefill autotuner's key.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
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
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm

    if BLOCK_M == 1:
        # One activation row: the 8 codes of a word are in-thread, so sum them there
        # and keep a [BLOCK_K // 8, BLOCK_N] accumulator; one cross-thread sum at the end.
        acc2 = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
        offs_k2 = tl.arange(0, BLOCK_K // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
        for k0 in range(k_start, k_end, BLOCK_K):
            w = _dequant_step(qw_ptr, scale_ptr, zero_ptr, k0, offs_n, mask_n, stride_wk, stride_sk, BLOCK_K, GROUP)
            # k0 is a multiple of BLOCK_K (slices start on groups): the hint makes x loads 16 bytes wide.
            xk = tl.load(x_rows + tl.multiple_of(k0, BLOCK_K) + offs_k2)  # [BLOCK_K // 8, 8]
            acc2 += tl.sum(xk.to(tl.float32)[:, :, None] * w.to(tl.float32), axis=1)
        acc = tl.sum(acc2, axis=0)[None, :]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            w = _dequant_step(qw_ptr, scale_ptr, zero_ptr, k0, offs_n, mask_n, stride_wk, stride_sk, BLOCK_K, GROUP)
            w = tl.reshape(w, (BLOCK_K, BLOCK_N))
            xk = tl.load(x_rows[:, None] + (tl.multiple_of(k0, BLOCK_K) + offs_k)[None, :], mask=mask_m[:, None], other=0)
            acc = tl.dot(xk, w, acc, input_precision=DOT_PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        # partials [SPLIT_K, M, N] float32, reduced by _splitk_reduce_kernel
        part = part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(part, acc, mask=mask)
    else:
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, out_ptr, numel, SPLIT_K, BLOCK: tl.constexpr):
    """out[i] = sum over s (in order) of part[s, i]; out is [M, N] contiguous."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_prefill_autotuned = triton.autotune(
    configs=PREFILL_CONFIGS[INTERPRETER_CONFIG:INTERPRETER_CONFIG + 1] if _INTERPRETED else PREFILL_CONFIGS,
    key=["M_BUCKET", "N", "K"])(_int4_matmul_kernel)
_SMALL_GEMM_CONFIG = PREFILL_CONFIGS[0]


def _launch_options(config: triton.Config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def m_bucket(m: int) -> int:
    """The autotune bucket of M: next power of two, 1 .. 16 for decode, 32 .. 256 for prefill."""
    return min(triton.next_power_of_2(m), 256)


def split_k(m: int, n: int, k: int, num_sms: int) -> int:
    """How many K slices a decode launch uses (1: no split, no partials).

    Doubles the split while the programs (column blocks x slices) do not yet fill two
    waves of the GPU, each slice keeps at least one group, and the float32 partials
    (written and read back: 8 * SPLIT_K * M * N bytes, mostly in L2) stay within the
    packed weight bytes (N * K / 2).
    """
    groups = k // GROUP_SIZE
    blocks = triton.cdiv(n, _NOMINAL_BLOCK_N)
    s = 1
    while (blocks * s < 2 * num_sms and 2 * s <= min(groups, _SPLIT_MAX)
           and 8 * (2 * s) * m * n <= n * k // 2):
        s *= 2
    # Slices hold whole groups; drop slices that would be empty.
    per_slice = triton.cdiv(groups, s)
    return triton.cdiv(groups, per_slice)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _DEFAULT_SMS


@torch.library.triton_op("olmo2_fast::int4_matmul", mutates_args=())
def _int4_matmul_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = packed.shape[1]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    # float32 x: exact float32 products, as torch's default matmul (no TF32); the setting
    # does not apply to 16-bit operands.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    args = (x, packed, scales, zeros)
    sizes = (m, n, k)
    strides = (x.stride(0), packed.stride(0), scales.stride(0), out.stride(0))
    if m > DECODE_MAX_M:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)  # noqa: E731
        if m > FIXED_CONFIG_MAX_M:
            kernel, options = _prefill_autotuned, {}
        else:
            kernel, options = _int4_matmul_kernel, _launch_options(_SMALL_GEMM_CONFIG)
        with launch_device(x.device):
            torch.library.wrap_triton(kernel)[grid](  # no split: part_ptr is unused
                *args, out, out, *sizes, k, m_bucket(m), *strides,
                GROUP=GROUP_SIZE, SPLIT=False, DOT_PRECISION=precision, **options)
        return out
    splits = split_k(m, n, k, _num_sms(x.device))
    k_split = triton.cdiv(k // GROUP_SIZE, splits) * GROUP_SIZE
    part = torch.empty((splits, m, n), device=x.device, dtype=torch.float32) if splits > 1 else out
    config = DECODE_CONFIGS[0]
    with launch_device(x.device):
        torch.library.wrap_triton(_int4_matmul_kernel)[(triton.cdiv(n, config.kwargs["BLOCK_N"]), splits)](
            *args, out, part, *sizes, k_split, m_bucket(m), *strides,
            BLOCK_M=1 if m == 1 else _DOT_BLOCK_M, GROUP_M=1, GROUP=GROUP_SIZE, SPLIT=splits > 1,
            DOT_PRECISION=precision, **_launch_options(config))
        if splits > 1:
            torch.library.wrap_triton(_splitk_reduce_kernel)[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
                part, out, m * n, splits, BLOCK=_REDUCE_BLOCK)
    return out


def int4_matmul(x: torch.Tensor, qw: Int4Weight) -> torch.Tensor:
    """out [M, N] = x [M, K] @ dequantize_int4(qw).T, float32 accumulation, in x.dtype.

    x: [M, K] float32/float16/bfloat16, stride(-1) == 1, any row stride.
    qw: Int4Weight of shape (N, K), group size 128, scales/zeros in x.dtype, packed
        [K // 8, N] int32 and scales/zeros [K // 128, N] contiguous, on x's device.
    Raises TypeError for dtype mismatches and ValueError for shape, layout or device ones.
    """
    if not isinstance(qw, Int4Weight):
        raise TypeError(f"qw must be an Int4Weight, got {type(qw).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if qw.scales.dtype != x.dtype or qw.zeros.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but the int4 scales/zeros are {qw.scales.dtype}/{qw.zeros.dtype}")
    if qw.packed.dtype != torch.int32:
        raise TypeError(f"packed int4 words must be int32, got {qw.packed.dtype}")
    n, k = qw.shape
    if qw.group_size != GROUP_SIZE:
        raise ValueError(f"int4_matmul supports group size {GROUP_SIZE}, got {qw.group_size}")
    if k % GROUP_SIZE:
        raise ValueError(f"K={k} is not a multiple of the group size {GROUP_SIZE}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}] for a weight of shape {qw.shape}, got {tuple(x.shape)}")
    groups = k // GROUP_SIZE
    for name, t, shape in (("packed", qw.packed, (k // 8, n)), ("scales", qw.scales, (groups, n)), ("zeros", qw.zeros, (groups, n))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} for a weight of shape {qw.shape}, got {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}")
    if x.stride(-1) != 1:
        raise ValueError(f"x must have stride(-1) == 1, got strides {x.stride()}")
    return _int4_matmul_op(x, qw.packed, qw.scales, qw.zeros)


def int4_matmul_cost(m: int, n: int, k: int, act_dtype: torch.dtype) -> Cost:
    """Bytes: packed weights N*K/2, scales+zeros 2*(N*K/128)*itemsize, x M*K and out M*N."""
    size = itemsize(act_dtype)
    weight_bytes = n * k // 2 + 2 * (n * k // GROUP_SIZE) * size
    return Cost(bytes=weight_bytes + (m * k + m * n) * size, flops=2 * m * n * k)

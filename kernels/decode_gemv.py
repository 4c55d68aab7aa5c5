# Decode GEMV: out [M, N] = x [M, K] @ W [N, K]^T for 1 <= M <= 16 rows, with the input row
# x computed on the fly by a fused prologue and an optional greedy-argmax epilogue.
#
# Algorithm. A program owns BLOCK_N output columns (all M rows, so every weight is read once
# per call) and one K slice of them; it walks the slice in BLOCK_K steps. Two shapes of
# program, one kernel:
#   * M == 1 (BLOCK_M = 1): multiply-adds on CUDA cores into a [BLOCK_N, BLOCK_K] float32
#     accumulator (in-thread), summed across K once at the end;
#   * 2 <= M <= 16 (BLOCK_M = 16, rows past M masked): out^T = W x^T by tl.dot (wgmma on sm_90,
#     mma.sync on sm_80), so the multiply costs the same at M = 16 as at M = 2.
# The weight tile of the next step is loaded before the current one is multiplied (on CUDA
# cores, registers double-buffer one tile; on the dot path Triton's pipeliner turns the loads
# into cp.async stages), and the first tile is loaded before waiting on the previous kernel
# (PDL: weights are never written by a predecessor; see kernels/pdl.py).
#
# Weight formats (WEIGHT_FORMAT constexpr, `WeightFormat`): DENSE W [N, K], or INT4 (an
# Int4Weight, kernels/int4_format.py; the device code is kernels/int4_tiles.py). int4, M == 1: a
# thread owns one 32-code unit (a 16-byte load) of each of the program's 8 or 16 rows and the
# input row's 32 matching values (64 contiguous bytes, loaded once per program: lanes and warps
# go along K); it reads the codes as float32 base + q (3 shifts and 8 LOP3s per 8 codes), sums
# x (base + q) with one FFMA per weight and applies the unit's scale and zero once per row:
# the unrounded weights (q - 8) s + z, within half a dtype ulp of dequantize_int4's. One tile in
# registers, the first peeled before the PDL wait (see the loop). int4, M >= 2: the tile is
# dequantised in registers to exactly dequantize_int4's dtype weights, then the dot as dense.
#
# Prologues (PROLOGUE constexpr, `Prologue` below), each with HF's rounding steps:
#   NONE           x given                                               (o_proj)
#   EMBEDDING      x = embed[ids]                                        (layer 0's qkv)
#   RESIDUAL_NORM  x = (residual + (w * (delta * rstd(delta))).to(dt)).to(dt)   (qkv, gate_up)
#   SWIGLU         x = (silu(gate).to(dt) * up).to(dt) from gate_up [M, 2K]     (down_proj)
#   FINAL_NORM     h = RESIDUAL_NORM(residual, delta, w_ff); x = (w_final * (h * rstd(h))).to(dt)
# with rstd(v) = rsqrt(mean(v^2) + eps) in float32 over the whole row: every program
# recomputes it from L2 (a pass over K before its loop; two nested passes for FINAL_NORM), so
# no launch is spent on the norm. EMBEDDING and RESIDUAL_NORM also store x, the next residual,
# to `residual_out`: only the programs of column block 0 do, each for its own K slice, so each
# element is written exactly once. Other programs read residual / delta while block 0 writes,
# so residual_out must not overlap any input (the launcher checks it).
#
# Split-K, in-kernel and deterministic. When the column blocks alone cannot fill the GPU,
# SPLIT_K programs share a column block, each over a K slice (whole BLOCK_K steps). Each writes
# its float32 partial [BLOCK_M, BLOCK_N] to the workspace, then (barrier, then one atomic
# add with acq_rel semantics at gpu scope) bumps the column block's counter. The program that
# sees count == SPLIT_K - 1 arrived last: every other slice's partial is visible to it (their
# stores precede their release; its acquire precedes its loads), so it sums the SPLIT_K
# partials in slice order 0, 1, ... (a fixed order: bit-identical results whatever the arrival
# order), writes `out` and stores 0 into the counter for the next call. No reduce launch, no
# float atomics, no memset per call.
#
# Greedy argmax epilogue (ARGMAX, lm_head). Whoever writes a column block's logits (the only
# program, or the last of its split) keys each logit as an int64:
#   ordered_bits(logit rounded to the dtype) << 32 | (2^31 - 1 - column),
# which orders like the float and breaks ties toward the lowest column (-0.0 is keyed as +0.0,
# NaN above +inf: torch.argmax's rules), takes the row max over columns < n_valid and
# atomic-maxes it into the workspace (integer max: exact and order-free). A second counter
# names the last column block, which decodes the winning column per row into next_ids (int64)
# and resets the keys and its counter. Logits are written too (sampling reads them).
#
# Concurrency (the interpreter runs programs one after another, so the tests can only check the
# results, the reset counters and determinism; the ordering is argued here): every program
# increments each counter it touches exactly once, after a CTA barrier that orders all its
# threads' partial stores / key atomics before the increment (release, cumulative through the
# barrier), and the last program's loads come after its acquire. Partials are loaded with .cg
# (L2, never a stale L1 line). Counter resets are plain stores by the last program: nothing else
# touches the counter before this kernel ends, and the next kernel touches it only after its
# griddepcontrol.wait (or stream order). Consequently one workspace serves every launch of a
# stream in turn, but never two launches that may run at the same time (two streams).
#
# Layouts: W [N, K] (Hugging Face, row stride free, K contiguous) in float32/float16/bfloat16,
# or an Int4Weight (group 128, contiguous tensors; its dtype is its scales'); activation rows
# with contiguous last dims and free row strides; out [M, N] contiguous in W's dtype. Limits:
# M <= 16 (DECODE_MAX_ROWS); ids and n_valid inside their ranges (not checked: that needs a host
# sync). No host sync anywhere: capturable in a CUDA graph.
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from ..reference import rms_norm as rms_norm_reference
from ._launch import launch_device
from .attention import FLOAT_DTYPES, _sm_count
from .pdl import pdl_enabled, release_dependents, wait_for_producer
from .roofline import Cost, itemsize
from .swiglu import swiglu_reference
from .int4_format import INT4_MAGIC, Int4Weight, dequantize_int4, int4_weight_bytes, validate_int4_weight
from .int4_tiles import int4_dot_tile, int4_dot_weights, int4_gemv_multiply_add, int4_gemv_tile

DECODE_MAX_ROWS = 16
Weight = torch.Tensor | Int4Weight  # what the launchers multiply by


class Prologue(enum.IntEnum):
    """How the kernel builds its input row x (the PROLOGUE constexpr)."""
    NONE = 0
    EMBEDDING = 1
    RESIDUAL_NORM = 2
    SWIGLU = 3
    FINAL_NORM = 4


class WeightFormat(enum.IntEnum):
    """How W is stored (the WEIGHT_FORMAT constexpr)."""
    DENSE = 0  # float32/float16/bfloat16 [N, K], K contiguous
    INT4 = 1   # int4 group-128 (kernels/int4_format.py Int4Weight): packed codes, scales and zeros


# Triton reads only tl.constexpr globals inside @triton.jit code: mirrors of the enums.
_NONE, _EMBEDDING, _RESIDUAL_NORM, _SWIGLU, _FINAL_NORM = (tl.constexpr(p.value) for p in Prologue)
_DENSE, _INT4 = (tl.constexpr(f.value) for f in WeightFormat)
LOWEST_KEY = -(2 ** 63)  # below every argmax key: "no candidate yet" (the workspace's best between calls)
_LOWEST_KEY = tl.constexpr(LOWEST_KEY)


# --------------------------------------------------------------------------- weights


@triton.jit
def _k_offsets(k0, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WEIGHT_FORMAT: tl.constexpr):
    """The step's input columns, in the shape its multiply takes x: [1, BLOCK_K], or for the int4
    GEMV [U, 1, 1, 4, 8] (k = k0 + 32u + 8i + c: a thread's 32 columns, one unit of codes)."""
    if WEIGHT_FORMAT == _INT4 and BLOCK_M == 1:
        u = tl.arange(0, BLOCK_K // 32)[:, None, None, None, None]
        offs = k0 + u * 32 + tl.arange(0, 4)[None, None, None, :, None] * 8 + tl.arange(0, 8)[None, None, None, None, :]
    else:
        offs = k0 + tl.arange(0, BLOCK_K)[None, :]
    return offs


@triton.jit
def _weight_rows(w_ptr, pid_n, N, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 WEIGHT_FORMAT: tl.constexpr):
    """What _weight_tile addresses the program's rows by: dense, their pointers (64-bit: N * stride
    can pass 2^31); int4, their indices clamped to the weight (the rows past N are computed, never
    stored): row blocks [1, BLOCK_N / 8, 1, 1] for the GEMV, rows [BLOCK_N] for the dot."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if WEIGHT_FORMAT == _DENSE:
        rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    elif BLOCK_M == 1:
        blocks = tl.minimum(pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8), N // 8 - 1)
        rows = blocks.to(tl.int64)[None, :, None, None]
    else:
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    return rows


@triton.jit
def _weight_tile(w_ptr, w_rows, scales_ptr, zeros_ptr, k0, k_end, mask_n, N, K, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, WEIGHT_FORMAT: tl.constexpr):
    """The weights of inputs k0 .. k0 + BLOCK_K for the block's rows; the loop may prefetch one step
    past the slice's end. Dense: W[n, k0:k0+BLOCK_K], zeros outside the slice. int4: (words, scales,
    zeros) of kernels/int4_tiles.py, clamped to the slice (x is zero outside it)."""
    if WEIGHT_FORMAT == _DENSE:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k < k_end)[None, :]
        tile = tl.load(w_rows + offs_k[None, :], mask=mask, other=0.0)
    elif BLOCK_M == 1:
        tile = int4_gemv_tile(w_ptr, scales_ptr, zeros_ptr, w_rows, k0, k_end, N, K, BLOCK_K)
    else:
        tile = int4_dot_tile(w_ptr, scales_ptr, zeros_ptr, w_rows, k0, k_end, N, K, BLOCK_K)
    return tile


@triton.jit
def _new_accumulator(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     WEIGHT_FORMAT: tl.constexpr):
    if BLOCK_M > 1:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    elif WEIGHT_FORMAT == _DENSE:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_K // 32, BLOCK_N // 8, 8, 1], dtype=tl.float32)
    return acc


@triton.jit
def _multiply_add(acc, tile, x, magic_16, magic_256, BLOCK_M: tl.constexpr, WEIGHT_FORMAT: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """acc += the weight tile times x^T (x: the step's input, shaped by _k_offsets).
    BLOCK_M == 1: dense, acc is [BLOCK_N, BLOCK_K], summed over K after the loop; int4, acc is
    [U, RB, 8, 1] (per unit and row; int4_gemv_multiply_add). Else acc is out^T
    [BLOCK_N, BLOCK_M] = W x^T: the weights (int4: dequantised to the dtype in registers) are the
    dot's A operand (64 rows: one wgmma per warpgroup on sm_90) and x its B operand, which wgmma
    reads from shared memory, so the prologue computes each x element once per program (out = x W^T
    would recompute the whole x tile in every warp: 4x the prologue's instructions, 33 per weight
    for SwiGLU)."""
    if BLOCK_M == 1 and WEIGHT_FORMAT == _INT4:
        words, scales, zeros = tile
        acc = int4_gemv_multiply_add(acc, words, scales, zeros, x, magic_16, magic_256,
                                     CENTRED=x.dtype == tl.float32)
    else:
        if WEIGHT_FORMAT == _DENSE:
            w = tile
        else:
            words, scales, zeros = tile
            w = int4_dot_weights(words, scales, zeros, magic_16, magic_256)
        if BLOCK_M == 1:
            acc += w.to(tl.float32) * x.to(tl.float32)
        else:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _row_results(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WEIGHT_FORMAT: tl.constexpr):
    """The program's [BLOCK_M, BLOCK_N] float32 results from its accumulator."""
    if BLOCK_M > 1:
        result = tl.trans(acc)
    elif WEIGHT_FORMAT == _DENSE:
        result = tl.sum(acc, axis=1)[None, :]
    else:
        result = tl.reshape(tl.sum(acc, axis=0), [1, BLOCK_N])
    return result


# --------------------------------------------------------------------------- prologues


@triton.jit
def _rms_norm_step(v, w_ptr, offs_k, mask_k, rstd):
    """(w * (v * rstd)).to(dtype) for one step, HF's Olmo2RMSNorm (offs_k: the step's columns, any
    shape; v: rows x those columns; rstd: [BLOCK_M])."""
    w = tl.load(w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    return (w * (v.to(tl.float32) * rstd[:, None])).to(v.dtype)


@triton.jit
def _residual_norm_step(residual_rows, delta_rows, norm_w_ptr, offs_k, mask, mask_k, rstd_delta):
    """(residual + norm(delta) * w).to(dtype): OLMo 2's post-norm residual, one step."""
    delta = tl.load(delta_rows + offs_k, mask=mask, other=0.0)
    residual = tl.load(residual_rows + offs_k, mask=mask, other=0.0)
    y = _rms_norm_step(delta, norm_w_ptr, offs_k, mask_k, rstd_delta)
    return (residual.to(tl.float32) + y.to(tl.float32)).to(residual.dtype)


@triton.jit
def _rstd(sum_squares, K, eps):
    return tl.math.rsqrt(sum_squares / K + eps)


@triton.jit
def _row_rstds(residual_rows, delta_rows, norm_w_ptr, mask_m, K, eps,
               PROLOGUE: tl.constexpr, BLOCK_M: tl.constexpr, STATS_BLOCK_K: tl.constexpr):
    """rstd of delta's rows and, for FINAL_NORM, of h = residual + norm(delta) * w: [BLOCK_M] each,
    from whole-row passes over K (the rows are in L2: the previous kernel just wrote them).
    Squares are summed element-wise and reduced across threads once per pass, not per step."""
    offs = tl.arange(0, STATS_BLOCK_K)
    squares = tl.zeros([BLOCK_M, STATS_BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, STATS_BLOCK_K):
        mask = mask_m[:, None] & (k0 + offs < K)[None, :]
        d = tl.load(delta_rows + (k0 + offs)[None, :], mask=mask, other=0.0).to(tl.float32)
        squares += d * d
    rstd_delta = _rstd(tl.sum(squares, axis=1), K, eps)
    rstd_h = rstd_delta
    if PROLOGUE == _FINAL_NORM:
        squares = tl.zeros([BLOCK_M, STATS_BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, STATS_BLOCK_K):
            offs_k = (k0 + offs)[None, :]
            mask_k = offs_k < K
            h = _residual_norm_step(residual_rows, delta_rows, norm_w_ptr, offs_k, mask_m[:, None] & mask_k, mask_k,
                                    rstd_delta).to(tl.float32)
            squares += h * h
        rstd_h = _rstd(tl.sum(squares, axis=1), K, eps)
    return rstd_delta, rstd_h


@triton.jit
def _silu_times_up(gate, up):
    """torch's F.silu(gate) * up in the dtype: silu in float32 rounded, then the product rounded."""
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _input_step(x_rows, residual_rows, delta_rows, norm_w_ptr, final_w_ptr, offs_k, k_end, K, mask_m,
                rstd_delta, rstd_h, PROLOGUE: tl.constexpr):
    """The step's input rows x at columns offs_k (_k_offsets; the model dtype, zero past k_end), built
    by the prologue. x_rows: row pointers [BLOCK_M, 1] of x (NONE), of embed[ids] (EMBEDDING) or of
    gate_up (SWIGLU)."""
    mask_k = offs_k < k_end
    mask = mask_m[:, None] & mask_k
    if PROLOGUE == _NONE or PROLOGUE == _EMBEDDING:
        x = tl.load(x_rows + offs_k, mask=mask, other=0.0)
    elif PROLOGUE == _SWIGLU:
        gate = tl.load(x_rows + offs_k, mask=mask, other=0.0)
        up = tl.load(x_rows + K + offs_k, mask=mask, other=0.0)
        x = _silu_times_up(gate, up)
    else:
        x = _residual_norm_step(residual_rows, delta_rows, norm_w_ptr, offs_k, mask, mask_k, rstd_delta)
        if PROLOGUE == _FINAL_NORM:
            x = _rms_norm_step(x, final_w_ptr, offs_k, mask_k, rstd_h)
    return x


# --------------------------------------------------------------------------- epilogue


@triton.jit
def _argmax_keys(logits, offs_n, n_valid):
    """int64 keys whose max is torch.argmax's pick: ordered float bits above, 2^31-1-column below."""
    v = tl.where(logits == 0.0, 0.0, logits)  # -0.0 ties with +0.0
    v = tl.where(v != v, float("nan"), v)      # every NaN is the positive quiet NaN: above +inf
    bits = v.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: reverse their order
    keys = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - offs_n).to(tl.int64)[None, :]
    return tl.where((offs_n < n_valid)[None, :], keys, _LOWEST_KEY)


@triton.jit
def _store_output(acc, out_ptr, next_ids_ptr, counters_ptr, best_ptr, offs_m, offs_n, mask_m, mask_n,
                  stride_om, n_valid, ARGMAX: tl.constexpr):
    """Write the column block's [BLOCK_M, BLOCK_N] result; with ARGMAX, fold it into the row maxima
    and let the last column block write next_ids."""
    logits = acc.to(out_ptr.dtype.element_ty)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, logits, mask=mask_m[:, None] & mask_n[None, :])
    if ARGMAX:
        best = tl.max(_argmax_keys(logits.to(tl.float32), offs_n, n_valid), axis=1)
        tl.atomic_max(best_ptr + offs_m, best, mask=mask_m, sem="relaxed", scope="gpu")
        tl.debug_barrier()  # every thread's atomic_max before the release below
        counter = counters_ptr + tl.num_programs(0)  # past the split-K counters
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(0) - 1:
            best = tl.load(best_ptr + offs_m, mask=mask_m, other=0, cache_modifier=".cg")
            tl.store(next_ids_ptr + offs_m, 0x7FFFFFFF - (best & 0x7FFFFFFF), mask=mask_m)
            tl.store(best_ptr + offs_m, tl.full([acc.shape[0]], _LOWEST_KEY, tl.int64), mask=mask_m)
            tl.store(counter, 0)


# --------------------------------------------------------------------------- kernel


@triton.jit
def _step_input(k0, k_end, K, pid_n, mask_m, x_rows, residual_rows, delta_rows, norm_w_ptr, final_w_ptr,
                residual_out_rows, rstd_delta, rstd_h, PROLOGUE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr, WEIGHT_FORMAT: tl.constexpr):
    """One BLOCK_K step's input x from the prologue, stored as the next residual by column block 0
    where the prologue makes one."""
    offs_k = _k_offsets(k0, BLOCK_M, BLOCK_K, WEIGHT_FORMAT)
    x = _input_step(x_rows, residual_rows, delta_rows, norm_w_ptr, final_w_ptr, offs_k, k_end, K, mask_m,
                    rstd_delta, rstd_h, PROLOGUE)
    if PROLOGUE == _EMBEDDING or PROLOGUE == _RESIDUAL_NORM:
        keep = mask_m[:, None] & (offs_k < k_end) & (pid_n == 0)
        tl.store(residual_out_rows + offs_k, x, mask=keep)
    return x


@triton.jit
def _decode_gemv_kernel(
    # pointers
    out_ptr, w_ptr, scales_ptr, zeros_ptr, x_ptr, ids_ptr, residual_ptr, delta_ptr, norm_w_ptr, final_w_ptr,
    residual_out_ptr, next_ids_ptr, counters_ptr, partials_ptr, best_ptr,
    # sizes
    M, N, K, K_SPLIT, N_VALID,
    # strides (rows; every last dim is contiguous; int4 tensors are contiguous)
    stride_om, stride_wn, stride_xm, stride_rm, stride_dm, stride_ro,
    # scalars: eps; the int4 views' float32 magic numbers (INT4_MAGIC, see kernels/int4_tiles.py)
    eps, magic_16, magic_256,
    # meta-parameters
    PROLOGUE: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, ARGMAX: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STATS_BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    w_rows = _weight_rows(w_ptr, pid_n, N, stride_wn, BLOCK_M, BLOCK_N, WEIGHT_FORMAT)
    tile = _weight_tile(w_ptr, w_rows, scales_ptr, zeros_ptr, k_start, k_end, mask_n, N, K, BLOCK_M, BLOCK_K,
                        WEIGHT_FORMAT)

    # Everything below may read what the previous kernel wrote, and writes what it may still read.
    wait_for_producer(USE_PDL)
    # Our dependents may start their own weight prefetch now; they wait for our completion
    # before touching activations or the workspace.
    release_dependents(USE_PDL)

    rows = offs_m.to(tl.int64)
    if PROLOGUE == _EMBEDDING:
        rows = tl.load(ids_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    x_rows = x_ptr + rows[:, None] * stride_xm
    residual_rows = residual_ptr + rows[:, None] * stride_rm
    delta_rows = delta_ptr + rows[:, None] * stride_dm
    rstd_delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd_h = rstd_delta
    if PROLOGUE == _RESIDUAL_NORM or PROLOGUE == _FINAL_NORM:
        rstd_delta, rstd_h = _row_rstds(residual_rows, delta_rows, norm_w_ptr, mask_m, K, eps,
                                        PROLOGUE, BLOCK_M, STATS_BLOCK_K)
    residual_out_rows = residual_out_ptr + offs_m.to(tl.int64)[:, None] * stride_ro

    acc = _new_accumulator(BLOCK_M, BLOCK_N, BLOCK_K, WEIGHT_FORMAT)
    if WEIGHT_FORMAT == _INT4 and BLOCK_M == 1:
        # One tile in registers (16 rows of two spill): the first step, peeled, multiplies the tile
        # loaded before the wait; each later step loads its own before its prologue runs (other
        # programs' loads hide the rest of the latency; most int4 GEMVs are one step long, K <=
        # BLOCK_K). A tile carried from one step into the next would be hoisted by ptxas into the
        # previous multiply (both live: spills).
        x = _step_input(k_start, k_end, K, pid_n, mask_m, x_rows, residual_rows, delta_rows, norm_w_ptr,
                        final_w_ptr, residual_out_rows, rstd_delta, rstd_h, PROLOGUE, BLOCK_M, BLOCK_K, WEIGHT_FORMAT)
        acc = _multiply_add(acc, tile, x, magic_16, magic_256, BLOCK_M, WEIGHT_FORMAT, DOT_PRECISION)
        for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
            tile = _weight_tile(w_ptr, w_rows, scales_ptr, zeros_ptr, k0, k_end, mask_n, N, K, BLOCK_M, BLOCK_K,
                                WEIGHT_FORMAT)
            x = _step_input(k0, k_end, K, pid_n, mask_m, x_rows, residual_rows, delta_rows, norm_w_ptr,
                            final_w_ptr, residual_out_rows, rstd_delta, rstd_h, PROLOGUE, BLOCK_M, BLOCK_K,
                            WEIGHT_FORMAT)
            acc = _multiply_add(acc, tile, x, magic_16, magic_256, BLOCK_M, WEIGHT_FORMAT, DOT_PRECISION)
    else:
        for k0 in range(k_start, k_end, BLOCK_K):
            x = _step_input(k0, k_end, K, pid_n, mask_m, x_rows, residual_rows, delta_rows, norm_w_ptr,
                            final_w_ptr, residual_out_rows, rstd_delta, rstd_h, PROLOGUE, BLOCK_M, BLOCK_K,
                            WEIGHT_FORMAT)
            next_tile = _weight_tile(w_ptr, w_rows, scales_ptr, zeros_ptr, k0 + BLOCK_K, k_end, mask_n, N, K,
                                     BLOCK_M, BLOCK_K, WEIGHT_FORMAT)
            acc = _multiply_add(acc, tile, x, magic_16, magic_256, BLOCK_M, WEIGHT_FORMAT, DOT_PRECISION)
            tile = next_tile
    result = _row_results(acc, BLOCK_M, BLOCK_N, WEIGHT_FORMAT)

    if SPLIT:
        # partials [SPLIT_K, M, N] float32 in the workspace; the last slice to arrive reduces.
        mask = mask_m[:, None] & mask_n[None, :]
        part_rows = partials_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(part_rows + pid_k.to(tl.int64) * M * N, result, mask=mask)
        tl.debug_barrier()  # every thread's partial store before the release below
        arrived = tl.atomic_add(counters_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(1) - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, tl.num_programs(1)):
                total += tl.load(part_rows + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(counters_ptr + pid_n, 0)
            _store_output(total, out_ptr, next_ids_ptr, counters_ptr, best_ptr, offs_m, offs_n, mask_m, mask_n,
                          stride_om, N_VALID, ARGMAX)
    else:
        _store_output(result, out_ptr, next_ids_ptr, counters_ptr, best_ptr, offs_m, offs_n, mask_m, mask_n,
                      stride_om, N_VALID, ARGMAX)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class GemvPlan:
    """One launch's shape of program and grid, from (M, N, K, dtype, SMs) only: no autotuning
    (the decode step is captured in a CUDA graph), the same plan on every call and replay."""
    block_m: int
    block_n: int
    block_k: int
    stats_block_k: int  # width of one step of the norm prologues' whole-row passes
    num_warps: int
    num_stages: int
    maxnreg: int | None  # ptxas register bound (None: ptxas's own choice)
    splits: int         # programs per column block, each over k_split columns of K
    k_split: int        # a multiple of block_k
    col_blocks: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.col_blocks, self.splits

    @property
    def programs(self) -> int:
        return self.col_blocks * self.splits


# The config table. Evidence (sm_90 / sm_80 compiles, tests/test_kernel_decode_gemv.py prints it):
#   M == 1: a [8, 1024] tile over 4 warps puts the warps side by side along K, so the input
#     row's [1, 1024] slice has the tile's own layout (8 contiguous values per thread, no
#     shared-memory shuffle per step: a [16, 256] tile with warps along N paid 4 barriers and an
#     stmatrix/ldmatrix round trip per step). 16-byte loads; 128-168 registers, no spills; the
#     bf16 multiply loop is 4.0-6.0 SASS instructions per weight (FFMA + bf16 unpacking, plus
#     the prologue's math), against a budget of ~19 at an H100's HBM rate. [16, 1024] spills.
#   2 <= M <= 16: out^T [64, 16] = W [64, 128] x^T tiles, wgmma m64n16k16 on sm_90 (mma.sync
#     on sm_80), 4 stages of cp.async (the pipeliner streams the weight tile and the prologue's
#     rows into shared memory: 64 KB of weights in flight per program). sm_90 loop, SASS
#     instructions per weight (for all 16 rows): 2.8 plain, 6.3 residual-norm, 6.4 SwiGLU, 8.0
#     final norm; the x W^T orientation on [16, 32] mma.sync tiles recomputed the prologue in
#     each of the 4 warps (SwiGLU 33 per weight, over the ~19 an H100 issues per weight at HBM
#     rate). sm_80 keeps that replication (mma.sync takes both operands from registers): ~17.5
#     for SwiGLU, inside an A100's ~19.
# float32 keeps the 16-byte vectors (half the elements per step); its dot path (exact FMA dots)
# takes 32-wide steps, which holds it at 112-144 registers. Dot configs pass maxnreg=255: with no
# register bound ptxas aims at 128 registers and spills 8-16 bytes of loop-invariant pointers in
# some variants (reloaded every step); bounded at 255 it allocates what the loop needs, no spills.
_GEMV_CONFIG = dict(block_n=8, block_k={2: 1024, 4: 512}, stats_block_k=2048, num_warps=4, num_stages=1, maxnreg=None)
_DOT_CONFIG = dict(block_n=64, block_k={2: 128, 4: 32}, stats_block_k=256, num_warps=4, num_stages=4, maxnreg=255)
# int4 (kernels/int4_tiles.py), M == 1: a thread owns one 32-code unit of every row of the program
# (one 16-byte load per row, 64 contiguous bytes of x, one group: the scale applies once per load);
# lanes and warps go along K, so the input row is loaded once per program and a step is 1024
# columns per warp. 16 rows (two row blocks) halve the per-weight cost of the thread's x work
# (conversion, group sums: 2 instructions per x element over its rows), used where the 16-row
# column blocks alone fill the GPU; else 8. Warps: the most of 4, 2, 1 whose steps cover K with at
# most a fifth of the threads idle (K = 5120 in steps of 4096 would idle 3/8), else 1. 2 <= M <= 16:
# _DOT_CONFIG (its 128- and 32-wide steps lie inside one group), the tile dequantised in registers.
_INT4_GEMV_CONFIG = dict(block_n=(8, 16), unit_columns=1024, stats_block_k=2048, num_stages=1, maxnreg=None)


def _int4_gemv_warps(k: int) -> int:
    for warps in (4, 2, 1):
        step = _INT4_GEMV_CONFIG["unit_columns"] * warps
        if k >= 0.8 * triton.cdiv(k, step) * step:
            return warps
    return 1


def gemv_plan(m: int, n: int, k: int, dtype: torch.dtype, num_sms: int, num_splits: int | None = None,
              weight_format: WeightFormat = WeightFormat.DENSE) -> GemvPlan:
    """The launch's tiles and split-K.

    Split-K only when the column blocks leave SMs idle: about the smallest split that gives every SM
    a program (beyond that, bandwidth comes from the bytes each program keeps in flight, not from
    more programs), never more slices than K steps. The float32 partials (8 * splits * M * N bytes,
    written and read back, mostly in L2) stay a small fraction of the weight bytes: at most half at
    M = 16 with a slice per 128-wide step, and the plan asks for far fewer (<= 6 slices at the
    published widths). num_splits overrides the count.
    """
    if m > 1:
        config = _DOT_CONFIG
        block_n, block_k, num_warps = config["block_n"], config["block_k"][itemsize(dtype)], config["num_warps"]
    elif weight_format == WeightFormat.DENSE:
        config = _GEMV_CONFIG
        block_n, block_k, num_warps = config["block_n"], config["block_k"][itemsize(dtype)], config["num_warps"]
    else:
        config = _INT4_GEMV_CONFIG
        narrow, wide = config["block_n"]
        block_n = wide if triton.cdiv(n, wide) >= num_sms else narrow
        num_warps = _int4_gemv_warps(k)
        block_k = config["unit_columns"] * num_warps
    col_blocks = triton.cdiv(n, block_n)
    k_steps = triton.cdiv(k, block_k)
    if num_splits is None:
        wanted = min(triton.cdiv(num_sms, col_blocks), k_steps)
        steps_per_split = k_steps // wanted  # rounds the slice count up, never below `wanted`
    else:
        steps_per_split = triton.cdiv(k_steps, num_splits)
    return GemvPlan(
        block_m=1 if m == 1 else DECODE_MAX_ROWS, block_n=block_n, block_k=block_k,
        stats_block_k=config["stats_block_k"], num_warps=num_warps, num_stages=config["num_stages"],
        maxnreg=config["maxnreg"],
        splits=triton.cdiv(k_steps, steps_per_split),  # no empty slices
        k_split=steps_per_split * block_k, col_blocks=col_blocks,
    )


# --------------------------------------------------------------------------- workspace


class DecodeGemvWorkspace(NamedTuple):
    """Caller-owned scratch, made once by decode_gemv_workspace and shared by every launch on one
    stream (each launch leaves it as it found it). Never share one between two streams."""
    counters: torch.Tensor  # [C] int32: split-K arrivals per column block, then the argmax arrivals; zero between calls
    partials: torch.Tensor  # [P] float32: split-K partials [splits, M, N]; no value kept between calls
    best: torch.Tensor      # [DECODE_MAX_ROWS] int64: argmax keys; LOWEST_KEY between calls


def decode_gemv_workspace(shapes, dtype: torch.dtype, device, *, max_rows: int = DECODE_MAX_ROWS) -> DecodeGemvWorkspace:
    """A workspace for launches of every (N, K) in `shapes` at up to `max_rows` rows of `dtype`, dense or
    int4 weights, planned for `device`'s SM count. Allocates (and zeroes the counters) once: no memset
    per call."""
    device = torch.device(device)
    if not 1 <= max_rows <= DECODE_MAX_ROWS:
        raise ValueError(f"max_rows must be in 1..{DECODE_MAX_ROWS}, got {max_rows}")
    counters, partials = 1, 1
    for n, k in shapes:
        for m in range(1, max_rows + 1):
            for weight_format in WeightFormat:
                plan = gemv_plan(m, n, k, dtype, _sm_count(device), weight_format=weight_format)
                counters = max(counters, plan.col_blocks + 1)  # + the argmax counter
                if plan.splits > 1:
                    partials = max(partials, plan.splits * m * n)
    return DecodeGemvWorkspace(
        counters=torch.zeros(counters, dtype=torch.int32, device=device),
        partials=torch.empty(partials, dtype=torch.float32, device=device),
        best=torch.full((DECODE_MAX_ROWS,), LOWEST_KEY, dtype=torch.int64, device=device),
    )


def decode_gemv_call_workspace(m: int, n: int, k: int, weight_format: WeightFormat, dtype: torch.dtype,
                               device) -> DecodeGemvWorkspace:
    """A workspace for one launch of (M, N, K) without the argmax epilogue, for a caller that keeps none
    (int4_matmul): allocated per call, and only the counters of a launch that splits K are zeroed (one
    memset); an unsplit launch without argmax never touches its workspace, so it costs no launch."""
    device = torch.device(device)
    plan = gemv_plan(m, n, k, dtype, _sm_count(device), weight_format=weight_format)
    allocate = torch.zeros if plan.splits > 1 else torch.empty
    return DecodeGemvWorkspace(counters=allocate(plan.col_blocks + 1, dtype=torch.int32, device=device),
                               partials=torch.empty(plan.splits * m * n if plan.splits > 1 else 1,
                                                    dtype=torch.float32, device=device),
                               best=torch.empty(m, dtype=torch.int64, device=device))


# --------------------------------------------------------------------------- launch


def _launch(prologue: Prologue, out, weight, counters, partials, best, num_splits: int, *, x=None, ids=None,
            residual=None, delta=None, norm_weight=None, final_norm_weight=None, residual_out=None,
            next_ids=None, eps: float = 0.0, n_valid: int = 0):
    """One kernel launch of `weight` (a dense tensor or an Int4Weight); unused pointers are bound to
    the weight's codes (never dereferenced)."""
    int4 = isinstance(weight, Int4Weight)
    weight_format = WeightFormat.INT4 if int4 else WeightFormat.DENSE
    codes, scales, zeros = (weight.packed, weight.scales, weight.zeros) if int4 else (weight, weight, weight)
    m, (n, k) = out.shape[0], weight.shape
    plan = gemv_plan(m, n, k, weight.dtype, _sm_count(weight.device), num_splits, weight_format)
    use_pdl = pdl_enabled(weight.device)

    def ptr(t):
        return codes if t is None else t

    def row_stride(t):
        return 0 if t is None else t.stride(0)

    with launch_device(weight.device):
        torch.library.wrap_triton(_decode_gemv_kernel)[plan.grid](
            out, codes, scales, zeros, ptr(x), ptr(ids), ptr(residual), ptr(delta), ptr(norm_weight),
            ptr(final_norm_weight), ptr(residual_out), ptr(next_ids), counters, partials, best,
            m, n, k, plan.k_split, n_valid,
            out.stride(0), 0 if int4 else weight.stride(0), row_stride(x), row_stride(residual), row_stride(delta),
            row_stride(residual_out),
            eps, *INT4_MAGIC,
            PROLOGUE=prologue.value, WEIGHT_FORMAT=weight_format.value, ARGMAX=next_ids is not None,
            SPLIT=plan.splits > 1, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
            STATS_BLOCK_K=plan.stats_block_k,
            # float32: exact products like torch's default matmul (TF32 would not be)
            DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
            USE_PDL=use_pdl, launch_pdl=use_pdl, num_warps=plan.num_warps, num_stages=plan.num_stages,
            maxnreg=plan.maxnreg,
        )


def _op_weight(weight: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None):
    """The weight an op was given: a dense tensor, or (scales given) an int4 one's packed codes."""
    if scales is None:
        return weight
    return Int4Weight(weight, scales, zeros, (scales.shape[1], weight.shape[1] * 32))


def _weight_args(weight) -> tuple:
    """A launcher's weight as the ops take it: (weight, scales, zeros), None for dense."""
    return (weight.packed, weight.scales, weight.zeros) if isinstance(weight, Int4Weight) else (weight, None, None)


def _new_out(rows: int, weight) -> torch.Tensor:
    return torch.empty((rows, weight.shape[0]), dtype=weight.dtype, device=weight.device)


_WORKSPACE_MUTATED = ("counters", "partials", "best")
# Every op takes the weight as (weight, scales, zeros): a dense [N, K] tensor with scales and zeros
# None, or an Int4Weight's packed codes, scales and zeros (custom ops take tensors, not dataclasses).


@torch.library.triton_op("olmo2_fast::decode_gemv", mutates_args=_WORKSPACE_MUTATED)
def _decode_gemv_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None,
                    counters: torch.Tensor, partials: torch.Tensor, best: torch.Tensor, num_splits: int) -> torch.Tensor:
    w = _op_weight(weight, scales, zeros)
    out = _new_out(x.shape[0], w)
    _launch(Prologue.NONE, out, w, counters, partials, best, num_splits, x=x)
    return out


@torch.library.triton_op("olmo2_fast::decode_gemv_embedding", mutates_args=_WORKSPACE_MUTATED + ("residual_out",))
def _decode_gemv_embedding_op(ids: torch.Tensor, embed: torch.Tensor, weight: torch.Tensor,
                              scales: torch.Tensor | None, zeros: torch.Tensor | None, counters: torch.Tensor,
                              partials: torch.Tensor, best: torch.Tensor, residual_out: torch.Tensor,
                              num_splits: int) -> torch.Tensor:
    w = _op_weight(weight, scales, zeros)
    out = _new_out(ids.shape[0], w)
    _launch(Prologue.EMBEDDING, out, w, counters, partials, best, num_splits, x=embed, ids=ids,
            residual_out=residual_out)
    return out


@torch.library.triton_op("olmo2_fast::decode_gemv_residual_norm", mutates_args=_WORKSPACE_MUTATED + ("residual_out",))
def _decode_gemv_residual_norm_op(residual: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor,
                                  weight: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None,
                                  counters: torch.Tensor, partials: torch.Tensor, best: torch.Tensor,
                                  residual_out: torch.Tensor, eps: float, num_splits: int) -> torch.Tensor:
    w = _op_weight(weight, scales, zeros)
    out = _new_out(residual.shape[0], w)
    _launch(Prologue.RESIDUAL_NORM, out, w, counters, partials, best, num_splits, residual=residual,
            delta=delta, norm_weight=norm_weight, residual_out=residual_out, eps=eps)
    return out


@torch.library.triton_op("olmo2_fast::decode_gemv_swiglu", mutates_args=_WORKSPACE_MUTATED)
def _decode_gemv_swiglu_op(gate_up: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
                           zeros: torch.Tensor | None, counters: torch.Tensor, partials: torch.Tensor,
                           best: torch.Tensor, num_splits: int) -> torch.Tensor:
    w = _op_weight(weight, scales, zeros)
    out = _new_out(gate_up.shape[0], w)
    _launch(Prologue.SWIGLU, out, w, counters, partials, best, num_splits, x=gate_up)
    return out


@torch.library.triton_op("olmo2_fast::decode_gemv_lm_head", mutates_args=_WORKSPACE_MUTATED + ("next_ids",))
def _decode_gemv_lm_head_op(residual: torch.Tensor, delta: torch.Tensor, ff_norm_weight: torch.Tensor,
                            final_norm_weight: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
                            zeros: torch.Tensor | None, counters: torch.Tensor, partials: torch.Tensor,
                            best: torch.Tensor, next_ids: torch.Tensor | None, eps: float, n_valid: int,
                            num_splits: int) -> torch.Tensor:
    w = _op_weight(weight, scales, zeros)
    out = _new_out(residual.shape[0], w)
    _launch(Prologue.FINAL_NORM, out, w, counters, partials, best, num_splits, residual=residual,
            delta=delta, norm_weight=ff_norm_weight, final_norm_weight=final_norm_weight, next_ids=next_ids,
            eps=eps, n_valid=n_valid)
    return out


# --------------------------------------------------------------------------- validation


def _check(ok: bool, message: str, error=ValueError):
    if not ok:
        raise error(message)


def _rows(name: str, t) -> int:
    """M of a [M, width] activation: 1..DECODE_MAX_ROWS."""
    _check(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    _check(t.dim() == 2 and 1 <= t.shape[0] <= DECODE_MAX_ROWS,
           f"{name} must be [M, width] with 1 <= M <= {DECODE_MAX_ROWS} (decode rows), got shape {tuple(t.shape)}")
    return t.shape[0]


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses of a tensor's elements."""
    start = t.data_ptr()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
    return start, start + extent * t.element_size()


def _weight_tensors(weight) -> dict[str, torch.Tensor]:
    """The tensors a launch reads `weight` from, by name, after checking it: a dense [N, K] tensor
    (float32/float16/bfloat16, checked with the other inputs) or an Int4Weight (kernels/int4_format.py
    validate_int4_weight: its packed codes, scales and zeros)."""
    if isinstance(weight, Int4Weight):
        validate_int4_weight(weight)
        return dict(weight=weight.packed, scales=weight.scales, zeros=weight.zeros)
    _check(isinstance(weight, torch.Tensor), f"weight must be a tensor or an Int4Weight, got {type(weight).__name__}",
           TypeError)
    _check(weight.dtype in FLOAT_DTYPES, f"weight must be float32/float16/bfloat16, got {weight.dtype}", TypeError)
    _check(weight.dim() == 2 and weight.shape[0] > 0 and weight.shape[1] > 0,
           f"weight must be [N, K] with N, K > 0, got shape {tuple(weight.shape)}")
    return dict(weight=weight)


def _validate(weight, workspace: DecodeGemvWorkspace, m: int, inputs: dict[str, tuple],
              *, ids=None, residual_out=None, next_ids=None, num_splits: int | None) -> int:
    """Check a launch's tensors; returns the split count to launch with.

    weight: dense [N, K] or an Int4Weight. inputs: name -> (tensor, expected shape) for every floating
    input (weight's dtype and device, contiguous last dim). ids (checked by the caller) is read too;
    residual_out is [M, K] and overlaps nothing read; next_ids is [M] int64.
    """
    weights = _weight_tensors(weight)
    n, k = weight.shape
    weight_format = WeightFormat.INT4 if isinstance(weight, Int4Weight) else WeightFormat.DENSE
    _check(isinstance(workspace, DecodeGemvWorkspace),
           f"workspace must be a DecodeGemvWorkspace from decode_gemv_workspace, got {type(workspace).__name__}", TypeError)
    if weight_format == WeightFormat.DENSE:
        inputs = dict(inputs, weight=(weight, (n, k)))
    if residual_out is not None:
        inputs["residual_out"] = (residual_out, (m, k))
    for name, (t, shape) in inputs.items():
        _check(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}", TypeError)
        _check(t.dtype == weight.dtype, f"{name} dtype {t.dtype} != weight dtype {weight.dtype}", TypeError)
        _check(tuple(t.shape) == tuple(shape), f"{name} must have shape {list(shape)} (M={m}, N={n}, K={k}), "
               f"got {list(t.shape)}")
        _check(t.stride(-1) == 1, f"{name} must have a contiguous last dimension, got strides {t.stride()}")
    if next_ids is not None:
        _check(isinstance(next_ids, torch.Tensor) and next_ids.dtype == torch.int64,
               f"next_ids must be an int64 tensor, got {getattr(next_ids, 'dtype', type(next_ids).__name__)}", TypeError)
        _check(tuple(next_ids.shape) == (m,) and next_ids.stride(0) == 1,
               f"next_ids must be a contiguous [M] = [{m}] tensor, got shape {list(next_ids.shape)}")
    counters, partials, best = workspace
    _check(all(isinstance(t, torch.Tensor) and t.dim() == 1 and t.is_contiguous() for t in workspace)
           and (counters.dtype, partials.dtype, best.dtype) == (torch.int32, torch.float32, torch.int64),
           "workspace must hold contiguous 1-D int32 counters, float32 partials and int64 best: "
           "make it with decode_gemv_workspace", TypeError)
    reads = dict(weights, **{name: t for name, (t, _) in inputs.items() if name != "residual_out"},
                 **({} if ids is None else dict(ids=ids)))
    others = dict(workspace._asdict(), **{name: t for name, t in (("residual_out", residual_out),
                                                                  ("next_ids", next_ids)) if t is not None})
    for name, t in dict(reads, **others).items():
        _check(t.device == weight.device, f"{name} is on {t.device} but weight is on {weight.device}")
    if residual_out is not None and weight.device.type != "meta" and not is_fake(residual_out):
        # Column block 0 writes residual_out while the other programs still read the inputs.
        # (Fake tensors, under torch.compile's tracing, have no addresses: checked when run eagerly.)
        first, last = _span(residual_out)
        for name, t in reads.items():
            start, end = _span(t)
            _check(end <= first or last <= start,
                   f"residual_out must not overlap {name}: other programs read {name} while it is written")
    k_steps = triton.cdiv(k, gemv_plan(m, n, k, weight.dtype, 1, weight_format=weight_format).block_k)
    _check(num_splits is None or (isinstance(num_splits, int) and not isinstance(num_splits, bool)
                                  and 1 <= num_splits <= k_steps),
           f"num_splits must be an int in 1..{k_steps} (the K steps of this shape), got {num_splits!r}")
    plan = gemv_plan(m, n, k, weight.dtype, _sm_count(weight.device), num_splits, weight_format)
    needs = dict(counters=plan.col_blocks + 1, partials=plan.splits * m * n if plan.splits > 1 else 0, best=m)
    for name, size in needs.items():
        have = getattr(workspace, name).numel()
        _check(have >= size, f"workspace.{name} holds {have} elements but this launch (M={m}, N={n}, K={k}) needs "
               f"{size}: make the workspace with decode_gemv_workspace over shapes including ({n}, {k})")
    return plan.splits


def _check_eps(eps) -> float:
    _check(isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0,
           f"eps must be a positive float, got {eps!r}", TypeError)
    return float(eps)


# --------------------------------------------------------------------------- public launchers
#
# Every launcher: weight [N, K] float32/float16/bfloat16 with a contiguous last dim (row stride
# free), or an Int4Weight of shape (N, K) (group 128, N % 8 == 0; its dtype is its scales'); activations
# [M, ...] with 1 <= M <= 16 in weight's dtype, contiguous last dims, any row stride; workspace from
# decode_gemv_workspace(shapes including (N, K), weight.dtype, device), untouched by any launch that
# may run concurrently; num_splits overrides gemv_plan's split. Returns out [M, N] contiguous in
# weight's dtype (float32 accumulation). No host sync.


def decode_gemv(x: torch.Tensor, weight: Weight, workspace: DecodeGemvWorkspace, *,
                num_splits: int | None = None) -> torch.Tensor:
    """out = x @ weight^T (o_proj). x: [M, K]."""
    m = _rows("x", x)
    splits = _validate(weight, workspace, m, dict(x=(x, (m, weight.shape[-1]))), num_splits=num_splits)
    return torch.ops.olmo2_fast.decode_gemv(x, *_weight_args(weight), *workspace, splits)


def decode_gemv_embedding(ids: torch.Tensor, embed: torch.Tensor, weight: Weight,
                          workspace: DecodeGemvWorkspace, residual_out: torch.Tensor, *,
                          num_splits: int | None = None) -> torch.Tensor:
    """out = embed[ids] @ weight^T (layer 0's qkv), and residual_out = embed[ids] (the residual).

    ids: [M] int64, each in [0, V) (not checked: that needs a host sync); embed: [V, K];
    residual_out: [M, K], overlapping no input.
    """
    _check(isinstance(ids, torch.Tensor) and ids.dtype == torch.int64,
           f"ids must be an int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}", TypeError)
    _check(ids.dim() == 1 and 1 <= ids.shape[0] <= DECODE_MAX_ROWS and ids.stride(0) == 1,
           f"ids must be a contiguous [M] tensor with 1 <= M <= {DECODE_MAX_ROWS}, got shape {list(ids.shape)}")
    _check(isinstance(embed, torch.Tensor) and embed.dim() == 2,
           f"embed must be a [V, K] tensor, got {list(getattr(embed, 'shape', [type(embed).__name__]))}")
    m, k = ids.shape[0], weight.shape[-1]
    splits = _validate(weight, workspace, m, dict(embed=(embed, (embed.shape[0], k))), ids=ids,
                       residual_out=residual_out, num_splits=num_splits)
    return torch.ops.olmo2_fast.decode_gemv_embedding(ids, embed, *_weight_args(weight), *workspace,
                                                      residual_out, splits)


def decode_gemv_residual_norm(residual: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor,
                              weight: Weight, workspace: DecodeGemvWorkspace, residual_out: torch.Tensor, *,
                              eps: float, num_splits: int | None = None) -> torch.Tensor:
    """x = residual + rmsnorm(delta) * norm_weight (OLMo 2's post-norm, HF rounding); out = x @ weight^T;
    residual_out = x (the next residual). qkv (delta = the previous layer's down_proj output, norm_weight
    its post_feedforward_layernorm) and gate_up (delta = o_proj's output, post_attention_layernorm).

    residual, delta, residual_out: [M, K]; norm_weight: [K]; residual_out overlaps no input.
    """
    m = _rows("residual", residual)
    k = weight.shape[-1]
    splits = _validate(weight, workspace, m, dict(residual=(residual, (m, k)), delta=(delta, (m, k)),
                                                  norm_weight=(norm_weight, (k,))),
                       residual_out=residual_out, num_splits=num_splits)
    return torch.ops.olmo2_fast.decode_gemv_residual_norm(residual, delta, norm_weight, *_weight_args(weight),
                                                          *workspace,
                                                          residual_out, _check_eps(eps), splits)


def decode_gemv_swiglu(gate_up: torch.Tensor, weight: Weight, workspace: DecodeGemvWorkspace, *,
                       num_splits: int | None = None) -> torch.Tensor:
    """out = (silu(gate) * up) @ weight^T (down_proj), read straight from gate_up's output.

    gate_up: [M, 2K], gate columns then up columns (model.py's fused layout), K = weight's K.
    """
    m = _rows("gate_up", gate_up)
    splits = _validate(weight, workspace, m, dict(gate_up=(gate_up, (m, 2 * weight.shape[-1]))),
                       num_splits=num_splits)
    return torch.ops.olmo2_fast.decode_gemv_swiglu(gate_up, *_weight_args(weight), *workspace, splits)


def decode_gemv_lm_head(residual: torch.Tensor, delta: torch.Tensor, ff_norm_weight: torch.Tensor,
                        final_norm_weight: torch.Tensor, weight: Weight, workspace: DecodeGemvWorkspace, *,
                        eps: float, next_ids: torch.Tensor | None = None, n_valid: int | None = None,
                        num_splits: int | None = None) -> torch.Tensor:
    """logits = rmsnorm(residual + rmsnorm(delta) * ff_norm_weight) * final_norm_weight @ weight^T:
    the last layer's post-feedforward residual, the final norm and lm_head in one launch.

    residual: [M, K] (the last layer's h); delta: [M, K] (its down_proj output);
    ff_norm_weight, final_norm_weight: [K].
    next_ids: optional [M] int64; when given, the kernel writes torch.argmax(logits[:, :n_valid], -1)
      there (greedy decoding on the device; ties and NaNs as torch.argmax).
    n_valid: columns the argmax may pick, 1..N (default N): the tokenizer's vocabulary.
    """
    m = _rows("residual", residual)
    n, k = weight.shape if isinstance(weight, (torch.Tensor, Int4Weight)) and len(weight.shape) == 2 else (0, 0)
    n_valid = n if n_valid is None else n_valid
    _check(isinstance(n_valid, int) and not isinstance(n_valid, bool) and 1 <= n_valid <= n,
           f"n_valid must be an int in 1..N = 1..{n}, got {n_valid!r}")
    splits = _validate(weight, workspace, m, dict(residual=(residual, (m, k)), delta=(delta, (m, k)),
                                                  ff_norm_weight=(ff_norm_weight, (k,)),
                                                  final_norm_weight=(final_norm_weight, (k,))),
                       next_ids=next_ids, num_splits=num_splits)
    return torch.ops.olmo2_fast.decode_gemv_lm_head(residual, delta, ff_norm_weight, final_norm_weight,
                                                    *_weight_args(weight),
                                                    *workspace, next_ids, _check_eps(eps), n_valid, splits)


# --------------------------------------------------------------------------- references
#
# The unfused sequence in the inputs' dtype: float64 inputs give the oracle (an Int4Weight then
# multiplies as its exact ŵ), 16-bit ones what torch computes (with dequantize_int4's dtype weights).


def _dense(weight, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_int4(weight, dtype) if isinstance(weight, Int4Weight) else weight


def decode_gemv_reference(x: torch.Tensor, weight) -> torch.Tensor:
    return F.linear(x, _dense(weight, x.dtype))


def decode_gemv_embedding_reference(ids, embed, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, residual_out)."""
    x = embed[ids]
    return F.linear(x, _dense(weight, x.dtype)), x


def decode_gemv_residual_norm_reference(residual, delta, norm_weight, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, residual_out): HF's `residual + post_norm(delta)`, then the projection."""
    x = residual + rms_norm_reference(delta, norm_weight, eps)
    return F.linear(x, _dense(weight, x.dtype)), x


def decode_gemv_swiglu_reference(gate_up, weight) -> torch.Tensor:
    return F.linear(swiglu_reference(gate_up), _dense(weight, gate_up.dtype))


def decode_gemv_lm_head_reference(residual, delta, ff_norm_weight, final_norm_weight, weight, eps,
                                  n_valid: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, greedy next ids): the last post-norm residual, model.norm, lm_head, then
    sampling.py's greedy pick (argmax of the logits over the first n_valid columns)."""
    h = residual + rms_norm_reference(delta, ff_norm_weight, eps)
    logits = F.linear(rms_norm_reference(h, final_norm_weight, eps), _dense(weight, h.dtype))
    return logits, logits[:, :n_valid].argmax(-1)


# --------------------------------------------------------------------------- roofline


def decode_gemv_cost(m: int, n: int, k: int, dtype: torch.dtype, prologue: Prologue = Prologue.NONE,
                     argmax: bool = False, weight_format: WeightFormat = WeightFormat.DENSE) -> Cost:
    """Minimum traffic: the weights once (int4: packed codes, scales and zeros), the prologue's inputs
    once, out (and residual_out / next ids) once; the workspace is overhead, not counted. FLOPs:
    2*M*N*K plus the prologue's element-wise work (per element: norm 4 and residual add 1; SwiGLU 4)."""
    size = itemsize(dtype)
    inputs = {  # elements read per row, elements of vectors read once, elements written per row, FLOPs per row
        Prologue.NONE: (k, 0, 0, 0),
        Prologue.EMBEDDING: (k, 0, k, 0),
        Prologue.RESIDUAL_NORM: (2 * k, k, k, 5 * k),
        Prologue.SWIGLU: (2 * k, 0, 0, 4 * k),
        Prologue.FINAL_NORM: (2 * k, 2 * k, 0, 9 * k),
    }[Prologue(prologue)]
    per_row, vectors, written, flops = inputs
    index_bytes = 8 * m * (prologue == Prologue.EMBEDDING) + 8 * m * argmax
    weight_bytes = int4_weight_bytes(n, k, dtype) if weight_format == WeightFormat.INT4 else n * k * size
    return Cost(bytes=weight_bytes + (m * (per_row + written + n) + vectors) * size + index_bytes,
                flops=2 * m * n * k + m * flops)

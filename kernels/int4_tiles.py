# int4 weights inside Triton kernels: reading kernels/int4_format.py's packing.
#
# Device functions shared by the decode GEMV (kernels/decode_gemv.py, WeightFormat.INT4) and
# the prefill GEMM (kernels/int4_matmul.py): the code views (the dequantisation), the
# CUDA-core GEMV step for one input row, and the dtype tile the tensor-core paths multiply.
#
# Code views. A packed word holds codes c = 0..7 at bits (4c + 3) .. (4c + 6) mod 32. Rotating
# it right by 0, 8, 16 or 24 bits puts two codes at bits 19..22 and 15..18; OR-ed into the
# float32 bit patterns of 16.0 and 256.0 (whose ulps are 2^-19 and 2^-15) they read as 16 + q
# (even c) and 256 + q (odd c): exact, and per 8 codes 3 shifts and 8 LOP3s, each LOP3 one
# (view & field) | magic, with no integer-to-float conversion. The magic numbers arrive as
# kernel arguments (INT4_MAGIC), not as constants: ptxas encodes a constant OR operand as an
# immediate beside the AND's and then needs two LOP3s per code (checked in the sm_90 SASS).
#
# The GEMV step (one input row, CUDA cores) factors each group's scale and zero out of the
# sum, so it multiplies with the unrounded ŵ = (q - 8) s + z:
#     sum_k x_k ŵ_k = s (D - T) + z S,   D = sum_k x_k (base_k + q_k),
#     T = sum_k x_k (base_k + 8) = 24 S_even + 264 S_odd,   S = S_even + S_odd,
# over one thread's 32-code unit (one 16-byte load, inside one group): one FFMA per weight for
# D (x (base + q) is exact in float32 for bf16 and fp16 x: 8 or 11 significant bits times 9),
# and per unit 32 adds for S_even / S_odd and three operations per row, shared by the thread's
# 8 or 16 rows. The bases cancel in D - T: each float32 sum then carries up to 264 |x| per
# term, which costs a rounding of ~2^-24 * 264 / |q - 8| (~2^-15) relative to the term: far
# below a bf16 (2^-9) or fp16 (2^-12) half ulp. float32 x would make x (256 + q) inexact (24 + 9
# bits): CENTRED subtracts base + 8 from each code first (one FADD per weight; float32 is no
# production dtype).
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def int4_code_values(words, magic_16, magic_256):
    """int32 words [..., 1] -> float32 [..., 8]: code c of each word as base + q, base 16 for even c
    and 256 for odd c (exact). magic_16 / magic_256: the float32 bits of 16.0 and 256.0."""
    c = tl.arange(0, 8)
    even = c % 2 == 0
    rotation = ((4 * c + 3 - tl.where(even, 19, 15) + 32) % 32).to(tl.uint32)  # code c -> bits 19.. or 15..
    bits = words.to(tl.uint32, bitcast=True)
    view = (bits >> rotation) | (bits << ((32 - rotation) % 32))
    field = tl.where(even, 0x00780000, 0x00078000).to(tl.uint32)
    magic = tl.where(even, magic_16, magic_256).to(tl.uint32)
    return ((view & field) | magic).to(tl.float32, bitcast=True)


@triton.jit
def int4_centred_codes(words, magic_16, magic_256):
    """int32 words [..., 1] -> float32 [..., 8]: q - 8 for each code (exact)."""
    c = tl.arange(0, 8)
    return int4_code_values(words, magic_16, magic_256) - tl.where(c % 2 == 0, 16.0 + 8.0, 256.0 + 8.0)


@triton.jit
def _as_float32(v):
    """v.to(float32), for bf16 as the integer shift it is: ptxas widens the high half of a bf16
    pair with two instructions (PRMT, IMAD.U32), this with one LOP3."""
    if v.dtype == tl.bfloat16:
        out = (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def int4_gemv_tile(w_ptr, scales_ptr, zeros_ptr, row_blocks, k0, k_end, N, K, BLOCK_K: tl.constexpr):
    """One step of a one-row GEMV: words [U, RB, 8, 4, 1] int32 (U = BLOCK_K / 32 units, one per
    thread: the units come first so that the lanes go along them; a row's unit is one 16-byte
    load) and the unit's group's scales and zeros [U, RB, 8, 1]. row_blocks: [1, RB, 1, 1] int64,
    the program's row blocks, clamped to the weight's. Units past the slice are clamped to its
    last one (the input row is zero there, and the loop's prefetch past its end re-reads cached
    lines), so no load is masked: a masked load zero-fills its registers first (2 CS2R per 16
    bytes, inside the loop)."""
    U: tl.constexpr = BLOCK_K // 32
    units = K // 32
    u = tl.minimum(k0 // 32 + tl.arange(0, U), (k_end - 1) // 32)[:, None, None, None]  # [U, 1, 1, 1]
    r = tl.arange(0, 8)[None, None, :, None]
    unit_rows = (row_blocks * units + u) * 8 + r                                        # [U, RB, 8, 1]
    words = tl.load(w_ptr + (unit_rows * 4)[:, :, :, :, None] + tl.arange(0, 4)[None, None, None, :, None])
    group_rows = (u // 4) * N + row_blocks * 8 + r  # 4 units per group of 128
    return words, tl.load(scales_ptr + group_rows), tl.load(zeros_ptr + group_rows)


@triton.jit
def int4_gemv_multiply_add(acc, words, scales, zeros, x, magic_16, magic_256, CENTRED: tl.constexpr):
    """acc [U, RB, 8, 1] float32 += the step's products for each (unit, row): s (D - T) + z S (see the
    module header). words [U, RB, 8, 4, 1], scales and zeros [U, RB, 8, 1], x [U, 1, 1, 4, 8] (the
    input row's 32 values per unit, zero past the slice)."""
    U: tl.constexpr = words.shape[0]
    RB: tl.constexpr = words.shape[1]
    xf = _as_float32(x)
    x_even, x_odd = tl.split(tl.reshape(xf, [U, 1, 16, 2]))
    sum_even = tl.sum(x_even, axis=2)[:, :, None, None]  # [U, 1, 1, 1]
    sum_odd = tl.sum(x_odd, axis=2)[:, :, None, None]
    if CENTRED:
        codes = int4_centred_codes(words, magic_16, magic_256)
        t = 0.0
    else:
        codes = int4_code_values(words, magic_16, magic_256)
        t = (16.0 + 8.0) * sum_even + (256.0 + 8.0) * sum_odd
    d = tl.sum(tl.reshape(codes * xf, [U, RB, 8, 32]), axis=3, keep_dims=True)  # a chain of FFMAs per row
    return acc + _as_float32(scales) * (d - t) + _as_float32(zeros) * (sum_even + sum_odd)


@triton.jit
def int4_dot_tile(w_ptr, scales_ptr, zeros_ptr, rows, k0, k_end, N, K, BLOCK_K: tl.constexpr):
    """One step of a tensor-core path: words [BLOCK_N, BLOCK_K / 32, 4, 1] int32 for weight rows
    `rows` ([BLOCK_N] int64, clamped to the weight's) and inputs k0 .. k0 + BLOCK_K (inside one
    group: BLOCK_K divides 128), and that group's scales and zeros [BLOCK_N, 1, 1, 1]. Units past
    the slice are clamped to its last one (their inputs are zero)."""
    u = tl.minimum(k0 // 32 + tl.arange(0, BLOCK_K // 32), (k_end - 1) // 32)[None, :, None, None]
    n = rows[:, None, None, None]
    words = tl.load(w_ptr + (((n // 8) * (K // 32) + u) * 8 + n % 8) * 4 + tl.arange(0, 4)[None, None, :, None])
    group_rows = (k0 // 128) * N + n
    return words, tl.load(scales_ptr + group_rows), tl.load(zeros_ptr + group_rows)


@triton.jit
def int4_dot_weights(words, scales, zeros, magic_16, magic_256):
    """The dtype weights [BLOCK_N, BLOCK_K] of an int4_dot_tile: dtype((q - 8) s + z) computed in
    float32, bit for bit dequantize_int4 (for bf16/fp16 scales, (q - 8) s is exact)."""
    BLOCK_N: tl.constexpr = words.shape[0]
    BLOCK_K: tl.constexpr = words.shape[1] * 32
    w = int4_centred_codes(words, magic_16, magic_256) * scales.to(tl.float32) + zeros.to(tl.float32)
    return tl.reshape(w, [BLOCK_N, BLOCK_K]).to(scales.dtype)

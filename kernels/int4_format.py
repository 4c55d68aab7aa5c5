# int4 group-wise weight-only quantisation: the format, in plain PyTorch.
#
# A linear weight W [N, K] (out_features N, in_features K) is cut, row by row, into
# groups of `group_size` (128) consecutive input features. Each group g of row n gets
# a scale s[g, n] and a zero z[g, n], stored in the activation dtype, and each weight
# a 4-bit code q in [0, 15]:
#
#     w ≈ ŵ = (q - 8) * s + z                           (torchao int4_weight_only,
#                                                        ZeroPointDomain.FLOAT)
# Quantisation, per group, with mn / mx the group's minimum / maximum in float32:
#     s = dtype((mx - mn) / 15)                         rounded to the stored dtype first,
#     z = dtype(mn + 8 * s)                             then z from the stored s,
#     q = clamp(round((w - z) / s) + 8, 0, 15)          round half to even (torch.round),
#                                                       using the stored s and z, so q is
#                                                       the nearest grid point that the
#                                                       dequantiser can reproduce;
#     a constant group (mx == mn, or s rounding to 0) stores s = 0, z = mn and q = 8,
#     which dequantises to mn exactly: no division by zero, no NaN.
#
# Numerics. ŵ is a real number; what each consumer uses of it:
#   * dequantize_int4(qw) (the twin): dtype(float32(q - 8) * float32(s) + float32(z)).
#     For bf16/fp16 scales the product is exact in float32 (4 + 11 significant bits),
#     so this is ŵ rounded to float32, then to the dtype. The tensor-core kernels (decode
#     GEMV for 2..16 rows, the prefill GEMM) build exactly these dtype weights: bit-exact.
#   * dequantize_int4(qw, torch.float64) is ŵ itself for bf16/fp16 scales (the tests'
#     oracle), and the M = 1 decode GEMV multiplies with ŵ unrounded: it factors s and z
#     out of each group's sum (kernels/decode_gemv.py), so its weights are within half a
#     dtype ulp of the twin's (the twin's rounding), never a per-weight rounding more.
#   * int4_matmul_reference (the torch backend's projection) multiplies with the twin's
#     dtype weights in float32.
# Error: |w - ŵ| <= s / 2 up to the rounding of the stored s and z; a group whose
# midpoint is far larger than its range (|z| >> 2^7 * s in bf16) loses relative
# precision because z is stored in the activation dtype, as in torchao; trained LLM
# weights are centred, so this does not arise in practice.
#
# Packed layout ("int32-n8k32-rotl3", the name config.json records): int32 words
# [N // 8, K // 32, 8, 4]; packed[b, u, r, i] holds the codes of output n = 8b + r for
# inputs k = 32u + 8i + c, c = 0..7: code c in bits (4c + 3) .. (4c + 6) mod 32 of the
# word, i.e. the natural nibble order rotated left by 3 bits (code 7 wraps: bits 31, 0,
# 1, 2). Scales and zeros are [K // group_size, N]. N must be a multiple of 8 (every
# OLMo 2 projection and vocabulary is). Why this order:
#   * 8 output rows form one contiguous stream along K: a decode program owning 8 or 16
#     rows reads one run of memory; a thread's 16-byte load is one row's 32 consecutive
#     codes (a whole unit u), matched by 64 contiguous bytes of x, and within one group,
#     so its scale and zero apply once per load;
#   * the rotation: rotating a word right by 0, 8, 16 or 24 bits brings codes (4, 3),
#     (6, 5), (0, 7), (2, 1) to bits 19..22 and 15..18. OR-ed into float32 256.0
#     (0x43800000, whose ulp is 2^-15) a code at bits 15..18 reads as 256 + q; into 16.0
#     (0x41800000, ulp 2^-19) a code at bits 19..22 reads as 16 + q. One LOP3
#     ((view & field) | magic) per code, 3 shifts per 8 codes: no integer-to-float
#     conversion. Even codes use 16 + q, odd codes 256 + q (INT4_BASES).
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZE = 128  # the group size every kernel supports
CODES_PER_WORD = 8  # 4-bit codes per int32 word
ROW_BLOCK = 8  # output rows interleaved in one packed block
UNIT = 32  # codes of one row per 16-byte unit (4 words)
WORD_ROTATION = 3  # bits the natural nibble order is rotated left by
MID_CODE = 8  # the code that dequantises to z
MAX_CODE = 15
# What the kernels' float32 views read a code q as: base + q, by code position c (even, odd).
INT4_BASES = (16.0, 256.0)
INT4_MAGIC = (0x41800000, 0x43800000)  # float32 bits of 16.0 (field at bits 19..22) and 256.0 (bits 15..18)
TENSOR_NAMES = ("qweight", "scales", "zeros")  # checkpoint keys, after a layer prefix
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Int4Weight:
    """A quantised linear weight of logical shape (N, K) = (out_features, in_features).

    packed: [N // 8, K // 32, 8, 4] int32 (see the module header).
    scales, zeros: [K // group_size, N] in the activation dtype.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    shape: tuple[int, int]
    group_size: int = GROUP_SIZE

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype the weight was quantised for (dtype of scales and zeros)."""
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> Int4Weight:
        """The same weight on `device` (the dtype never changes: it is the format's)."""
        return Int4Weight(self.packed.to(device), self.scales.to(device), self.zeros.to(device), self.shape, self.group_size)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> Int4Weight:
        """Rebuild a weight from `int4_tensors(...)` output (e.g. read from safetensors).

        The shape and group size follow from the tensor shapes, so a checkpoint needs no
        other metadata. Raises ValueError when a key is missing or the shapes disagree.
        """
        missing = [prefix + name for name in TENSOR_NAMES if prefix + name not in tensors]
        if missing:
            raise ValueError(f"int4 weight tensors missing: {missing}")
        packed, scales, zeros = (tensors[prefix + name] for name in TENSOR_NAMES)
        if packed.dtype != torch.int32 or packed.dim() != 4 or tuple(packed.shape[2:]) != (ROW_BLOCK, UNIT // 8):
            raise ValueError(f"{prefix}qweight must be an int32 [N / 8, K / 32, 8, 4] tensor, got {packed.dtype} "
                             f"{tuple(packed.shape)}")
        n, k = packed.shape[0] * ROW_BLOCK, packed.shape[1] * UNIT
        if scales.dim() != 2 or scales.shape[1] != n or scales.shape[0] == 0 or k % scales.shape[0]:
            raise ValueError(f"{prefix}scales shape {tuple(scales.shape)} does not fit qweight {tuple(packed.shape)} (K={k}, N={n})")
        if zeros.shape != scales.shape or zeros.dtype != scales.dtype:
            raise ValueError(f"{prefix}zeros {zeros.dtype} {tuple(zeros.shape)} != scales {scales.dtype} {tuple(scales.shape)}")
        return cls(packed, scales, zeros, (n, k), k // scales.shape[0])


def int4_tensors(weight: Int4Weight, prefix: str = "") -> dict[str, torch.Tensor]:
    """The weight's tensors by checkpoint key: `{prefix}qweight`, `{prefix}scales`, `{prefix}zeros`."""
    return dict(zip((prefix + name for name in TENSOR_NAMES), (weight.packed, weight.scales, weight.zeros)))


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same bits."""
    return (words - ((words >> 31) << 32)).to(torch.int32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] (integers in [0, 15], N % 8 == 0, K % 32 == 0) -> packed [N // 8, K // 32, 8, 4] int32."""
    if q.dim() != 2 or q.shape[0] % ROW_BLOCK or q.shape[1] % UNIT:
        raise ValueError(f"pack_int4 needs codes [N, K] with N % {ROW_BLOCK} == 0 and K % {UNIT} == 0, got {tuple(q.shape)}")
    n, k = q.shape
    codes = q.to(torch.int64).reshape(n, k // CODES_PER_WORD, CODES_PER_WORD)
    natural = (codes << (4 * torch.arange(CODES_PER_WORD, device=q.device))).sum(-1)  # [N, K / 8] in [0, 2^32)
    rotated = ((natural << WORD_ROTATION) | (natural >> (32 - WORD_ROTATION))) & 0xFFFFFFFF
    words = _as_int32(rotated).reshape(n // ROW_BLOCK, ROW_BLOCK, k // UNIT, UNIT // CODES_PER_WORD)  # (b, r, u, i)
    return words.permute(0, 2, 1, 3).contiguous()  # (b, u, r, i)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Packed [N // 8, K // 32, 8, 4] int32 -> codes [N, K] as uint8 in [0, 15]."""
    if packed.dim() != 4 or packed.dtype != torch.int32 or tuple(packed.shape[2:]) != (ROW_BLOCK, UNIT // 8):
        raise ValueError(f"unpack_int4 needs int32 words [N / 8, K / 32, 8, 4], got {packed.dtype} {tuple(packed.shape)}")
    blocks, units = packed.shape[:2]
    words = packed.permute(0, 2, 1, 3).reshape(blocks * ROW_BLOCK, units * UNIT // CODES_PER_WORD).to(torch.int64)
    words &= 0xFFFFFFFF
    natural = ((words >> WORD_ROTATION) | (words << (32 - WORD_ROTATION))) & 0xFFFFFFFF
    codes = (natural.unsqueeze(-1) >> (4 * torch.arange(CODES_PER_WORD, device=packed.device))) & MAX_CODE
    return codes.reshape(blocks * ROW_BLOCK, units * UNIT).to(torch.uint8)


def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE, dtype: torch.dtype | None = None) -> Int4Weight:
    """Quantise W [N, K] (float) group-wise along K; scales/zeros in `dtype` (default w.dtype).

    Raises ValueError when K is not a multiple of group_size, N not a multiple of 8,
    group_size is not a positive multiple of 32, or W holds inf/NaN (this is an offline
    step: it may sync).
    """
    if w.dim() != 2 or w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_int4 needs a 2-D float32/float16/bfloat16 weight, got {w.dtype} {tuple(w.shape)}")
    dtype = w.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"scale dtype must be float32, float16 or bfloat16, got {dtype}")
    if group_size <= 0 or group_size % UNIT:
        raise ValueError(f"group_size must be a positive multiple of {UNIT}, got {group_size}")
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features K={k} is not a multiple of the int4 group size {group_size}")
    if n % ROW_BLOCK:
        raise ValueError(f"out_features N={n} is not a multiple of {ROW_BLOCK} (the int4 row block)")
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantise a weight holding inf or NaN")
    wg = w.float().reshape(n, k // group_size, group_size)  # (N, G, group)
    mn, mx = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((mx - mn) / MAX_CODE).to(dtype)
    zero = (mn + MID_CODE * scale.float()).to(dtype)
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    zero_range = s == 0
    steps = torch.round((wg - z) / torch.where(zero_range, 1.0, s))
    q = torch.where(zero_range, 0.0, steps).add(MID_CODE).clamp(0, MAX_CODE).to(torch.uint8)
    return Int4Weight(pack_int4(q.reshape(n, k)), scale.T.contiguous(), zero.T.contiguous(), (n, k), group_size)


def dequantize_int4(qw: Int4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight W [N, K] in `dtype` (default qw.dtype): dtype((q - 8) * scale + zero) per group, the
    arithmetic in float32, or in float64 for dtype float64 (then exactly ŵ for bf16/fp16 scales)."""
    dtype = qw.dtype if dtype is None else dtype
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    n, k = qw.shape
    groups = k // qw.group_size
    q = unpack_int4(qw.packed).to(exact).reshape(n, groups, qw.group_size)  # (N, G, group)
    s = qw.scales.to(exact).T.unsqueeze(-1)
    z = qw.zeros.to(exact).T.unsqueeze(-1)
    return ((q - MID_CODE) * s + z).reshape(n, k).to(dtype)


def int4_matmul_reference(x: torch.Tensor, qw: Int4Weight) -> torch.Tensor:
    """x [M, K] @ W^T in plain PyTorch: x.float() @ dequantize_int4(qw).float().T, cast to x.dtype. The
    int4 kernels' twin, and the torch backend's int4 projection (here: importing it needs no triton)."""
    return (x.float() @ dequantize_int4(qw).float().T).to(x.dtype)


def int4_weight_bytes(n: int, k: int, dtype: torch.dtype) -> int:
    """Bytes of an (N, K) int4 weight: N*K/2 of codes, a scale and a zero per group of 128 in `dtype`."""
    return n * k // 2 + 2 * (n * k // GROUP_SIZE) * torch.empty((), dtype=dtype).element_size()


def int4_quantization_error(w: torch.Tensor, group_size: int = GROUP_SIZE) -> float:
    """Relative Frobenius error ||dequant(quant(W)) - W|| / ||W|| (for docs and tests)."""
    wq = dequantize_int4(quantize_int4(w, group_size)).double()
    return ((wq - w.double()).norm() / w.double().norm()).item()


def validate_int4_weight(qw) -> None:
    """Check that `qw` is an Int4Weight the kernels take: group size 128, K % 128 == 0, N % 8 == 0,
    packed [N / 8, K / 32, 8, 4] int32, scales and zeros [K / 128, N] in one float dtype, all
    contiguous on one device. Raises TypeError (types, dtypes) or ValueError (shapes, layout, devices)."""
    if not isinstance(qw, Int4Weight):
        raise TypeError(f"expected an Int4Weight, got {type(qw).__name__}")
    n, k = qw.shape
    if qw.group_size != GROUP_SIZE:
        raise ValueError(f"the int4 kernels support group size {GROUP_SIZE}, got {qw.group_size}")
    if k % GROUP_SIZE or n % ROW_BLOCK or n <= 0 or k <= 0:
        raise ValueError(f"an int4 weight needs K a multiple of {GROUP_SIZE} and N of {ROW_BLOCK}, got shape {qw.shape}")
    if qw.packed.dtype != torch.int32:
        raise TypeError(f"packed int4 words must be int32, got {qw.packed.dtype}")
    if qw.scales.dtype not in FLOAT_DTYPES or qw.zeros.dtype != qw.scales.dtype:
        raise TypeError(f"int4 scales and zeros must share a float32/float16/bfloat16 dtype, got "
                        f"{qw.scales.dtype} and {qw.zeros.dtype}")
    groups = k // GROUP_SIZE
    expected = (("packed", qw.packed, (n // ROW_BLOCK, k // UNIT, ROW_BLOCK, UNIT // CODES_PER_WORD)),
                ("scales", qw.scales, (groups, n)), ("zeros", qw.zeros, (groups, n)))
    for name, t, shape in expected:
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} for an int4 weight of shape {qw.shape}, got {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"int4 {name} must be contiguous")
        if t.device != qw.packed.device:
            raise ValueError(f"int4 {name} is on {t.device} but packed is on {qw.packed.device}")

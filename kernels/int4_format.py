# int4 group-wise weight-only quantisation: the format, in plain PyTorch.
#
# A linear weight W [N, K] (out_features N, in_features K) is cut, row by row, into
# groups of `group_size` (128) consecutive input features. Each group g of row n gets
# a scale s[g, n] and a zero z[g, n], stored in the activation dtype, and each weight
# a 4-bit code q in [0, 15]:
#
#     w ≈ (q - 8) * s + z                               (torchao int4_weight_only,
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
# Dequantisation: w = dtype(float32(q - 8) * float32(s) + float32(z)). For bf16/fp16
# scales the product (q - 8) * s is exact in float32 (4 + 11 significant bits), so a
# kernel that fuses it into one FMA produces the same bits as this twin.
# Error: |w - dequant| <= s / 2 up to the rounding of the stored s, z and result;
# a group whose midpoint is far larger than its range (|z| >> 2^7 * s in bf16) loses
# relative precision because z is stored in the activation dtype, as in torchao;
# trained LLM weights are centred, so this does not arise in practice.
#
# Packed layout, K-major like GPTQ's `qweight`: int32 words [K // 8, N]; word (r, n)
# holds the codes of weight rows k = 8r .. 8r+7 of output n, code k - 8r in bits
# 4(k - 8r) .. 4(k - 8r) + 3 (little-endian nibbles). Scales and zeros are
# [K // group_size, N]. Why K-major: a matmul program owns a block of output columns
# n and walks down K, so each step loads a [BLOCK_K // 8, BLOCK_N] tile whose rows are
# contiguous along n (16-byte loads, fully coalesced warps), the scales and zeros of
# one group are one contiguous row, and each thread's word covers 8 consecutive k of
# one output, whose 8 activations it loads with one 16-byte load. Row-major [N, K // 8]
# words would give each thread 32 consecutive k of one row instead, four activation
# loads per weight load. The unpacked [BLOCK_K, BLOCK_N] tile is tl.dot's B operand as is.
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZE = 128  # the group size every kernel supports
CODES_PER_WORD = 8  # 4-bit codes per int32 word
MID_CODE = 8  # the code that dequantises to z
MAX_CODE = 15
TENSOR_NAMES = ("qweight", "scales", "zeros")  # checkpoint keys, after a layer prefix
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Int4Weight:
    """A quantised linear weight of logical shape (N, K) = (out_features, in_features).

    packed: [K // 8, N] int32, 8 codes per word along K (see the module header).
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
        if packed.dtype != torch.int32 or packed.dim() != 2:
            raise ValueError(f"{prefix}qweight must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
        k = packed.shape[0] * CODES_PER_WORD
        n = packed.shape[1]
        if scales.dim() != 2 or scales.shape[1] != n or scales.shape[0] == 0 or k % scales.shape[0]:
            raise ValueError(f"{prefix}scales shape {tuple(scales.shape)} does not fit qweight {tuple(packed.shape)} (K={k}, N={n})")
        if zeros.shape != scales.shape or zeros.dtype != scales.dtype:
            raise ValueError(f"{prefix}zeros {zeros.dtype} {tuple(zeros.shape)} != scales {scales.dtype} {tuple(scales.shape)}")
        return cls(packed, scales, zeros, (n, k), k // scales.shape[0])


def int4_tensors(weight: Int4Weight, prefix: str = "") -> dict[str, torch.Tensor]:
    """The weight's tensors by checkpoint key: `{prefix}qweight`, `{prefix}scales`, `{prefix}zeros`."""
    return dict(zip((prefix + name for name in TENSOR_NAMES), (weight.packed, weight.scales, weight.zeros)))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] (integers in [0, 15], K % 8 == 0) -> packed int32 words [K // 8, N]."""
    if q.dim() != 2 or q.shape[1] % CODES_PER_WORD:
        raise ValueError(f"pack_int4 needs codes [N, K] with K % 8 == 0, got {tuple(q.shape)}")
    n, k = q.shape
    codes = q.to(torch.int64).T.reshape(k // CODES_PER_WORD, CODES_PER_WORD, n)  # (K/8, 8, N)
    shifts = 4 * torch.arange(CODES_PER_WORD, device=q.device).view(1, -1, 1)
    words = (codes << shifts).sum(dim=1)  # in [0, 2^32): reinterpret the top bit as the sign
    return (words - ((words >> 31) << 32)).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Packed int32 words [K // 8, N] -> codes [N, K] as uint8 in [0, 15]."""
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack_int4 needs int32 words [K // 8, N], got {packed.dtype} {tuple(packed.shape)}")
    kw, n = packed.shape
    shifts = 4 * torch.arange(CODES_PER_WORD, device=packed.device, dtype=torch.int32).view(1, -1, 1)
    codes = (packed.unsqueeze(1) >> shifts) & MAX_CODE  # arithmetic shift; the mask drops the sign
    return codes.reshape(kw * CODES_PER_WORD, n).T.contiguous().to(torch.uint8)


def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE, dtype: torch.dtype | None = None) -> Int4Weight:
    """Quantise W [N, K] (float) group-wise along K; scales/zeros in `dtype` (default w.dtype).

    Raises ValueError when K is not a multiple of group_size, group_size is not a
    positive multiple of 8, or W holds inf/NaN (this is an offline step: it may sync).
    """
    if w.dim() != 2 or w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_int4 needs a 2-D float32/float16/bfloat16 weight, got {w.dtype} {tuple(w.shape)}")
    dtype = w.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"scale dtype must be float32, float16 or bfloat16, got {dtype}")
    if group_size <= 0 or group_size % CODES_PER_WORD:
        raise ValueError(f"group_size must be a positive multiple of {CODES_PER_WORD}, got {group_size}")
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features K={k} is not a multiple of the int4 group size {group_size}")
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


def dequantize_int4(qw: Int4Weight) -> torch.Tensor:
    """The weight W [N, K] in qw.dtype: dtype(float32(q - 8) * scale + zero), per group."""
    n, k = qw.shape
    groups = k // qw.group_size
    q = unpack_int4(qw.packed).float().reshape(n, groups, qw.group_size)  # (N, G, group)
    s = qw.scales.float().T.unsqueeze(-1)
    z = qw.zeros.float().T.unsqueeze(-1)
    return ((q - MID_CODE) * s + z).reshape(n, k).to(qw.dtype)


def int4_matmul_reference(x: torch.Tensor, qw: Int4Weight) -> torch.Tensor:
    """x [M, K] @ W^T in plain PyTorch: x.float() @ dequantize_int4(qw).float().T, cast to x.dtype. The
    int4_matmul kernel's twin, and the torch backend's int4 projection (here: importing it needs no triton)."""
    return (x.float() @ dequantize_int4(qw).float().T).to(x.dtype)


def int4_quantization_error(w: torch.Tensor, group_size: int = GROUP_SIZE) -> float:
    """Relative Frobenius error ||dequant(quant(W)) - W|| / ||W|| (for docs and tests)."""
    wq = dequantize_int4(quantize_int4(w, group_size)).double()
    return ((wq - w.double()).norm() / w.double().norm()).item()

# Causal attention over the static KV cache: chunked prefill and split-KV decode.
#
# Algorithm: FlashAttention-2 style online softmax. Scores are computed per key tile with
# tl.dot in float32, scaled by head_dim**-0.5 * log2(e) so exp2 replaces exp, and folded
# into a running (max m, sum l, accumulator acc) per query row; the [n_q, n_kv] score
# matrix never exists. P is cast to the value dtype for the second dot (as every flash
# kernel does); accumulation stays float32.
#
# Layouts accepted:
#   q        [T, Hq, D]   packed queries of all sequences (prefill) or [B, Hq, D] (decode);
#                         any strides with stride(-1) == 1 (a view of a fused qkv works)
#   k_cache, v_cache      [max_batch, Hkv, max_seq, D], stride(-1) == 1, same strides;
#                         read in place, sequence b uses cache row b
#   cu_seqlens_q [B+1] int32: queries of sequence b are rows cu[b]:cu[b+1] of q
#   kv_lens      [B]   int32: valid cached positions of sequence b, new tokens included;
#                         sequence b's queries sit at positions kv_lens[b]-n_b .. kv_lens[b]-1
#   out      [T, Hq, D] (contiguous, q's dtype)
#
# Prefill: one program per (BLOCK_M query rows, query head, sequence). GQA reads KV head
# h // (Hq // Hkv) in place (no repeat). Key tiles strictly below the block's first query
# position run without a mask; only the tiles on the diagonal pay for the causal mask.
# Decode: one program per (split, KV head, sequence) loads each K/V tile once for all G
# query heads of the group, padded to BLOCK_G = 16 rows so tl.dot (mma) applies to any G
# (G = 5 for OLMo-2 32B); groups wider than 16 take ceil(G/16) programs. When B * Hkv is
# too small to fill the GPU, the sequence is split (flash-decoding): each split writes a
# partial (m, l, acc) and a second kernel combines them. The split count depends only on
# shapes (B, Hkv, max_seq) and the SM count, never on kv_lens, so a decode step stays
# free of host syncs and CUDA-graph capturable; splits past a sequence's end write the
# neutral partial (m = -inf, l = 0, acc = 0).
#
# Limits: D a power of two in 16..256; float32/float16/bfloat16 (float32 dots run in
# IEEE precision, not TF32, to match a float32 reference). Prefill needs the caller's
# max_q_len >= every n_b (rows past it are never written) and n_b <= kv_lens[b] <= max_seq;
# decode needs 1 <= kv_lens[b] <= max_seq. Rows of q not covered by cu_seqlens_q are left unwritten.
# Neither is checked on the host (it would need a sync); a row with no visible key
# yields 0, never NaN.
import functools
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from olmo2_fast.kernels._launch import launch_device
from olmo2_fast.kernels.roofline import Cost, itemsize

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Query heads a decode program serves: the M side of its dots (mma wants M >= 16).
DECODE_BLOCK_G = 16
# Most splits per sequence; also the reducer's tile height (one compiled config).
MAX_SPLITS = 32
# A split shorter than this spends more on its fixed costs (q load, partial write and
# re-read) than it gains in parallelism.
_MIN_SPLIT_TOKENS = 256
# The reducer only moves [MAX_SPLITS, D] float32 partials per (sequence, head).
REDUCE_NUM_WARPS = 4
_LOG2E = 1.4426950408889634


class KernelConfig(NamedTuple):
    block_m: int  # query rows per program (prefill) or padded group height (decode)
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


def prefill_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Tile sizes of the prefill kernel: the one place the launcher and tests read them.

    Chosen from sm_80/sm_90 compile reports (tests/test_kernel_attention.py): the
    largest tiles that stay under 255 registers without spilling on both targets.
    """
    if dtype == torch.float32:
        # IEEE float32 dots run on FMA units, which hold whole operand rows per
        # thread: only 16-row tiles stay out of local memory.
        return KernelConfig(16, 16, 4, 2)
    if head_dim <= 64:
        return KernelConfig(128, 64, 8, 3)
    if head_dim == 128:
        return KernelConfig(128, 32, 8, 3)  # 128x64 spills on sm_80
    return KernelConfig(64, 32, 8, 2)


def decode_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Tile sizes of the decode kernel (memory-bound: wide key tiles, pipelined loads)."""
    if dtype == torch.float32:
        return KernelConfig(DECODE_BLOCK_G, 32 if head_dim <= 128 else 16, 4, 2)
    return KernelConfig(DECODE_BLOCK_G, 64 if head_dim <= 128 else 32, 4, 3)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter has no SMs: plan as for an H100


def decode_num_splits(batch: int, n_heads: int, n_kv_heads: int, max_seq: int, block_n: int, sm_count: int = 132) -> int:
    """Splits per sequence for decode, from shapes only (never from kv_lens).

    Aim for two programs per SM; give each split at least _MIN_SPLIT_TOKENS cache slots
    and at most MAX_SPLITS splits; then drop the splits that rounding the split length
    up to whole tiles leaves always empty.
    """
    programs = batch * n_kv_heads * triton.cdiv(n_heads // n_kv_heads, DECODE_BLOCK_G)
    splits = min(triton.cdiv(2 * sm_count, max(programs, 1)), MAX_SPLITS, max(1, max_seq // _MIN_SPLIT_TOKENS))
    return triton.cdiv(max_seq, _split_len(max_seq, splits, block_n))


def _split_len(max_seq: int, splits: int, block_n: int) -> int:
    """Cache slots per split, a whole number of key tiles."""
    return triton.cdiv(triton.cdiv(max_seq, splits), block_n) * block_n


# --------------------------------------------------------------------------- kernels


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k, v, visible, qk_scale, MASKED: tl.constexpr):
    """Fold one key tile into the running (acc, m, l) of each query row (base-2 logits)."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet has m = -inf: shift by 0 instead, so that
    # exp2(-inf - -inf) cannot make NaN and the row keeps l = 0, acc = 0.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_ptr, kv_lens_ptr,
    qk_scale, group,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ch, stride_cs,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_begin = tl.load(cu_seqlens_ptr + seq)
    n_q = tl.load(cu_seqlens_ptr + seq + 1) - q_begin
    m0 = block * BLOCK_M
    if m0 >= n_q:  # the grid is sized for the longest sequence
        return
    kv_len = tl.load(kv_lens_ptr + seq)
    first_pos = kv_len - n_q + m0  # cache position of this block's first query row

    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    keys = tl.arange(0, BLOCK_N)
    row_ok = m0 + rows < n_q
    tok = (q_begin + m0 + rows).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + cols[None, :], mask=row_ok[:, None], other=0.0)

    kv_off = seq.to(tl.int64) * stride_cb + (head // group).to(tl.int64) * stride_ch
    k_tile = k_ptr + kv_off + keys[:, None] * stride_cs + cols[None, :]
    v_tile = v_ptr + kv_off + keys[:, None] * stride_cs + cols[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Keys below every row's position: whole tiles, no mask, no bounds check (< kv_len).
    # Clamped at 0 so that a bad kv_lens[b] < n_b cannot send the loads below the row.
    unmasked_end = tl.maximum(first_pos + 1, 0) // BLOCK_N * BLOCK_N
    for start in range(0, unmasked_end, BLOCK_N):
        k = tl.load(k_tile + start * stride_cs)
        v = tl.load(v_tile + start * stride_cs)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, None, qk_scale, MASKED=False)

    # The diagonal: key j is visible to row i when j <= position(i); padding rows past
    # n_q see keys up to the last valid row's position (their output is dropped).
    q_pos = first_pos + rows
    causal_end = tl.minimum(first_pos + BLOCK_M, kv_len)
    for start in range(unmasked_end, causal_end, BLOCK_N):
        key_pos = start + keys
        in_range = key_pos < causal_end
        # other=0: slots past the sequence may hold stale or NaN data, and 0 * NaN = NaN.
        k = tl.load(k_tile + start * stride_cs, mask=in_range[:, None], other=0.0)
        v = tl.load(v_tile + start * stride_cs, mask=in_range[:, None], other=0.0)
        visible = (key_pos[None, :] <= q_pos[:, None]) & in_range[None, :]
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, visible, qk_scale, MASKED=True)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, m_part_ptr, l_part_ptr, acc_part_ptr, kv_lens_ptr,
    qk_scale, group, n_heads, split_len,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_cb, stride_ch, stride_cs,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    split = tl.program_id(0)
    pid_h = tl.program_id(1)  # kv_head * chunks + chunk of BLOCK_G query heads
    seq = tl.program_id(2)
    chunks = tl.cdiv(group, BLOCK_G)
    kv_head = pid_h // chunks
    g = (pid_h % chunks) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < group
    heads = kv_head * group + g
    cols = tl.arange(0, HEAD_DIM)
    keys = tl.arange(0, BLOCK_N)

    q_rows = q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + cols[None, :]
    q = tl.load(q_rows, mask=g_ok[:, None], other=0.0)

    kv_off = seq.to(tl.int64) * stride_cb + kv_head.to(tl.int64) * stride_ch
    k_tile = k_ptr + kv_off + keys[:, None] * stride_cs + cols[None, :]
    v_tile = v_ptr + kv_off + keys[:, None] * stride_cs + cols[None, :]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)

    kv_len = tl.load(kv_lens_ptr + seq)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len)  # hi <= lo: an empty split, neutral partial
    for start in range(lo, hi, BLOCK_N):
        in_range = start + keys < hi
        k = tl.load(k_tile + start * stride_cs, mask=in_range[:, None], other=0.0)
        v = tl.load(v_tile + start * stride_cs, mask=in_range[:, None], other=0.0)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, in_range[None, :], qk_scale, MASKED=True)

    if SPLIT:
        n_splits = tl.num_programs(0)
        part = (seq * n_heads + heads).to(tl.int64) * n_splits + split  # [B, Hq, splits] rows
        tl.store(m_part_ptr + part, m_i, mask=g_ok)
        tl.store(l_part_ptr + part, l_i, mask=g_ok)
        tl.store(acc_part_ptr + part[:, None] * HEAD_DIM + cols[None, :], acc, mask=g_ok[:, None])
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


@triton.jit
def _decode_reduce_kernel(
    out_ptr, m_part_ptr, l_part_ptr, acc_part_ptr,
    n_heads, n_splits,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, MAX_SPLITS: tl.constexpr,
):
    head = tl.program_id(0)
    seq = tl.program_id(1)
    s = tl.arange(0, MAX_SPLITS)
    cols = tl.arange(0, HEAD_DIM)
    s_ok = s < n_splits
    part = (seq * n_heads + head).to(tl.int64) * n_splits + s
    m = tl.load(m_part_ptr + part, mask=s_ok, other=float("-inf"))
    l = tl.load(l_part_ptr + part, mask=s_ok, other=0.0)
    acc = tl.load(acc_part_ptr + part[:, None] * HEAD_DIM + cols[None, :], mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    # Empty splits carry m = -inf and weigh exp2(-inf) = 0; if all are empty (kv_len 0),
    # shift by 0 so the output is 0 rather than NaN.
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    l_sum = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(l_sum == 0.0, 1.0, l_sum)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + cols, out.to(out_ptr.dtype.element_ty))


# --------------------------------------------------------------------------- ops


@torch.library.triton_op("olmo2_fast::attention_prefill", mutates_args=())
def _attention_prefill_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          kv_lens: torch.Tensor, max_q_len: int) -> torch.Tensor:
    n_tokens, n_heads, head_dim = q.shape
    batch = kv_lens.shape[0]
    out = torch.empty((n_tokens, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if n_tokens == 0 or batch == 0 or max_q_len == 0:
        return out
    cfg = prefill_config(head_dim, q.dtype)
    grid = (triton.cdiv(max_q_len, cfg.block_m), n_heads, batch)
    with launch_device(q.device):
        torch.library.wrap_triton(_prefill_kernel)[grid](
            q, k_cache, v_cache, out, cu_seqlens_q, kv_lens,
            head_dim ** -0.5 * _LOG2E, n_heads // k_cache.shape[1],
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2),
            HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out


@torch.library.triton_op("olmo2_fast::attention_decode", mutates_args=())
def _attention_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor,
                         num_splits: int) -> torch.Tensor:
    batch, n_heads, head_dim = q.shape
    n_kv_heads, max_seq = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    out = torch.empty((batch, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    cfg = decode_config(head_dim, q.dtype)
    split = num_splits > 1
    shape = (batch, n_heads, num_splits) if split else (1,)  # placeholders when unused
    m_part = torch.empty(shape, dtype=torch.float32, device=q.device)
    l_part = torch.empty(shape, dtype=torch.float32, device=q.device)
    acc_part = torch.empty(shape + ((head_dim,) if split else ()), dtype=torch.float32, device=q.device)
    grid = (num_splits, n_kv_heads * triton.cdiv(group, cfg.block_m), batch)
    with launch_device(q.device):
        torch.library.wrap_triton(_decode_kernel)[grid](
            q, k_cache, v_cache, out, m_part, l_part, acc_part, kv_lens,
            head_dim ** -0.5 * _LOG2E, group, n_heads, _split_len(max_seq, num_splits, cfg.block_n),
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2),
            HEAD_DIM=head_dim, BLOCK_G=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=split,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if split:
            torch.library.wrap_triton(_decode_reduce_kernel)[(n_heads, batch)](
                out, m_part, l_part, acc_part, n_heads, num_splits, out.stride(0), out.stride(1),
                HEAD_DIM=head_dim, MAX_SPLITS=MAX_SPLITS, num_warps=REDUCE_NUM_WARPS,
            )
    return out


# --------------------------------------------------------------------------- launchers


def _check_common(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, op: str) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("kv_lens", kv_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be 3-D [tokens, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache and v_cache must both be [max_batch, Hkv, max_seq, D], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: q must be float32, float16 or bfloat16, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"{op}: k_cache/v_cache dtype ({k_cache.dtype}, {v_cache.dtype}) must match q ({q.dtype})")
    if kv_lens.dtype != torch.int32 or kv_lens.dim() != 1:
        raise TypeError(f"{op}: kv_lens must be a 1-D int32 tensor, got {kv_lens.dtype} of shape {tuple(kv_lens.shape)}")
    if len({t.device for t in (q, k_cache, v_cache, kv_lens)}) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got q on {q.device}, k_cache on {k_cache.device}, "
                         f"v_cache on {v_cache.device}, kv_lens on {kv_lens.device}")
    n_heads, head_dim = q.shape[1], q.shape[2]
    max_batch, n_kv_heads = k_cache.shape[0], k_cache.shape[1]
    if k_cache.shape[2] == 0:
        raise ValueError(f"{op}: the cache has no positions (max_seq == 0)")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"{op}: cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        raise ValueError(f"{op}: Hq ({n_heads}) must be a multiple of Hkv ({n_kv_heads})")
    if kv_lens.shape[0] > max_batch:
        raise ValueError(f"{op}: {kv_lens.shape[0]} sequences but the cache holds only {max_batch} rows")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError(f"{op}: q and the caches need stride(-1) == 1, got q {q.stride()}, k_cache {k_cache.stride()}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"{op}: k_cache and v_cache must have the same strides, got {k_cache.stride()} and {v_cache.stride()}")
    if kv_lens.stride(0) != 1 and kv_lens.shape[0] > 1:
        raise ValueError(f"{op}: kv_lens must be contiguous, got stride {kv_lens.stride()}")


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      kv_lens: torch.Tensor, max_q_len: int) -> torch.Tensor:
    """Causal attention of packed new tokens against the KV cache (prefill, chunked prefill).

    q: [T, Hq, D], the queries of all B sequences back to back (after norm and RoPE).
    k_cache, v_cache: [max_batch, Hkv, max_seq, D], already holding the new tokens' K/V.
    cu_seqlens_q: [B+1] int32, sequence b's queries are rows cu_seqlens_q[b]:cu_seqlens_q[b+1].
    kv_lens: [B] int32, cached positions of sequence b including its n_b new tokens; its
      queries sit at positions kv_lens[b]-n_b .. kv_lens[b]-1 and see keys 0..own position.
    max_q_len: host int >= every n_b (sizes the grid without a device sync).
    Returns out [T, Hq, D] in q's dtype.
    """
    _check_common(q, k_cache, v_cache, kv_lens, "attention_prefill")
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.dim() != 1:
        raise TypeError("attention_prefill: cu_seqlens_q must be a 1-D int32 tensor")
    if cu_seqlens_q.shape[0] != kv_lens.shape[0] + 1:
        raise ValueError(f"attention_prefill: cu_seqlens_q has {cu_seqlens_q.shape[0]} entries, "
                         f"expected B+1 = {kv_lens.shape[0] + 1} for {kv_lens.shape[0]} kv_lens")
    if cu_seqlens_q.device != q.device:
        raise ValueError(f"attention_prefill: cu_seqlens_q is on {cu_seqlens_q.device}, q on {q.device}")
    if cu_seqlens_q.stride(0) != 1 and cu_seqlens_q.shape[0] > 1:
        raise ValueError(f"attention_prefill: cu_seqlens_q must be contiguous, got stride {cu_seqlens_q.stride()}")
    if isinstance(max_q_len, bool) or not isinstance(max_q_len, int):
        raise TypeError(f"attention_prefill: max_q_len must be a host int, got {type(max_q_len).__name__}")
    if max_q_len < 0:
        raise ValueError(f"attention_prefill: max_q_len must be >= 0, got {max_q_len}")
    return torch.ops.olmo2_fast.attention_prefill(q, k_cache, v_cache, cu_seqlens_q, kv_lens, max_q_len)


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, *,
                     num_splits: int | None = None) -> torch.Tensor:
    """One new query per sequence against its cache (decode step).

    q: [B, Hq, D], sequence b's query (at position kv_lens[b]-1, its K/V already cached).
    k_cache, v_cache: [max_batch, Hkv, max_seq, D]; sequence b uses cache row b.
    kv_lens: [B] int32, cached positions of sequence b, 1 <= kv_lens[b] <= max_seq.
    num_splits: splits of the cache per sequence (flash-decoding), 1..MAX_SPLITS; default
      decode_num_splits(...) from the shapes and the GPU's SM count.
    Returns out [B, Hq, D] in q's dtype.
    """
    _check_common(q, k_cache, v_cache, kv_lens, "attention_decode")
    if kv_lens.shape[0] != q.shape[0]:
        raise ValueError(f"attention_decode: q has {q.shape[0]} sequences but kv_lens has {kv_lens.shape[0]}")
    if num_splits is None:
        num_splits = decode_num_splits(q.shape[0], q.shape[1], k_cache.shape[1], k_cache.shape[2],
                                       decode_config(q.shape[2], q.dtype).block_n, _sm_count(q.device))
    elif isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"attention_decode: num_splits must be an int or None, got {type(num_splits).__name__}")
    elif not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"attention_decode: num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    return torch.ops.olmo2_fast.attention_decode(q, k_cache, v_cache, kv_lens, num_splits)


# --------------------------------------------------------------------------- reference and roofline


def attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        kv_lens: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch attention with HF OLMo 2's eager numerics (the oracle and the CPU path).

    Same arguments as attention_prefill (decode is cu_seqlens_q = arange(B+1)). As HF:
    scores = (q @ k^T) * D**-0.5 in the input dtype, causal mask, softmax in float32 cast
    back to the dtype, then @ v; GQA repeats KV head h // G. Loops over sequences on the host.
    """
    n_heads, head_dim = q.shape[1], q.shape[2]
    group = n_heads // k_cache.shape[1]
    out = torch.zeros_like(q)
    bounds, lens = cu_seqlens_q.tolist(), kv_lens.tolist()
    for b, kv_len in enumerate(lens):
        begin, end = bounds[b], bounds[b + 1]
        n_q = end - begin
        if n_q == 0:
            continue
        qb = q[begin:end].transpose(0, 1)                                    # (Hq, n_q, D)
        kb = k_cache[b, :, :kv_len].repeat_interleave(group, dim=0)           # (Hq, kv_len, D)
        vb = v_cache[b, :, :kv_len].repeat_interleave(group, dim=0)
        scores = torch.matmul(qb, kb.transpose(1, 2)) * head_dim ** -0.5      # (Hq, n_q, kv_len)
        q_pos = torch.arange(kv_len - n_q, kv_len, device=q.device)
        hidden = torch.arange(kv_len, device=q.device)[None, :] > q_pos[:, None]
        scores = scores.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[begin:end] = torch.matmul(probs, vb).transpose(0, 1)
    return out


def attention_prefill_cost(q_lens: Sequence[int], kv_lens: Sequence[int], n_heads: int, n_kv_heads: int,
                           head_dim: int, dtype: torch.dtype) -> Cost:
    """Roofline of attention_prefill for sequences with q_lens[b] new tokens and kv_lens[b] cached.

    bytes = (2 * sum(n_b) * Hq * D  +  2 * sum(kv_len_b) * Hkv * D) * itemsize   (q, out; K and V)
    flops = 4 * D * Hq * sum_b pairs_b, pairs_b = n_b * (kv_len_b - n_b) + n_b * (n_b + 1) / 2,
    the (query, key) pairs the causal mask keeps (2 FLOPs per multiply-add, two dots).
    """
    size = itemsize(dtype)
    n_q, n_kv = sum(q_lens), sum(kv_lens)
    pairs = sum(n * (kv - n) + n * (n + 1) // 2 for n, kv in zip(q_lens, kv_lens))
    return Cost(bytes=(2 * n_q * n_heads + 2 * n_kv * n_kv_heads) * head_dim * size,
                flops=4 * head_dim * n_heads * pairs)


def attention_decode_cost(kv_lens: Sequence[int], n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> Cost:
    """Roofline of attention_decode: one query per sequence, so pairs_b = kv_len_b."""
    return attention_prefill_cost([1] * len(kv_lens), kv_lens, n_heads, n_kv_heads, head_dim, dtype)

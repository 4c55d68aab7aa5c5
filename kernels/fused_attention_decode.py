# Decode attention from the raw qkv row, in one launch per layer: all-heads QK-RMSNorm, RoPE,
# the k/v cache write, split-KV attention over the cache and the split combine.
#
# It replaces `qk_norm_rope` + `attention_decode` (+ its reduce launch) in a decode step
# (one new token per sequence); prefill keeps those kernels. Numerics are theirs, rounding
# step for rounding step: the q/k norm output rounded to the dtype before a float32 RoPE,
# float32 scores and softmax, P rounded to the value dtype for the second dot.
#
# Grid: one program per (split, KV head x chunk of BLOCK_G query heads, sequence); each serves
# all G query heads of its group (padded to BLOCK_G = 16 rows for mma, so G = 5 works). Every
# program, for one sequence b with kv_len = kv_lens[b] (read on the device):
#   1. recomputes the RMS of the WHOLE q row (Hq*D wide; OLMo 2 normalises all heads at once,
#      not per head) from L2, normalises and rotates its G heads of q in registers, at
#      position kv_len - 1 (inv_freq and sin/cos as qk_norm_rope computes them);
#   2. the last split first takes the new token: it normalises and rotates the k row (RMS of
#      the whole k row), folds the new key and value into its softmax from registers as a
#      one-visible-row tile, and (chunk 0 only: exactly one program per (sequence, KV head))
#      writes them into the cache slot kv_len - 1. Folding from registers rather than writing
#      then reading back means no program ever reads that slot, so there is nothing to order:
#      the splits read only slots < kv_len - 1, which no one writes. Folding before the K/V
#      loop keeps the k row's state out of it (folded after it, that state stayed live
#      across the loop: bf16 REG 232 instead of 128..168);
#   3. attends to its share of the cached keys 0 .. kv_len-2: the split ranges are cut from
#      the device kv_len (ceil((kv_len-1) / splits) keys each), so a 4096-slot cache holding
#      a 512-token context keeps every split busy. The split COUNT depends only on shapes
#      (batch, heads, max_seq, SM count), so the launch is CUDA-graph capturable;
#   4. writes its float32 partial (m, l, acc) for its heads to the caller's workspace, then
#      bar.sync (every thread's partial stores precede the increment) and one acq_rel,
#      gpu-scope atomic add on the (sequence, KV-head chunk) counter. The program that
#      draws splits - 1 arrived last: Triton broadcasts the scalar atomic's result through
#      shared memory after a bar.sync, which carries thread 0's acquire to the whole CTA, so
#      the partials it then loads are every split's. It combines them in split order (the
#      same fixed order whichever program arrives last: deterministic), writes out and
#      resets the counter to 0 for the next call or graph replay. No reduce launch, no float
#      atomics, no per-call allocation or memset.
# With a single split the program writes out directly and never touches the workspace.
#
# PDL (sm_90+, USE_PDL): the norm weights load before `wait_for_producer`; the qkv row,
# kv_lens, the cache and the workspace only after it. Dependents are released right after
# the wait: they still wait for this grid's completion before reading `out`, and they can
# only be scheduled once every program of this grid has issued the release (has started),
# so early-launched dependents cannot starve this grid of SMs. A
# workspace shared by all layers is safe because each launch in between waits on its
# predecessor before touching memory (kernels/pdl.py's contract), which orders this launch
# after the previous layer's counter resets.
#
# Layouts: qkv [B, (Hq + 2*Hkv) * D] (q, k, v columns; a row-strided view is fine);
# norm weights [Hq*D], [Hkv*D]; kv_lens [B] int32; caches [max_batch, Hkv, max_seq, D] with
# a contiguous last dim, sequence b in cache row b; out [B, Hq*D] contiguous (o_proj's input).
# Limits: D a power of two in 16..256; float32/float16/bfloat16 (float32 dots in IEEE
# precision; not at D = 256, see fused_attention_decode_supports). The caller promises kv_lens[b] <= max_seq (checking needs a host sync): a
# larger value is clamped to max_seq, so no value reads or writes outside row b of the cache.
# kv_lens[b] = 0 marks a padding row (a CUDA-graph bucket's unused rows): its cache row is
# neither read nor written, and its output is its own new token's v (a softmax over that one
# key), whatever sits in the cache.
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from .attention import (
    DECODE_BLOCK_G, FLOAT_DTYPES, MAX_SPLITS, SUPPORTED_HEAD_DIMS, _LOG2E, KernelConfig, _attend_tile, _sm_count,
    attention_reference, decode_config,
)
from ._launch import launch_device
from .pdl import pdl_enabled, release_dependents, wait_for_producer
from .qk_norm_rope import _sincos, _sum_of_squares, qk_norm_rope_reference
from .roofline import Cost, itemsize

# Rows of the tile that carries the new token's key through the attention dot: the smallest
# N an mma takes (only row 0 is visible).
_NEW_KEY_ROWS = tl.constexpr(16)
# Widest chunk of the q/k row one sum-of-squares step loads: 32 elements (four 16-byte
# vectors in bf16) per thread at 4 warps, so a 5120-wide q row takes two L2 round trips.
_MAX_ROW_BLOCK = 4096
# No more splits than max_seq // this: only tiny caches (tests) are cut this way, a cache of
# the published sizes (>= 256 slots at any request) never is. It keeps a 40-slot cache from
# being cut into 32 mostly empty splits.
_MIN_SPLIT_TOKENS = 16


class DecodeWorkspace(NamedTuple):
    """Caller-owned scratch of fused_attention_decode, made once (fused_attention_decode_workspace)
    and reused by every layer and every step of one batch size. The split count is its shape[2]."""
    m: torch.Tensor         # [batch, Hq, splits] float32: each split's running max (base-2 logits)
    l: torch.Tensor         # [batch, Hq, splits] float32: each split's softmax denominator
    acc: torch.Tensor       # [batch, Hq, splits, D] float32: each split's unnormalised output
    counters: torch.Tensor  # [batch, Hkv * chunks] int32: arrivals; zero between calls

    @property
    def num_splits(self) -> int:
        return self.m.shape[2]


def fused_decode_num_splits(batch: int, n_q_heads: int, n_kv_heads: int, max_seq: int, sm_count: int = 132) -> int:
    """Splits per sequence, from shapes only (never from kv_lens): at least one program per SM.

    One wave, by arithmetic (not measured on a card): each program streams K/V through
    num_stages-deep pipelined loads, 32-64 KB in flight (bf16, D = 128), above the ~20 KB
    per SM that Little's law asks at 3.35 TB/s and ~0.8 us latency; a second wave would only
    add fixed costs (row norm, partial, its share of the combine).
    Capped at MAX_SPLITS (the combine's tile) and at one split per _MIN_SPLIT_TOKENS slots.
    Batch 1, 4096 slots: 1B 9 splits (144 programs), 7B 5 (160), 13B 4 (160), 32B 17 (136).
    """
    programs = batch * n_kv_heads * triton.cdiv(n_q_heads // n_kv_heads, DECODE_BLOCK_G)
    return max(1, min(triton.cdiv(sm_count, programs), MAX_SPLITS, max_seq // _MIN_SPLIT_TOKENS))


def fused_decode_grid(batch: int, n_q_heads: int, n_kv_heads: int, num_splits: int) -> tuple[int, int, int]:
    """(splits, KV heads x chunks of DECODE_BLOCK_G query heads, sequences)."""
    return num_splits, n_kv_heads * triton.cdiv(n_q_heads // n_kv_heads, DECODE_BLOCK_G), batch


def fused_attention_decode_workspace(batch: int, n_q_heads: int, n_kv_heads: int, head_dim: int, max_seq: int,
                                     device, *, num_splits: int | None = None) -> DecodeWorkspace:
    """Allocate the workspace for decode steps of `batch` sequences (the counters zeroed, once).

    num_splits: default fused_decode_num_splits(...) with the device's SM count; 1..MAX_SPLITS.
    """
    device = torch.device(device)
    if num_splits is None:
        num_splits = fused_decode_num_splits(batch, n_q_heads, n_kv_heads, max_seq, _sm_count(device))
    elif isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"fused_attention_decode_workspace: num_splits must be an int in [1, {MAX_SPLITS}], "
                         f"got {num_splits!r}")
    if n_kv_heads < 1 or n_q_heads % n_kv_heads:
        raise ValueError(f"fused_attention_decode_workspace: Hq ({n_q_heads}) must be a multiple of Hkv ({n_kv_heads})")
    _, counters, _ = fused_decode_grid(batch, n_q_heads, n_kv_heads, num_splits)
    f32 = dict(dtype=torch.float32, device=device)
    return DecodeWorkspace(
        m=torch.empty((batch, n_q_heads, num_splits), **f32),
        l=torch.empty((batch, n_q_heads, num_splits), **f32),
        acc=torch.empty((batch, n_q_heads, num_splits, head_dim), **f32),
        counters=torch.zeros((batch, counters), dtype=torch.int32, device=device),
    )


# --------------------------------------------------------------------------- kernel


@triton.jit
def _rope_cos_sin(position, rope_theta, rope_scaling_factor, HEAD_DIM: tl.constexpr):
    """cos, sin [HEAD_DIM // 2] of one position, as qk_norm_rope: inv_freq rounded once from
    float64, freq = float32(position) * inv_freq in float32 (HF), then our float32 sincos."""
    i = tl.arange(0, HEAD_DIM // 2)
    exponent = (2 * i).to(tl.float64) / HEAD_DIM
    inv_freq = tl.exp2(-exponent * tl.log2(tl.cast(rope_theta, tl.float64))) / tl.cast(rope_scaling_factor, tl.float64)
    return _sincos(position.to(tl.float32) * inv_freq.to(tl.float32))


@triton.jit
def _load_halves(ptr, heads, head_ok, HEAD_DIM: tl.constexpr):
    """Both halves [R, D/2] (float32) of the heads `heads` [R] of a row of D-wide heads."""
    HALF: tl.constexpr = HEAD_DIM // 2
    col = heads[:, None] * HEAD_DIM + tl.arange(0, HALF)[None, :]
    first = tl.load(ptr + col, mask=head_ok[:, None], other=0.0).to(tl.float32)
    second = tl.load(ptr + col + HALF, mask=head_ok[:, None], other=0.0).to(tl.float32)
    return first, second


@triton.jit
def _norm_rope(x1, x2, w1, w2, rstd, cos, sin, DTYPE: tl.constexpr):
    """[R, D] in DTYPE: qk_norm_rope's per-element math (HF RMSNorm order, the norm output
    rounded before RoPE, rotate-half in float32) on halves [R, D/2], then the halves
    concatenated (join + permute + reshape: tl.cat may reorder)."""
    y1 = (w1 * (x1 * rstd)).to(DTYPE).to(tl.float32)
    y2 = (w2 * (x2 * rstd)).to(DTYPE).to(tl.float32)
    r1 = (y1 * cos[None, :] - y2 * sin[None, :]).to(DTYPE)
    r2 = (y2 * cos[None, :] + y1 * sin[None, :]).to(DTYPE)
    rows: tl.constexpr = r1.shape[0]
    half: tl.constexpr = r1.shape[1]
    return tl.reshape(tl.permute(tl.join(r1, r2), (0, 2, 1)), [rows, 2 * half])


@triton.jit
def _combine_splits(m_part_ptr, l_part_ptr, acc_part_ptr, part_row, n_splits,
                    HEAD_DIM: tl.constexpr, SPLITS_BLOCK: tl.constexpr):
    """Output [D] (float32) of one query head from its n_splits partials, in split order.

    No -inf guard: the last split always holds the new token, so the max is finite and the
    denominator >= 1; empty splits (m = -inf) weigh exp2(-inf) = 0.
    """
    s = tl.arange(0, SPLITS_BLOCK)
    s_ok = s < n_splits
    part = part_row * n_splits + s
    m = tl.load(m_part_ptr + part, mask=s_ok, other=float("-inf"))
    l = tl.load(l_part_ptr + part, mask=s_ok, other=0.0)
    acc = tl.load(acc_part_ptr + part[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :],
                  mask=s_ok[:, None], other=0.0)
    w = tl.math.exp2(m - tl.max(m, 0))
    return tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)


@triton.jit
def _fused_attention_decode_kernel(
    # pointers
    out_ptr, qkv_ptr, q_norm_weight_ptr, k_norm_weight_ptr, kv_lens_ptr, k_cache_ptr, v_cache_ptr,
    m_part_ptr, l_part_ptr, acc_part_ptr, counters_ptr,
    # sizes
    n_q_heads, group, max_seq,
    # strides
    stride_qkv_b, stride_out_b, stride_cache_b, stride_cache_h, stride_cache_s,
    # scalars
    eps, rope_theta, rope_scaling_factor, qk_scale,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, ROW_BLOCK: tl.constexpr,
    SPLIT: tl.constexpr, SPLITS_BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    DTYPE: tl.constexpr = k_cache_ptr.dtype.element_ty
    split = tl.program_id(0)
    pid_h = tl.program_id(1)  # kv_head * chunks + chunk of BLOCK_G query heads
    seq = tl.program_id(2)
    n_splits = tl.num_programs(0)
    chunks = tl.cdiv(group, BLOCK_G)
    kv_head = pid_h // chunks
    chunk = pid_h % chunks
    g = chunk * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < group
    heads = kv_head * group + g
    cols = tl.arange(0, HEAD_DIM)
    keys = tl.arange(0, BLOCK_N)
    q_width = n_q_heads * HEAD_DIM
    kv_width = q_width // group
    is_last_split = split == n_splits - 1

    # Prologue: the norm weights, which no predecessor writes (with PDL this overlaps its tail).
    q_w1, q_w2 = _load_halves(q_norm_weight_ptr, heads, g_ok, HEAD_DIM)
    kv_row = kv_head + tl.zeros([1], tl.int32)  # the new token's KV head as a 1-row tile
    k_w1, k_w2 = _load_halves(k_norm_weight_ptr, kv_row, kv_row >= 0, HEAD_DIM)

    wait_for_producer(USE_PDL)
    release_dependents(USE_PDL)

    kv_len = tl.minimum(tl.load(kv_lens_ptr + seq), max_seq)
    position = kv_len - 1  # of the new token; -1 in a padding row, which writes nothing
    q_row = qkv_ptr + seq.to(tl.int64) * stride_qkv_b
    k_row = q_row + q_width
    v_row = k_row + kv_width

    cos, sin = _rope_cos_sin(position, rope_theta, rope_scaling_factor, HEAD_DIM)
    q_rstd = tl.math.rsqrt(_sum_of_squares(q_row, q_width, ROW_BLOCK) / q_width + eps)
    q_x1, q_x2 = _load_halves(q_row, heads, g_ok, HEAD_DIM)
    q = _norm_rope(q_x1, q_x2, q_w1, q_w2, q_rstd, cos, sin, DTYPE)  # [BLOCK_G, D]

    cache_off = seq.to(tl.int64) * stride_cache_b + kv_head.to(tl.int64) * stride_cache_h
    k_tile = k_cache_ptr + cache_off + keys[:, None] * stride_cache_s + cols[None, :]
    v_tile = v_cache_ptr + cache_off + keys[:, None] * stride_cache_s + cols[None, :]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)

    if is_last_split:
        k_rstd = tl.math.rsqrt(_sum_of_squares(k_row, kv_width, ROW_BLOCK) / kv_width + eps)
        k_x1, k_x2 = _load_halves(k_row, kv_row, kv_row >= 0, HEAD_DIM)
        k_new = _norm_rope(k_x1, k_x2, k_w1, k_w2, k_rstd, cos, sin, DTYPE)  # [1, D]
        v_new = tl.load(v_row + kv_head * HEAD_DIM + cols[None, :])          # [1, D]
        new_key = tl.arange(0, _NEW_KEY_ROWS) == 0  # the one visible row of the fold tile
        k_fold = tl.broadcast_to(k_new, [_NEW_KEY_ROWS, HEAD_DIM])
        v_fold = tl.where(new_key[:, None], v_new, 0.0).to(DTYPE)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_fold, v_fold, new_key[None, :], qk_scale, MASKED=True)
        slot = cache_off + position.to(tl.int64) * stride_cache_s + cols[None, :]
        write = (chunk == 0) & (position >= 0)
        tl.store(k_cache_ptr + slot, k_new, mask=write)
        tl.store(v_cache_ptr + slot, v_new, mask=write)

    # This split's share of the cached keys 0 .. kv_len-2, cut from the device kv_len.
    n_cached = kv_len - 1
    split_len = tl.cdiv(n_cached, n_splits)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, n_cached)  # hi <= lo: an empty split, neutral partial
    for start in range(lo, hi, BLOCK_N):
        in_range = start + keys < hi
        # other=0: slots past the range may hold stale or NaN data, and 0 * NaN = NaN.
        k = tl.load(k_tile + start * stride_cache_s, mask=in_range[:, None], other=0.0)
        v = tl.load(v_tile + start * stride_cache_s, mask=in_range[:, None], other=0.0)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, in_range[None, :], qk_scale, MASKED=True)

    out_rows = out_ptr + seq.to(tl.int64) * stride_out_b
    if SPLIT:
        part = (seq * n_q_heads + heads).to(tl.int64) * n_splits + split  # [B, Hq, splits] rows
        tl.store(m_part_ptr + part, m_i, mask=g_ok)
        tl.store(l_part_ptr + part, l_i, mask=g_ok)
        tl.store(acc_part_ptr + part[:, None] * HEAD_DIM + cols[None, :], acc, mask=g_ok[:, None])
        # Every thread's partial stores before thread 0's release: Triton does not promise a
        # barrier before an atomic (triton PR 6307), so make one.
        tl.debug_barrier()
        counter = counters_ptr + seq * tl.num_programs(1) + pid_h
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == n_splits - 1:
            for i in range(0, tl.minimum(group - chunk * BLOCK_G, BLOCK_G)):
                head = kv_head * group + chunk * BLOCK_G + i
                out = _combine_splits(m_part_ptr, l_part_ptr, acc_part_ptr, (seq * n_q_heads + head).to(tl.int64),
                                      n_splits, HEAD_DIM, SPLITS_BLOCK)
                tl.store(out_rows + head * HEAD_DIM + cols, out.to(DTYPE))
            tl.store(counter, 0)
    else:
        out = acc / l_i[:, None]  # l_i >= 1: the new token is always visible
        tl.store(out_rows + heads[:, None] * HEAD_DIM + cols[None, :], out.to(DTYPE), mask=g_ok[:, None])


# --------------------------------------------------------------------------- op and launcher


def _row_block(n_q_heads: int, head_dim: int) -> int:
    """Elements per sum-of-squares step: the q row (the wider of q and k) in as few steps as
    _MAX_ROW_BLOCK allows."""
    return min(triton.next_power_of_2(n_q_heads * head_dim), _MAX_ROW_BLOCK)


def fused_attention_decode_supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the launcher takes (head_dim, dtype): SUPPORTED_HEAD_DIMS x FLOAT_DTYPES except
    float32 at D = 256, whose IEEE dots (FMA units, whole operand rows per thread) spill with
    every tile and warp count tried (sm_80: REG 255, STACK 48..1456). No OLMo 2 size has
    D = 256; a model that does keeps qk_norm_rope + attention_decode for its decode steps."""
    return head_dim in SUPPORTED_HEAD_DIMS and dtype in FLOAT_DTYPES and not (dtype == torch.float32 and head_dim == 256)


def fused_decode_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """attention_decode's tiles (decode_config), adjusted where this kernel's compile reports
    (tests/test_kernel_fused_attention_decode.py) showed spills:
      * float32, D >= 64: 8 warps. Its IEEE dots hold whole operand rows per thread, and with
        the norm/RoPE prologue 4 warps spill at D = 128 whatever the key tile (REG 255,
        STACK 80..224); 8 warps: REG 166..174. At D = 32 it is the reverse (8 warps: REG 64
        STACK 8; 4 warps: REG 96, none), so D <= 32 keeps 4;
      * D = 16: 32-key tiles in 16-bit, 16-key tiles in float32 (the defaults, 64 and 32,
        left two registers spilled on sm_80: REG 64..96, STACK 8).
    """
    cfg = decode_config(head_dim, dtype)
    if dtype == torch.float32 and head_dim >= 64:
        cfg = cfg._replace(num_warps=8)
    if head_dim == 16:
        cfg = cfg._replace(block_n=16 if dtype == torch.float32 else 32)
    return cfg


def kernel_meta(n_q_heads: int, head_dim: int, dtype: torch.dtype, num_splits: int, use_pdl: bool) -> dict:
    """The meta-parameters and launch options the launcher passes: the one place tests read them."""
    cfg = fused_decode_config(head_dim, dtype)
    return dict(HEAD_DIM=head_dim, BLOCK_G=cfg.block_m, BLOCK_N=cfg.block_n, ROW_BLOCK=_row_block(n_q_heads, head_dim),
                SPLIT=num_splits > 1, SPLITS_BLOCK=triton.next_power_of_2(num_splits), USE_PDL=use_pdl,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@torch.library.triton_op("olmo2_fast::fused_attention_decode",
                         mutates_args=("k_cache", "v_cache", "m_part", "l_part", "acc_part", "counters"))
def _fused_attention_decode_op(
    qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, kv_lens: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, m_part: torch.Tensor, l_part: torch.Tensor, acc_part: torch.Tensor,
    counters: torch.Tensor, eps: float, rope_theta: float, rope_scaling_factor: float,
) -> torch.Tensor:
    batch = qkv.shape[0]
    _, n_kv_heads, max_seq, head_dim = k_cache.shape
    n_q_heads = q_norm_weight.shape[0] // head_dim
    num_splits = m_part.shape[2]
    out = torch.empty((batch, n_q_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    if batch == 0:
        return out
    use_pdl = pdl_enabled(qkv.device)
    grid = fused_decode_grid(batch, n_q_heads, n_kv_heads, num_splits)
    with launch_device(qkv.device):
        torch.library.wrap_triton(_fused_attention_decode_kernel)[grid](
            out, qkv, q_norm_weight, k_norm_weight, kv_lens, k_cache, v_cache, m_part, l_part, acc_part, counters,
            n_q_heads, n_q_heads // n_kv_heads, max_seq,
            qkv.stride(0), out.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            eps, rope_theta, rope_scaling_factor, head_dim ** -0.5 * _LOG2E,
            launch_pdl=use_pdl, **kernel_meta(n_q_heads, head_dim, qkv.dtype, num_splits, use_pdl),
        )
    return out


def _check(cond: bool, message: str, error=ValueError):
    if not cond:
        raise error(f"fused_attention_decode: {message}")


def fused_attention_decode(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                           kv_lens: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           workspace: DecodeWorkspace, *, eps: float, rope_theta: float,
                           rope_scaling_factor: float = 1.0) -> torch.Tensor:
    """One decode step's attention for a layer, from the fused qkv projection rows.

    qkv:           [B, (Hq + 2*Hkv) * D]  q, k, v columns of each sequence's new token (row stride free)
    q_norm_weight: [Hq * D], k_norm_weight: [Hkv * D]  same dtype as qkv
    kv_lens:       [B] int32  cached positions of sequence b after this step, new token included
                   (<= max_seq, not checked: that needs a host sync); the new token sits at
                   position kv_lens[b] - 1. 0 marks a padding row: its cache row is neither
                   read nor written, its output is its new token's v
    k_cache, v_cache: [max_batch, Hkv, max_seq, D]  sequence b is row b; slot kv_lens[b]-1 is
                   written with the new token's k (normed, rotated) and v, nothing else is
    workspace:     fused_attention_decode_workspace(batch >= B, Hq, Hkv, D, ...) on the same device;
                   its counters must be zero (they are after every call)
    eps, rope_theta, rope_scaling_factor: from config.json (linear scaling divides inv_freq).
    Returns out [B, Hq * D] in qkv's dtype, ready for o_proj.
    """
    tensors = dict(qkv=qkv, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, kv_lens=kv_lens,
                   k_cache=k_cache, v_cache=v_cache)
    for name, tensor in tensors.items():
        _check(isinstance(tensor, torch.Tensor), f"{name} must be a torch.Tensor, got {type(tensor).__name__}", TypeError)
    _check(isinstance(workspace, DecodeWorkspace) and all(isinstance(t, torch.Tensor) for t in workspace),
           f"workspace must be a DecodeWorkspace from fused_attention_decode_workspace, got {type(workspace).__name__}",
           TypeError)
    tensors.update(("workspace." + name, t) for name, t in workspace._asdict().items())
    devices = {t.device for t in tensors.values()}
    _check(len(devices) == 1, f"all tensors must be on one device, got {sorted(map(str, devices))}")
    _check(qkv.dtype in FLOAT_DTYPES, f"qkv must be float32, float16 or bfloat16, got {qkv.dtype}", TypeError)
    for name in ("q_norm_weight", "k_norm_weight", "k_cache", "v_cache"):
        _check(tensors[name].dtype == qkv.dtype, f"{name} dtype {tensors[name].dtype} != qkv dtype {qkv.dtype}", TypeError)
    _check(kv_lens.dtype == torch.int32 and kv_lens.dim() == 1,
           f"kv_lens must be a 1-D int32 tensor, got {kv_lens.dtype} of shape {tuple(kv_lens.shape)}", TypeError)
    for name in ("workspace.m", "workspace.l", "workspace.acc"):
        _check(tensors[name].dtype == torch.float32, f"{name} must be float32, got {tensors[name].dtype}", TypeError)
    _check(workspace.counters.dtype == torch.int32, f"workspace.counters must be int32, got {workspace.counters.dtype}",
           TypeError)

    _check(k_cache.dim() == 4, f"k_cache must be [max_batch, Hkv, max_seq, D], got shape {tuple(k_cache.shape)}")
    _check(v_cache.shape == k_cache.shape, f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    max_batch, n_kv_heads, max_seq, head_dim = k_cache.shape
    _check(head_dim in SUPPORTED_HEAD_DIMS, f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    _check(fused_attention_decode_supports(head_dim, qkv.dtype),
           f"float32 with head_dim {head_dim} is not supported (it spills on every config): use qk_norm_rope + "
           "attention_decode")
    _check(n_kv_heads > 0 and max_seq > 0, f"the cache needs at least one KV head and one position, got {tuple(k_cache.shape)}")
    _check(q_norm_weight.dim() == 1 and q_norm_weight.shape[0] % (n_kv_heads * head_dim) == 0 and q_norm_weight.shape[0] > 0,
           f"q_norm_weight must be [Hq * D] with Hq a multiple of Hkv={n_kv_heads}, D={head_dim}, "
           f"got {tuple(q_norm_weight.shape)}")
    n_q_heads = q_norm_weight.shape[0] // head_dim
    _check(k_norm_weight.shape == (n_kv_heads * head_dim,),
           f"k_norm_weight must be [Hkv * D] = [{n_kv_heads * head_dim}], got {tuple(k_norm_weight.shape)}")
    qkv_width = (n_q_heads + 2 * n_kv_heads) * head_dim
    _check(qkv.dim() == 2 and qkv.shape[1] == qkv_width,
           f"qkv must be [B, (Hq + 2*Hkv) * D] = [B, {qkv_width}], got shape {tuple(qkv.shape)}")
    batch = qkv.shape[0]
    _check(kv_lens.shape == (batch,), f"kv_lens must be [B] = [{batch}], got shape {tuple(kv_lens.shape)}")
    _check(batch <= max_batch, f"{batch} sequences but the cache holds only {max_batch} rows")
    for name, tensor in tensors.items():
        _check(tensor.stride(-1) == 1 or tensor.numel() <= 1,
               f"{name} must have a contiguous last dimension, got strides {tensor.stride()}")
    _check(k_cache.stride() == v_cache.stride(),
           f"k_cache and v_cache must have the same strides, got {k_cache.stride()} and {v_cache.stride()}")

    make = "make it with fused_attention_decode_workspace"
    _check(workspace.m.dim() == 3 and workspace.m.shape[0] >= batch and workspace.m.shape[1] == n_q_heads
           and 1 <= workspace.m.shape[2] <= MAX_SPLITS,
           f"workspace.m must be [batch >= {batch}, Hq = {n_q_heads}, splits in 1..{MAX_SPLITS}], got "
           f"{tuple(workspace.m.shape)}: {make}")
    ws_batch, _, num_splits = workspace.m.shape
    _, counters, _ = fused_decode_grid(ws_batch, n_q_heads, n_kv_heads, num_splits)
    shapes = dict(m=(ws_batch, n_q_heads, num_splits), l=(ws_batch, n_q_heads, num_splits),
                  acc=(ws_batch, n_q_heads, num_splits, head_dim), counters=(ws_batch, counters))
    for name, shape in shapes.items():
        tensor = tensors["workspace." + name]
        _check(tuple(tensor.shape) == shape,
               f"workspace.{name} must be {list(shape)} to match workspace.m and the cache, got {tuple(tensor.shape)}: {make}")
        _check(tensor.is_contiguous(), f"workspace.{name} must be contiguous: {make}")
    return torch.ops.olmo2_fast.fused_attention_decode(
        qkv, q_norm_weight, k_norm_weight, kv_lens, k_cache, v_cache, *workspace,
        float(eps), float(rope_theta), float(rope_scaling_factor))


# --------------------------------------------------------------------------- reference and roofline


def fused_attention_decode_reference(qkv, q_norm_weight, k_norm_weight, kv_lens, k_cache, v_cache, *,
                                     eps: float, rope_theta: float, rope_scaling_factor: float = 1.0) -> torch.Tensor:
    """Plain PyTorch from the unfused twins: qk_norm_rope_reference at positions kv_lens - 1
    (writes the caches), then attention_reference. float64 in, float64 math out."""
    batch = qkv.shape[0]
    rows = torch.arange(batch, dtype=torch.int32, device=qkv.device)
    q = qk_norm_rope_reference(qkv, q_norm_weight, k_norm_weight, kv_lens - 1, rows, k_cache, v_cache,
                               eps=eps, rope_theta=rope_theta, rope_scaling_factor=rope_scaling_factor)
    cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=qkv.device)
    return attention_reference(q, k_cache, v_cache, cu_seqlens, kv_lens).flatten(1)


def fused_attention_decode_cost(kv_lens: Sequence[int], n_q_heads: int, n_kv_heads: int, head_dim: int,
                                dtype: torch.dtype) -> Cost:
    """Roofline of one call (minimum HBM traffic; the workspace stays in L2).

    bytes = (B*(Hq + 2*Hkv)*D        qkv rows
             + (Hq + Hkv)*D          norm weights
             + 2*sum(kv_len_b - 1)*Hkv*D   cached K and V read (the new token comes from registers)
             + 2*B*Hkv*D             the new k, v written
             + B*Hq*D) * itemsize    out
            + 4*B                    kv_lens
    flops = 7*B*(Hq + Hkv)*D         norm + RoPE (qk_norm_rope_cost's count)
            + 4*D*Hq*sum(kv_len_b)   two dots over every visible key, the new one included
    """
    batch, q_width, kv_width = len(kv_lens), n_q_heads * head_dim, n_kv_heads * head_dim
    cached = sum(kv_lens) - batch
    elements = (batch * (q_width + 2 * kv_width) + q_width + kv_width + 2 * cached * kv_width
                + 2 * batch * kv_width + batch * q_width)
    return Cost(bytes=elements * itemsize(dtype) + 4 * batch,
                flops=7 * batch * (q_width + kv_width) + 4 * head_dim * n_q_heads * sum(kv_lens))

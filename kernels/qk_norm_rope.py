# QK-norm + RoPE + KV-cache write for OLMo 2 attention, in one launch.
#
# Algorithm (one program per token t; q, k, v are slices of the fused qkv row):
#   pass 1  sum of squares over the WHOLE q row (Hq*D wide) and the whole k row (Hkv*D):
#           OLMo 2 normalises all heads at once, not per head;
#   pass 2  head block by head block: y = (w * (x * rstd)).to(dtype)   (HF RMSNorm order),
#           then non-interleaved RoPE in float32:
#             out[:D/2] = y1*cos - y2*sin,  out[D/2:] = y2*cos + y1*sin,
#           q -> q[t, h, :],  k -> k_cache[seq_ids[t], h, positions[t], :],
#           v (copied unchanged) -> v_cache[seq_ids[t], h, positions[t], :].
# The row is read twice (the second time from L1/L2) instead of being held in
# registers: a 5120-wide q row would need 40+ float32 registers per thread on top of
# the k row, and the loops keep the register count independent of the width.
#
# RoPE follows HF: inv_freq = 1 / theta^(2i/D) / factor (linear scaling), then
# freq = float32(position) * inv_freq in float32, then cos/sin of that float32 value.
# inv_freq is computed in float64 and rounded once. cos/sin come from our own sincos
# (a float64 reduction modulo pi/2, then float32 polynomials on [-pi/4, pi/4]), not
# from tl.cos/tl.sin: those lower to libdevice __nv_cosf/__nv_sinf whose Payne-Hanek
# slow path keeps a local array (STACK 32 in the cubin, indistinguishable from a spill)
# and adds a branch. The float64 reduction stays exact to ~1e-7 rad for every int32
# position (inv_freq <= 1).
#
# Layouts: qkv [T, (Hq + 2*Hkv) * D] (q columns, then k, then v), last dim contiguous;
# norm weights [Hq*D] and [Hkv*D]; positions/seq_ids [T] int32; caches
# [max_batch, Hkv, max_seq, D] with a contiguous last dim; q out [T, Hq, D] contiguous.
# Any GQA group (Hq % Hkv == 0 is not even required here), any even D; widths need not
# be powers of two (masked head blocks and row chunks).
# Limits: the caller guarantees 0 <= positions[t] < max_seq and
# 0 <= seq_ids[t] < max_batch (checking would need a host sync), and that no two
# tokens address the same cache slot.
import torch
import triton
import triton.language as tl

from ..reference import apply_rope, compute_dtype, rms_norm, rope_cos_sin, rope_inv_freq
from ._launch import launch_device
from .roofline import Cost, itemsize

# Elements each thread handles per load: 8 x 2 bytes = one 16-byte vector in bf16/fp16.
_ELEMS_PER_THREAD = 8


@triton.jit
def _sincos(freq):
    """cos(freq), sin(freq) for float32 freq >= 0, to about one float32 ulp."""
    x = freq.to(tl.float64)
    # Quadrant j and remainder r = x - j*pi/2 in [-pi/4, pi/4]; float64 keeps r exact
    # to ~1e-16 * j, far below float32 resolution.
    j = tl.floor(x * tl.full([], 0.6366197723675814, tl.float64) + 0.5)
    r = (x - j * tl.full([], 1.5707963267948966, tl.float64)).to(tl.float32)
    z = r * r
    # Cephes sinf/cosf minimax polynomials on [-pi/4, pi/4].
    s = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
    c = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5))
    quadrant = j.to(tl.int32) & 3
    odd = (quadrant & 1) == 1
    cos = tl.where(odd, s, c)
    sin = tl.where(odd, c, s)
    cos = tl.where((quadrant == 1) | (quadrant == 2), -cos, cos)
    sin = tl.where(quadrant >= 2, -sin, sin)
    return cos, sin


@triton.jit
def _sum_of_squares(row_ptr, width, ROW_BLOCK: tl.constexpr):
    offs = tl.arange(0, ROW_BLOCK)
    acc = tl.zeros([ROW_BLOCK], dtype=tl.float32)
    for start in range(0, width, ROW_BLOCK):
        x = tl.load(row_ptr + start + offs, mask=start + offs < width, other=0.0).to(tl.float32)
        acc += x * x
    return tl.sum(acc, axis=0)


@triton.jit
def _norm_rope_heads(
    src_ptr, weight_ptr, dst_ptr,
    n_heads,
    dst_stride_h,
    rstd, cos, sin,
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, HEADS_BLOCK: tl.constexpr,
):
    """Normalise (HF RMSNorm order), rotate and store n_heads heads of one token."""
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HALF_BLOCK)[None, :]
    for h0 in range(0, n_heads, HEADS_BLOCK):
        h = h0 + tl.arange(0, HEADS_BLOCK)[:, None]
        mask = (h < n_heads) & (d < HALF)
        col = h * HEAD_DIM + d
        x1 = tl.load(src_ptr + col, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src_ptr + col + HALF, mask=mask, other=0.0).to(tl.float32)
        w1 = tl.load(weight_ptr + col, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(weight_ptr + col + HALF, mask=mask, other=0.0).to(tl.float32)
        # HF rounds the norm output to the model dtype before RoPE.
        y1 = (w1 * (x1 * rstd)).to(dst_ptr.dtype.element_ty).to(tl.float32)
        y2 = (w2 * (x2 * rstd)).to(dst_ptr.dtype.element_ty).to(tl.float32)
        out = dst_ptr + h.to(tl.int64) * dst_stride_h + d
        tl.store(out, (y1 * cos - y2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(out + HALF, (y2 * cos + y1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    # pointers
    q_ptr, qkv_ptr, q_weight_ptr, k_weight_ptr, positions_ptr, seq_ids_ptr, k_cache_ptr, v_cache_ptr,
    # sizes
    n_q_heads, n_kv_heads,
    # strides
    stride_q_t, stride_q_h, stride_qkv_t,
    stride_kc_b, stride_kc_h, stride_kc_s,
    stride_vc_b, stride_vc_h, stride_vc_s,
    # scalars
    eps, rope_theta, rope_scaling_factor,
    # meta-parameters
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, HEADS_BLOCK: tl.constexpr, ROW_BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + t)
    seq = tl.load(seq_ids_ptr + t).to(tl.int64)
    q_width = n_q_heads * HEAD_DIM
    kv_width = n_kv_heads * HEAD_DIM
    q_row = qkv_ptr + t * stride_qkv_t
    k_row = q_row + q_width
    v_row = k_row + kv_width

    q_rstd = tl.math.rsqrt(_sum_of_squares(q_row, q_width, ROW_BLOCK) / q_width + eps)
    k_rstd = tl.math.rsqrt(_sum_of_squares(k_row, kv_width, ROW_BLOCK) / kv_width + eps)

    # inv_freq rounded once from float64; freq multiplied in float32 as HF does.
    i = tl.arange(0, HALF_BLOCK)
    exponent = (2 * i).to(tl.float64) / HEAD_DIM
    inv_freq = tl.exp2(-exponent * tl.log2(tl.cast(rope_theta, tl.float64))) / tl.cast(rope_scaling_factor, tl.float64)
    cos, sin = _sincos(position.to(tl.float32) * inv_freq.to(tl.float32))
    cos = cos[None, :]
    sin = sin[None, :]

    _norm_rope_heads(q_row, q_weight_ptr, q_ptr + t * stride_q_t, n_q_heads, stride_q_h, q_rstd, cos, sin,
                     HEAD_DIM, HALF_BLOCK, HEADS_BLOCK)
    k_dst = k_cache_ptr + seq * stride_kc_b + position.to(tl.int64) * stride_kc_s
    _norm_rope_heads(k_row, k_weight_ptr, k_dst, n_kv_heads, stride_kc_h, k_rstd, cos, sin,
                     HEAD_DIM, HALF_BLOCK, HEADS_BLOCK)

    v_dst = v_cache_ptr + seq * stride_vc_b + position.to(tl.int64) * stride_vc_s
    d = tl.arange(0, 2 * HALF_BLOCK)[None, :]
    for h0 in range(0, n_kv_heads, HEADS_BLOCK):
        h = h0 + tl.arange(0, HEADS_BLOCK)[:, None]
        mask = (h < n_kv_heads) & (d < HEAD_DIM)
        v = tl.load(v_row + h * HEAD_DIM + d, mask=mask)
        tl.store(v_dst + h.to(tl.int64) * stride_vc_h + d, v, mask=mask)


def _config(n_q_heads: int, n_kv_heads: int, head_dim: int) -> dict:
    """Meta-parameters and num_warps the launcher uses for a model shape.

    Eight warps once the q row passes 2048 elements (7B/13B/32B) so a decode token's
    rows take few load rounds; each thread loads 8 contiguous elements (16 bytes in
    bf16) in both passes, which keeps ~60 registers per thread whatever the width.
    """
    num_warps = 4 if n_q_heads * head_dim <= 2048 else 8
    row_block = num_warps * 32 * _ELEMS_PER_THREAD
    half_block = triton.next_power_of_2(head_dim // 2)
    heads_block = min(max(1, row_block // half_block), triton.next_power_of_2(max(n_q_heads, n_kv_heads)))
    return dict(HEAD_DIM=head_dim, HALF_BLOCK=half_block, HEADS_BLOCK=heads_block, ROW_BLOCK=row_block,
                num_warps=num_warps)


@torch.library.triton_op("olmo2_fast::qk_norm_rope", mutates_args=("k_cache", "v_cache"))
def _qk_norm_rope_op(
    qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
    positions: torch.Tensor, seq_ids: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    eps: float, rope_theta: float, rope_scaling_factor: float,
) -> torch.Tensor:
    n_tokens = qkv.shape[0]
    _, n_kv_heads, _, head_dim = k_cache.shape
    n_q_heads = q_norm_weight.shape[0] // head_dim
    q = torch.empty((n_tokens, n_q_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if n_tokens == 0:
        return q
    with launch_device(qkv.device):
        torch.library.wrap_triton(_qk_norm_rope_kernel)[(n_tokens,)](
            q, qkv, q_norm_weight, k_norm_weight, positions, seq_ids, k_cache, v_cache,
            n_q_heads, n_kv_heads,
            q.stride(0), q.stride(1), qkv.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            eps, rope_theta, rope_scaling_factor,
            **_config(n_q_heads, n_kv_heads, head_dim),
        )
    return q


def _check(cond: bool, message: str, error=ValueError):
    if not cond:
        raise error(message)


def qk_norm_rope(qkv, q_norm_weight, k_norm_weight, positions, seq_ids, k_cache, v_cache, *,
                 eps: float, rope_theta: float, rope_scaling_factor: float = 1.0) -> torch.Tensor:
    """RMSNorm q and k over all heads, apply RoPE, write k and v into the cache; return q.

    qkv:           [T, (Hq + 2*Hkv) * D]  fused projection output, q then k then v columns
    q_norm_weight: [Hq * D]               q_norm weight, same dtype as qkv
    k_norm_weight: [Hkv * D]              k_norm weight, same dtype as qkv
    positions:     [T] int32              position of each token in its sequence (< max_seq)
    seq_ids:       [T] int32              cache row (sequence) of each token (< max_batch)
    k_cache:       [max_batch, Hkv, max_seq, D]  written at [seq_ids[t], :, positions[t], :]
    v_cache:       [max_batch, Hkv, max_seq, D]  same
    eps, rope_theta, rope_scaling_factor: from config.json (linear RoPE scaling divides
        inv_freq by the factor; 1.0 means none).
    Returns q [T, Hq, D] contiguous, normalised and rotated. Position/sequence ranges are
    not checked (that needs a host sync): the caller guarantees them.
    """
    tensors = dict(qkv=qkv, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, positions=positions,
                   seq_ids=seq_ids, k_cache=k_cache, v_cache=v_cache)
    for name, tensor in tensors.items():
        _check(isinstance(tensor, torch.Tensor), f"{name} must be a tensor", TypeError)
    devices = {t.device for t in tensors.values()}
    _check(len(devices) == 1, f"all tensors must be on one device, got {sorted(map(str, devices))}")
    _check(qkv.dtype in (torch.float32, torch.float16, torch.bfloat16),
           f"qkv must be float32/float16/bfloat16, got {qkv.dtype}", TypeError)
    for name in ("q_norm_weight", "k_norm_weight", "k_cache", "v_cache"):
        _check(tensors[name].dtype == qkv.dtype, f"{name} dtype {tensors[name].dtype} != qkv dtype {qkv.dtype}",
               TypeError)
    for name in ("positions", "seq_ids"):
        _check(tensors[name].dtype == torch.int32, f"{name} must be int32, got {tensors[name].dtype}", TypeError)
    _check(qkv.dim() == 2, f"qkv must be [T, (Hq + 2*Hkv) * D], got shape {tuple(qkv.shape)}")
    _check(k_cache.dim() == 4, f"k_cache must be [max_batch, Hkv, max_seq, D], got {tuple(k_cache.shape)}")
    _check(v_cache.shape == k_cache.shape, f"v_cache shape {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    _, n_kv_heads, _, head_dim = k_cache.shape
    _check(head_dim % 2 == 0 and head_dim > 0, f"head_dim must be even, got {head_dim}")
    _check(n_kv_heads > 0, f"k_cache must have at least one KV head, got {tuple(k_cache.shape)}")
    _check(q_norm_weight.dim() == 1 and q_norm_weight.shape[0] % head_dim == 0 and q_norm_weight.shape[0] > 0,
           f"q_norm_weight must be [Hq * D] with D={head_dim}, got {tuple(q_norm_weight.shape)}")
    _check(k_norm_weight.shape == (n_kv_heads * head_dim,),
           f"k_norm_weight must be [Hkv * D] = [{n_kv_heads * head_dim}], got {tuple(k_norm_weight.shape)}")
    qkv_width = q_norm_weight.shape[0] + 2 * n_kv_heads * head_dim
    _check(qkv.shape[1] == qkv_width,
           f"qkv has {qkv.shape[1]} columns, expected Hq*D + 2*Hkv*D = {qkv_width} from the weights and cache")
    n_tokens = qkv.shape[0]
    for name in ("positions", "seq_ids"):
        _check(tensors[name].shape == (n_tokens,), f"{name} must be [T] = [{n_tokens}], got {tuple(tensors[name].shape)}")
    for name, tensor in tensors.items():
        _check(tensor.stride(-1) == 1 or tensor.numel() <= 1,
               f"{name} must have a contiguous last dimension, got strides {tensor.stride()}")
    return torch.ops.olmo2_fast.qk_norm_rope(qkv, q_norm_weight, k_norm_weight, positions, seq_ids, k_cache, v_cache,
                                             float(eps), float(rope_theta), float(rope_scaling_factor))


def qk_norm_rope_reference(qkv, q_norm_weight, k_norm_weight, positions, seq_ids, k_cache, v_cache, *,
                           eps: float, rope_theta: float, rope_scaling_factor: float = 1.0) -> torch.Tensor:
    """Plain-PyTorch qk_norm_rope from the model reference's pieces (HF OLMo 2 numerics; float64 in,
    float64 math out)."""
    n_tokens = qkv.shape[0]
    _, n_kv_heads, _, head_dim = k_cache.shape
    n_q_heads = q_norm_weight.shape[0] // head_dim
    q, k, v = qkv.split([n_q_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    q = rms_norm(q, q_norm_weight, eps).view(n_tokens, n_q_heads, head_dim)
    k = rms_norm(k, k_norm_weight, eps).view(n_tokens, n_kv_heads, head_dim)
    inv_freq = rope_inv_freq(head_dim, rope_theta, rope_scaling_factor, dtype=compute_dtype(qkv.dtype))
    cos, sin = rope_cos_sin(positions, inv_freq)                  # (T, D)
    cos, sin = cos[:, None, :], sin[:, None, :]                   # broadcast over heads
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    seq, pos = seq_ids.long(), positions.long()
    k_cache[seq, :, pos, :] = k
    v_cache[seq, :, pos, :] = v.reshape(n_tokens, n_kv_heads, head_dim)
    return q


def qk_norm_rope_cost(n_tokens: int, n_q_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> Cost:
    """Bytes: read qkv, both weights and the int32 metadata, write q, k and v.
    FLOPs per q/k element: square-and-add, two scalings (rstd, weight), RoPE's two
    multiplies and one add = 7; v is copied."""
    q_width, kv_width = n_q_heads * head_dim, n_kv_heads * head_dim
    size = itemsize(dtype)
    read = n_tokens * (q_width + 2 * kv_width) * size + (q_width + kv_width) * size + 2 * 4 * n_tokens
    written = n_tokens * (q_width + 2 * kv_width) * size
    return Cost(bytes=read + written, flops=7 * n_tokens * (q_width + kv_width))

# SwiGLU activation of the fused gate/up projection: out = silu(gate) * up.
#
# Algorithm: a 2-D grid (token, column block); each program loads BLOCK gate and up
# values of one row and writes BLOCK outputs. Numerics follow torch's
# `F.silu(gate) * up` in the model dtype: silu is computed in float32 and rounded to
# the dtype, then the product is computed in float32 and rounded again.
#
# Layouts: gate_up [T, 2*I] (gate columns first, then up), contiguous last dim, any
# row stride; out [T, I] contiguous. Limits: none beyond int32 column counts.
import torch
import triton
import triton.language as tl

from ._launch import launch_device
from .roofline import Cost, itemsize

# 1024 columns over 4 warps: 8 per thread, one 16-byte vector per load in bf16/fp16.
_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _swiglu_kernel(
    # pointers
    out_ptr, gate_up_ptr,
    # sizes
    n_cols,
    # strides
    stride_out, stride_gate_up,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate_ptr = gate_up_ptr + row * stride_gate_up + cols
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + n_cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def _config(n_cols: int) -> dict:
    block = min(_BLOCK, triton.next_power_of_2(n_cols))
    return dict(BLOCK=block, num_warps=min(_NUM_WARPS, max(1, block // 256)))


@torch.library.triton_op("olmo2_fast::swiglu", mutates_args=())
def _swiglu_op(gate_up: torch.Tensor) -> torch.Tensor:
    n_tokens, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((n_tokens, n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if n_tokens == 0:
        return out
    config = _config(n_cols)
    grid = (n_tokens, triton.cdiv(n_cols, config["BLOCK"]))
    with launch_device(gate_up.device):
        torch.library.wrap_triton(_swiglu_kernel)[grid](out, gate_up, n_cols, out.stride(0), gate_up.stride(0), **config)
    return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused projection.

    gate_up: [T, 2*I] float32/float16/bfloat16, gate columns then up columns,
             contiguous last dim.
    Returns [T, I] contiguous, in gate_up's dtype.
    """
    if not isinstance(gate_up, torch.Tensor):
        raise TypeError("gate_up must be a tensor")
    if gate_up.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"gate_up must be float32/float16/bfloat16, got {gate_up.dtype}")
    if gate_up.dim() != 2 or gate_up.shape[1] == 0 or gate_up.shape[1] % 2 != 0:
        raise ValueError(f"gate_up must be [T, 2*I] with I > 0, got shape {tuple(gate_up.shape)}")
    if gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must have a contiguous last dimension, got strides {gate_up.stride()}")
    return torch.ops.olmo2_fast.swiglu(gate_up)


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """torch's `F.silu(gate) * up` in gate_up's dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def swiglu_cost(n_tokens: int, intermediate: int, dtype: torch.dtype) -> Cost:
    """Bytes: read gate and up, write out. FLOPs per output: exp, add, divide, multiply = 4."""
    return Cost(bytes=3 * n_tokens * intermediate * itemsize(dtype), flops=4 * n_tokens * intermediate)

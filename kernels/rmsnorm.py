# RMSNorm, alone (the final norm) or fused with OLMo 2's post-norm residual add.
#
# Algorithm: one program per row; the whole row stays in registers (one read of x),
#   y   = (w * (x * rsqrt(mean(x^2) + eps))).to(dtype)      float32 math, HF order
#   out = (residual + y).to(dtype)                           if HAS_RESIDUAL
# which is HF's Olmo2RMSNorm followed by `residual + norm(x)`: the norm output is
# rounded to the dtype before the add, and the add itself is done in float32 and
# rounded once (what torch does for bf16 + bf16).
#
# Layouts: x, residual, out [T, H] with a contiguous last dim (row strides free);
# weight [H] contiguous. Limits: H <= 16384 (one BLOCK = next_pow2(H) per row, at
# most 32 float32 values per thread per array with 16 warps); OLMo 2 uses 2048-5120.
import torch
import triton
import triton.language as tl

from ..reference import rms_norm as rmsnorm_reference  # the model's HF-exact RMSNorm is this kernel's oracle
from ._launch import launch_device
from .roofline import Cost, itemsize

MAX_HIDDEN = 16384


@triton.jit
def _rmsnorm_kernel(
    # pointers
    out_ptr, x_ptr, residual_ptr, weight_ptr,
    # sizes
    n_cols,
    # strides
    stride_out, stride_x, stride_residual,
    # scalars
    eps,
    # meta-parameters
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (w * (x * rstd)).to(out_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        y = (r + y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, y, mask=mask)


def _config(n_cols: int) -> dict:
    """BLOCK covers the row; warps grow with it so a thread holds at most 16 values
    (32 at H > 8192): ~50 registers at 5120-8192 wide rows, no spills."""
    block = triton.next_power_of_2(n_cols)
    return dict(BLOCK=block, num_warps=min(16, max(1, block // 512)))


def _launch(out, x, residual, weight, eps: float):
    if x.shape[0] == 0:
        return
    has_residual = residual is not None
    with launch_device(x.device):
        torch.library.wrap_triton(_rmsnorm_kernel)[(x.shape[0],)](
            out, x, residual if has_residual else x, weight,
            x.shape[1],
            out.stride(0), x.stride(0), residual.stride(0) if has_residual else 0,
            eps,
            HAS_RESIDUAL=has_residual, **_config(x.shape[1]),
        )


@torch.library.triton_op("olmo2_fast::rmsnorm", mutates_args=())
def _rmsnorm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(out, x, None, weight, eps)
    return out


@torch.library.triton_op("olmo2_fast::residual_rmsnorm", mutates_args=())
def _residual_rmsnorm_op(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(out, x, residual, weight, eps)
    return out


def _validate(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None):
    tensors = dict(x=x, weight=weight) if residual is None else dict(residual=residual, x=x, weight=weight)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32/float16/bfloat16, got {x.dtype}")
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} != x dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if weight.shape != (x.shape[1],):
        raise ValueError(f"weight must be [H] = [{x.shape[1]}], got {tuple(weight.shape)}")
    if not 0 < x.shape[1] <= MAX_HIDDEN:
        raise ValueError(f"hidden size must be in 1..{MAX_HIDDEN}, got {x.shape[1]}")
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """OLMo 2 RMSNorm (the final norm).

    x:      [T, H] float32/float16/bfloat16, contiguous last dim
    weight: [H]    same dtype
    Returns [T, H] contiguous: (weight * (x * rsqrt(mean(x^2) + eps))).to(dtype), float32 math.
    """
    _validate(x, weight)
    return torch.ops.olmo2_fast.rmsnorm(x, weight, float(eps))


def residual_rmsnorm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """OLMo 2 post-norm residual: residual + rmsnorm(x, weight) (norm rounded to dtype, then added).

    residual: [T, H] float32/float16/bfloat16, contiguous last dim
    x:        [T, H] same dtype (the attention or MLP output)
    weight:   [H]    same dtype
    Returns a new [T, H] contiguous tensor.
    """
    _validate(x, weight, residual)
    return torch.ops.olmo2_fast.residual_rmsnorm(residual, x, weight, float(eps))


def residual_rmsnorm_reference(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF post-norm residual: `residual + norm(x)` with both operands in the model dtype."""
    return residual + rmsnorm_reference(x, weight, eps)


def rmsnorm_cost(n_tokens: int, hidden: int, dtype: torch.dtype) -> Cost:
    """Bytes: read x and the weight, write out. FLOPs per element: square-and-add,
    times rstd, times weight = 4."""
    size = itemsize(dtype)
    return Cost(bytes=(2 * n_tokens * hidden + hidden) * size, flops=4 * n_tokens * hidden)


def residual_rmsnorm_cost(n_tokens: int, hidden: int, dtype: torch.dtype) -> Cost:
    """rmsnorm_cost plus reading the residual and one add per element."""
    size = itemsize(dtype)
    return rmsnorm_cost(n_tokens, hidden, dtype) + Cost(bytes=n_tokens * hidden * size, flops=n_tokens * hidden)

"""rmsnorm / residual_rmsnorm: interpreter numerics vs float64, HF parity, errors, GPU compile."""

import pytest
import torch

from harness import ALL_DTYPES, DEVICE, assert_close_to_ref, assert_compiles_clean, kernel_spec, run_without_interpreter
from olmo2_fast.kernels import rmsnorm as rmsnorm_module
from olmo2_fast.kernels.rmsnorm import (
    MAX_HIDDEN, residual_rmsnorm, residual_rmsnorm_cost, residual_rmsnorm_reference, rmsnorm, rmsnorm_cost,
    rmsnorm_reference,
)
from olmo2_fast.kernels.roofline import Cost

EPS = 1e-6
PUBLISHED_HIDDEN = (2048, 4096, 5120)


def _inputs(n_tokens, hidden, dtype, row_stride=None):
    """x (optionally a column slice of a wider buffer), a non-unit weight, a residual."""
    row_stride = row_stride or hidden
    x = (3 * torch.randn(n_tokens, row_stride, device=DEVICE)).to(dtype)[:, :hidden]
    weight = (1 + 0.5 * torch.randn(hidden, device=DEVICE)).to(dtype)
    residual = (4 * torch.randn(n_tokens, hidden, device=DEVICE)).to(dtype)
    return x, weight, residual


SHAPES = [(1, 64), (5, 100), (3, 2048), (2, 5120)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n_tokens, hidden", SHAPES)
def test_rmsnorm_matches_float64(dtype, n_tokens, hidden, nan_allocations):
    x, weight, _ = _inputs(n_tokens, hidden, dtype)
    out = rmsnorm(x, weight, EPS)
    ref64 = rmsnorm_reference(x.double(), weight.double(), EPS)
    assert_close_to_ref(out, ref64, rmsnorm_reference(x, weight, EPS))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n_tokens, hidden", SHAPES)
def test_residual_rmsnorm_matches_float64(dtype, n_tokens, hidden, nan_allocations):
    x, weight, residual = _inputs(n_tokens, hidden, dtype)
    out = residual_rmsnorm(residual, x, weight, EPS)
    ref64 = residual_rmsnorm_reference(residual.double(), x.double(), weight.double(), EPS)
    assert_close_to_ref(out, ref64, residual_rmsnorm_reference(residual, x, weight, EPS))


@pytest.mark.heavy
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("hidden", PUBLISHED_HIDDEN)
def test_prefill_rows(dtype, hidden, nan_allocations):
    x, weight, residual = _inputs(1024, hidden, dtype)
    assert_close_to_ref(rmsnorm(x, weight, EPS), rmsnorm_reference(x.double(), weight.double(), EPS),
                        rmsnorm_reference(x, weight, EPS))
    assert_close_to_ref(residual_rmsnorm(residual, x, weight, EPS),
                        residual_rmsnorm_reference(residual.double(), x.double(), weight.double(), EPS),
                        residual_rmsnorm_reference(residual, x, weight, EPS))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_strided_rows_and_exact_match(dtype, nan_allocations):
    """Row strides other than H are honoured, and in 16-bit dtypes the kernel equals
    the HF-order reference bit for bit on almost every element (only float32
    summation order differs)."""
    x, weight, _ = _inputs(6, 300, dtype, row_stride=320)
    residual = (4 * torch.randn(6, 333, device=DEVICE)).to(dtype)[:, 20:320]  # misaligned start too
    out = residual_rmsnorm(residual, x, weight, EPS)
    expected = residual_rmsnorm_reference(residual, x, weight, EPS)
    assert out.is_contiguous()
    assert (out != expected).float().mean().item() < 0.01
    assert_close_to_ref(out, residual_rmsnorm_reference(residual.double(), x.double(), weight.double(), EPS), expected)


def test_reference_is_hf_olmo2_rmsnorm():
    pytest.importorskip("transformers.models.olmo2", reason="optional parity check: transformers is not installed")
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    x, weight, residual = _inputs(4, 96, torch.bfloat16)
    norm = Olmo2RMSNorm(96, eps=EPS).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(weight)
        assert torch.equal(rmsnorm_reference(x, weight, EPS), norm(x))
        assert torch.equal(residual_rmsnorm_reference(residual, x, weight, EPS), residual + norm(x))


def test_zero_tokens():
    x, weight, residual = _inputs(0, 64, torch.float32)
    assert rmsnorm(x, weight, EPS).shape == (0, 64)
    assert residual_rmsnorm(residual, x, weight, EPS).shape == (0, 64)


def test_registered_ops():
    x, weight, residual = _inputs(3, 64, torch.float32)
    torch.testing.assert_close(torch.ops.olmo2_fast.rmsnorm(x, weight, EPS), rmsnorm_reference(x, weight, EPS))
    torch.testing.assert_close(torch.ops.olmo2_fast.residual_rmsnorm(residual, x, weight, EPS),
                               residual_rmsnorm_reference(residual, x, weight, EPS))


def test_ops_on_meta_and_fake_tensors():
    run_without_interpreter("""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import olmo2_fast.kernels.rmsnorm
x = torch.empty(3, 64, dtype=torch.bfloat16, device="meta")
w = torch.empty(64, dtype=torch.bfloat16, device="meta")
out = torch.ops.olmo2_fast.residual_rmsnorm(x, x, w, 1e-6)
assert out.shape == (3, 64) and out.dtype == torch.bfloat16 and out.device.type == "meta"
with FakeTensorMode() as mode:
    out = torch.ops.olmo2_fast.rmsnorm(mode.from_tensor(torch.randn(3, 64)), mode.from_tensor(torch.randn(64)), 1e-6)
assert out.shape == (3, 64)
""")


def test_bad_inputs():
    x, weight, residual = _inputs(3, 64, torch.float16)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        rmsnorm(x.double(), weight.double(), EPS)
    with pytest.raises(TypeError, match="weight dtype"):
        rmsnorm(x, weight.float(), EPS)
    with pytest.raises(TypeError, match="residual dtype"):
        residual_rmsnorm(residual.float(), x, weight, EPS)
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm(x, weight[:63], EPS)
    with pytest.raises(ValueError, match="residual must have"):
        residual_rmsnorm(residual[:2], x, weight, EPS)
    with pytest.raises(ValueError, match="x must be"):
        rmsnorm(x[None], weight, EPS)
    with pytest.raises(ValueError, match="one device"):
        rmsnorm(x, weight.to("meta"), EPS)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        rmsnorm(torch.randn(3, 128, device=DEVICE).half()[:, ::2], weight, EPS)
    wide = torch.ones(1, MAX_HIDDEN + 1, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="hidden size"):
        rmsnorm(wide, wide[0], EPS)


def test_cost():
    # 7B decode step, bf16: x 4096*2 B, weight 4096*2 B, out 4096*2 B; 4 FLOPs per element.
    assert rmsnorm_cost(1, 4096, torch.bfloat16) == Cost(bytes=3 * 8192, flops=16384)
    # 3 tokens in float32 with residual: x, residual, out (3 rows each) + weight; 5 FLOPs per element.
    assert residual_rmsnorm_cost(3, 4096, torch.float32) == Cost(bytes=(3 * 3 + 1) * 4096 * 4, flops=5 * 3 * 4096)


def _specs(hidden_sizes):
    specs = []
    for ptr in ("*fp16", "*bf16"):
        for hidden in hidden_sizes:
            for has_residual in (False, True):
                config = rmsnorm_module._config(hidden)
                num_warps = config.pop("num_warps")
                signature = dict(out_ptr=ptr, x_ptr=ptr, residual_ptr=ptr, weight_ptr=ptr, n_cols="i32",
                                 stride_out="i32", stride_x="i32", stride_residual="i32", eps="fp32",
                                 BLOCK="constexpr", HAS_RESIDUAL="constexpr")
                specs.append(kernel_spec(
                    "olmo2_fast.kernels.rmsnorm:_rmsnorm_kernel", signature,
                    dict(config, HAS_RESIDUAL=has_residual),
                    # Every pointer and every size/stride here is a multiple of 16: what Triton
                    # specialises at a real launch.
                    aligned=[name for name in signature if signature[name] in (ptr, "i32")],
                    num_warps=num_warps, name=f"rmsnorm H={hidden} {ptr} residual={has_residual} w{num_warps}"))
    return specs


def test_compiles_for_gpu():
    """Published hidden sizes, plus 8192 and the launcher's limit."""
    assert_compiles_clean(_specs(PUBLISHED_HIDDEN + (8192, MAX_HIDDEN)), need_vector_loads=True)

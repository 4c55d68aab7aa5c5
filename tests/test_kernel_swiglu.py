"""swiglu: interpreter numerics vs float64, errors, registered op, roofline, GPU compile."""
import pytest
import torch

from harness import ALL_DTYPES, DEVICE, assert_close_to_ref, assert_compiles_clean, kernel_spec, run_without_interpreter
from olmo2_fast.kernels import swiglu as swiglu_module
from olmo2_fast.kernels.roofline import Cost
from olmo2_fast.kernels.swiglu import swiglu, swiglu_cost, swiglu_reference

PUBLISHED_INTERMEDIATE = (8192, 11008, 13824, 27648)


def _gate_up(n_tokens, intermediate, dtype, row_stride=None):
    row_stride = row_stride or 2 * intermediate
    return (3 * torch.randn(n_tokens, row_stride, device=DEVICE)).to(dtype)[:, : 2 * intermediate]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n_tokens, intermediate", [(1, 64), (5, 1000), (3, 1030), (2, 11008)])
def test_swiglu_matches_float64(dtype, n_tokens, intermediate, nan_allocations):
    gate_up = _gate_up(n_tokens, intermediate, dtype)
    out = swiglu(gate_up)
    assert out.shape == (n_tokens, intermediate) and out.dtype == dtype and out.is_contiguous()
    assert_close_to_ref(out, swiglu_reference(gate_up.double()), swiglu_reference(gate_up))


@pytest.mark.heavy
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("intermediate", PUBLISHED_INTERMEDIATE)
def test_prefill_rows(dtype, intermediate, nan_allocations):
    gate_up = _gate_up(256, intermediate, dtype)
    assert_close_to_ref(swiglu(gate_up), swiglu_reference(gate_up.double()), swiglu_reference(gate_up))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # intended, see docstring
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_strided_rows_and_extreme_gates(dtype, nan_allocations):
    """Row stride != 2*I; gates of +-100 (exp(100) overflows float32: silu -> -0 or x)."""
    gate_up = _gate_up(4, 200, dtype, row_stride=416)
    gate_up[0, :8] = torch.tensor([-100.0, -30.0, -5.0, 0.0, 5.0, 30.0, 100.0, -0.0], dtype=dtype)
    out = swiglu(gate_up)
    expected = swiglu_reference(gate_up)
    assert (out != expected).float().mean().item() < 0.01
    assert_close_to_ref(out, swiglu_reference(gate_up.double()), expected)


def test_zero_tokens():
    assert swiglu(torch.empty(0, 64, device=DEVICE)).shape == (0, 32)


def test_registered_op():
    gate_up = _gate_up(3, 96, torch.float32)
    torch.testing.assert_close(torch.ops.olmo2_fast.swiglu(gate_up), swiglu_reference(gate_up))


def test_op_on_meta_tensors():
    run_without_interpreter("""
import torch
import olmo2_fast.kernels.swiglu
out = torch.ops.olmo2_fast.swiglu(torch.empty(3, 22016, dtype=torch.bfloat16, device="meta"))
assert out.shape == (3, 11008) and out.dtype == torch.bfloat16 and out.device.type == "meta"
""")


def test_bad_inputs():
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        swiglu(torch.ones(2, 8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        swiglu(torch.ones(2, 8, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[T, 2\*I\]"):
        swiglu(torch.ones(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[T, 2\*I\]"):
        swiglu(torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous last dimension"):
        swiglu(torch.ones(2, 16, device=DEVICE)[:, ::2])
    with pytest.raises(TypeError, match="tensor"):
        swiglu([[1.0, 2.0]])


def test_cost():
    # 7B, 4 tokens, bf16: read gate+up 4*2*11008*2 B, write 4*11008*2 B; 4 FLOPs per output.
    assert swiglu_cost(4, 11008, torch.bfloat16) == Cost(bytes=4 * 3 * 11008 * 2, flops=4 * 4 * 11008)


def test_compiles_for_gpu():
    configs = {tuple(sorted(swiglu_module._config(i).items())) for i in PUBLISHED_INTERMEDIATE}
    signature = dict(out_ptr=None, gate_up_ptr=None, n_cols="i32", stride_out="i32", stride_gate_up="i32",
                     BLOCK="constexpr")
    specs = []
    for ptr in ("*fp16", "*bf16"):
        for config in map(dict, configs):
            num_warps = config.pop("num_warps")
            specs.append(kernel_spec(
                "olmo2_fast.kernels.swiglu:_swiglu_kernel", dict(signature, out_ptr=ptr, gate_up_ptr=ptr), config,
                # The published intermediate sizes are multiples of 16, so are the strides.
                aligned=["out_ptr", "gate_up_ptr", "n_cols", "stride_out", "stride_gate_up"],
                num_warps=num_warps, name=f"swiglu {ptr} {config} w{num_warps}"))
    assert_compiles_clean(specs, need_vector_loads=True)

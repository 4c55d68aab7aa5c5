"""int4_matmul: numerics vs float64 on every path (GEMV, split-K, skinny dot, GEMM), errors,
registered op, roofline, GPU compile of every config the launcher or autotuner can pick."""
import inspect

import pytest
import torch
import triton.language as tl

from harness import (
    ALL_DTYPES, DEVICE, assert_close_to_ref, assert_compiles_clean, dtype_id, kernel_spec, run_without_interpreter,
)
from olmo2_fast.kernels import int4_matmul as int4_module
from olmo2_fast.kernels.int4_format import Int4Weight, dequantize_int4, quantize_int4
from olmo2_fast.kernels.int4_matmul import (
    int4_matmul, int4_matmul_cost, int4_matmul_reference, m_bucket, split_k,
)
from olmo2_fast.kernels.roofline import Cost

M_VALUES = (1, 2, 7, 16, 64, 300)  # GEMV, skinny dot (split and not), GEMM with ragged tiles
SMALL_NK = [(96, 384), (200, 128)]  # N % 64 != 0; K = 3 groups (split-K) and 1 group
# OLMo 2 projections (N, K): 1B o_proj / down, 7B gate_up / down, 13B and 32B down, 32B qkv.
PUBLISHED_NK = [(2048, 2048), (2048, 8192), (22016, 4096), (4096, 11008), (5120, 13824), (5120, 27648), (7168, 5120)]


def _weight(n, k, dtype):
    return quantize_int4(torch.randn(n, k) / k**0.5, dtype=dtype).to(DEVICE)


def _check(x, qw):
    out = int4_matmul(x, qw)
    assert out.shape == (x.shape[0], qw.shape[0]) and out.dtype == x.dtype and out.device == x.device
    w = dequantize_int4(qw)
    ref64 = x.double() @ w.double().T
    torch_out = x @ w.T
    assert_close_to_ref(out, ref64, torch_out)
    assert_close_to_ref(int4_matmul_reference(x, qw), ref64, torch_out)
    return out


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("n, k", SMALL_NK)
def test_matches_float64(n, k, m, dtype, nan_allocations):
    _check(torch.randn(m, k, device=DEVICE).to(dtype), _weight(n, k, dtype))


@pytest.mark.parametrize("m", [1, 2])
def test_uneven_split(m, nan_allocations):
    """5 groups over 4 requested slices: 3 slices of 2, 2 and 1 groups, none empty."""
    assert split_k(m, 64, 640, 132) == 3
    _check(torch.randn(m, 640, device=DEVICE), _weight(64, 640, torch.float32))


def test_split_plan():
    assert split_k(1, 96, 384, 132) == 2 and split_k(2, 96, 384, 132) == 2  # 3 groups: slices of 2 and 1
    assert split_k(1, 200, 128, 132) == 1  # one group: nothing to split
    assert split_k(1, 2048, 2048, 132) == 16  # 32 column blocks -> 512 programs
    assert split_k(16, 2048, 2048, 132) == 8  # float32 partials capped at the packed weight bytes
    assert split_k(1, 100352, 2048, 132) == 1  # lm_head fills the GPU unsplit


def test_deterministic_and_strided_rows(nan_allocations):
    qw = _weight(96, 384, torch.float16)
    wide = torch.randn(3, 512, device=DEVICE).to(torch.float16)
    x = wide[:, :384]  # row stride 512
    first = _check(x, qw)
    assert torch.equal(int4_matmul(x, qw), first)
    assert torch.equal(int4_matmul(x.contiguous(), qw), first)


def test_zero_rows():
    assert int4_matmul(torch.empty(0, 128, device=DEVICE), _weight(32, 128, torch.float32)).shape == (0, 32)


def test_registered_op():
    qw = _weight(96, 384, torch.float32)
    x = torch.randn(2, 384, device=DEVICE)
    out = torch.ops.olmo2_fast.int4_matmul(x, qw.packed, qw.scales, qw.zeros)
    assert torch.equal(out, int4_matmul(x, qw))


def test_op_on_meta_and_fake_tensors():
    run_without_interpreter("""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import olmo2_fast.kernels.int4_matmul
def args(m, n, k, device):
    return (torch.empty(m, k, dtype=torch.bfloat16, device=device), torch.empty(k // 8, n, dtype=torch.int32, device=device),
            torch.empty(k // 128, n, dtype=torch.bfloat16, device=device), torch.empty(k // 128, n, dtype=torch.bfloat16, device=device))
for m in (1, 4, 300):
    out = torch.ops.olmo2_fast.int4_matmul(*args(m, 2048, 8192, "meta"))
    assert out.shape == (m, 2048) and out.dtype == torch.bfloat16 and out.device.type == "meta"
with FakeTensorMode() as mode:
    out = torch.ops.olmo2_fast.int4_matmul(*(mode.from_tensor(t) for t in args(3, 96, 384, "cpu")))
assert out.shape == (3, 96)
""")


def test_bad_inputs():
    qw = _weight(96, 384, torch.float32)
    x = torch.randn(2, 384, device=DEVICE)
    with pytest.raises(TypeError, match="Int4Weight"):
        int4_matmul(x, qw.packed)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        int4_matmul(x.to(torch.int32), qw)
    with pytest.raises(TypeError, match="scales/zeros are torch.float32"):
        int4_matmul(x.half(), qw)
    with pytest.raises(ValueError, match=r"x must be \[M, 384\]"):
        int4_matmul(torch.randn(2, 256, device=DEVICE), qw)
    with pytest.raises(ValueError, match=r"x must be \[M, 384\]"):
        int4_matmul(torch.randn(384, device=DEVICE), qw)
    with pytest.raises(ValueError, match=r"stride\(-1\) == 1"):
        int4_matmul(torch.randn(384, 2, device=DEVICE).T, qw)
    with pytest.raises(ValueError, match="not a multiple of the group size 128"):
        int4_matmul(torch.randn(2, 200, device=DEVICE), Int4Weight(qw.packed, qw.scales, qw.zeros, (96, 200)))
    with pytest.raises(ValueError, match="supports group size 128"):
        int4_matmul(torch.randn(2, 256, device=DEVICE), quantize_int4(torch.randn(8, 256), group_size=64).to(DEVICE))
    with pytest.raises(ValueError, match=r"scales must be \[3, 96\]"):
        int4_matmul(x, Int4Weight(qw.packed, qw.scales[:2], qw.zeros, qw.shape))
    with pytest.raises(ValueError, match="packed must be contiguous"):
        transposed = qw.packed.T.contiguous().T
        int4_matmul(x, Int4Weight(transposed, qw.scales, qw.zeros, qw.shape))
    with pytest.raises(ValueError, match="on meta"):
        int4_matmul(x, qw.to("meta"))


def test_m_bucket():
    assert [m_bucket(m) for m in (1, 2, 3, 5, 9, 16, 17, 33, 100, 200, 300, 8192)] == [1, 2, 4, 8, 16, 16, 32, 64, 128, 256, 256, 256]


def test_cost():
    # 7B o_proj, one token, bf16: 4096*4096/2 packed bytes, 2 * (4096*4096/128) bf16 scales
    # and zeros, 4096 bf16 in and out; 2*M*N*K FLOPs.
    assert int4_matmul_cost(1, 4096, 4096, torch.bfloat16) == Cost(
        bytes=8_388_608 + 524_288 + 8_192 + 8_192, flops=33_554_432)
    assert int4_matmul_cost(3, 256, 128, torch.float32) == Cost(
        bytes=16_384 + 2 * 256 * 4 + 3 * 128 * 4 + 3 * 256 * 4, flops=2 * 3 * 256 * 128)


@pytest.mark.heavy
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m", [1, 4, 16, 64, 300])
@pytest.mark.parametrize("n, k", PUBLISHED_NK)
def test_published_widths(n, k, m, dtype, nan_allocations):
    _check(torch.randn(m, k, device=DEVICE).to(dtype), _weight(n, k, dtype))


# --------------------------------------------------------------------------- GPU compile

MATMUL = "olmo2_fast.kernels.int4_matmul:_int4_matmul_kernel"
REDUCE = "olmo2_fast.kernels.int4_matmul:_splitk_reduce_kernel"
POINTER_TYPES = {"qw_ptr": "*i32", "part_ptr": "*fp32"}


def _signature(kernel, act):
    """Triton types for every argument of `kernel`: pointers, i32 sizes/strides, constexprs."""
    def kind(param):
        if param.annotation is tl.constexpr:
            return "constexpr"
        return POINTER_TYPES.get(param.name, f"*{act}") if param.name.endswith("_ptr") else "i32"
    return {name: kind(param) for name, param in inspect.signature(kernel.fn, eval_str=True).parameters.items()}


def _aligned(signature):
    """What a real launch gives 16-byte alignment / divisibility by 16 (the published widths do)."""
    return [a for a, t in signature.items() if t.startswith("*") or a in ("N", "K", "K_SPLIT", "numel") or a.startswith("stride")]


def _matmul_specs(path):
    """Every (config, constexprs) the launcher passes on `path`, fp16 and bf16."""
    if path == "prefill":
        variants = [(cfg, dict(cfg.kwargs, SPLIT=False)) for cfg in int4_module.PREFILL_CONFIGS]
    else:
        block_m = 1 if path == "gemv" else int4_module._DOT_BLOCK_M
        variants = [(cfg, dict(cfg.kwargs, BLOCK_M=block_m, GROUP_M=1, SPLIT=split))
                    for cfg in int4_module.DECODE_CONFIGS for split in (False, True)]
    specs = []
    for act in ("fp16", "bf16"):
        signature = _signature(int4_module._int4_matmul_kernel, act)
        for cfg, constexprs in variants:
            constexprs = dict(constexprs, GROUP=128, DOT_PRECISION="tf32")
            specs.append(kernel_spec(MATMUL, signature, constexprs, aligned=_aligned(signature), num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages, name=f"{path} {act} {constexprs} w{cfg.num_warps} s{cfg.num_stages}"))
    return specs


def test_gemv_compiles_for_gpu():
    """M == 1: CUDA-core multiply-add; the word, x and scale loads must be 16 bytes wide."""
    assert_compiles_clean(_matmul_specs("gemv"), need_vector_loads=True)


def test_skinny_decode_compiles_for_gpu():
    """2 <= M <= 16: tl.dot on the dequantised tile (word loads are 16-byte cp.async)."""
    assert_compiles_clean(_matmul_specs("skinny"), need_mma=True)


def test_prefill_compiles_for_gpu():
    assert_compiles_clean(_matmul_specs("prefill"), need_mma=True)


def test_reduce_compiles_for_gpu():
    specs = []
    for act in ("fp16", "bf16"):
        signature = _signature(int4_module._splitk_reduce_kernel, act)
        specs.append(kernel_spec(REDUCE, signature, {"BLOCK": int4_module._REDUCE_BLOCK}, aligned=_aligned(signature)))
    assert_compiles_clean(specs, need_vector_loads=True)

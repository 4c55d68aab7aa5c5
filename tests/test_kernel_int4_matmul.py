"""int4_matmul: numerics vs float64 on both paths (M <= 16 through the decode GEMV, the GEMM above
with ragged tiles), errors, registered op, roofline, GPU compile of every GEMM config the launcher
or autotuner can pick."""
import inspect

import pytest
import torch
import triton.language as tl

from harness import (
    ALL_DTYPES, DEVICE, INTERPRETED, SHARED_LIMIT, assert_close_to_ref, compile_for_gpu, dtype_id, kernel_spec,
    run_without_interpreter,
)
from olmo2_fast.kernels import int4_matmul as int4_module
from olmo2_fast.kernels.int4_format import Int4Weight, dequantize_int4, quantize_int4
from olmo2_fast.kernels.int4_matmul import int4_matmul, int4_matmul_cost, int4_matmul_reference, m_bucket
from olmo2_fast.kernels.roofline import Cost

M_VALUES = (1, 7, 17, 64, 300)  # decode GEMV (CUDA cores, dot), GEMM: fixed config, ragged tiles, autotuned
SMALL_NK = [(96, 384), (200, 128)]  # N % 64 != 0; K = 3 groups and 1 group
# OLMo 2 projections (N, K): 1B o_proj / down, 7B gate_up / down, 13B and 32B down, 32B qkv.
PUBLISHED_NK = [(2048, 2048), (2048, 8192), (22016, 4096), (4096, 11008), (5120, 13824), (5120, 27648), (7168, 5120)]


def _weight(n, k, dtype):
    return quantize_int4(torch.randn(n, k) / k**0.5, dtype=dtype).to(DEVICE)


def _check(x, qw):
    """The kernel and the twin against x @ ŵ^T in float64 (ŵ exact), by the harness rule against torch's
    matmul in x's dtype on dequantize_int4's weights."""
    out = int4_matmul(x, qw)
    assert out.shape == (x.shape[0], qw.shape[0]) and out.dtype == x.dtype and out.device == x.device
    ref64 = x.double() @ dequantize_int4(qw, torch.float64).T
    torch_out = x @ dequantize_int4(qw).T
    assert_close_to_ref(out, ref64, torch_out)
    assert_close_to_ref(int4_matmul_reference(x, qw), ref64, torch_out)
    return out


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("n, k", SMALL_NK)
def test_matches_float64(n, k, m, dtype, nan_allocations):
    _check(torch.randn(m, k, device=DEVICE).to(dtype), _weight(n, k, dtype))


@pytest.mark.skipif(not INTERPRETED, reason="records launches through Triton's interpreter")
def test_up_to_16_rows_run_the_decode_gemv_and_more_the_gemm(monkeypatch):
    """Recorded, not run: M <= 16 is one decode GEMV launch, on a workspace whose counters are zeroed (the one
    memset) only where K is split (N = 96, K = 2304 at M = 1: 3 steps of 1024), never where it is not
    (N = 2112 at M = 1: 132 column blocks of 16); M = 17 is the GEMM. (Inside a custom op, torch's own ops
    are hidden from the recorder: torch.zeros is counted directly.)"""
    from launch_plan import record_launches
    zeros, memsets = torch.zeros, []
    monkeypatch.setattr(torch, "zeros", lambda *args, **kwargs: memsets.append(args) or zeros(*args, **kwargs))
    cases = [(1, 2112, 384, "_decode_gemv_kernel", 0), (1, 96, 2304, "_decode_gemv_kernel", 1),
             (16, 96, 384, "_decode_gemv_kernel", 1), (17, 96, 384, "_int4_matmul_kernel", 0)]
    for m, n, k, kernel, expected in cases:
        qw = Int4Weight(torch.empty(n // 8, k // 32, 8, 4, dtype=torch.int32, device=DEVICE),
                        *(torch.empty(k // 128, n, device=DEVICE) for _ in range(2)), (n, k))
        x = torch.empty(m, k, device=DEVICE)
        memsets.clear()
        with record_launches() as plan:
            int4_matmul(x, qw)
        assert [launch.kernel for launch in plan.launches] == [kernel], (m, n, plan.launches)
        assert len(memsets) == expected and plan.host_syncs == [], (m, n, memsets)


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
    return (torch.empty(m, k, dtype=torch.bfloat16, device=device),
            torch.empty(n // 8, k // 32, 8, 4, dtype=torch.int32, device=device),
            torch.empty(k // 128, n, dtype=torch.bfloat16, device=device), torch.empty(k // 128, n, dtype=torch.bfloat16, device=device))
for m in (1, 4, 300):
    out = torch.ops.olmo2_fast.int4_matmul(*args(m, 2048, 8192, "meta"))
    assert out.shape == (m, 2048) and out.dtype == torch.bfloat16 and out.device.type == "meta"
with FakeTensorMode() as mode:
    for m in (3, 40):
        out = torch.ops.olmo2_fast.int4_matmul(*(mode.from_tensor(t) for t in args(m, 96, 384, "cpu")))
        assert out.shape == (m, 96)
""")


def test_bad_inputs():
    qw = _weight(96, 384, torch.float32)
    x = torch.randn(2, 384, device=DEVICE)
    with pytest.raises(TypeError, match="expected an Int4Weight"):
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
    with pytest.raises(ValueError, match="K a multiple of 128 and N of 8"):
        int4_matmul(torch.randn(2, 200, device=DEVICE), Int4Weight(qw.packed, qw.scales, qw.zeros, (96, 200)))
    with pytest.raises(ValueError, match="support group size 128"):
        int4_matmul(torch.randn(2, 256, device=DEVICE), quantize_int4(torch.randn(8, 256), group_size=64).to(DEVICE))
    with pytest.raises(ValueError, match=r"scales must be \[3, 96\]"):
        int4_matmul(x, Int4Weight(qw.packed, qw.scales[:2], qw.zeros, qw.shape))
    with pytest.raises(ValueError, match="int4 packed must be contiguous"):
        transposed = qw.packed.transpose(0, 1).contiguous().transpose(0, 1)
        int4_matmul(x, Int4Weight(transposed, qw.scales, qw.zeros, qw.shape))
    with pytest.raises(ValueError, match="is on meta"):
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
POINTER_TYPES = {"qw_ptr": "*i32"}


def _signature(kernel, act):
    """Triton types for every argument of `kernel`: pointers, i32 sizes/strides/magic numbers, constexprs."""
    def kind(param):
        if param.annotation is tl.constexpr:
            return "constexpr"
        return POINTER_TYPES.get(param.name, f"*{act}") if param.name.endswith("_ptr") else "i32"
    return {name: kind(param) for name, param in inspect.signature(kernel.fn, eval_str=True).parameters.items()}


def _aligned(signature):
    """What a real launch gives 16-byte alignment / divisibility by 16 (the published widths do)."""
    return [a for a, t in signature.items() if t.startswith("*") or a in ("N", "K") or a.startswith("stride")]


def _gemm_specs():
    """Every config the launcher or the autotuner can pick, fp16 and bf16."""
    specs = []
    for act in ("fp16", "bf16"):
        signature = _signature(int4_module._int4_matmul_kernel, act)
        for cfg in int4_module.PREFILL_CONFIGS:
            constexprs = dict(cfg.kwargs, DOT_PRECISION="tf32")
            specs.append(kernel_spec(MATMUL, signature, constexprs, aligned=_aligned(signature), num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages, name=f"{act} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"))
    return specs


def test_gemm_compiles_for_gpu():
    """sm_80 and sm_90: no spills, shared memory in bounds, mma / wgmma in every config; prints the sm_90
    main loop's SASS instructions per weight a thread dequantises (the tile is BLOCK_N x BLOCK_K, shared
    by BLOCK_M rows)."""
    specs = _gemm_specs()
    problems = []
    for spec, report in zip([s for s in specs for _ in (80, 90)], compile_for_gpu(specs, (80, 90))):
        where = f"{spec['name']} sm_{report['capability']}"
        if report["stack"] or report["local"] or report["shared"] > SHARED_LIMIT[report["capability"]]:
            problems.append(f"{where}: REG {report['regs']} STACK {report['stack']} shared {report['shared']}")
        if not (report["mma"] or report["wgmma"]):
            problems.append(f"{where}: no mma/wgmma")
        if report["capability"] == 90:
            c = spec["constexprs"]
            loop = max(report["sass_loops"], key=lambda loop: loop["opcodes"].get("LOP3.LUT", 0))
            weights = c["BLOCK_N"] * c["BLOCK_K"] // (32 * spec["num_warps"])
            print(f"{where}: REG {report['regs']}, {loop['instructions']} instructions / {weights} weights "
                  f"= {loop['instructions'] / weights:.2f} per weight, shared by {c['BLOCK_M']} rows")
    assert not problems, "\n".join(problems)

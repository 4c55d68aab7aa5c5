"""pytest-benchmark micro-benchmarks: each kernel next to the eager PyTorch it replaces.

    python -m pytest benchmarks --benchmark-only      # GPU: 7B shapes, bf16; CPU: tiny shapes, interpreter

The cases are kernel_cases' (the inputs and baselines of `olmo2-fast bench kernels`): decode at
batch 1 (batch 2 on a CPU) and a prefill prompt, int4 on the gate_up projection. A round is the
host wall time of one call followed by a device synchronisation, so it includes the launch; the
graph-replay timings of `olmo2-fast bench kernels` are the ones to quote. extra_info carries the
op's bytes, FLOPs, the achieved GB/s and the error against the float64 oracle.
"""
import pytest
import torch

from olmo2_fast.benchmarks.kernel_cases import EAGER, TRITON, build_cases
from olmo2_fast.benchmarks.shapes import Grid, model_config

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # bf16 tl.dot is wrong under the interpreter
GRID = Grid(batches=(1,), seqs=(2048,), contexts=(4096,)) if ON_GPU else Grid(batches=(2,), seqs=(24,), contexts=(32,))
CASES = [c for c in build_cases(model_config("7b", smoke=not ON_GPU), DTYPE, DEVICE, GRID)
         if c.kernel != "int4_matmul" or c.shape["W"] == "gate_up"]
PARAMS = [pytest.param(case, impl, id=f"{case.kernel}-{case.phase}-{case.label.replace(' ', '_')}-{impl.replace(' ', '_')}")
          for case in CASES for impl in (TRITON, EAGER if case.kernel != "int4_matmul" else "torch dequant+matmul")]


@pytest.mark.parametrize("case, impl", PARAMS)
def test_kernel(benchmark, case, impl):
    candidate = next(c for c in case.candidates if c.impl == impl)
    inputs = case.make_set(0)

    def call():
        out = candidate.fn(*inputs)
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    if ON_GPU:
        out = benchmark(call)
    else:  # an interpreted launch takes tens of milliseconds: a few rounds are enough to exercise the path
        out = benchmark.pedantic(call, rounds=2, warmup_rounds=1, iterations=1)
    assert torch.isfinite(out).all()
    err = (out.double() - case.oracle(*inputs)).abs().max().item()
    benchmark.extra_info.update(kernel=case.kernel, phase=case.phase, shape=case.label, impl=impl,
                                dtype=str(DTYPE), bytes=case.cost.bytes, flops=case.cost.flops, max_err=err,
                                device=torch.cuda.get_device_name() if ON_GPU else "cpu (interpreter)")
    if benchmark.stats is not None:
        benchmark.extra_info["gbps"] = case.cost.bytes / benchmark.stats.stats.median / 1e9
    assert err < (5e-2 if DTYPE == torch.bfloat16 else 1e-3)

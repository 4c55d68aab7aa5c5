"""pytest plugin: the test selection of `gpu_check`'s test step (`-p olmo2_fast.benchmarks.gpu_test_selection`).

On a GPU every test runs natively, heavy ones included (tests/conftest.py). Within the
check's time cap this keeps every non-heavy test and the heavy cases parametrised with
torch.bfloat16 (the production dtype, whose tensor-core dots only silicon computes natively),
and deselects:
- the other heavy cases (float32 / float16, or no dtype): fp32 dots are exact IEEE, a
  correctness path that is slow at real widths, and fp16 is not a production dtype for OLMo 2;
- the tests in SLOW_ON_A_GPU, each for the reason given there.
Deselected tests are counted in pytest's summary line and named in the report header.
"""
from __future__ import annotations

import pytest
import torch

# node id -> why the check's test step leaves it out (the step after it covers the same code)
SLOW_ON_A_GPU = {
    "tests/test_bench.py::test_bench_kernels_smoke":
        "its torch.compile baselines cost minutes of inductor compiling on a GPU; the check's "
        "`bench kernels` steps run the same engine at real shapes",
    "tests/test_bench.py::test_bench_generate_smoke":
        "HF's compiled static-cache decode costs a minute of compiling; the check's `bench generate` "
        "steps run the same engines at real shapes",
}


def _is_bfloat16_case(item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(value is torch.bfloat16 for value in callspec.params.values())


def selected(item) -> bool:
    if item.nodeid in SLOW_ON_A_GPU:
        return False
    return "heavy" not in item.keywords or _is_bfloat16_case(item)


def pytest_report_header(config):
    names = "; ".join(f"{node}: {why}" for node, why in SLOW_ON_A_GPU.items())
    return [f"gpu_check selection: non-heavy tests + heavy bfloat16 cases; also left out: {names}"]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if selected(item)]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if not selected(item)])
        items[:] = keep

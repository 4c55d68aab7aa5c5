"""Test-session setup.

Without CUDA the kernels run under Triton's interpreter, which must be switched on
before `triton` is first imported (`@triton.jit` picks interpreted or compiled at
decoration time). Compile-for-GPU checks run in a subprocess without it
(`tests/gpu_compile.py`).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could enable TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: large shapes; runs natively on a GPU, under the interpreter only with OLMO2_FAST_HEAVY=1")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    on_gpu = torch.cuda.is_available()
    run_heavy = on_gpu or os.environ.get("OLMO2_FAST_HEAVY") == "1"
    skip_heavy = pytest.mark.skip(reason="heavy case: runs on a GPU, or under the interpreter with OLMO2_FAST_HEAVY=1")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "heavy" in item.keywords and not run_heavy:
            item.add_marker(skip_heavy)
        if "cuda" in item.keywords and not on_gpu:
            item.add_marker(skip_cuda)

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

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: large shapes; runs natively on a GPU, under the interpreter only with OLMO2_FAST_HEAVY=1")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    config.addinivalue_line("markers", "h100_plan: under the interpreter, plan the kernels for an H100's 132 SMs "
                                       "(launch-plan tests); other model-level tests plan for 8")


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


@pytest.fixture(autouse=True)
def gpu_bf16_rounding(monkeypatch):
    """Make the interpreter round float32 -> bfloat16 to nearest even, as the GPU does.

    Triton 3.6's InterpreterBuilder.cast_impl converts float32 to bfloat16 with no
    rounding mode, i.e. it truncates; on the GPU the same `.to(tl.bfloat16)` is
    cvt.rn. Without this, bf16 outputs carry up to 2x the GPU's rounding error and
    the comparison against PyTorch would judge the interpreter, not the kernel.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    truncating_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.uint16).numpy(), dst_type.scalar)
        return truncating_cast(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


@pytest.fixture(autouse=True)
def gpu_bf16_dots(monkeypatch):
    """Make the interpreter's tl.dot on bfloat16 operands compute what the GPU's mma does.

    Triton 3.6's InterpreterBuilder.create_dot hands np.matmul the operands' storage,
    and bfloat16 is stored as uint16: it multiplies bit patterns (triton issue 11584).
    Widening bf16 to float32 is exact (same exponent, 16 more zero mantissa bits; a
    shift, so subnormals, inf and NaN keep their values), and a product of two 8-bit
    significands fits float32's 24: np.matmul then forms exact products and sums them
    in float32, which is the mma's arithmetic up to summation order.
    tests/test_interpreter_patches.py checks this against torch after any triton upgrade.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    raw_dot = interpreter.InterpreterBuilder.create_dot

    def as_float32(operand):
        if operand.dtype.scalar != tl.bfloat16:
            return operand
        widened = (operand.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(widened, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return raw_dot(self, as_float32(a), as_float32(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.fixture(autouse=True)
def interpreted_helpers_run_unpatched(monkeypatch):
    """Let a @triton.jit helper called inside an interpreted launch skip re-patching triton.language.

    Triton 3.6's interpreter patches the language modules a kernel sees when a launch starts
    and restores them when it ends; but every call of a jit helper inside the kernel patches
    them again (`InterpretedFunction.__call__` -> `_patch_lang`, ~3 ms: each builtin rewrapped),
    and discards what it did. The fused decode kernels call ~15 helpers per program, so this
    was ~40% of their interpreted time. A helper whose language modules the running launch has
    already patched now calls straight through; any other still patches (nothing changes
    for it). tests/test_interpreter_patches.py checks that a launch with helpers patches once
    and computes what it did.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    patched: set[int] = set()  # ids of the language modules the running launch has patched
    patch_lang, restore = interpreter._patch_lang, interpreter._LangPatchScope.restore

    def languages(fn):
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    def launch_patch(fn):
        scope = patch_lang(fn)
        patched.update(languages(fn))
        return scope

    def launch_restore(self):
        patched.clear()
        return restore(self)

    device_call = interpreter.InterpretedFunction.__call__

    def helper_call(self, *args, **kwargs):
        if not patched or not languages(self.fn) <= patched:
            return device_call(self, *args, **kwargs)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    monkeypatch.setattr(interpreter, "_patch_lang", launch_patch)
    monkeypatch.setattr(interpreter._LangPatchScope, "restore", launch_restore)
    monkeypatch.setattr(interpreter.InterpretedFunction, "__call__", helper_call)


@pytest.fixture(autouse=True)
def interpreter_plans_for_eight_sms(request, monkeypatch):
    """Model-level tests under the interpreter plan the kernels for an 8-SM card, not an H100.

    Without a GPU the kernels plan as for an H100 (kernels/attention.py `_sm_count`), and the
    interpreter runs every program of a launch in turn: the fused decode step's 132-SM grids
    (split-K, split-KV) make a tiny model's decode step take seconds. The numerics do not depend
    on the split count (the kernel tests sweep it), so tests of models, generation and serving
    plan for 8 SMs. The kernel tests (tests/test_kernel_*.py) keep the H100 plan, and so does any
    test marked h100_plan (the launch budget and grid fill at the published widths).
    """
    if os.environ.get("TRITON_INTERPRET") != "1" or request.node.get_closest_marker("h100_plan") \
            or request.module.__name__.startswith("test_kernel_"):
        return
    import olmo2_fast.kernels.attention as attention
    import olmo2_fast.kernels.decode_gemv as gemv
    import olmo2_fast.kernels.fused_attention_decode as fused_attention
    for module in (attention, gemv, fused_attention):
        monkeypatch.setattr(module, "_sm_count", lambda device: 8)


@pytest.fixture
def nan_allocations(monkeypatch):
    """Poison the outputs a launcher allocates itself: torch.empty/empty_like fill
    floating tensors with NaN, so an element a kernel never writes fails the check."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(empty_like(*args, **kwargs)))

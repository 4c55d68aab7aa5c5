"""The interpreter patches in conftest.py do what the GPU does, checked through real kernels.

Each test launches a tiny @triton.jit kernel, so a triton upgrade that stops routing dots or
casts through the patched builder methods fails here, not as a puzzling tolerance in a kernel
test (one that renames them fails every test: monkeypatch.setattr raises). On a GPU the same
tests check the claim the patches rest on: mma and cvt.rn compute exactly this.
"""
import pytest
import torch
import triton
import triton.language as tl

from harness import DEVICE, INTERPRETED, assert_close_to_ref


@triton.jit
def _dot_kernel(out_ptr, a_ptr, b_ptr, acc_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rows, cols, ks = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rows[:, None] * K + ks[None, :])
    b = tl.load(b_ptr + ks[:, None] * N + cols[None, :])
    acc = tl.load(acc_ptr + rows[:, None] * N + cols[None, :])
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], tl.dot(a, b, acc))


def _dot(a, b, acc):
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=DEVICE)
    _dot_kernel[(1,)](out, a, b, acc, a.shape[0], b.shape[1], a.shape[1])
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dot_is_a_float32_matmul_of_the_operand_values(dtype):
    # Values far from 1 and of both signs: a product of bit patterns would be off by orders of magnitude.
    gen = torch.Generator().manual_seed(0)
    a = (3 * torch.randn(16, 64, generator=gen)).to(dtype).to(DEVICE)
    b = (3 * torch.randn(64, 32, generator=gen)).to(dtype).to(DEVICE)
    acc = torch.randn(16, 32, generator=gen).to(DEVICE)
    out = _dot(a, b, acc)
    ref64 = a.double() @ b.double() + acc.double()
    assert_close_to_ref(out, ref64, a.float() @ b.float() + acc, atol=1e-5)


@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter's bf16 widening")
def test_dot_sees_every_finite_bf16_value_exactly():
    # All 2^16 bit patterns but inf/NaN, subnormals included, times the identity: each
    # output is x*1 plus exact zeros, so any inexact widening changes a value.
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16)
    values = values[torch.isfinite(values)]
    values = torch.cat([values, values.new_zeros(-len(values) % (16 * 256))]).view(-1, 256, 16)
    eye = torch.eye(16, dtype=torch.bfloat16)
    for block in values:
        wrong = (_dot(block, eye, torch.zeros(256, 16)) != block.float()).sum().item()
        assert wrong == 0, f"{wrong} of {block.numel()} bf16 values reach np.matmul altered"


@triton.jit
def _to_bf16_kernel(out_ptr, x_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


def test_float32_to_bf16_rounds_to_nearest_even():
    # 1 + 0.75 ulp truncates to 1 but rounds up to 1 + ulp; ties go to the even neighbour
    # (1 + 1.5 ulp up to 1 + 2 ulp, where truncation gives 1 + ulp).
    ulp = 2.0**-7
    x = torch.tensor([1 + 0.75 * ulp, 1 + 0.5 * ulp, 1 + 1.5 * ulp, -(1 + 0.75 * ulp), 3.0e38, 1e-40, 0.0, -2.5] * 2,
                     dtype=torch.float32, device=DEVICE)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _to_bf16_kernel[(1,)](out, x, len(x))
    assert torch.equal(out.float(), x.to(torch.bfloat16).float())


@triton.jit
def _scaled(x, scale):
    return x * scale


@triton.jit
def _helpers_kernel(out_ptr, x_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, _scaled(_scaled(x, 2.0), 3.0) + _scaled(tl.sum(x), 0.5))


@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter's patching of triton.language")
def test_helpers_inside_a_launch_run_on_the_launch_patches(monkeypatch):
    """conftest's interpreted_helpers_run_unpatched: the language is patched once per launch (not once per
    helper call), the helpers compute what they did, and the launch leaves triton.language as it found it."""
    from triton.runtime import interpreter
    patches = []
    launch_patch = interpreter._patch_lang
    monkeypatch.setattr(interpreter, "_patch_lang", lambda fn: patches.append(fn.__name__) or launch_patch(fn))
    builtin_before = tl.sum
    x = torch.randn(32, device=DEVICE)
    out = torch.empty_like(x)
    for _ in range(2):
        _helpers_kernel[(4,)](out, x, 32)
    # Per launch: the kernel's patch, then one for tl.sum (a jit function whose module sees triton.language.core,
    # which the kernel's module does not); the other 11 helper calls of the 4 programs patch nothing.
    assert patches == ["_helpers_kernel", "sum"] * 2
    torch.testing.assert_close(out, 6 * x + 0.5 * x.sum(), rtol=1e-6, atol=1e-6)
    assert tl.sum is builtin_before

"""The kernel test harness: devices, poisoned outputs, tolerances, GPU compile checks.

Every kernel test uses these pieces the same way:
  * `DEVICE` is "cuda" on a GPU and "cpu" under Triton's interpreter (see conftest.py);
  * every kernel runs in `ALL_DTYPES` (float32, float16, bfloat16) under the interpreter
    too: conftest.py patches the interpreter's bf16 tl.dot (it multiplied raw uint16
    storage, triton issue 11584) and its float32 -> bf16 cast (it truncated) to compute
    what the GPU computes; tests/test_interpreter_patches.py checks both patches;
  * outputs are poisoned with NaN before a launch so unwritten elements fail;
  * `assert_close_to_ref` bounds the kernel's error against a float64 reference by
    twice the error PyTorch itself makes in the same dtype, plus a small atol
    (flash-attention's rule), and rejects NaN/inf outright;
  * `compile_for_gpu` compiles kernels for sm_80/sm_90 in a subprocess without the
    interpreter and reports registers, spills, shared memory and PTX features.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Per-dtype absolute slack added to twice PyTorch's own error.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}

# Shared memory per block (bytes) that each target allows.
SHARED_LIMIT = {80: 166_912, 90: 232_448}


def dtype_id(dtype: torch.dtype) -> str:
    """A readable pytest id: "bfloat16", not "dtype2"."""
    return str(dtype).removeprefix("torch.")


def poisoned(shape, dtype, device=DEVICE):
    """An output buffer filled with NaN (or -1 for integer dtypes)."""
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor, *, atol=None, factor=2.0):
    """`out` (kernel, low precision) against `ref64` (float64 reference).

    Passes when err(out, ref64) <= factor * err(torch_out, ref64) + atol, where
    `torch_out` is the same computation done by PyTorch in `out`'s dtype.
    """
    assert out.shape == ref64.shape, f"shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"kernel output has {(~torch.isfinite(out)).sum().item()} non-finite elements"
    atol = ATOL[out.dtype] if atol is None else atol
    err = max_abs_err(out, ref64)
    torch_err = max_abs_err(torch_out, ref64)
    bound = factor * torch_err + atol
    assert err <= bound, f"max error {err:.3e} > {factor} x torch's {torch_err:.3e} + {atol:.1e} ({out.dtype})"


def run_without_interpreter(code: str):
    """Run `code` in a fresh process with compiled (not interpreted) Triton kernels.

    FakeTensor/meta shape inference of a triton_op goes through torch's Triton
    higher-order op, which only knows compiled JITFunctions; it needs no GPU.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------- compile


def kernel_spec(kernel: str, signature: dict, constexprs: dict | None = None, *, aligned=(), num_warps=4, num_stages=3, name=None):
    """One kernel configuration to compile.

    kernel: "module:function", e.g. "olmo2_fast.kernels.swiglu:_swiglu_kernel".
    signature: argument name -> triton type ("*bf16", "i32", "fp32", "constexpr").
    constexprs: values for the constexpr arguments.
    aligned: argument names the real launch gives 16-byte alignment (pointers) or
      divisibility by 16 (sizes, strides); without it Triton emits scalar loads.
    """
    return {
        "kernel": kernel,
        "signature": signature,
        "constexprs": constexprs or {},
        "aligned": list(aligned),
        "num_warps": num_warps,
        "num_stages": num_stages,
        "name": name or f"{kernel.split(':')[1]}{constexprs or ''} w{num_warps} s{num_stages}",
    }


def compile_for_gpu(specs: list[dict], capabilities=(80, 90), timeout=1200) -> list[dict]:
    """Compile each spec for each capability; one report dict per (spec, capability)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("gpu_compile.py")
    proc = subprocess.run(
        [sys.executable, str(script)],
        input=json.dumps({"specs": specs, "capabilities": list(capabilities)}),
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"GPU compile subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def assert_compiles_clean(specs: list[dict], *, need_mma=False, need_vector_loads=False, capabilities=(80, 90)):
    """Compile all specs; fail on spills, excess shared memory or missing PTX features."""
    problems = []
    for r in compile_for_gpu(specs, capabilities):
        where = f"{r['name']} sm_{r['capability']}"
        if r["stack"] > 0 or r["local"] > 0:
            problems.append(f"{where}: spills (REG {r['regs']} STACK {r['stack']} LOCAL {r['local']})")
        if r["shared"] > SHARED_LIMIT[r["capability"]]:
            problems.append(f"{where}: shared memory {r['shared']} > {SHARED_LIMIT[r['capability']]}")
        if need_mma and not (r["mma"] or r["wgmma"]):
            problems.append(f"{where}: no mma/wgmma in the PTX")
        if need_vector_loads and not r["vector_loads"]:
            problems.append(f"{where}: no 16-byte vector loads (ld.global.v4) in the PTX")
    assert not problems, "\n".join(problems)

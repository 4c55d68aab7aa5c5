"""Compile Triton kernels for NVIDIA targets without a GPU (run by harness.compile_for_gpu).

Reads {"specs": [...], "capabilities": [80, 90]} as JSON on stdin and prints one JSON
report per (spec, capability): registers, STACK/LOCAL (spills), shared memory, and
whether the PTX holds mma / wgmma / 16-byte vector loads. Must run in a process
without TRITON_INTERPRET, or @triton.jit would build interpreted functions.
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET") != "1", "gpu_compile.py must run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes, function: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"Function {function}:":
            usage = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
            return {"regs": int(usage["REG"]), "stack": int(usage["STACK"]), "local": int(usage["LOCAL"])}
    raise RuntimeError(f"cuobjdump did not list {function}:\n{text}")


def compile_one(spec: dict, capability: int) -> dict:
    module, name = spec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    names = list(spec["signature"])
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec["aligned"]}
    src = ASTSource(fn, signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    ptx = compiled.asm["ptx"]
    report = resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    report.update(
        name=spec["name"],
        capability=capability,
        shared=compiled.metadata.shared,
        mma="mma.sync" in ptx,
        wgmma="wgmma" in ptx,
        vector_loads=bool(re.search(r"ld\.global(\.\w+)*\.v4", ptx)),
        cp_async="cp.async" in ptx,
    )
    return report


def main():
    request = json.load(sys.stdin)
    reports = [compile_one(s, c) for s in request["specs"] for c in request["capabilities"]]
    json.dump(reports, sys.stdout)


if __name__ == "__main__":
    main()

"""Compile Triton kernels for NVIDIA targets without a GPU (run by harness.compile_for_gpu).

Reads {"specs": [...], "capabilities": [80, 90]} as JSON on stdin and prints one JSON
report per (spec, capability): registers, STACK/LOCAL (spills), shared memory, whether
the PTX holds mma / wgmma / 16-byte vector loads / griddepcontrol, its gpu-scope acq_rel
atomics (and whether a CTA barrier orders the writes before each), and the loops of the
SASS (`sass_loops`: each innermost loop's instruction count and opcode histogram, from
`cuobjdump --dump-sass`). Must run in a process without TRITON_INTERPRET, or
@triton.jit would build interpreted functions.

Instructions per element, GPU-free: a loop is a backward branch (a BRA to a lower
address); its body runs from the branch target to the branch. The innermost loops'
body length divided by the elements one thread handles per iteration is a throughput
proxy (an H100 SM issues 4 warp-instructions per clock). A test picks its loop from the
report by its opcodes (e.g. the one with the most FFMA is a GEMV's multiply loop).
"""
import concurrent.futures
import importlib
import json
import multiprocessing
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


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+0x([0-9a-f]+)")
_PREDICATE = re.compile(r"^@!?U?P[T\d]+\s+")


def sass_instructions(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction text without its predicate guard) of the cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(address, 16), _PREDICATE.sub("", body.strip())) for address, body in _SASS_LINE.findall(text)]


def sass_loops(instructions: list[tuple[int, str]]) -> list[dict]:
    """The innermost loops (backward branches whose body holds no other backward branch), in address order:
    start/end addresses, instruction count (branch included) and opcode histogram."""
    spans = []
    for address, text in instructions:
        match = _BRANCH.search(text)
        if match and int(match.group(1), 16) < address:
            spans.append((int(match.group(1), 16), address))
    innermost = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    loops = []
    for start, end in sorted(innermost):
        opcodes: dict[str, int] = {}
        body = [text for address, text in instructions if start <= address <= end]
        for text in body:
            opcodes[text.split()[0]] = opcodes.get(text.split()[0], 0) + 1
        loops.append({"start": start, "end": end, "instructions": len(body), "opcodes": opcodes})
    return loops


def release_atomics(ptx: str) -> dict:
    """The gpu-scope acq_rel atomics of the PTX (split-K / last-block counters), and whether a CTA
    barrier separates each from the global writes before it: the release then covers every
    thread's writes (barrier, then one thread's release: cumulativity), not only its own."""
    count, fenced = 0, True
    last_barrier, last_write = -1, -1
    for index, line in enumerate(ptx.splitlines()):
        if "atom.global.gpu.acq_rel" in line:
            count += 1
            fenced &= last_barrier > last_write
        if re.search(r"\b(st|red|atom)\.global", line):
            last_write = index
        if re.search(r"\bbar\.sync\b|\bbarrier\.sync\b", line):
            last_barrier = index
    return {"acq_rel_atomics": count, "release_after_barrier": count > 0 and fenced}


def compile_one(spec: dict, capability: int) -> dict:
    module, name = spec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    names = list(spec["signature"])
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec["aligned"]}
    src = ASTSource(fn, signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
    # spec["options"]: further compile options the launch passes (e.g. maxnreg)
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"], **spec.get("options", {})}
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
        griddepcontrol="griddepcontrol" in ptx,
        **release_atomics(ptx),
        sass_loops=sass_loops(sass_instructions(compiled.asm["cubin"])),
    )
    return report


def main():
    request = json.load(sys.stdin)
    jobs = [(s, c) for s in request["specs"] for c in request["capabilities"]]
    # Compiles are independent and CPU-bound (ptxas, ~1-5 s each): spread them over the cores
    # (fresh "spawn" workers: forking a process that has loaded triton is not safe).
    workers = min(len(jobs), len(os.sched_getaffinity(0)))
    if workers > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            reports = list(pool.map(compile_one, *zip(*jobs)))
    else:
        reports = [compile_one(s, c) for s, c in jobs]
    json.dump(reports, sys.stdout)


if __name__ == "__main__":
    main()

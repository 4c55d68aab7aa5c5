"""`olmo2-fast bench kernels`: time each kernel case against its baselines and make the rows.

For every case (kernel_cases.py) and every candidate (our Triton kernel, the eager PyTorch it
replaces, torch.compile of that eager code, and per kernel further baselines) a row holds:
  median / p20 / p80 ms per call (timing.py), GB/s and TFLOP/s from the op's `*_cost` bytes and
  FLOPs, the fraction of the roofline floor max(bytes / measured bandwidth, FLOPs / measured
  matmul peak), which side bounds it, the speedup over the eager sequence (for int4 also over
  the unquantised matmul), and the max / relative error against a float64 oracle.
A candidate that fails (out of memory, torch.compile unavailable) gets a row with a note.
"""
from __future__ import annotations

import itertools
import sys
from typing import Callable

import torch

from olmo2_fast.progress import Progress

from .environment import Environment
from .kernel_cases import TRITON, Candidate, Case, tensors_of
from .report import Column, number, percent, text, times
from .timing import Peaks, TimingPlan, rotation_sets

COLUMNS = [
    Column("kernel", "kernel"), Column("phase", "phase"), Column("shape", "shape"), Column("impl", "impl"),
    Column("median_ms", "median ms", number(4)), Column("p20_ms", "p20", number(3)), Column("p80_ms", "p80", number(3)),
    Column("gbps", "GB/s", number(4)), Column("tflops", "TFLOP/s", number(3)),
    Column("roofline_fraction", "roofline", percent), Column("bound", "bound"),
    Column("speedup", "x eager", times), Column("speedup_vs_dense", "x dense", times),
    Column("max_err", "max err", number(2)), Column("note", "note", text),
]
# In a CPU smoke run the time column says so in its header.
CPU_COLUMNS = [Column(c.key, "CPU-smoke ms", c.fmt) if c.key == "median_ms" else c for c in COLUMNS]


def compile_candidates(case: Case, backend: str | None) -> list[Candidate]:
    """The case's candidates with a torch.compile twin after each compilable one.

    backend None: compilation skipped (--no-compile); the twin row says so. dynamic=False and a
    dynamo reset per case give each shape its own specialised graph (and keep one function
    compiled at many shapes from hitting dynamo's recompile limit and silently running eager).
    """
    out = []
    for cand in case.candidates:
        out.append(cand)
        if not cand.compile:
            continue
        name = "torch.compile" if backend in (None, "inductor") else f"torch.compile ({backend} backend)"
        fn = None if backend is None else torch.compile(cand.fn, dynamic=False, backend=backend)
        out.append(Candidate(name, fn, cost=cand.cost, oracle=cand.oracle))
    return out


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref|, ||out - ref|| / ||ref||) against the float64 oracle; NaN when out is not finite."""
    if not torch.isfinite(out).all():
        return float("nan"), float("nan")
    diff = out.double() - ref
    return diff.abs().max().item(), (diff.norm() / ref.norm().clamp_min(1e-300)).item()


def measure(cand: Candidate, case: Case, sets: list[tuple], reference: torch.Tensor, plan: TimingPlan) -> dict:
    """Time one candidate over the rotating sets, then check its output on set 0."""
    if cand.fn is None:
        return {"note": "skipped: --no-compile"}
    order = itertools.cycle(sets)
    try:
        timing = plan.time(lambda: cand.fn(*next(order)), calls_multiple=len(sets))
        out = cand.fn(*sets[0])
        max_err, rel_err = errors(out, cand.oracle(*sets[0]) if cand.oracle else reference)
    except Exception as e:  # recorded in the row: one failing baseline must not end the run
        first_line = (str(e).strip().splitlines() or [""])[0][:160]
        label = "torch.compile unavailable" if cand.impl.startswith("torch.compile") else "failed"
        return {"note": f"{label}: {type(e).__name__}: {first_line}"}
    return {"median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
            "samples": timing.samples, "method": timing.method, "max_err": max_err, "rel_err": rel_err,
            "note": "" if max_err == max_err else "non-finite output"}


def roofline(cost, median_ms: float | None, peaks: Peaks) -> dict:
    fields = {"bytes": cost.bytes, "flops": cost.flops,
              "bound": "memory" if cost.bytes / peaks.bandwidth >= cost.flops / peaks.flops else "compute"}
    if median_ms:
        seconds = median_ms / 1e3
        fields.update(gbps=cost.bytes / seconds / 1e9, tflops=cost.flops / seconds / 1e12,
                      roofline_fraction=cost.floor_seconds(peaks.bandwidth, peaks.flops) / seconds)
    return fields


def _input_sets(case: Case, plan: TimingPlan) -> list[tuple]:
    first = case.make_set(0)
    shared = {id(t) for t in tensors_of(case.shared)}
    allocated = sum(t.nbytes for t in tensors_of(first) if id(t) not in shared)
    budget = torch.cuda.mem_get_info(plan.device)[0] // 4 if plan.on_gpu else 0
    count = rotation_sets(case.cost.bytes, allocated, plan.l2_bytes(), budget)
    return [first] + [case.make_set(i) for i in range(1, count)]


def run_case(case: Case, plan: TimingPlan, peaks: Peaks, compile_backend: str | None, common: dict,
             bar: Progress) -> list[dict]:
    if compile_backend is not None:
        torch._dynamo.reset()
    sets = _input_sets(case, plan)
    reference = case.oracle(*sets[0])
    rows = []
    for cand in compile_candidates(case, compile_backend):
        result = measure(cand, case, sets, reference, plan)
        rows.append({"kernel": case.kernel, "phase": case.phase, "shape": case.label, "impl": cand.impl,
                     "input_sets": len(sets), **result, **roofline(cand.cost or case.cost, result.get("median_ms"), peaks),
                     "eager_baseline": cand.eager_baseline, "dense_baseline": cand.dense_baseline})
        bar.advance()
    for flag, key in (("eager_baseline", "speedup"), ("dense_baseline", "speedup_vs_dense")):
        base = next((r.get("median_ms") for r in rows if r[flag]), None)
        for row in rows:
            row[key] = base / row["median_ms"] if base and row.get("median_ms") else None
    for row in rows:
        del row["eager_baseline"], row["dense_baseline"]
        row.update(common)
    del sets
    if plan.on_gpu:
        torch.cuda.empty_cache()
    return rows


def run_kernels(cases: list[Case], plan: TimingPlan, peaks: Peaks, env: Environment, compile_backend: str | None,
                common: dict, progress: bool | None = None,
                on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """All rows of `bench kernels`; `common` (model size, dtype) and the environment go into every row.
    `on_rows` gets the rows so far after each case, so a run stopped midway keeps what it measured."""
    total = sum(len(c.candidates) + sum(x.compile for x in c.candidates) for c in cases)
    bar = Progress(total, "bench kernels", enabled=progress)
    rows = []
    try:
        for case in cases:
            rows += run_case(case, plan, peaks, compile_backend, {**common, **peaks.fields(), **env.fields()}, bar)
            if on_rows is not None:
                on_rows(rows)
    finally:
        bar.close()
    failed = [r for r in rows if r["impl"] == TRITON and r.get("median_ms") is None]
    for r in failed:
        print(f"warning: {r['kernel']} {r['shape']}: {r['note']}", file=sys.stderr)
    return rows


"""Timing a callable on the GPU (or, for smoke runs, the CPU), and measuring the card's two ceilings.

GPU method, the same for our kernels and for every baseline:
  1. warm-up for `warmup_ms` on a side stream, so Triton compilation, autotuning, torch.compile
     and cuBLAS handle creation stay out of the numbers;
  2. estimate one call's time with CUDA events;
  3. capture a CUDA graph of n calls and time its replays with CUDA events; a sample is one
     replay divided by n, and samples are taken for about `rep_ms` (at least 10).
Graph replays remove the gaps between launches, which is how the decode step runs its kernels
(graphs.py), and they do the same for the baselines: a speedup is the kernels', not Python
overhead's. The callable cycles over several input sets (see `rotation_sets`) whose bytes
together pass twice the L2 cache, so a memory-bound kernel reads HBM, not what the previous
call left in L2. A callable that cannot be captured (it syncs with the host) is timed with
events around eager calls instead; `Timing.method` says which.

Ceilings (`measure_peaks`): a device-to-device copy of 1 GiB (bytes read + bytes written over
time) and an 8192^3 matmul in the benchmark dtype on random data, timed the same way. Roofline
fractions divide by these measured numbers, never by a datasheet.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

TARGET_SAMPLE_MS = 1.0  # one sample (graph replay) lasts about this long: event resolution is ~0.5 us
MAX_CALLS_PER_SAMPLE = 8192
MIN_SAMPLES, MAX_SAMPLES = 10, 500
MAX_SETS = 4096  # input sets cycled through; small decode inputs need thousands to pass 2 x L2
DEFAULT_L2_BYTES = 50 * 2**20  # H100; read from the device when it reports one


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    method: str  # "cuda-graph", "cuda-events" or "cpu-clock"


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples_ms: list[float], method: str) -> Timing:
    ordered = sorted(samples_ms)
    return Timing(_quantile(ordered, 0.5), _quantile(ordered, 0.2), _quantile(ordered, 0.8), len(ordered), method)


def time_cuda(fn: Callable[[], object], *, warmup_ms: float, rep_ms: float, calls_multiple: int = 1,
              graph: bool = True) -> Timing:
    """Median / p20 / p80 milliseconds per call of `fn` on the current CUDA device.

    calls_multiple: calls per sample are a multiple of this (the number of input sets `fn`
    cycles through, so every set is used equally often). graph=False for callables that
    cannot be captured.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls, start = 0, time.perf_counter()
        while calls < 2 or (time.perf_counter() - start) * 1e3 < warmup_ms:
            fn()
            torch.cuda.synchronize()
            calls += 1
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(calls_multiple):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = max(begin.elapsed_time(end) / calls_multiple, 1e-4)
        rounds = max(1, math.ceil(TARGET_SAMPLE_MS / (estimate_ms * calls_multiple)))
        n = calls_multiple * max(1, min(rounds, MAX_CALLS_PER_SAMPLE // calls_multiple))
        n_samples = min(MAX_SAMPLES, max(MIN_SAMPLES, math.ceil(rep_ms / (estimate_ms * n))))

        if graph:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                for _ in range(n):
                    fn()
            run = cuda_graph.replay
        else:
            def run():
                for _ in range(n):
                    fn()
        run()  # the first replay uploads the graph
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n_samples)]
        for begin, end in events:
            begin.record()
            run()
            end.record()
        torch.cuda.synchronize()
    return summarize([b.elapsed_time(e) / n for b, e in events], "cuda-graph" if graph else "cuda-events")


def time_cpu(fn: Callable[[], object], *, warmup_calls: int, samples: int) -> Timing:
    """Wall-clock milliseconds per call on the host (CPU smoke runs)."""
    for _ in range(warmup_calls):
        fn()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return summarize(times, "cpu-clock")


@dataclass(frozen=True)
class TimingPlan:
    """How to time on this device: GPU warm-up/repetition in ms, CPU smoke runs in calls."""
    device: torch.device
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_warmup_calls: int = 1
    cpu_samples: int = 3

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def time(self, fn: Callable[[], object], *, calls_multiple: int = 1, graph: bool = True) -> Timing:
        if self.on_gpu:
            return time_cuda(fn, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms, calls_multiple=calls_multiple,
                             graph=graph)
        return time_cpu(fn, warmup_calls=self.cpu_warmup_calls, samples=self.cpu_samples)

    def l2_bytes(self) -> int:
        if not self.on_gpu:
            return 0
        return getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or DEFAULT_L2_BYTES


def rotation_sets(touched_bytes: int, allocated_bytes: int, l2_bytes: int, memory_budget: int) -> int:
    """Input sets to cycle through: enough that the bytes one call touches, summed over the sets,
    pass twice the L2 cache; no more than fit in `memory_budget`. On a CPU (l2_bytes = 0) two
    sets, which still exercises the rotation."""
    if l2_bytes <= 0:
        return 2
    want = math.ceil(2 * l2_bytes / max(touched_bytes, 1))
    fit = memory_budget // max(allocated_bytes, 1)
    return int(max(1, min(want, fit, MAX_SETS)))


@dataclass(frozen=True)
class Peaks:
    bandwidth: float  # bytes/s: device-to-device copy, bytes read + bytes written
    flops: float      # FLOP/s: a square matmul in the benchmark dtype
    how: str

    def fields(self) -> dict:
        return {"peak_gbps": self.bandwidth / 1e9, "peak_tflops": self.flops / 1e12}


def _time_copy(plan: TimingPlan, copy_bytes: int, generator: torch.Generator):
    src = torch.randn(copy_bytes // 4, generator=generator, device=plan.device)
    dst = torch.empty_like(src)
    return plan.time(lambda: dst.copy_(src))


def measure_peaks(plan: TimingPlan, dtype: torch.dtype, smoke: bool) -> Peaks:
    """The two ceilings of the roofline, measured on this device, on random data."""
    if plan.on_gpu:
        copy_bytes, n = (256 * 2**20, 4096) if smoke else (2**30, 8192)
    else:
        copy_bytes, n = 64 * 2**20, 512
    generator = torch.Generator(plan.device).manual_seed(0)
    copy = _time_copy(plan, copy_bytes, generator)  # its buffers are freed before the matmul's
    a = torch.randn(n, n, generator=generator, device=plan.device).to(dtype)
    b = torch.randn(n, n, generator=generator, device=plan.device).to(dtype)
    matmul = plan.time(lambda: torch.matmul(a, b))
    dtype_name = str(dtype).removeprefix("torch.")
    return Peaks(bandwidth=2 * copy_bytes / (copy.median_ms / 1e3), flops=2 * n**3 / (matmul.median_ms / 1e3),
                 how=f"copy of {copy_bytes / 2**20:.0f} MiB (read + write), {n}^3 {dtype_name} matmul")

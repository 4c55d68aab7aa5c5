"""CUDA-graph decode: a decode step captured once per batch bucket, then replayed.

At batch 1 a decode step is ~10 launches per layer; launched one by one from Python they
cost as much as the HBM floor of a small model. A captured graph replays all of them
with one launch.

The mechanics are split in two so that everything but the capture itself runs (and is
tested) on a CPU:
  * `DecodeGraphs` picks the bucket (1, 2, 4, ..., 64) of a decode batch, owns each bucket's
    static inputs (a `StepBatch` of padding rows), fills them in place before a replay and
    captures again when the cache changes;
  * a recorder turns "run this step" into a `CapturedStep`: `CudaGraphRecorder` with
    `torch.cuda.CUDAGraph`; tests use a fake that re-runs the step on replay
    (tests/fake_graphs.py), driving the same bucket and buffer code.
The captured step is any callable `step(batch, cache) -> Tensor` (Olmo2Fast's fused or
cuBLAS decode step) that reads only the batch's device tensors and the cache: a host
value it read (a `.item()`, `host_segments`) would be frozen into the graph; it must not
autotune either (kernels/int4_matmul.py fixes its decode configs by shape for this).

Rows past the real batch are padding: they decode token 0 at the cache's last position
into their own cache row, which exists because with graphs on the cache's batch is
rounded up to a bucket (`bucket_for`). Batches above the largest bucket decode eagerly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .cache import KVCache, StepBatch

logger = logging.getLogger("olmo2_fast")

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
WARMUP_RUNS = 2  # before a capture: the first launches compile kernels, which must not happen inside it
TIMED_REPLAYS = 7  # replays per candidate when a bucket times its decode paths against each other

DecodeStep = Callable[[StepBatch, KVCache], torch.Tensor]


def bucket_for(batch: int) -> int:
    """The rows a decode step of `batch` sequences runs with graphs on (and the cache rows it needs):
    the smallest bucket that holds it, or `batch` itself above the largest bucket, where the
    step runs eagerly (its launches are then amortised over many rows anyway)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"a decode batch must be a positive int, got {batch!r}")
    return next((size for size in BUCKETS if batch <= size), batch)


@dataclass
class CapturedStep:
    """A recorded step: `replay()` recomputes `output` in place from the static inputs it was recorded on."""
    output: torch.Tensor
    replay: Callable[[], None]


class GraphRecorder(Protocol):
    def capture(self, step: Callable[[], torch.Tensor], device: torch.device) -> CapturedStep: ...


class CudaGraphRecorder:
    """Records steps as CUDA graphs on the step's device (not the current one).

    Warm-up and capture run on a side stream of that device; all graphs of a device share
    one memory pool, so the buckets reuse each other's intermediate buffers (only one
    replays at a time, in stream order) instead of each holding its own.
    """

    def __init__(self):
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, tuple]] = {}

    def capture(self, step: Callable[[], torch.Tensor], device: torch.device) -> CapturedStep:
        with torch.cuda.device(device):
            if device not in self._streams:
                self._streams[device] = (torch.cuda.Stream(device), torch.cuda.graph_pool_handle())
            stream, pool = self._streams[device]
            current = torch.cuda.current_stream(device)
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_RUNS):
                    step()
            current.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # An explicit stream: torch.cuda.graph's default one is made once, on whatever device
            # was current at its first use.
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                output = step()

        def replay():
            with torch.cuda.device(device):  # cudaGraphLaunch goes to the current device's stream
                graph.replay()
        return CapturedStep(output, replay)

    @staticmethod
    def time(captured: CapturedStep, replays: int = TIMED_REPLAYS) -> float:
        """Median seconds of one replay (CUDA events, after one untimed replay)."""
        device = captured.output.device
        with torch.cuda.device(device):
            captured.replay()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(replays)]
            for start, end in events:
                start.record()
                captured.replay()
                end.record()
            torch.cuda.synchronize(device)
        return sorted(start.elapsed_time(end) for start, end in events)[replays // 2] / 1e3


def _set_padding(batch: StepBatch, rows: slice, max_seq: int):
    """Rows no real sequence fills (warm-up, padding) decode token 0 with an empty cache (kv_lens 0:
    the attention kernels read no key and the fused one writes nothing); the unfused path writes
    its k/v at the cache's last slot, where live data never sits when a decode step starts (a
    sequence at position max_seq - 1 writes it itself before reading it, and a prompt reusing a
    cached prefix never reuses that slot), so the warm-up clobbers no live sequence's tokens."""
    batch.input_ids[rows] = 0
    batch.positions[rows] = max_seq - 1
    batch.kv_lens[rows] = 0


class BucketGraph:
    """One bucket's static inputs and its captured step over them."""

    def __init__(self, step: DecodeStep, cache: KVCache, size: int, recorder: GraphRecorder):
        device = cache.k.device
        rows = torch.arange(size, device=device, dtype=torch.int32)
        static = StepBatch(
            input_ids=torch.empty(size, dtype=torch.int64, device=device),
            positions=torch.empty(size, dtype=torch.int32, device=device),
            seq_ids=rows,
            cu_seqlens=torch.arange(size + 1, device=device, dtype=torch.int32),
            kv_lens=torch.empty(size, dtype=torch.int32, device=device),
            last_token_rows=rows.long(),
            max_q_len=1,
            host_segments=[(i, i + 1, 1) for i in range(size)],
        )
        _set_padding(static, slice(None), cache.max_seq)
        self.static, self.max_seq = static, cache.max_seq
        self.filled = 0  # leading rows the last fill gave to real sequences
        self.captured = recorder.capture(lambda: step(static, cache), device)

    def fill(self, batch: StepBatch):
        """Copy a decode batch's ids, positions and lengths into the first rows (device to device);
        rows a longer previous batch filled go back to padding."""
        n = batch.input_ids.shape[0]
        self.static.input_ids[:n].copy_(batch.input_ids)
        self.static.positions[:n].copy_(batch.positions)
        self.static.kv_lens[:n].copy_(batch.kv_lens)
        if n < self.filled:
            _set_padding(self.static, slice(n, self.filled), self.max_seq)
        self.filled = n

    def replay(self, batch: StepBatch) -> torch.Tensor:
        """The step's output rows for `batch`: a view of the graph's output, valid until its next replay."""
        self.fill(batch)
        self.captured.replay()
        return self.captured.output[:batch.input_ids.shape[0]]


class DecodeGraphs:
    """Decode steps replayed from graphs captured lazily, one per bucket, over one cache.

    `step` decodes eagerly (batches without a bucket); `candidates(rows)`, when given, names the
    decode steps a bucket of that many rows may capture, preferred first
    (Olmo2Fast.decode_candidates: the fused step and the cuBLAS one). With more than one,
    each is captured and the recorder times a few replays of each; the bucket keeps the fastest
    (logged), so the product is never slower than either path on any card. A recorder that
    cannot time (the CPU tests' fake) keeps the preferred one.
    A new cache drops the graphs (they address the old cache's memory) and captures again;
    call `release()` before freeing a cache so the graphs do not keep it alive.
    """

    def __init__(self, step: DecodeStep, recorder: GraphRecorder | None = None, *,
                 candidates: Callable[[int], dict[str, DecodeStep]] | None = None):
        self.step = step
        self.candidates = candidates or (lambda rows: {"decode": step})
        self.recorder = CudaGraphRecorder() if recorder is None else recorder
        self.graphs: dict[int, BucketGraph] = {}
        self.choices: dict[int, str] = {}  # bucket -> the candidate its graph replays
        self.cache: KVCache | None = None
        self.last_choice: str | None = None

    def replay(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        n = batch.input_ids.shape[0]
        size = bucket_for(n)
        if n > BUCKETS[-1] or size > cache.max_batch:  # no bucket, or no spare cache rows to pad it with
            self.last_choice = next(iter(self.candidates(n)))
            return self.step(batch, cache)
        if cache is not self.cache:
            self.release()
            self.cache = cache
        if size not in self.graphs:
            self.choices[size], self.graphs[size] = self._capture(cache, size)
        self.last_choice = self.choices[size]
        return self.graphs[size].replay(batch)

    def _capture(self, cache: KVCache, size: int) -> tuple[str, BucketGraph]:
        graphs = {name: BucketGraph(step, cache, size, self.recorder) for name, step in self.candidates(size).items()}
        timer = getattr(self.recorder, "time", None)
        if len(graphs) == 1 or timer is None:
            return next(iter(graphs.items()))
        seconds = {name: timer(graph.captured) for name, graph in graphs.items()}
        best = min(seconds, key=seconds.get)
        logger.info("decode step for batch bucket %d: %s (%s)", size, best,
                    ", ".join(f"{name} {s * 1e3:.3f} ms" for name, s in seconds.items()))
        return best, graphs[best]

    def release(self):
        """Forget every graph and the cache they were captured over."""
        self.graphs.clear()
        self.choices.clear()
        self.cache = None

"""CUDA-graph decode: each decode step of the kernel-backed model, captured once per batch bucket.

At batch 1 a decode step is ~10 launches per layer; launched one by one from Python they
cost as much as the HBM floor of a small model. A captured graph replays all of them
with one launch. Each bucket (1, 2, 4, 8, 16, ...) owns static input buffers (ids,
positions, cache rows, cached lengths) that a replay fills in place; rows past the real
batch decode a dummy token into their own unused cache rows, which exist because the
cache's batch is rounded up to a bucket.
"""
from __future__ import annotations

import torch

from .cache import KVCache, StepBatch

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket_for(batch: int) -> int:
    for size in BUCKETS:
        if batch <= size:
            return size
    raise ValueError(f"decode batch {batch} exceeds the largest CUDA-graph bucket {BUCKETS[-1]}")


class _Graph:
    def __init__(self, model, cache: KVCache, size: int, pool):
        device = cache.k.device
        rows = torch.arange(size, device=device, dtype=torch.int32)
        # Rows no real sequence fills (warm-up, padding) write their K/V into the cache's last slot:
        # live data never sits there when a decode step starts (a sequence at position max_seq - 1
        # writes that slot itself before reading it), so earlier tokens are never clobbered.
        self.batch = StepBatch(
            input_ids=torch.zeros(size, dtype=torch.int64, device=device),
            positions=torch.full((size,), cache.max_seq - 1, dtype=torch.int32, device=device),
            seq_ids=rows,
            cu_seqlens=torch.arange(size + 1, device=device, dtype=torch.int32),
            kv_lens=torch.ones(size, dtype=torch.int32, device=device),  # padding rows attend to one key
            last_token_rows=rows.long(),
            max_q_len=1,
            host_segments=[(i, i + 1, 1) for i in range(size)],
        )
        # Warm up on a side stream (first launches compile and autotune kernels, which must not be captured).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model.forward(self.batch, cache, decode=True)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = model.forward(self.batch, cache, decode=True)

    def replay(self, batch: StepBatch) -> torch.Tensor:
        n = batch.input_ids.shape[0]
        static = self.batch
        static.input_ids[:n].copy_(batch.input_ids)
        static.positions[:n].copy_(batch.positions)
        static.kv_lens[:n].copy_(batch.kv_lens)
        self.graph.replay()
        return self.logits[:n]


class DecodeGraphs:
    """Lazily captured decode graphs, one per batch bucket, over one cache (recaptured if the cache changes)."""

    def __init__(self, model):
        self.model = model
        self.graphs: dict[int, _Graph] = {}
        self.cache: KVCache | None = None
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every bucket's graph

    def replay(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        size = bucket_for(batch.input_ids.shape[0])
        if size > cache.max_batch:  # no spare cache rows to pad the bucket with
            return self.model.forward(batch, cache, decode=True)
        if cache is not self.cache:
            self.graphs.clear()
            self.cache = cache
        if size not in self.graphs:
            self.graphs[size] = _Graph(self.model, cache, size, self.pool)
        return self.graphs[size].replay(batch)

"""Steps over a chunk of one sequence's tokens already on the device, eager or from a CUDA graph.

Speculative decoding steps one sequence (cache row 0) by several tokens at once: the target
verifies the last accepted token and the drafts, the draft model catches up on the tokens it
has not cached. `chunk_batch` makes that step's `StepBatch` from device ids without copying
anything from the host (positions come from an arange on the device; the row bookkeeping
tensors are made once per shape). A chunk of one token is a decode step, which an engine with
CUDA graphs replays from its own decode graphs.

`ChunkGraph` is the target's verify step captured once at a fixed number of rows (k + 1 for k
drafts), with the recorder of the engine's decode graphs (graphs.py): a fixed max_q_len gives a
fixed launch grid. A chunk with fewer tokens fills the first rows; the rows after it are
padding that writes K/V past the chunk, into slots the next step overwrites and no query of
this one reads (attention is causal within the chunk). It replays only where every row's slot
exists (start + rows <= max_seq); elsewhere the step runs eagerly.
"""
from __future__ import annotations

import functools

import torch

from .cache import KVCache, StepBatch
from .graphs import GraphRecorder


@functools.lru_cache(maxsize=64)
def _rows(n: int, logit_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq_ids, cu_seqlens, last_token_rows) of a chunk of n tokens of row 0 whose last logit_rows
    rows' logits are wanted: the same every step, so made once (read-only)."""
    return (torch.zeros(n, dtype=torch.int32, device=device),
            torch.tensor([0, n], dtype=torch.int32).to(device),
            torch.arange(n - logit_rows, n, device=device))


def chunk_batch(ids: torch.Tensor, start: int, logit_rows: int = 1) -> StepBatch:
    """ids (n,) int64 on the device: the tokens at positions start..start+n-1 of cache row 0. The step
    returns the logits of its last `logit_rows` rows."""
    n = ids.shape[0]
    seq_ids, cu_seqlens, last_rows = _rows(n, logit_rows, ids.device)
    positions = torch.arange(start, start + n, dtype=torch.int32, device=ids.device)
    return StepBatch(input_ids=ids, positions=positions, seq_ids=seq_ids, cu_seqlens=cu_seqlens,
                     kv_lens=positions[-1:] + 1, last_token_rows=last_rows, max_q_len=n,
                     host_segments=[(0, n, start + n)])


class ChunkGraph:
    """A chunk step of `rows` tokens of cache row 0, every row's logits returned, captured on first use."""

    def __init__(self, step, cache: KVCache, rows: int, recorder: GraphRecorder):
        device = cache.k.device
        self.step, self.cache, self.rows, self.recorder = step, cache, rows, recorder
        self.offsets = torch.arange(rows, dtype=torch.int32, device=device)
        self.static = chunk_batch(torch.zeros(rows, dtype=torch.int64, device=device), 0, rows)
        self.captured = None

    def fits(self, ids: torch.Tensor, start: int) -> bool:
        return ids.shape[0] <= self.rows and start + self.rows <= self.cache.max_seq

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (n, vocab) of the n = len(ids) tokens at start..start+n-1: a view of the graph's
        output, valid until its next replay."""
        static = self.static
        static.input_ids[:ids.shape[0]].copy_(ids)
        torch.add(self.offsets, start, out=static.positions)
        static.kv_lens.fill_(start + self.rows)
        if self.captured is None:
            # Captured over the real inputs: the warm-up runs write this chunk's own K/V, as the step does.
            self.captured = self.recorder.capture(lambda: self.step(static, self.cache), self.cache.k.device)
        self.captured.replay()
        return self.captured.output[:ids.shape[0]]

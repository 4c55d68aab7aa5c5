"""The static KV cache and the per-step token batch both backends consume.

Layout: `k`, `v` of shape (layers, max_batch, kv_heads, max_seq, head_dim); `layer(l)`
gives the (max_batch, kv_heads, max_seq, head_dim) views the kernels take. A decode
kernel reads one sequence's keys for one KV head contiguously, and all query heads of
that group share them. Cache row b belongs to sequence b of the running batch; when
sequences finish, the generation loop moves running ones into the freed rows
(`move_row`), so the running batch always occupies rows 0..n-1.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .config import Olmo2Config
from .errors import GenerationError


def cache_bytes(config: Olmo2Config, max_batch: int, max_seq: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * max_batch * config.kv_width * max_seq * itemsize


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None  # host memory: let the allocator decide


class KVCache:
    def __init__(self, config: Olmo2Config, max_batch: int, max_seq: int, dtype: torch.dtype, device):
        if max_seq > config.max_position_embeddings:
            raise GenerationError(f"max_seq_len {max_seq} exceeds the model's context "
                                  f"({config.max_position_embeddings} positions)")
        device = torch.device(device)
        need = cache_bytes(config, max_batch, max_seq, dtype)
        free = _free_bytes(device)
        if free is not None and need > free:
            raise GenerationError(f"KV cache for batch {max_batch} x {max_seq} tokens needs {need / 2**30:.2f} GiB, "
                                  f"but only {free / 2**30:.2f} GiB is free on {device}; lower max_batch_size or "
                                  "max_seq_len")
        shape = (config.num_hidden_layers, max_batch, config.num_key_value_heads, max_seq, config.head_dim)
        try:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            raise GenerationError(f"could not allocate the KV cache ({need / 2**30:.2f} GiB on {device}): {e}") from None
        self.max_batch, self.max_seq = max_batch, max_seq
        self.nbytes = need

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[index], self.v[index]

    def move_row(self, src: int, dst: int, length: int):
        """Copy the first `length` cached positions of row `src` into row `dst`, every layer: a device
        copy of what that sequence has cached (the cost of reading its K/V once), queued like a kernel."""
        self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
        self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])


@functools.lru_cache(maxsize=64)
def _decode_rows(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq_ids, cu_seqlens, last_token_rows) of a decode step of n sequences: the same every step,
    so made once (read-only) instead of allocated per token."""
    rows = torch.arange(n, dtype=torch.int32, device=device)
    return rows, torch.arange(n + 1, dtype=torch.int32, device=device), rows.long()


@dataclass
class StepBatch:
    """Tokens of B sequences packed into one step (a prefill of several prompts, or one decode step).

    Device tensors feed the kernels; `host_segments` (start, end, kv_len) per sequence
    is what the host already knows and lets the reference loop without a device read.
    """
    input_ids: torch.Tensor        # (T,) int64
    positions: torch.Tensor        # (T,) int32, absolute position of each token
    seq_ids: torch.Tensor          # (T,) int32, cache row of each token
    cu_seqlens: torch.Tensor       # (B+1,) int32, tokens of sequence b are rows cu[b]:cu[b+1]
    kv_lens: torch.Tensor          # (B,) int32, cached length of each sequence after this step
    last_token_rows: torch.Tensor  # (B,) int64, row of each sequence's last token
    max_q_len: int
    host_segments: list[tuple[int, int, int]]

    @classmethod
    def decode(cls, ids: torch.Tensor, positions: torch.Tensor, lengths: list[int]) -> "StepBatch":
        """One new token per sequence, nothing copied from the host: ids (B,) int64 and positions (B,)
        int32 are device tensors (the previous step's sampled ids and kv_lens); lengths[b] ==
        positions[b], the tokens sequence b has cached before this one, as the host counts them
        (for host_segments). The step's kv_lens, positions + 1, are the next step's positions."""
        rows, cu_seqlens, last_rows = _decode_rows(len(lengths), ids.device)
        return cls(
            input_ids=ids, positions=positions, seq_ids=rows, cu_seqlens=cu_seqlens, kv_lens=positions + 1,
            last_token_rows=last_rows, max_q_len=1,
            host_segments=[(b, b + 1, length + 1) for b, length in enumerate(lengths)],
        )

    @classmethod
    def build(cls, chunks: list[list[int]], start_positions: list[int], device) -> "StepBatch":
        """chunks[b]: the new token ids of sequence b (>= 1 each); start_positions[b]: how many it has cached."""
        ids, positions, seq_ids, cu, kv_lens, segments = [], [], [], [0], [], []
        for b, (chunk, start) in enumerate(zip(chunks, start_positions)):
            ids += chunk
            positions += range(start, start + len(chunk))
            seq_ids += [b] * len(chunk)
            segments.append((cu[-1], cu[-1] + len(chunk), start + len(chunk)))
            cu.append(cu[-1] + len(chunk))
            kv_lens.append(start + len(chunk))

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return cls(
            input_ids=tensor(ids, torch.int64), positions=tensor(positions, torch.int32),
            seq_ids=tensor(seq_ids, torch.int32), cu_seqlens=tensor(cu, torch.int32),
            kv_lens=tensor(kv_lens, torch.int32), last_token_rows=tensor([end - 1 for end in cu[1:]], torch.int64),
            max_q_len=max(len(c) for c in chunks), host_segments=segments,
        )

"""The engine contract, and the one place engines are chosen and built.

Two engines compute OLMo 2: the plain-PyTorch reference (backend "torch", reference.py)
and the kernel-backed model (backend "triton", model.py). Everything above them — the
scheduler, the API, the server, the benchmarks — talks to an `Engine` and builds one with
`build_engine`, so the backend rules (the default per device, Triton's interpreter on a
CPU, CUDA graphs) live here only.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterator, Protocol

import torch

from .cache import KVCache, StepBatch
from .config import Olmo2Config
from .errors import CheckpointError

logger = logging.getLogger("olmo2_fast")

BACKENDS = ("auto", "torch", "triton")


class Engine(Protocol):
    config: Olmo2Config

    def step(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """Packed tokens of B sequences -> logits (len(batch.last_token_rows), vocab); their k/v go into the cache."""

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, vocab) logits, full recomputation with no cache."""

    def checkpoint_tensors(self) -> tuple[Olmo2Config, dict[str, torch.Tensor]]:
        """(config, tensors by checkpoint name) that save_checkpoint writes and from_pretrained loads back."""

    def cache_rows(self, batch: int) -> int:
        """KV-cache rows a decode batch of `batch` sequences needs (more with CUDA-graph buckets)."""

    def release_cache(self):
        """Drop anything that holds on to the current KV cache (captured graphs), before it is freed."""

    def greedy_ids(self, rows: int) -> torch.Tensor | None:
        """(rows,) int64 argmax ids of the last step's logits when the step computed them itself (the fused
        decode step's lm_head epilogue), so sampling need not launch anything; None otherwise."""


def enable_triton_interpreter():
    """Kernels on a CPU run under Triton's interpreter, which must be switched on before triton is
    first imported (torch itself may import it, e.g. for torch.compile)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise CheckpointError("backend='triton' on a CPU needs Triton's interpreter, but triton was already imported "
                              "in this process without it: set TRITON_INTERPRET=1 before starting Python, or use "
                              "backend='torch'")
    os.environ["TRITON_INTERPRET"] = "1"


def choose_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA (our kernels), "torch" on a CPU (the reference; int4 runs there too,
    dequantising in PyTorch). "triton" on a CPU runs the kernels under Triton's interpreter: slow, for tests."""
    if backend not in BACKENDS:
        raise CheckpointError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type == "cpu":
        logger.warning("backend='triton' on a CPU runs the kernels under Triton's interpreter: slow, for testing")
        enable_triton_interpreter()
    return backend


def build_engine(config: Olmo2Config, tensors: Iterator[tuple[str, torch.Tensor]], *, backend: str,
                 device: torch.device, quantize: str | None = None, quantize_lm_head: bool = False,
                 cuda_graphs: bool = True, decode_path: str = "auto", greedy_vocab: int | None = None) -> Engine:
    """An engine over (HF name, tensor) pairs as checkpoint.iter_checkpoint yields them.

    backend: "torch" or "triton" (see choose_backend). quantize: None or "int4" (weights quantised
    at load; a checkpoint saved quantised needs none); quantize_lm_head: lm_head too. cuda_graphs: on
    CUDA, the kernel engine replays its decode steps as CUDA graphs (graphs.py). decode_path (kernels): "fused", "cublas"
    or "auto" (model.Olmo2Fast). greedy_vocab: the ids greedy decoding may pick (the tokenizer's).
    """
    if backend == "torch":
        from .reference import Olmo2Reference

        return Olmo2Reference.from_tensors(config, tensors, device, quantize, quantize_lm_head)
    from .graphs import DecodeGraphs
    from .model import Olmo2Fast  # imports triton: only now, after the interpreter decision

    engine = Olmo2Fast.from_tensors(config, tensors, quantize, quantize_lm_head, decode_path=decode_path,
                                   greedy_vocab=greedy_vocab)
    if device.type == "cuda" and cuda_graphs:
        engine.graphs = DecodeGraphs(engine.decode_step, candidates=engine.decode_candidates)
    return engine

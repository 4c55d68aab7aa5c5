"""The public API: `OLMo2.from_pretrained(path)`, `model(input_ids)`, `generate`, `stream`."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .cache import KVCache, cache_bytes
from .checkpoint import CONFIG_FILE, iter_checkpoint, parse_dtype, resolve_checkpoint, save_checkpoint
from .config import Olmo2Config
from .errors import CheckpointError, GenerationError
from .generate import run_generation
from .graphs import DecodeGraphs, bucket_for
from .reference import Olmo2Reference
from .sampling import SamplingParams
from .tokenizer import Tokenizer

logger = logging.getLogger("olmo2_fast")

BACKENDS = ("auto", "torch", "triton")
SEQ_ROUNDING = 256  # the cache grows in steps of this many positions
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja")  # copied beside the weights by save_pretrained


def enable_triton_interpreter():
    """Kernels on a CPU run under Triton's interpreter, which must be switched on before triton is
    first imported (torch itself may import it, e.g. once a torch-backend model has been loaded)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise CheckpointError("backend='triton' on a CPU needs Triton's interpreter, but triton was already imported "
                              "in this process without it: set TRITON_INTERPRET=1 before starting Python, or use "
                              "backend='torch'")
    os.environ["TRITON_INTERPRET"] = "1"


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"unknown device {device!r}: use 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device='cuda' was requested, but CUDA is not available in this PyTorch "
                              f"(torch {torch.__version__}); use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise CheckpointError(f"unsupported device {device}: use 'cpu' or 'cuda'")
    return device


class OLMo2:
    """An OLMo 2 checkpoint ready to run: model, tokenizer and a static KV cache."""

    def __init__(self, engine, tokenizer: Tokenizer, config: Olmo2Config, device: torch.device, dtype: torch.dtype,
                 backend: str, source_dir: Path, max_batch_size: int | None = None, max_seq_len: int | None = None):
        self.engine, self.tokenizer, self.config, self.source_dir = engine, tokenizer, config, source_dir
        self.device, self.dtype, self.backend = device, dtype, backend
        self._cache: KVCache | None = None
        self._fixed_cache = max_batch_size is not None or max_seq_len is not None
        if self._fixed_cache:
            self._allocate_cache(max_batch_size or 1, max_seq_len or config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, dtype=None, backend: str = "auto",
                        quantize: str | None = None, revision: str | None = None,
                        max_batch_size: int | None = None, max_seq_len: int | None = None,
                        progress: bool | None = None, cuda_graphs: bool = True) -> "OLMo2":
        """Load a Hugging Face OLMo 2 checkpoint (local directory, or hub id with huggingface_hub).

        device: "cpu" / "cuda" (default: cuda when available). dtype: bfloat16 / float32 /
        float16 (default: bfloat16 on CUDA, float32 on CPU). backend: "triton" (our kernels),
        "torch" (the plain-PyTorch reference) or "auto" (triton on CUDA or for int4 weights, torch
        on CPU; triton on a CPU runs the kernels under Triton's interpreter: slow, for testing). quantize: None or
        "int4" (group-128 weight-only, triton backend). max_batch_size / max_seq_len: preallocate
        the KV cache (default: grown to fit each request). progress: progress bar over tensors
        (default: when stderr is a terminal). cuda_graphs: replay decode steps as CUDA graphs.
        """
        if backend not in BACKENDS:
            raise CheckpointError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise GenerationError(f"{name} must be a positive integer, got {value!r}")
        if quantize not in (None, "int4"):
            raise CheckpointError(f"unsupported quantize={quantize!r}: choose None or 'int4'")
        device = resolve_device(device)
        directory = resolve_checkpoint(path, revision)
        config = Olmo2Config.from_json_file(directory / CONFIG_FILE)
        if backend == "auto":  # int4 weights exist only for the kernels
            backend = "triton" if device.type == "cuda" or quantize or config.quantization else "torch"
        if (quantize or config.quantization) and backend != "triton":
            raise CheckpointError("int4 weights run on the int4 kernels: use backend='triton' (the default on CUDA)")
        if backend == "triton" and device.type == "cpu":
            logger.warning("backend='triton' on a CPU runs the kernels under Triton's interpreter: slow, for testing")
            enable_triton_interpreter()
        dtype = parse_dtype(dtype if dtype is not None else ("bfloat16" if device.type == "cuda" else "float32"))
        if dtype == torch.float16:
            logger.warning("OLMo 2 overflows in float16 (NaN / '!!!!' output); prefer bfloat16 or float32")
        directory = resolve_checkpoint(path, revision)
        config = Olmo2Config.from_json_file(directory / CONFIG_FILE)
        tokenizer = Tokenizer(directory, config)
        tensors = iter_checkpoint(directory, config, dtype, device, progress)
        if backend == "torch":
            engine = Olmo2Reference.from_tensors(config, tensors, device)
        else:
            from .model import Olmo2Fast  # imports triton: only now, after the interpreter decision

            engine = Olmo2Fast.from_tensors(config, tensors, quantize)
            if device.type == "cuda" and cuda_graphs:
                engine.graphs = DecodeGraphs(engine.decode_step)
        return cls(engine, tokenizer, config, device, dtype, backend, directory, max_batch_size, max_seq_len)

    def save_pretrained(self, path: str | Path, num_shards: int = 1) -> Path:
        """Write the model as a checkpoint directory that from_pretrained loads: config.json, safetensors
        and the tokenizer files. A quantize="int4" model saves its packed int4 weights, so reloading it
        skips quantisation."""
        if self.backend == "torch":
            config, tensors = self.config, dict(self.engine.state_dict())
        else:
            config, tensors = self.engine.checkpoint_tensors()
        config = config.with_(torch_dtype=str(self.dtype).removeprefix("torch."))
        extra = {name: self.source_dir / name for name in TOKENIZER_FILES if (self.source_dir / name).is_file()}
        return save_checkpoint(path, config, tensors, num_shards=num_shards, extra_files=extra)

    # ------------------------------------------------------------------ logits

    def __call__(self, input_ids) -> torch.Tensor:
        """input_ids (batch, seq) or (seq,) ints -> logits (batch, seq, vocab), full recomputation."""
        ids = torch.as_tensor(input_ids, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise GenerationError(f"input_ids must be integer ids of shape (batch, seq) with seq >= 1, got "
                                  f"{tuple(ids.shape)} {ids.dtype}")
        self._check_length(ids.shape[1])
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise GenerationError(f"token ids must lie in [0, {self.config.vocab_size}), got "
                                  f"[{ids.min().item()}, {ids.max().item()}]")
        with torch.inference_mode():
            return self.engine(ids.long())

    # ------------------------------------------------------------------ generation

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: str | Sequence[str] | None = None, *,
                 min_p: float | None = None, repetition_penalty: float = 1.0):
        """Complete a prompt (str -> completion text; list[int] -> new token ids) or a list of prompts.

        Greedy by default; with temperature > 0, `seed` makes sampling reproducible (each
        prompt of a batch gets seed + its index). Generation stops at an EOS id of the
        checkpoint, at any `stop` string (excluded from the text), after `max_new_tokens`,
        or at the end of the model's context.
        """
        prompts, single, as_text = self._parse_prompts(prompt)
        for states in self._run(prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                                stop):
            pass  # run to completion; `states` holds the final state of every sequence
        results = [s.text if as_text else list(s.ids) for s in states]
        return results[0] if single else results

    def stream(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop: str | Sequence[str] | None = None, *,
               min_p: float | None = None, repetition_penalty: float = 1.0) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, whole characters only, as they are decoded."""
        prompts, single, _ = self._parse_prompts(prompt)
        if not single:
            raise GenerationError("stream() takes one prompt; use generate() for a batch")
        for states in self._run(prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                                seed, stop):
            piece = states[0].pending_text()
            if piece:
                yield piece

    def chat(self, messages: list[dict], max_new_tokens: int = 256, **kwargs) -> str:
        """Reply to a conversation using the checkpoint's chat template (OLMo 2 Instruct: Tulu style).

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]; other keyword
        arguments as for generate(). Returns the assistant's reply text.
        """
        return self.generate(self.tokenizer.apply_chat_template(messages), max_new_tokens=max_new_tokens, **kwargs)

    def stream_chat(self, messages: list[dict], max_new_tokens: int = 256, **kwargs) -> Iterator[str]:
        """chat(), streamed as text pieces."""
        return self.stream(self.tokenizer.apply_chat_template(messages), max_new_tokens=max_new_tokens, **kwargs)

    def _run(self, prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise GenerationError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        for p in prompts:
            self._check_length(len(p))
        # The last new token never enters the cache: a prompt of P tokens with N new ones needs P + N - 1 positions.
        room = self.config.max_position_embeddings - max(len(p) for p in prompts) + 1
        max_new_tokens = min(max_new_tokens, room)
        cache = self._cache_for(len(prompts), max(len(p) for p in prompts) + max_new_tokens - 1)
        seeds = [None if seed is None else seed + i for i in range(len(prompts))]
        yield from run_generation(self.engine, cache, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                  params=params, seeds=seeds, stop=stop)

    def _parse_prompts(self, prompt) -> tuple[list[list[int]], bool, bool]:
        """-> (token id lists, whether a single prompt was given, whether results are text)."""
        def ids_of(p) -> tuple[list[int], bool]:
            if isinstance(p, str):
                ids = self.tokenizer.encode(p)
                if not ids:
                    fallback = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else (
                        self.tokenizer.eos_ids[0] if self.tokenizer.eos_ids else None)
                    if fallback is None:
                        raise GenerationError("empty prompt, and the tokenizer has no BOS/EOS token to start from")
                    ids = [fallback]
                return ids, True
            if isinstance(p, (list, tuple)) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                bad = [t for t in p if not 0 <= t < self.config.vocab_size]
                if bad:
                    raise GenerationError(f"prompt token ids must lie in [0, {self.config.vocab_size}), got {bad[:5]}")
                return list(p), False
            raise GenerationError("a prompt must be a str or a non-empty list of int token ids, got "
                                  f"{type(p).__name__}: {str(p)[:60]!r}")

        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (str, list, tuple)) for p in prompt):
            parsed = [ids_of(p) for p in prompt]
            kinds = {text for _, text in parsed}
            if len(kinds) > 1:
                raise GenerationError("a batch of prompts must be all strings or all token id lists")
            return [ids for ids, _ in parsed], False, kinds.pop()
        ids, as_text = ids_of(prompt)
        return [ids], True, as_text

    def _check_length(self, length: int):
        if length > self.config.max_position_embeddings:
            raise GenerationError(f"prompt of {length} tokens is longer than the model's context of "
                                  f"{self.config.max_position_embeddings} positions")

    # ------------------------------------------------------------------ cache

    def _cache_for(self, batch: int, seq: int) -> KVCache:
        cache = self._cache
        if cache is not None and batch <= cache.max_batch and seq <= cache.max_seq:
            return cache
        if self._fixed_cache:
            raise GenerationError(f"request needs a KV cache of batch {batch} x {seq} positions, but the model was "
                                  f"loaded with max_batch_size={cache.max_batch}, max_seq_len={cache.max_seq}")
        seq = min(-(-seq // SEQ_ROUNDING) * SEQ_ROUNDING, self.config.max_position_embeddings)
        graphs = getattr(self.engine, "graphs", None)
        if graphs is not None:
            batch = bucket_for(batch)  # spare rows let a graph bucket pad a smaller batch
            graphs.release()  # the graphs hold the old cache: let it go with them
        if cache is not None:
            batch, seq = max(batch, cache.max_batch), max(seq, cache.max_seq)
        cache = self._cache = None  # free the old cache (this frame's reference too) before allocating the larger one
        return self._allocate_cache(batch, seq)

    def _allocate_cache(self, batch: int, seq: int) -> KVCache:
        logger.info("allocating KV cache: batch %d x %d positions, %.1f MiB", batch, seq,
                    cache_bytes(self.config, batch, seq, self.dtype) / 2**20)
        self._cache = KVCache(self.config, batch, seq, self.dtype, self.device)
        return self._cache

"""The public API: `OLMo2.from_pretrained(path)`, `model(input_ids)`, `generate`, `stream`, `chat`."""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .cache import KVCache, cache_bytes
from .checkpoint import CONFIG_FILE, iter_checkpoint, parse_dtype, resolve_checkpoint, save_checkpoint
from .config import Olmo2Config
from .engine import Engine, build_engine, choose_backend
from .errors import CheckpointError, GenerationError
from .sampling import SamplingParams
from .scheduler import Request, Scheduler
from .scheduler import Sequence as RunningSequence
from .speculative import Speculation, SpeculativeDecoder
from .tokenizer import Tokenizer

logger = logging.getLogger("olmo2_fast")

SEQ_ROUNDING = 256  # the cache grows in steps of this many positions
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja")  # copied beside the weights by save_pretrained


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


@dataclass(frozen=True)
class GenerationResult:
    """One prompt's generation, as generate(..., return_details=True) and TextStream.result report it.

    finish_reason: "eos" (the model ended), "stop" (a stop string; cut from the text), "length"
    (max_new_tokens), or "context" (the model's context is full). Times in seconds, on the host
    clock; decode_tokens_per_s counts the tokens after the first.
    """
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_prompt_tokens: int        # prompt tokens found in the KV cache, not prefilled
    time_to_first_token: float
    total_time: float
    decode_tokens_per_s: float | None

    @classmethod
    def of(cls, sequence: RunningSequence) -> "GenerationResult":
        first, end = sequence.first_token_at or sequence.finished_at, sequence.finished_at
        decoded = len(sequence.sampled) - 1
        return cls(sequence.text, list(sequence.ids), sequence.finish_reason, sequence.prompt_len, sequence.reused,
                   first - sequence.submitted_at, end - sequence.submitted_at,
                   decoded / (end - first) if decoded > 0 and end > first else None)


class TextStream:
    """The text pieces of one generation (whole characters, stop strings held back until ruled out),
    iterated as they are decoded; `result` holds the GenerationResult once the stream is exhausted.
    Closing it early (or dropping it) ends the generation and frees the model for the next call."""

    def __init__(self, pieces: Iterator[str], outcome: dict):
        # `outcome` is filled by the generator; it must not refer back to this object, or the pair would
        # form a cycle and a dropped stream would hold the model until the garbage collector ran.
        self._pieces, self._outcome = pieces, outcome

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    @property
    def result(self) -> GenerationResult | None:
        return self._outcome.get("result")

    def close(self):
        self._pieces.close()


class OLMo2:
    """An OLMo 2 checkpoint ready to run: model, tokenizer and a static KV cache.

    One instance serves one generation at a time: calls from several threads are served one after
    another (each waits for the model), and starting a generation while a stream of the same thread
    is still open is refused with a GenerationError (it would need the same cache rows).
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer, config: Olmo2Config, device: torch.device,
                 dtype: torch.dtype, backend: str, source_dir: Path, max_batch_size: int | None = None,
                 max_seq_len: int | None = None, speculation: Speculation | None = None):
        self.engine, self.tokenizer, self.config, self.source_dir = engine, tokenizer, config, source_dir
        self.device, self.dtype, self.backend = device, dtype, backend
        self.speculation = speculation
        self._cache: KVCache | None = None
        self._scheduler: Scheduler | None = None
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread id of the generation in progress
        self._fixed_cache = max_batch_size is not None or max_seq_len is not None
        if self._fixed_cache:
            self._allocate_cache(max_batch_size or 1, max_seq_len or config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, dtype=None, backend: str = "auto",
                        quantize: str | None = None, quantize_lm_head: bool = False, revision: str | None = None,
                        max_batch_size: int | None = None, max_seq_len: int | None = None,
                        progress: bool | None = None, cuda_graphs: bool = True, decode_path: str = "auto", draft=None,
                        num_speculative_tokens: int | None = None, prompt_lookup: int | None = None) -> "OLMo2":
        """Load a Hugging Face OLMo 2 checkpoint (local directory, or hub id with huggingface_hub).

        device: "cpu" / "cuda" (default: cuda when available). dtype: bfloat16 / float32 /
        float16 (default: bfloat16 on CUDA, float32 on CPU). backend: "triton" (our kernels),
        "torch" (the plain-PyTorch reference) or "auto" (triton on CUDA, torch on a CPU; triton on
        a CPU runs the kernels under Triton's interpreter: slow, for testing). quantize: None or
        "int4" (group-128 weight-only; the kernels on triton, dequantise-and-matmul on torch).
        quantize_lm_head: quantise lm_head too (off by default: its accuracy cost is in the README).
        max_batch_size / max_seq_len: preallocate the KV cache (default: grown to fit each
        request). progress: progress bar over tensors (default: when stderr is a terminal).
        cuda_graphs: replay decode steps as CUDA graphs. decode_path (backend "triton"): "fused" (five
        launches per layer, fused_decode.py), "cublas" (cuBLAS projections, unfused kernels) or "auto"
        (fused where it applies; with CUDA graphs each batch bucket keeps the faster of the two, timed).
        Speculative decoding of single prompts (speculative.py): draft, a checkpoint path or an OLMo2 with
        the same tokenizer (a path loads with this model's device, dtype, backend and quantize), or
        prompt_lookup=N, drafting from earlier occurrences of the last N tokens; num_speculative_tokens:
        drafts per target forward (default: speculative.DEFAULT_DRAFT_TOKENS / DEFAULT_LOOKUP_TOKENS).
        """
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise GenerationError(f"{name} must be a positive integer, got {value!r}")
        device = resolve_device(device)
        backend = choose_backend(backend, device)
        dtype = parse_dtype(dtype if dtype is not None else ("bfloat16" if device.type == "cuda" else "float32"))
        if dtype == torch.float16:
            logger.warning("OLMo 2 overflows in float16 (NaN / '!!!!' output); prefer bfloat16 or float32")
        directory = resolve_checkpoint(path, revision)
        config = Olmo2Config.from_json_file(directory / CONFIG_FILE)
        tokenizer = Tokenizer(directory, config)
        speculation = Speculation.configure(  # before the target's weights: a refused draft fails fast
            directory, config, device, draft, num_speculative_tokens, prompt_lookup,
            load_draft=lambda path: cls.from_pretrained(path, device=device, dtype=dtype, backend=backend,
                                                        quantize=quantize, quantize_lm_head=quantize_lm_head,
                                                        progress=progress, cuda_graphs=cuda_graphs,
                                                        decode_path=decode_path))
        engine = build_engine(config, iter_checkpoint(directory, config, dtype, device, progress), backend=backend,
                              device=device, quantize=quantize, quantize_lm_head=quantize_lm_head,
                              cuda_graphs=cuda_graphs, decode_path=decode_path,
                              greedy_vocab=tokenizer.vocab_size)
        return cls(engine, tokenizer, config, device, dtype, backend, directory, max_batch_size, max_seq_len,
                   speculation)

    def save_pretrained(self, path: str | Path, num_shards: int = 1) -> Path:
        """Write the model as a checkpoint directory that from_pretrained loads: config.json, safetensors
        and the tokenizer files. A quantised model saves its packed weights, so reloading it skips
        quantisation. Written beside the target and moved into place (checkpoint.save_checkpoint)."""
        config, tensors = self.engine.checkpoint_tensors()
        config = config.with_(torch_dtype=str(self.dtype).removeprefix("torch."))
        extra = {name: self.source_dir / name for name in TOKENIZER_FILES if (self.source_dir / name).is_file()}
        return save_checkpoint(path, config, tensors, num_shards=num_shards, extra_files=extra)

    # ------------------------------------------------------------------ logits

    def __call__(self, input_ids) -> torch.Tensor:
        """input_ids (batch, seq) or (seq,) integer ids (lists, tensor or numpy array) -> logits
        (batch, seq, vocab), full recomputation."""
        if isinstance(input_ids, (list, tuple)):
            try:
                input_ids = np.asarray(input_ids)
            except ValueError:  # numpy refuses ragged nesting
                raise GenerationError("input_ids must be a rectangular (batch, seq) array of token ids; for prompts "
                                      "of different lengths use generate()") from None
            if input_ids.dtype.kind not in "iu":
                raise GenerationError(f"input_ids must be integer token ids, got {input_ids.dtype} values (for "
                                      "text, use model.tokenizer.encode)")
        elif not isinstance(input_ids, (torch.Tensor, np.ndarray)):
            raise GenerationError(f"input_ids must be integer token ids (list, tensor or array), got "
                                  f"{type(input_ids).__name__}")
        ids = torch.as_tensor(input_ids, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype.is_floating_point or ids.dtype.is_complex \
                or ids.dtype == torch.bool:
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
                 min_p: float | None = None, repetition_penalty: float = 1.0, return_details: bool = False):
        """Complete a prompt (str -> completion text; token ids -> new token ids) or a list of prompts.

        A prompt is text, or token ids as a list, a 1-D integer tensor or numpy array. Greedy by
        default; with temperature > 0, `seed` makes sampling reproducible (each prompt of a batch
        gets seed + its index). Generation stops at an EOS id of the checkpoint, at any `stop`
        string (cut from the text), after `max_new_tokens`, or at the end of the model's context.
        return_details=True returns GenerationResult(s) instead: text, ids, finish reason, timings.
        """
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        prompts, single, as_text = self._parse_prompts(prompt)
        requests = self._requests(prompts, max_new_tokens, params, stop)
        with self._exclusive():
            sequences = self._start(requests)
            while not all(s.done for s in sequences):
                self._scheduler.step()
        results = [self._result(s) for s in sequences]
        if not return_details:
            results = [r.text if as_text else r.token_ids for r in results]
        return results[0] if single else results

    def stream(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop: str | Sequence[str] | None = None, *,
               min_p: float | None = None, repetition_penalty: float = 1.0) -> TextStream:
        """The completion of one prompt as text pieces (whole characters) as they are decoded: a
        TextStream, whose `result` (a GenerationResult) is set once it is exhausted."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        prompts, single, _ = self._parse_prompts(prompt)
        if not single:
            raise GenerationError("stream() takes one prompt; use generate() for a batch")
        return self.stream_request(self._requests(prompts, max_new_tokens, params, stop)[0])

    def stream_request(self, request: Request) -> TextStream:
        """Stream a scheduler Request (token-level control, e.g. reuse_prefix for chat sessions)."""
        outcome: dict = {}

        def pieces() -> Iterator[str]:
            with self._exclusive():
                sequence = self._start([request])[0]
                try:
                    while not sequence.done:
                        self._scheduler.step()
                        piece = sequence.pending_text()
                        if piece:
                            yield piece
                    outcome["result"] = self._result(sequence)
                    piece = sequence.pending_text()
                    if piece:
                        yield piece
                finally:
                    if not sequence.done:  # closed early: end it, so the next call starts clean
                        sequence.cancel()
                        while not self._scheduler.idle:
                            self._scheduler.step()
        return TextStream(pieces(), outcome)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, **kwargs):
        """Reply to a conversation using the checkpoint's chat template (OLMo 2 Instruct: Tulu style).

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]; other keyword
        arguments as for generate(). Returns the assistant's reply text. For a conversation that
        continues turn after turn, ChatSession (model.chat_session()) reuses the KV cache.
        """
        return self.generate(self.tokenizer.apply_chat_template(messages), max_new_tokens=max_new_tokens, **kwargs)

    def stream_chat(self, messages: list[dict], max_new_tokens: int = 256, **kwargs) -> TextStream:
        """chat(), streamed as text pieces."""
        return self.stream(self.tokenizer.apply_chat_template(messages), max_new_tokens=max_new_tokens, **kwargs)

    def chat_session(self, system: str | None = None, **defaults):
        """A conversation kept turn by turn: see chat.ChatSession."""
        from .chat import ChatSession

        return ChatSession(self, system, **defaults)

    def prepare(self, max_batch_size: int = 1, max_seq_len: int | None = None):
        """Allocate the KV cache for requests up to this size now, rather than at the first request that
        needs it (its log line and allocation time then come before, not during, a generation)."""
        with self._exclusive():
            self._cache_for(max_batch_size, max_seq_len or self.config.max_position_embeddings)

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold the model for one generation: other threads wait; the same thread is refused."""
        me = threading.get_ident()
        if self._owner == me:
            raise GenerationError("this model is already generating in this thread (an unfinished stream): finish "
                                  "or close that stream first, or load a second OLMo2 for concurrent generations")
        draft = self.speculation.draft if self.speculation is not None else None
        with self._lock:
            self._owner = me
            try:
                with draft._exclusive() if draft is not None else contextlib.nullcontext():  # its cache is in use
                    yield
            finally:
                self._owner = None

    def _requests(self, prompts: list[list[int]], max_new_tokens, params: SamplingParams, stop) -> list[Request]:
        if stop is None or isinstance(stop, str):
            stop = () if stop is None else (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        else:
            raise GenerationError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        for p in prompts:
            self._check_length(len(p))
        seeds = params.seeds(len(prompts))
        return [Request(tuple(p), max_new_tokens, SamplingParams(params.temperature, params.top_k, params.top_p,
                                                                 params.min_p, params.repetition_penalty, seed),
                        stop) for p, seed in zip(prompts, seeds)]

    def _start(self, requests: list[Request]) -> list[RunningSequence]:
        """Queue requests on a scheduler whose cache fits them all (the caller holds _exclusive)."""
        # The last new token never enters the cache: a prompt of P tokens with N new ones needs P + N - 1 positions.
        need = max(len(r.prompt) + r.max_new_tokens - 1 for r in requests)
        cache = self._cache_for(len(requests), min(need, self.config.max_position_embeddings))
        if self.speculation is not None and len(requests) == 1:  # a batch decodes without speculation
            draft = self.speculation.draft
            draft_cache = draft._cache_for(1, cache.max_seq) if draft is not None else None
            decoder = self._scheduler
            if not (isinstance(decoder, SpeculativeDecoder) and decoder.cache is cache
                    and decoder.draft_cache is draft_cache):
                self._scheduler = SpeculativeDecoder(self.engine, self.tokenizer, cache, self.speculation, draft_cache)
        elif not isinstance(self._scheduler, Scheduler) or self._scheduler.cache is not cache:
            self._scheduler = Scheduler(self.engine, self.tokenizer, cache)
        return [self._scheduler.add(r) for r in requests]

    @staticmethod
    def _result(sequence: RunningSequence) -> GenerationResult:
        if sequence.finish_reason == "error":
            raise GenerationError(sequence.error)
        return GenerationResult.of(sequence)

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
            if isinstance(p, (torch.Tensor, np.ndarray)) and p.ndim == 1 and p.shape[0] > 0 and (
                    p.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
                    or (isinstance(p, np.ndarray) and np.issubdtype(p.dtype, np.integer))):
                p = p.tolist()
            if isinstance(p, (list, tuple)) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                bad = [t for t in p if not 0 <= t < self.config.vocab_size]
                if bad:
                    raise GenerationError(f"prompt token ids must lie in [0, {self.config.vocab_size}), got {bad[:5]}")
                return list(p), False
            raise GenerationError("a prompt must be a str, or token ids as a non-empty list / 1-D integer tensor or "
                                  f"array, got {type(p).__name__}: {str(p)[:60]!r}")

        def is_prompt_list(p) -> bool:
            return isinstance(p, (list, tuple)) and bool(p) and all(
                isinstance(x, (str, list, tuple, torch.Tensor, np.ndarray)) for x in p)

        if is_prompt_list(prompt):
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
        batch = self.engine.cache_rows(batch)
        if cache is not None:
            batch, seq = max(batch, cache.max_batch), max(seq, cache.max_seq)
        self.engine.release_cache()  # captured graphs hold the old cache: let it go with them
        cache = self._cache = self._scheduler = None  # free the old cache before allocating the larger one
        return self._allocate_cache(batch, seq)

    def _allocate_cache(self, batch: int, seq: int) -> KVCache:
        logger.info("allocating KV cache: batch %d x %d positions, %.1f MiB", batch, seq,
                    cache_bytes(self.config, batch, seq, self.dtype) / 2**20)
        self._cache = KVCache(self.config, batch, seq, self.dtype, self.device)
        return self._cache

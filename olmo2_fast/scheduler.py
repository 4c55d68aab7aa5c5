"""The generation scheduler: requests join and leave a running batch at step boundaries.

One `Scheduler` drives one engine over one KV cache. Each `step()` runs one engine step
for every running sequence and turns the logits into one new token each:
  * a request that joins is prefilled in the same step as the others decode (one packed,
    chunked-prefill launch sequence); a request that allows it (`reuse_prefix`, e.g. the
    next turn of a chat) prefills only what no cache row already holds of its prompt;
  * running sequences occupy cache rows 0..n-1: when some finish, the last running ones
    move into their rows (`KVCache.move_row`), so the batch, and its CUDA-graph bucket,
    shrinks;
  * in steady decoding, step t+1 is queued on the device, from step t's sampled ids and
    lengths kept on the device, before the host reads step t's ids: detokenising and stop
    strings overlap the device's next step. A sequence that finished at step t has been
    stepped once more in vain; its extra token is dropped.
Sampling is per request (its own SamplingParams and seed; the noise is a function of
seed, position and token id, so a request's tokens do not depend on what it is batched
with). Non-finite logits are flagged on the device with the sampled ids (no extra sync)
and end that request with an error.

This module knows nothing of threads, tokenisation beyond what stopping needs, or HTTP:
`OLMo2.generate` steps a scheduler until its requests are done; the server steps one from
its worker thread.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .cache import KVCache, StepBatch
from .errors import GenerationError
from .sampling import SamplingParams, apply_repetition_penalty, exponential_noise, filtered_probs
from .tokenizer import StreamDecoder, Tokenizer

FINISH_REASONS = ("eos", "stop", "length", "context", "cancelled", "error")


@dataclass(frozen=True)
class Request:
    """What to generate. prompt: token ids (>= 1); logprobs: None, or k >= 0 to record each new
    token's log-probability under the model (temperature 1, no filters) and the k most likely;
    reuse_prefix: take whatever a cache row already holds of the prompt instead of prefilling it
    (the cached keys were computed in another batch, so logits may differ in the last bits)."""
    prompt: tuple[int, ...]
    max_new_tokens: int
    params: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    reuse_prefix: bool = False

    def __post_init__(self):
        if not self.prompt:
            raise GenerationError("a prompt needs at least one token")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError(f"stop must be a non-empty string or a list of them, got {list(self.stop)!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            raise GenerationError(f"logprobs must be an integer in [0, 20] or None, got {self.logprobs!r}")


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the k most likely (id, logprob), most likely first


@dataclass(eq=False)
class Sequence:
    """One request's progress: its new ids and text, why it stopped, and when things happened."""
    request: Request
    seed: int
    decoder: StreamDecoder
    ids: list[int] = field(default_factory=list)  # new tokens, EOS excluded
    sampled: list[int] = field(default_factory=list)  # every sampled token, EOS included (what the cache may hold)
    text: str = ""
    emitted: int = 0                 # characters of `text` already handed out by pending_text()
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # one of FINISH_REASONS
    error: str | None = None
    reused: int = 0                  # prompt tokens found in the cache (not prefilled)
    cancel_requested: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    def cancel(self):
        """Stop at the next step boundary with finish_reason "cancelled" (safe from another thread)."""
        self.cancel_requested = True

    def pending_text(self) -> str:
        """New text that can no longer turn into a stop string: everything, once done."""
        hold = 0 if self.done else max((len(s) - 1 for s in self.request.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece

    def feed(self, token_id: int, eos_ids: tuple[int, ...], max_seq: int, logprob: TokenLogprob | None = None):
        """Record one sampled token, -1 for non-finite logits (an error), as a loop over a cache of max_seq
        positions produced it; the speculative loop (speculative.py) feeds its accepted tokens one by one."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token_id < 0:
            self._finish("error", f"the model produced non-finite logits at step {len(self.ids) + 1} of this "
                                  "generation: float16 overflows on OLMo 2; load the model with dtype='bfloat16'")
            return
        if logprob is not None:
            self.logprobs.append(logprob)
        # The token at position prompt_len + len(ids) is fed only if that position exists.
        self._add(token_id, eos_ids, max_seq - (self.prompt_len + len(self.ids)))

    def _add(self, token_id: int, eos_ids: tuple[int, ...], room: int):
        """Record a sampled token; `room`: tokens this sequence may still produce before the cache ends."""
        self.sampled.append(token_id)
        if token_id in eos_ids:
            self._finish("eos")
            return
        self.ids.append(token_id)
        self.text += self.decoder.push(token_id)
        if len(self.ids) >= self.request.max_new_tokens:
            self._finish("length")
        elif room <= 0:
            self._finish("context")
        else:
            self._cut_at_stop()

    def _cut_at_stop(self) -> bool:
        hits = [h for h in (self.text.find(s) for s in self.request.stop) if h >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason, self.finished_at = "stop", time.perf_counter()
        return bool(hits)

    def _finish(self, reason: str, error: str | None = None):
        if self.done:
            return
        if reason != "error":
            self.text += self.decoder.flush()  # characters held back for more bytes are final now
            if self._cut_at_stop():
                return
        self.finish_reason, self.error = reason, error
        self.finished_at = time.perf_counter()


def open_sequence(request: Request, engine, tokenizer: Tokenizer, cache: KVCache) -> Sequence:
    """A request checked against the engine's vocabulary and the cache, as a Sequence with its seed."""
    if len(request.prompt) > cache.max_seq:
        raise GenerationError(f"prompt of {len(request.prompt)} tokens does not fit the KV cache of "
                              f"{cache.max_seq} positions")
    vocab = engine.config.vocab_size
    if not 0 <= min(request.prompt) <= max(request.prompt) < vocab:  # C loops: cheap for long prompts
        bad = [t for t in request.prompt if not 0 <= t < vocab]
        raise GenerationError(f"prompt token ids must lie in [0, {vocab}), got {bad[:5]}")
    seed = request.params.seed
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # host generator: no device sync
    return Sequence(request, seed, tokenizer.stream_decoder())


class _HostIds:
    """Brings each step's sampled ids to the host without stalling the device.

    On CUDA the copy goes to pinned memory behind an event, so the next decode step can be
    queued before the host waits. Buffer and event belong to the ids' device, which need not
    be the current one.
    """

    def __init__(self, batch: int, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            with torch.cuda.device(device):
                self.buffer = torch.empty(batch, dtype=torch.int64, pin_memory=True)
            self.ready = torch.cuda.Event()

    def start(self, ids: torch.Tensor):
        self.count = ids.shape[0]
        if self.cuda:
            self.buffer[:self.count].copy_(ids, non_blocking=True)
            self.ready.record(torch.cuda.current_stream(ids.device))
        else:
            self.ids = ids

    def wait(self) -> list[int]:
        if self.cuda:
            self.ready.synchronize()
            return self.buffer[:self.count].tolist()
        return self.ids.tolist()


@dataclass
class _InFlight:
    """A queued step: which sequences its rows belong to, and its sampled ids / logprobs on the device."""
    sequences: list[Sequence]
    ids: torch.Tensor                  # (n,) int64, -1 where the logits were not finite
    logprobs: tuple | None             # (chosen (n,), top values (n, k), top ids (n, k)) or None


class Scheduler:
    """Continuous batching of requests over one engine and one KV cache (see the module docstring)."""

    def __init__(self, engine, tokenizer: Tokenizer, cache: KVCache, max_running: int | None = None):
        """max_running: most sequences in one batch (default: every cache row; a server caps it below the
        rows that CUDA-graph buckets round the cache up to)."""
        self.engine, self.tokenizer, self.cache = engine, tokenizer, cache
        self.max_running = min(max_running or cache.max_batch, cache.max_batch)
        device = cache.k.device
        self.device = device
        self.running: list[Sequence] = []      # running[r] occupies cache row r
        self.waiting: list[Sequence] = []
        # Token ids whose K/V each cache row holds, also after its sequence left (prefix reuse).
        self.row_tokens: list[list[int]] = [[] for _ in range(cache.max_batch)]
        self.lengths: list[int] = []           # cached positions of each running row, host side
        self.next_ids: torch.Tensor | None = None   # (n,) the running rows' next input ids, on the device
        self.positions: torch.Tensor | None = None  # (n,) int32 their positions (= lengths), on the device
        self.seeds = torch.zeros(cache.max_batch, dtype=torch.int64, device=device)
        self.seen: torch.Tensor | None = None  # (max_batch, vocab) bool, when a request penalises repetition
        self.host = _HostIds(cache.max_batch, device)
        self.in_flight: _InFlight | None = None

    # ------------------------------------------------------------------ requests

    def add(self, request: Request) -> Sequence:
        """Queue a request; it joins at the next step."""
        sequence = open_sequence(request, self.engine, self.tokenizer, self.cache)
        self.waiting.append(sequence)
        return sequence

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and self.in_flight is None

    def step(self) -> list[Sequence]:
        """Advance every sequence by one token; returns the sequences that changed (a token or an end)."""
        changed = []
        if self.in_flight is None:
            self._queue_step()
            if self.in_flight is None:
                return changed
        read = self.in_flight
        self.host.start(read.ids)
        self.in_flight = None
        if self._can_pipeline(read):
            self._queue_decode()
        tokens = self.host.wait()
        logprobs = self._logprobs_to_host(read.logprobs)
        max_seq = self.cache.max_seq
        for row, (sequence, token) in enumerate(zip(read.sequences, tokens)):
            if sequence.done:
                continue
            logprob = None
            if logprobs is not None and sequence.request.logprobs is not None and token >= 0:
                chosen, top_values, top_ids = logprobs
                k = sequence.request.logprobs
                logprob = TokenLogprob(token, chosen[row], tuple(zip(top_ids[row][:k], top_values[row][:k])))
            sequence.feed(token, self.tokenizer.eos_ids, max_seq, logprob)
            changed.append(sequence)
        for sequence in self.running + self.waiting:
            if sequence.cancel_requested and not sequence.done:
                sequence._finish("cancelled")
                changed.append(sequence)
        self.waiting = [s for s in self.waiting if not s.done]
        self._compact()
        if self.in_flight is None and (self.running or self.waiting):
            self._queue_step()
        return changed

    # ------------------------------------------------------------------ steps

    def _can_pipeline(self, read: _InFlight) -> bool:
        """Queue the next decode step before reading this one's ids, when the host needs nothing from it:
        no request waits to join, and every running row has a cache position left to write."""
        return (not self.waiting and self.running and read.sequences == self.running
                and all(n < self.cache.max_seq for n in self.lengths))

    def _queue_step(self):
        """Admit waiting requests, then queue one step: decode-only (from device ids) when nobody joins,
        else a mixed step with the newcomers' prefill chunks."""
        joining = []
        while self.waiting and len(self.running) + len(joining) < self.max_running:
            sequence = self.waiting.pop(0)
            if sequence.cancel_requested:
                sequence._finish("cancelled")
                continue
            joining.append(sequence)
        if not joining:
            if self.running:
                self._queue_decode()
            return
        chunks, starts = [], []
        for row, sequence in enumerate(self.running):  # host knows every running row's last token now
            chunks.append([sequence.ids[-1]])
            starts.append(self.lengths[row])
        for sequence in joining:
            row = len(self.running)
            prompt = list(sequence.request.prompt)
            sequence.reused = self._reuse_prefix(row, prompt) if sequence.request.reuse_prefix else 0
            self.running.append(sequence)
            self.lengths.append(sequence.reused)
            self.row_tokens[row] = []  # known again when the sequence leaves (_compact)
            self.seeds[row] = sequence.seed
            if sequence.request.params.repetition_penalty != 1.0:
                self._seen()[row].zero_()
                self._seen()[row, torch.tensor(prompt, device=self.device)] = True
            chunks.append(prompt[sequence.reused:])
            starts.append(sequence.reused)
        batch = StepBatch.build(chunks, starts, self.device)
        self.lengths = [start + len(chunk) for start, chunk in zip(starts, chunks)]
        self._launch(batch)

    def _queue_decode(self):
        batch = StepBatch.decode(self.next_ids, self.positions, list(self.lengths))
        self.lengths = [n + 1 for n in self.lengths]
        self._launch(batch)

    def _launch(self, batch: StepBatch):
        with torch.inference_mode():
            logits = self.engine.step(batch, self.cache)
            ids, logprobs = self._sample(logits, batch.kv_lens)
        self.next_ids, self.positions = ids.clamp(min=0), batch.kv_lens
        self.in_flight = _InFlight(list(self.running), ids, logprobs)

    def _sample(self, logits: torch.Tensor, positions: torch.Tensor):
        """(n, V) logits -> ids (n,), -1 for rows with non-finite logits; logprobs when a row asked.

        Rows are sampled in groups of equal SamplingParams (the seed aside); the noise of the token at
        position p of a request is a function of its seed and p alone."""
        vocab = self.tokenizer.vocab_size
        n = logits.shape[0]
        sequences = self.running
        wanted = [s.request.logprobs for s in sequences if s.request.logprobs is not None]
        plain_greedy = not wanted and all(s.request.params.greedy and s.request.params.repetition_penalty == 1.0
                                          for s in sequences)
        greedy = self.engine.greedy_ids(n) if plain_greedy else None
        if greedy is not None:  # the step's own argmax (over the tokenizer's vocabulary): nothing to sample
            # argmax picks a NaN or +inf logit when there is one, so checking the chosen logit suffices.
            return torch.where(torch.isfinite(logits.gather(1, greedy[:, None])[:, 0]), greedy, -1), None
        full = logits.float()
        logits = full[:, :vocab]
        ids = torch.empty(n, dtype=torch.int64, device=logits.device)
        groups: dict[tuple, tuple[SamplingParams, list[int]]] = {}
        for row, sequence in enumerate(sequences):
            p = sequence.request.params
            key = (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty)  # all but the seed
            groups.setdefault(key, (p, []))[1].append(row)
        for params, rows in groups.values():
            index = torch.tensor(rows, device=logits.device) if len(groups) > 1 else slice(None)
            group = logits[index]
            if params.repetition_penalty != 1.0:
                group = apply_repetition_penalty(group, self._seen()[:n][index, :vocab], params.repetition_penalty)
            if params.greedy:
                chosen = group.argmax(-1)
            else:
                noise = exponential_noise(self.seeds[:n][index], positions[index], vocab)
                chosen = (filtered_probs(group, params) / noise).argmax(-1)
            ids[index] = chosen
        if self.seen is not None:
            self.seen[:n].scatter_(1, ids[:, None], True)
        ids = torch.where(torch.isfinite(logits).all(-1), ids, -1)
        logprobs = None
        if wanted:
            log_probs = torch.log_softmax(full, -1)  # the model's distribution, as prompt scoring computes it
            top = torch.topk(log_probs[:, :vocab], max(max(wanted), 1), dim=-1)
            logprobs = (log_probs.gather(1, ids.clamp(min=0)[:, None])[:, 0], top.values, top.indices)
        return ids, logprobs

    @staticmethod
    def _logprobs_to_host(logprobs):
        if logprobs is None:
            return None
        chosen, values, indices = logprobs
        return chosen.tolist(), values.tolist(), indices.tolist()

    def _seen(self) -> torch.Tensor:
        if self.seen is None:
            self.seen = torch.zeros(self.cache.max_batch, self.engine.config.vocab_size, dtype=torch.bool,
                                    device=self.device)
        return self.seen

    # ------------------------------------------------------------------ cache rows

    def _reuse_prefix(self, row: int, prompt: list[int]) -> int:
        """Cached positions of `prompt` that need no prefill in `row`: the longest prefix a free row holds
        (copied into `row` when it is another one), leaving at least the last prompt token to compute."""
        best, best_row = 0, row
        for free in range(row, self.cache.max_batch):
            held = self.row_tokens[free]
            common = 0
            for a, b in zip(held, prompt):
                if a != b:
                    break
                common += 1
            if common > best:
                best, best_row = common, free
        best = min(best, len(prompt) - 1)
        if best and best_row != row:
            self.cache.move_row(best_row, row, best)
        return best

    def _compact(self):
        """Drop finished sequences; the last running rows move into the freed rows (cache, tokens,
        lengths, next ids, positions, seeds, repetition masks), so rows 0..n-1 stay the running batch."""
        keep = [not s.done for s in self.running]
        if all(keep):
            return
        n = sum(keep)
        holes = [r for r in range(n) if not keep[r]]
        movers = [r for r in range(n, len(self.running)) if keep[r]]
        for row, sequence in enumerate(self.running):  # what each row holds once it is no longer running
            self.row_tokens[row] = _cached_tokens(sequence, self.lengths[row])
        with torch.inference_mode():
            for dst, src in zip(holes, movers):
                self.cache.move_row(src, dst, self.lengths[src])
                self.running[dst], self.lengths[dst] = self.running[src], self.lengths[src]
                tensors = [self.seeds] + ([self.seen] if self.seen is not None else [])
                if self.next_ids is not None:
                    tensors += [self.next_ids, self.positions]
                for tensor in tensors:
                    tensor[dst] = tensor[src]
        self.running, self.lengths = self.running[:n], self.lengths[:n]
        if self.next_ids is not None:
            self.next_ids, self.positions = self.next_ids[:n], self.positions[:n]
        if self.in_flight is not None and n == 0:
            self.in_flight = None  # a step queued for sequences that have all finished: nothing to read
        elif self.in_flight is not None:
            # A step queued before the finish: its rows follow the move (a device copy, in stream order).
            self._compact_in_flight(holes, movers, n)

    def _compact_in_flight(self, holes: list[int], movers: list[int], n: int):
        flight = self.in_flight
        with torch.inference_mode():
            ids = flight.ids.clone()
            for dst, src in zip(holes, movers):
                ids[dst] = ids[src]
        logprobs = flight.logprobs
        if logprobs is not None:
            order = list(range(n))
            for dst, src in zip(holes, movers):
                order[dst] = src
            index = torch.tensor(order, dtype=torch.long, device=self.device)
            logprobs = tuple(t[index] for t in logprobs)
        self.in_flight = _InFlight(list(self.running), ids[:n], logprobs)


def _cached_tokens(sequence: Sequence, length: int) -> list[int]:
    """The token ids whose K/V a sequence's cache row holds at positions 0..length-1."""
    return (list(sequence.request.prompt) + sequence.sampled)[:length]

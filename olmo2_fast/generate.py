"""The generation loop: prefill, decode steps, sampling and stopping, for any engine.

An engine (the reference model, or the kernel-backed model) exposes
`step(batch: StepBatch, cache: KVCache) -> logits (B, vocab)`. This module knows nothing
of tokenisation beyond what stopping needs (EOS ids and stop strings matched on the
decoded text), and nothing of how the engine computes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .cache import KVCache, StepBatch
from .sampling import SamplingParams, sample
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class SequenceState:
    """One request's progress: its new ids, its text so far and why it stopped."""
    prompt_len: int
    decoder: StreamDecoder
    stop: tuple[str, ...]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0                 # characters of `text` already handed to a stream
    finish_reason: str | None = None  # "eos", "stop", "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_id: int, eos_ids: tuple[int, ...], max_new_tokens: int):
        if token_id in eos_ids:
            self.finish_reason = "eos"
            self.text += self.decoder.flush()
            return
        self.ids.append(token_id)
        self.text += self.decoder.push(token_id)
        if len(self.ids) >= max_new_tokens:
            self.text += self.decoder.flush()
            self.finish_reason = "length"
        self._apply_stop()

    def _apply_stop(self):
        hits = [h for h in (self.text.find(s) for s in self.stop) if h >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"

    def pending_text(self) -> str:
        """New text that can no longer turn into a stop string: everything, once done."""
        hold = 0 if self.done else max((len(s) - 1 for s in self.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece


class _HostIds:
    """Brings each step's sampled ids to the host without stalling the device.

    On CUDA the copy goes to pinned memory behind an event, so the next decode step can be
    queued before the host waits: the host's per-token work (detokenising, stop strings)
    overlaps the device's next step instead of adding to it. Buffer and event belong to the
    ids' device, which need not be the current one.
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
            self.ready.record(torch.cuda.current_stream(ids.device))  # the stream the copy was queued on
        else:
            self.ids = ids

    def wait(self) -> list[int]:
        if self.cuda:
            self.ready.synchronize()
            return self.buffer[:self.count].tolist()
        return self.ids.tolist()


def run_generation(engine, cache: KVCache, tokenizer: Tokenizer, prompts: list[list[int]], *,
                   max_new_tokens: int, params: SamplingParams, seeds: list[int | None],
                   stop: tuple[str, ...] = ()) -> Iterator[list[SequenceState]]:
    """Generate for a batch of prompts; yields the states after every step until all are done.

    One packed prefill for all prompts, then one decode step per token for the sequences
    still running, which occupy cache rows 0..n-1: when some finish, the last running ones
    move into their rows (cache, position, next id, repetition mask, generator), so the
    batch, and with CUDA graphs its bucket, shrinks. Decode positions never cross from the
    host: they start as the prefill's kv_lens and advance on the device (the host keeps the
    same counts for the reference engine and the moves). Step t+1 is queued before step t's
    ids reach the host, so a sequence is stepped once more after its last token, in vain.
    """
    device = cache.k.device
    states = [SequenceState(len(p), tokenizer.stream_decoder(), stop) for p in prompts]
    generators = None
    if not params.greedy:
        generators = []
        for seed in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(seed) if seed is not None else g.seed()
            generators.append(g)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), engine.config.vocab_size, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            seen[row, torch.tensor(prompt, device=device)] = True

    def next_ids(batch: StepBatch) -> torch.Tensor:
        with torch.inference_mode():
            ids = sample(engine.step(batch, cache), params, tokenizer.vocab_size, generators, seen)
        if seen is not None:
            seen.scatter_(1, ids[:, None], True)
        return ids

    host = _HostIds(len(prompts), device)
    rows = list(range(len(prompts)))  # rows[r]: the index of the state cache row r serves
    lengths = [len(p) for p in prompts]  # tokens each row has cached, counted on the host
    prefill = StepBatch.build(prompts, [0] * len(prompts), device)
    positions = prefill.kv_lens  # the same counts on the device
    ids = next_ids(prefill)
    for produced in range(1, max_new_tokens + 1):
        host.start(ids)
        if produced < max_new_tokens:  # queue the next step before reading this one's ids
            batch = StepBatch.decode(ids, positions, lengths)
            ids, positions, lengths = next_ids(batch), batch.kv_lens, [n + 1 for n in lengths]
        for row, token in zip(rows, host.wait()):  # the rows step `produced` ran on (they change only below)
            states[row].add(token, tokenizer.eos_ids, max_new_tokens)
        yield states
        n = sum(not states[state].done for state in rows)
        if n == 0:
            return
        if n == len(rows):
            continue
        # Shrink to the n running sequences: each finished row below n takes a running row above it.
        holes = [r for r in range(n) if states[rows[r]].done]
        movers = [r for r in range(n, len(rows)) if not states[rows[r]].done]
        with torch.inference_mode():  # ids is an inference tensor
            for dst, src in zip(holes, movers):
                cache.move_row(src, dst, lengths[src])
                for tensor in (ids, positions) if seen is None else (ids, positions, seen):
                    tensor[dst] = tensor[src]
                rows[dst], lengths[dst] = rows[src], lengths[src]
                if generators is not None:
                    generators[dst] = generators[src]
        rows, lengths, ids, positions = rows[:n], lengths[:n], ids[:n], positions[:n]
        if seen is not None:
            seen = seen[:n]
        if generators is not None:
            generators = generators[:n]

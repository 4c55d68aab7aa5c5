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
    overlaps the device's next step instead of adding to it.
    """

    def __init__(self, batch: int, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.buffer = torch.empty(batch, dtype=torch.int64, pin_memory=True)
            self.ready = torch.cuda.Event()

    def start(self, ids: torch.Tensor):
        if self.cuda:
            self.buffer.copy_(ids, non_blocking=True)
            self.ready.record()
        else:
            self.ids = ids

    def wait(self) -> list[int]:
        if self.cuda:
            self.ready.synchronize()
            return self.buffer.tolist()
        return self.ids.tolist()


def run_generation(engine, cache: KVCache, tokenizer: Tokenizer, prompts: list[list[int]], *,
                   max_new_tokens: int, params: SamplingParams, seeds: list[int | None],
                   stop: tuple[str, ...] = ()) -> Iterator[list[SequenceState]]:
    """Generate for a batch of prompts; yields the states after every step until all are done.

    One packed prefill for all prompts, then one decode step per token for all rows.
    Sequences that finish early keep their cache row and are stepped with the rest (their
    outputs ignored). Step t+1 is queued before step t's ids reach the host, so when
    every sequence stops, one step has been computed in vain.
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
    lengths = [len(p) for p in prompts]
    ids = next_ids(StepBatch.build(prompts, [0] * len(prompts), device))
    for produced in range(1, max_new_tokens + 1):
        host.start(ids)
        if produced < max_new_tokens:  # queue the next step before reading this one's ids
            ids = next_ids(StepBatch.decode(ids, lengths, device))
            lengths = [n + 1 for n in lengths]
        for state, token in zip(states, host.wait()):
            if not state.done:
                state.add(token, tokenizer.eos_ids, max_new_tokens)
        yield states
        if all(s.done for s in states):
            return

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


def run_generation(engine, cache: KVCache, tokenizer: Tokenizer, prompts: list[list[int]], *,
                   max_new_tokens: int, params: SamplingParams, seeds: list[int | None],
                   stop: tuple[str, ...] = ()) -> Iterator[list[SequenceState]]:
    """Generate for a batch of prompts; yields the states after every step until all are done.

    Sequences that finish early keep their cache row and are stepped with the rest (their
    outputs ignored), so one batched step serves all rows.
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
    lengths = [0] * len(prompts)
    chunks = prompts
    while True:
        batch = StepBatch.build(chunks, lengths, device)
        with torch.inference_mode():
            logits = engine.step(batch, cache)
        next_ids = sample(logits, params, tokenizer.vocab_size, generators, seen)
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        host_ids = next_ids.tolist()  # the one device-to-host read per step
        for state, token in zip(states, host_ids):
            if not state.done:
                state.add(token, tokenizer.eos_ids, max_new_tokens)
        yield states
        if all(s.done for s in states):
            return
        lengths = [length + len(chunk) for length, chunk in zip(lengths, chunks)]
        chunks = [[token] for token in host_ids]

"""Next-token selection on the logits' device: greedy, temperature, top-k, top-p, min-p and
repetition penalty. The only value that leaves the device is the chosen id.

Sampling draws with the exponential race (argmax of p_i / E_i, E_i ~ Exp(1)), which picks
i with probability p_i and needs one random draw per logit from a per-sequence
torch.Generator, so each request's seed reproduces its tokens whatever it is batched with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import GenerationError


MAX_SEED = 2**63 - 1


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_k: int | None = None          # keep the k most likely tokens
    top_p: float | None = None        # keep the smallest set whose probability reaches p
    min_p: float | None = None        # drop tokens below min_p x the top probability
    repetition_penalty: float = 1.0   # > 1 discourages tokens already in the prompt or output (CTRL / HF rule)
    seed: int | None = None           # prompt i of a batch samples with seed + i; None: a fresh random seed

    def __post_init__(self):
        def refuse(name: str, rule: str):
            value = getattr(self, name)
            raise GenerationError(f"{name} must be {rule}, got {value!r} ({type(value).__name__})")

        if not (_number(self.temperature) and self.temperature >= 0):
            refuse("temperature", "a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            refuse("top_k", "a positive integer or None")
        if self.top_p is not None and not (_number(self.top_p) and 0 < self.top_p <= 1):
            refuse("top_p", "a number in (0, 1] or None")
        if self.min_p is not None and not (_number(self.min_p) and 0 <= self.min_p <= 1):
            refuse("min_p", "a number in [0, 1] or None")
        if not (_number(self.repetition_penalty) and self.repetition_penalty > 0):
            refuse("repetition_penalty", "a finite number > 0 (1 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            refuse("seed", "an integer in [0, 2**63) or None")

    def seeds(self, batch: int) -> list[int | None]:
        """Per-prompt seeds of a batch: seed + i, so a batch reproduces the single-prompt runs."""
        if self.seed is not None and self.seed + batch - 1 > MAX_SEED:
            raise GenerationError(f"seed {self.seed} + batch index {batch - 1} exceeds 2**63 - 1")
        return [None if self.seed is None else self.seed + i for i in range(batch)]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) without int64 overflow: c split into 16-bit halves."""
    hi = (x * (c >> 16)) & 0xFFFF
    return (x * (c & 0xFFFF) + (hi << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix ("lowbias32", C. Wellons) of int64 x in [0, 2^32), elementwise. Pure integer
    ops, so every device and backend computes the same bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) draws (B, vocab) float32, a pure function of (seed, position, token id).

    Counter-based instead of a torch.Generator per row: the draws for the token at `positions[b]`
    of the request seeded `seeds[b]` are the same whatever the request is batched with, on every
    backend, without host work per row, and inside a captured CUDA graph (the seeds and positions
    are device tensors). Uniforms of 24 bits, u in (0, 1), then -log(u).
    """
    seeds, positions = seeds.to(torch.int64), positions.to(torch.int64)
    key = hash32(hash32(seeds & _MASK32) ^ ((seeds >> 32) & _MASK32))
    key = hash32(key ^ (positions & _MASK32))                                   # (B,)
    ids = hash32(torch.arange(vocab, device=seeds.device, dtype=torch.int64))   # (V,)
    bits = hash32(key[:, None] ^ ids[None, :]) >> 8                              # (B, V), 24 bits
    u = (bits.to(torch.float32) + 0.5) * (1.0 / 2**24)
    return -torch.log(u)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's rule: a seen token's logit is divided by the penalty when positive, multiplied when negative."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """float32 logits (B, V) -> probabilities (B, V) after temperature, top-k, top-p and min-p."""
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.min_p:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    if params.top_p is not None and params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p * sorted_probs.sum(-1, keepdim=True), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, vocab_size: int,
           generators: list[torch.Generator] | None = None, seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,) int64, never >= vocab_size (the tokenizer's bound).

    generators: one per row for sampling (ignored when greedy); seen: (B, V) bool mask of
    tokens already present, for the repetition penalty.
    """
    logits = logits[:, :vocab_size].float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen[:, :vocab_size], params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    probs = filtered_probs(logits, params)
    noise = torch.empty_like(probs)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(-1)

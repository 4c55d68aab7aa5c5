"""Speculative decoding of one sequence at a time: k drafted tokens verified per target forward.

`SpeculativeDecoder` has the Scheduler's interface (`add`, `step`, `idle`, `cache`, `running`,
`waiting`); `OLMo2` uses it for single-prompt requests when it was loaded with a draft model
or prompt lookup (batches decode without speculation, on the Scheduler). Each `step()` is one
round over cache row 0:
  1. draft m <= k tokens (drafting.py: a draft model decoding on the device, or prompt lookup);
  2. verify: one target step over the context tokens it has not cached (the last token; the
     whole prompt in the first round) followed by the drafts, returning the logits of the last
     m + 1 rows (a chunked prefill, `chunk_steps.chunk_batch`); in steady state it replays a
     CUDA graph captured at k + 1 rows (`chunk_steps.ChunkGraph`);
  3. accept (speculative_sampling.py): j drafts kept and one token more, computed on the
     device and read by the host once per round (the only host read of the loop);
  4. roll back: both caches keep the kept prefix (their cached lengths drop to it); the slots
     of rejected drafts are overwritten by the next round;
  5. the j + 1 tokens go to the Sequence one at a time (`Sequence.feed`), so EOS, stop strings,
     max_new_tokens and the context end end it exactly where plain decoding would; tokens past
     the end are dropped. A round drafts no more than max_new_tokens and the cache leave room for.
Greedy output is the target's greedy output, token for token; sampled output is distributed as
the target's (the standard rejection rule; seeds reproduce it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import KVCache
from .chunk_steps import ChunkGraph, chunk_batch
from .drafting import DraftModel, PromptLookup, check_draft
from .errors import GenerationError
from .scheduler import Request, Sequence, TokenLogprob, open_sequence
from .speculative_sampling import accept
from .tokenizer import Tokenizer

# Drafts per round when num_speculative_tokens is not given, from the sweep on the trained demo pair
# (README, "Speculative decoding"). Prompt lookup: 6, the fastest measured or within 6% of it on both
# prompts (its drafts cost nothing). Draft model: 4, from the measured tokens per target forward (mean of
# the two prompts) over the cost of a round, 1 + 0.2 k target forwards: a draft step as a 1B drafting for
# a 7B costs by weight bytes, the verify rows free as at batch 1 on a GPU; k = 3 and 4 are within 2% of
# each other there, and the repetitive prompt alone peaks at 6. On the CPU, where a draft step costs
# ~0.45 of a target forward and each verify row adds compute, k = 1 measured fastest.
DEFAULT_DRAFT_TOKENS = 4
DEFAULT_LOOKUP_TOKENS = 6


@dataclass(frozen=True)
class Speculation:
    """How a model drafts: with `draft` (an OLMo2 of the same tokenizer) or prompt lookup of n-grams
    of length `prompt_lookup`; `num_tokens` drafts per round."""
    num_tokens: int
    draft: object | None = None
    prompt_lookup: int | None = None

    @classmethod
    def configure(cls, target_dir, target_config, device: torch.device, draft=None,
                  num_speculative_tokens: int | None = None, prompt_lookup: int | None = None,
                  load_draft=None) -> "Speculation | None":
        """The options of OLMo2.from_pretrained, checked; None without a draft or prompt lookup.
        draft: a path (loaded with `load_draft(path)`) or an OLMo2."""
        for name, value in (("num_speculative_tokens", num_speculative_tokens), ("prompt_lookup", prompt_lookup)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise GenerationError(f"{name} must be a positive integer, got {value!r}")
        if draft is not None and prompt_lookup is not None:
            raise GenerationError("draft= and prompt_lookup= are two ways of drafting: choose one")
        if draft is None and prompt_lookup is None:
            if num_speculative_tokens is not None:
                raise GenerationError("num_speculative_tokens needs draft= (a draft model) or prompt_lookup=N")
            return None
        if draft is not None and not hasattr(draft, "engine"):
            draft = load_draft(draft)
        if draft is not None:
            check_draft(target_dir, target_config, device, draft)
        default = DEFAULT_DRAFT_TOKENS if draft is not None else DEFAULT_LOOKUP_TOKENS
        return cls(num_speculative_tokens or default, draft, prompt_lookup)


@dataclass
class SpeculationStats:
    """Counts over a decoder's life: target forwards (rounds), drafts verified and kept, tokens emitted."""
    forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_forward(self) -> float | None:
        return self.tokens / self.forwards if self.forwards else None


def _common_prefix(held: list[int], prompt: list[int]) -> int:
    """Cached positions a prompt can reuse: the shared prefix, leaving at least its last token to compute."""
    common = 0
    for a, b in zip(held, prompt):
        if a != b:
            break
        common += 1
    return min(common, len(prompt) - 1)


class SpeculativeDecoder:
    """Speculative decoding over one engine, one cache row and a drafter (see the module docstring)."""

    def __init__(self, engine, tokenizer: Tokenizer, cache: KVCache, speculation: Speculation,
                 draft_cache: KVCache | None = None):
        """draft_cache: the draft model's cache (row 0 used), at least as long as `cache`; default: a new one."""
        draft = speculation.draft
        if draft is not None and draft_cache is None:
            draft_cache = KVCache(draft.config, draft.engine.cache_rows(1), cache.max_seq, draft.dtype, draft.device)
        self.engine, self.tokenizer, self.cache, self.draft_cache = engine, tokenizer, cache, draft_cache
        self.k = speculation.num_tokens
        self.lookup_n = speculation.prompt_lookup
        self.draft = DraftModel(draft.engine, draft_cache) if draft is not None else None
        self.device = cache.k.device
        graphs = getattr(engine, "graphs", None)  # the verify graph records the way the engine's decode graphs do
        self.graph = ChunkGraph(engine.step, cache, self.k + 1, graphs.recorder) if graphs is not None else None
        self.running: list[Sequence] = []  # at most one: it occupies cache row 0
        self.waiting: list[Sequence] = []
        self.stats = SpeculationStats()
        self.length = 0                    # context positions the target's row 0 holds
        self.held: list[int] = []          # the tokens of the last sequence's cache rows (prefix reuse)
        self.draft_held: list[int] = []

    def add(self, request: Request) -> Sequence:
        """Queue a request; it starts when the one before it has finished."""
        sequence = open_sequence(request, self.engine, self.tokenizer, self.cache)
        self.waiting.append(sequence)
        return sequence

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def step(self) -> list[Sequence]:
        """One round: the running sequence advances by 1..k+1 tokens; returns the sequences that changed."""
        changed = [s for s in self.waiting if s.cancel_requested]
        for sequence in changed:
            sequence._finish("cancelled")
        self.waiting = [s for s in self.waiting if not s.done]
        if not self.running and self.waiting:
            self._begin(self.waiting.pop(0))
        if not self.running:
            return changed
        sequence = self.running[0]
        if not sequence.cancel_requested:
            with torch.inference_mode():
                self._round(sequence)
        if sequence.cancel_requested and not sequence.done:
            sequence._finish("cancelled")
        if sequence.done:
            self._end()
        return changed + [sequence]

    # ------------------------------------------------------------------ one sequence

    def _begin(self, sequence: Sequence):
        prompt = list(sequence.request.prompt)
        reuse = sequence.request.reuse_prefix
        self.length = sequence.reused = _common_prefix(self.held, prompt) if reuse else 0
        if self.draft is not None:
            self.draft.length = _common_prefix(self.draft_held, prompt) if reuse else 0
        self.running = [sequence]
        self.context = prompt                  # prompt and every token emitted, the dropped ones too (a copy)
        self.emitted, self.emitted_from = None, 0  # the last round's tokens on the device, from context[emitted_from]
        self.lookup = PromptLookup(self.lookup_n) if self.lookup_n is not None else None
        self.seed = torch.tensor([sequence.seed], device=self.device)
        self.seen = None
        if sequence.request.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(self.engine.config.vocab_size, dtype=torch.bool, device=self.device)
            self.seen[torch.tensor(prompt, device=self.device)] = True

    def _end(self):
        self.held = self.context[:self.length]
        if self.draft is not None:
            self.draft_held = self.context[:self.draft.length]
        self.running = []

    def _tail(self, length: int) -> torch.Tensor:
        """The context's tokens from `length` on, as device ids: views of the last round's output in steady
        state (no host-to-device copy), a copy of the host's list for the prompt."""
        if self.emitted is not None and length >= self.emitted_from:
            return self.emitted[length - self.emitted_from:]
        return torch.tensor(self.context[length:], dtype=torch.int64).to(self.device, non_blocking=True)

    def _round(self, sequence: Sequence):
        request, vocab = sequence.request, self.tokenizer.vocab_size
        params, n = request.params, len(self.context)
        seen = None if self.seen is None else self.seen[:vocab]
        # Drafts that can be emitted: one token more than them comes anyway, and the last row's
        # position must exist in the cache.
        m = max(0, min(self.k, request.max_new_tokens - len(sequence.ids) - 1, self.cache.max_seq - n))
        q = None
        if self.draft is not None and m:
            drafts, q = self.draft.propose(self._tail(self.draft.length), m, params, self.seed, seen, vocab)
        else:
            proposal = self.lookup.propose(self.context, m) if self.lookup is not None and m else []
            m = len(proposal)
            drafts = torch.tensor(proposal, dtype=torch.int64).to(self.device, non_blocking=True)
        full = self._verify(torch.cat([self._tail(self.length), drafts]), m + 1)
        outcome = accept(full[:, :vocab], drafts, q, params, self.seed, n, seen)
        values = outcome.tolist()  # the round's one host read
        kept, tokens = values[0], values[1:values[0] + 2]
        logprobs = self._logprobs(full, outcome[1:kept + 2], request.logprobs)
        self.stats.forwards += 1
        self.stats.drafted += m
        self.stats.accepted += kept
        self.stats.tokens += kept + 1
        # Row 0 now holds the context and the m drafts; the context and the kept drafts remain valid.
        self.length = n + kept
        if self.draft is not None:
            self.draft.keep(n + kept)
        self.emitted, self.emitted_from = outcome[1:kept + 2], n
        self.context.extend(tokens)
        if self.seen is not None:
            self.seen.index_fill_(0, self.emitted.clamp(min=0), True)
        for i, token in enumerate(tokens):
            if sequence.done:
                break  # a token past the end (EOS, a stop string, the length): dropped
            sequence.feed(token, self.tokenizer.eos_ids, self.cache.max_seq, None if logprobs is None else logprobs[i])

    def _verify(self, ids: torch.Tensor, rows: int) -> torch.Tensor:
        """The target's logits (rows, vocab) for the last `rows` of the chunk `ids` at position `length` on."""
        if self.graph is not None and ids.shape[0] == rows and self.graph.fits(ids, self.length):
            return self.graph(ids, self.length)
        return self.engine.step(chunk_batch(ids, self.length, rows), self.cache)

    def _logprobs(self, full: torch.Tensor, tokens: torch.Tensor, k: int | None) -> list[TokenLogprob] | None:
        """Each emitted token's log-probability under the target (temperature 1, no filters) and the k most
        likely, as the Scheduler records them."""
        if k is None:
            return None
        rows = torch.log_softmax(full[:tokens.shape[0]].float(), -1)
        chosen = rows.gather(1, tokens.clamp(min=0)[:, None])[:, 0].tolist()
        top = torch.topk(rows[:, :self.tokenizer.vocab_size], max(k, 1), dim=-1)
        values, indices = top.values.tolist(), top.indices.tolist()
        return [TokenLogprob(t, chosen[i], tuple(zip(indices[i][:k], values[i][:k])))
                for i, t in enumerate(tokens.tolist())]

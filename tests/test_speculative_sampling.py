"""Speculative sampling is distributed as the target samples (speculative_sampling.py's rejection rule).

Thousands of seeded generations of the first three tokens, through the SpeculativeDecoder, against the
target's own probabilities of every three-token continuation, computed exactly from the model (full
forwards, then the plain sampler's filters). Chi-square tests of the first one, two and three tokens at a
false-alarm rate of 1e-4 each (the seeds are fixed, so the outcome is deterministic); their power shows on
the same draws against the draft's own distribution, which is what a loop that kept every draft would
output. (Mutants of the rule fail them: a residual drawn from p instead of max(0, p - q), chi-square 630
against a bound of 114; min-p probabilities left unnormalised, 104 against 19.) Both drafting methods:
a draft model (q a distribution; top-k on p and q) and prompt lookup (q a point mass; min-p and top-k).
The rule's bookkeeping (kept counts, non-finite rows) is tested directly on crafted logits.
"""
import math
from collections import Counter

import pytest
import torch

from checkpoints import make_checkpoint
from olmo2_fast import OLMo2
from olmo2_fast.cache import KVCache
from olmo2_fast.sampling import SamplingParams, filtered_probs
from olmo2_fast.scheduler import Request
from olmo2_fast.speculative import Speculation, SpeculativeDecoder
from olmo2_fast.speculative_sampling import accept, distribution
from test_speculative import one_thread, perturbed  # noqa: F401 (one_thread: an autouse fixture)

NEW_TOKENS = 3
Z_1E4 = 3.719  # the standard normal's 1 - 1e-4 quantile


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative_sampling")
    target = make_checkpoint(root / "target", seed=41)
    draft = OLMo2.from_pretrained(perturbed(target, root / "draft", 0.2), device="cpu")
    return OLMo2.from_pretrained(target, device="cpu"), draft


def exact(model: OLMo2, prompt: list[int], params: SamplingParams, n: int = NEW_TOKENS) -> dict[tuple, float]:
    """P(first n tokens) of `model` sampling with `params`: every continuation the filters leave."""
    if n == 0:
        return {(): 1.0}
    logits = model(prompt)[0, -1:, :model.tokenizer.vocab_size].float()
    probs = filtered_probs(logits, params)[0].double()
    probs /= probs.sum()  # min-p and top-p leave the mass they remove out
    out = {}
    for token in probs.nonzero()[:, 0].tolist():
        for rest, p in exact(model, prompt + [token], params, n - 1).items():
            out[(token,) + rest] = probs[token].item() * p
    return out


def chi_square(counts: Counter, probs: dict[tuple, float]) -> tuple[float, float]:
    """(statistic, critical value at 1e-4): cells expected below 5 are pooled; outcomes `probs` gives no
    probability (impossible under it) count in the pool too."""
    total = sum(counts.values())
    stat, pool_seen, pool_p, cells = 0.0, 0, 0.0, 0
    for outcome, p in probs.items():
        if p * total < 5:
            pool_seen, pool_p = pool_seen + counts[outcome], pool_p + p
            continue
        stat += (counts[outcome] - p * total) ** 2 / (p * total)
        cells += 1
    pool_seen += sum(c for outcome, c in counts.items() if outcome not in probs)
    if pool_p > 0:
        stat += (pool_seen - pool_p * total) ** 2 / (pool_p * total)
        cells += 1
    elif pool_seen:
        stat = math.inf
    df = cells - 1
    critical = df * (1 - 2 / (9 * df) + Z_1E4 * math.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty
    return stat, critical


def assert_distributed_as(counts: Counter, probs: dict[tuple, float]):
    """The first 1, 2 and 3 tokens each pass the chi-square test (the marginals of few cells have the power
    to see a shift at one position that the 3-token table's many cells would dilute)."""
    for n in range(1, NEW_TOKENS + 1):
        seen, expected = Counter(), Counter()
        for outcome, count in counts.items():
            seen[outcome[:n]] += count
        for outcome, p in probs.items():
            expected[outcome[:n]] += p
        stat, critical = chi_square(seen, dict(expected))
        assert stat < critical, (n, stat, critical)


def draws(target: OLMo2, speculation: Speculation, prompt: list[int], params: SamplingParams, n: int):
    """The first NEW_TOKENS tokens of n generations seeded 0..n-1 (the prompt's cache reused), and the stats."""
    cache = KVCache(target.config, 1, 64, torch.float32, "cpu")
    draft_cache = None if speculation.draft is None else KVCache(speculation.draft.config, 1, 64, torch.float32, "cpu")
    decoder = SpeculativeDecoder(target.engine, target.tokenizer, cache, speculation, draft_cache)
    counts = Counter()
    for seed in range(n):
        sequence = decoder.add(Request(tuple(prompt), NEW_TOKENS, SamplingParams(
            params.temperature, params.top_k, params.top_p, params.min_p, seed=seed), reuse_prefix=True))
        while not decoder.idle:
            decoder.step()
        counts[tuple(sequence.sampled)] += 1
    return counts, decoder.stats


def test_draft_model_sampling_is_distributed_as_the_target(models):
    target, draft = models
    eos, target.tokenizer.eos_ids = target.tokenizer.eos_ids, ()  # every draw makes all three tokens
    try:
        prompt = target.tokenizer.encode("The capital of France is")
        params = SamplingParams(temperature=1.0, top_k=4)
        counts, stats = draws(target, Speculation(2, draft=draft), prompt, params, 1500)
    finally:
        target.tokenizer.eos_ids = eos
    assert 0.2 < stats.acceptance < 0.8  # both branches: kept drafts (chains of two) and residual draws
    assert_distributed_as(counts, exact(target, prompt, params))
    wrong, critical = chi_square(counts, exact(draft, prompt, params))  # the draft's distribution: told apart
    assert wrong > 10 * critical, (wrong, critical)


def test_prompt_lookup_sampling_is_distributed_as_the_target(models):
    target, _ = models
    params = SamplingParams(temperature=1.0, top_k=6, min_p=0.75)  # min-p removes mass where drafts are tested
    base = target.tokenizer.encode("The capital of France is")

    def prompt_with(token):  # its last two tokens occurred before, followed by `token`: lookup proposes it
        return base + [token] + base[-2:]

    def chance(token):  # of the proposal under the target
        return distribution(target(prompt_with(token))[0, -1:, :target.tokenizer.vocab_size], params)[0, token]
    prompt = prompt_with(max(range(target.tokenizer.vocab_size), key=chance))
    eos, target.tokenizer.eos_ids = target.tokenizer.eos_ids, ()
    try:
        counts, stats = draws(target, Speculation(2, prompt_lookup=2), prompt, params, 1500)
    finally:
        target.tokenizer.eos_ids = eos
    assert 0 < stats.accepted < stats.drafted
    assert_distributed_as(counts, exact(target, prompt, params))


def test_the_rule_counts_kept_drafts_and_flags_non_finite_rows():
    vocab = 5
    logits = torch.full((4, vocab), -5.0)
    logits[[0, 1, 2, 3], [2, 3, 1, 4]] = 5.0  # greedy choices 2, 3, 1, 4
    drafts = torch.tensor([2, 3, 0])
    seed = torch.tensor([1])
    greedy = SamplingParams()
    assert accept(logits, drafts, None, greedy, seed, 10, None).tolist() == [2, 2, 3, 1, 4]  # 3 emitted, 1 padding
    assert accept(logits, torch.tensor([2, 3, 1]), None, greedy, seed, 10, None).tolist() == [3, 2, 3, 1, 4]
    assert accept(logits[:1], drafts[:0], None, greedy, seed, 10, None).tolist() == [0, 2]
    broken = logits.clone()
    broken[1, 0] = float("nan")
    assert accept(broken, drafts, None, greedy, seed, 10, None).tolist()[:3] == [1, 2, -1]  # d_0 kept, row 1 fails
    sampled = SamplingParams(temperature=1.0)
    certain = torch.full((3, vocab), -1e4)
    certain[[0, 1, 2], [1, 1, 1]] = 0.0  # p is a point mass on token 1 everywhere
    q = torch.full((2, vocab), 0.25).scatter(1, torch.tensor([[1], [1]]), 0.0)  # the draft never proposes 1
    out = accept(certain, torch.tensor([3, 3]), q, sampled, seed, 10, None).tolist()
    assert out[:2] == [0, 1]  # p(3) = 0: rejected, and the residual max(0, p - q) is token 1
    assert accept(certain, torch.tensor([1, 1]), None, sampled, seed, 10, None).tolist() == [2, 1, 1, 1]

import pytest
import torch

from olmo2_fast.errors import GenerationError
from olmo2_fast.sampling import SamplingParams, apply_repetition_penalty, filtered_probs, sample


def test_filters_keep_what_they_promise():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2)).nonzero()[:, 1].tolist() == [0, 1]
    # top-p 0.7: 0.5 alone is < 0.7, 0.5 + 0.25 reaches it.
    assert filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.7)).nonzero()[:, 1].tolist() == [0, 1]
    # min-p 0.4: keep tokens with p >= 0.4 * 0.5 = 0.2.
    assert filtered_probs(logits, SamplingParams(temperature=1.0, min_p=0.4)).nonzero()[:, 1].tolist() == [0, 1]
    probs = filtered_probs(logits, SamplingParams(temperature=1.0))
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.25, 0.15, 0.1]]))


def test_sampling_follows_the_distribution_and_seeds_reproduce():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3)
    gens = [torch.Generator().manual_seed(7)] * 1  # one generator drawing row after row
    draws = torch.cat([sample(logits[i:i + 2000], SamplingParams(temperature=1.0), 3, gens * 2000)
                       for i in range(0, 20000, 2000)])
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.02, rtol=0)
    a = sample(logits[:5], SamplingParams(temperature=1.0), 3, [torch.Generator().manual_seed(s) for s in range(5)])
    b = sample(logits[:5], SamplingParams(temperature=1.0), 3, [torch.Generator().manual_seed(s) for s in range(5)])
    assert torch.equal(a, b)


def test_repetition_penalty_follows_the_hf_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -4.0, 1.0]]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), r"temperature must be a finite number >= 0 \(0 = greedy\), got -1 \(int\)"),
    (dict(temperature="0.5"), r"temperature must be a finite number >= 0 \(0 = greedy\), got '0.5' \(str\)"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(top_k=True), r"top_k must be a positive integer or None, got True \(bool\)"),
    (dict(top_k=2.0), "top_k must be a positive integer"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p="0.9"), r"top_p must be a number in \(0, 1\]"),
    (dict(min_p=2.0), r"min_p must be a number in \[0, 1\]"),
    (dict(min_p=float("nan")), r"min_p must be a number in \[0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number > 0"),
    (dict(seed="7"), r"seed must be an integer in \[0, 2\*\*63\) or None, got '7' \(str\)"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=True), "seed must be an integer"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(seed=2**64), "seed must be an integer"),
])
def test_invalid_parameters_are_named(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**kwargs)


def test_per_prompt_seeds():
    assert SamplingParams(seed=5).seeds(3) == [5, 6, 7]
    assert SamplingParams().seeds(2) == [None, None]
    with pytest.raises(GenerationError, match="exceeds 2\\*\\*63 - 1"):
        SamplingParams(seed=2**63 - 2).seeds(3)


def test_counter_based_noise_is_exponential_and_a_function_of_seed_position_and_token():
    from olmo2_fast.sampling import exponential_noise
    seeds = torch.tensor([0, 1, 2**40 + 3, 2**63 - 1])
    positions = torch.tensor([0, 5, 5, 4095])
    noise = exponential_noise(seeds, positions, 50_000)
    assert noise.dtype == torch.float32 and torch.isfinite(noise).all() and (noise > 0).all()
    # Same (seed, position) -> same draws, whatever else is in the batch; any change -> new draws.
    torch.testing.assert_close(exponential_noise(seeds[1:3], positions[1:3], 50_000), noise[1:3], rtol=0, atol=0)
    other = exponential_noise(torch.tensor([1, 1]), torch.tensor([6, 5]), 50_000)
    assert (other[0] != noise[1]).float().mean() > 0.99 and torch.equal(other[1], noise[1])
    # Exp(1): mean 1, variance 1, and the uniforms behind it spread evenly over 20 bins.
    flat = noise.flatten().double()
    assert abs(flat.mean() - 1) < 0.01 and abs(flat.var() - 1) < 0.03
    counts = torch.histc(torch.exp(-flat), bins=20, min=0, max=1)
    expected = flat.numel() / 20
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 45, chi2  # 19 degrees of freedom: p < 0.001 beyond 43.8
    # Rows are independent: adjacent seeds are uncorrelated.
    assert abs(torch.corrcoef(noise[:2].double())[0, 1]) < 0.03

"""The scheduler: requests joining and leaving a running batch, prefix reuse, finish reasons,
per-request sampling, logprobs and non-finite logits (torch backend: fast on a CPU; the kernels
run the same loop in tests/test_model_triton.py and tests/test_graphs.py)."""
import pytest
import torch

from checkpoints import make_checkpoint
from olmo2_fast import OLMo2
from olmo2_fast.cache import KVCache
from olmo2_fast.errors import GenerationError
from olmo2_fast.sampling import SamplingParams
from olmo2_fast.scheduler import Request, Scheduler

PROMPTS = ["The capital of France is", "Once upon a time there", "A key-value cache keeps the keys", "x"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return OLMo2.from_pretrained(make_checkpoint(tmp_path_factory.mktemp("sched"), seed=12), device="cpu")


def scheduler(model, batch=4, seq=128):
    return Scheduler(model.engine, model.tokenizer, KVCache(model.config, batch, seq, torch.float32, "cpu"))


def run(sched, requests, join_at=None):
    """Add requests (request i at step join_at[i]), step until all are done; -> sequences."""
    join_at = join_at or [0] * len(requests)
    sequences, step = [None] * len(requests), 0
    while step == 0 or not sched.idle:
        for i, r in enumerate(requests):
            if join_at[i] == step:
                sequences[i] = sched.add(r)
        sched.step()
        step += 1
        assert step < 1000
    return sequences


def request(model, text, n=12, **kwargs):
    return Request(tuple(model.tokenizer.encode(text)), n, **kwargs)


def solo(model, r):
    return run(scheduler(model), [r])[0]


def test_greedy_equals_full_recomputation(model):
    r = request(model, PROMPTS[0], 10)
    s = solo(model, r)
    ids = list(r.prompt)
    for _ in range(len(s.ids)):
        ids.append(model(ids)[0, -1, :model.tokenizer.vocab_size].argmax().item())
    assert s.ids == ids[len(r.prompt):] and s.finish_reason in ("length", "eos")


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.95, seed=5),
                                    SamplingParams(temperature=1.0, top_k=20, repetition_penalty=1.3, seed=9)],
                         ids=["greedy", "top_p", "top_k_penalty"])
def test_requests_joining_a_running_batch_equal_their_solo_runs(model, params):
    requests = [request(model, p, 8 + 3 * i, params=params) for i, p in enumerate(PROMPTS)]
    alone = [solo(model, r) for r in requests]
    together = run(scheduler(model, batch=3), requests, join_at=[0, 0, 2, 5])  # the 4th waits for a free row
    assert [s.ids for s in together] == [s.ids for s in alone]
    assert [s.text for s in together] == [s.text for s in alone]


def test_mixed_sampling_parameters_in_one_batch(model):
    requests = [request(model, PROMPTS[0], 10), request(model, PROMPTS[1], 10, params=SamplingParams(0.8, seed=1)),
                request(model, PROMPTS[1], 10, params=SamplingParams(0.8, min_p=0.1, seed=2))]
    together = run(scheduler(model), requests)
    assert [s.ids for s in together] == [solo(model, r).ids for r in requests]


def test_finish_reasons(model):
    free = solo(model, request(model, PROMPTS[0], 16))
    assert free.finish_reason == "length" and len(free.ids) == 16
    stop = free.text[4:7]
    cut = solo(model, request(model, PROMPTS[0], 16, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(stop)]
    eos, model.tokenizer.eos_ids = model.tokenizer.eos_ids, (free.ids[2],)
    try:
        ended = solo(model, request(model, PROMPTS[0], 16))
        assert ended.finish_reason == "eos" and ended.ids == free.ids[:free.ids.index(free.ids[2])]
        model.tokenizer.eos_ids = ()
        prompt = (5,) * 120
        full = run(scheduler(model, seq=128), [Request(prompt, 50)])[0]
        assert full.finish_reason == "context" and len(full.ids) == 128 - 120 + 1
    finally:
        model.tokenizer.eos_ids = eos


def test_a_prompt_that_shares_a_cached_prefix_prefills_only_the_rest(model):
    sched = scheduler(model, batch=2)
    first = run(sched, [request(model, PROMPTS[2], 6)])[0]
    follow_up = tuple(list(first.request.prompt) + first.sampled + model.tokenizer.encode(" and more"))
    again = run(sched, [Request(follow_up, 6, reuse_prefix=True)])[0]
    # Everything the first request left in the cache: its prompt and its new tokens but perhaps the last
    # (fed only when the step after it had already been queued).
    assert again.reused >= len(first.request.prompt) + len(first.sampled) - 1
    assert again.ids == solo(model, Request(follow_up, 6)).ids
    assert run(sched, [Request(follow_up, 6)])[0].reused == 0  # only when the request allows it


def test_cancel_frees_the_row_and_others_continue(model):
    sched = scheduler(model, batch=2)
    a, b = sched.add(request(model, PROMPTS[0], 30)), sched.add(request(model, PROMPTS[1], 12))
    sched.step()
    sched.step()
    a.cancel()
    while not sched.idle:
        sched.step()
    assert a.finish_reason == "cancelled" and len(a.ids) < 30
    assert b.ids == solo(model, b.request).ids


def test_logprobs_are_the_models_distribution(model):
    r = request(model, PROMPTS[1], 5, params=SamplingParams(temperature=0.7, seed=3), logprobs=3)
    s = solo(model, r)
    ids = list(r.prompt) + s.ids
    full = torch.log_softmax(model(ids)[0].float(), -1)  # over every logit, as prompt scoring normalises
    for i, lp in enumerate(s.logprobs):
        position = len(r.prompt) - 1 + i
        assert lp.token_id == s.ids[i]
        assert lp.logprob == pytest.approx(full[position, lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == full[position, :model.tokenizer.vocab_size].topk(3).indices.tolist()


def test_non_finite_logits_end_the_request_with_an_error(model, monkeypatch):
    sched = scheduler(model)
    step = model.engine.step

    def overflow(batch, cache):
        logits = step(batch, cache)
        logits[-1, 3] = float("inf")
        return logits
    monkeypatch.setattr(model.engine, "step", overflow)
    s = run(sched, [request(model, PROMPTS[0], 5)])[0]
    assert s.finish_reason == "error" and "non-finite logits at step 1 " in s.error and "bfloat16" in s.error


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=(), max_new_tokens=3), "at least one token"),
    (dict(prompt=(1,), max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(prompt=(1,), max_new_tokens=3, stop=("",)), "stop must be a non-empty string"),
    (dict(prompt=(1,), max_new_tokens=3, logprobs=21), r"logprobs must be an integer in \[0, 20\]"),
])
def test_bad_requests(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        Request(**kwargs)


def test_prompts_that_do_not_fit_are_refused(model):
    sched = scheduler(model, seq=16)
    with pytest.raises(GenerationError, match="does not fit the KV cache of 16 positions"):
        sched.add(Request((1,) * 17, 2))
    with pytest.raises(GenerationError, match=r"must lie in \[0, 448\)"):
        sched.add(Request((1, 448), 2))


def test_max_running_caps_the_batch_and_cancelled_waiting_requests_end_at_once(model):
    sched = Scheduler(model.engine, model.tokenizer, KVCache(model.config, 4, 64, torch.float32, "cpu"), max_running=2)
    a, b, c = (sched.add(request(model, p, 6)) for p in PROMPTS[:3])
    sched.step()
    assert len(sched.running) == 2 and sched.waiting == [c]
    c.cancel()
    assert c in sched.step() and c.finish_reason == "cancelled" and not sched.waiting
    while not sched.idle:
        sched.step()
    assert a.finish_reason == b.finish_reason == "length"

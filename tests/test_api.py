"""The public API on the torch backend: generate, stream, batching, stopping, seeds, errors."""
import weakref

import pytest
import torch

from checkpoints import VARIANTS, make_checkpoint
from olmo2_fast import OLMo2
from olmo2_fast.errors import GenerationError

PROMPTS = ["The capital of France is", "Once upon a time there", "A key-value cache keeps the keys"]


@pytest.fixture(scope="module", params=["gqa", "gqa5"])
def model(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), seed=11, **VARIANTS[request.param])
    return OLMo2.from_pretrained(path, device="cpu")


def test_logits_for_the_whole_sequence(model):
    ids = torch.randint(0, 400, (3, 10))
    logits = model(ids)
    assert logits.shape == (3, 10, model.config.vocab_size)
    torch.testing.assert_close(model(ids[1].tolist())[0], logits[1])


def test_greedy_with_the_cache_equals_full_recomputation(model):
    prompt = model.tokenizer.encode(PROMPTS[0])
    new = model.generate(prompt, max_new_tokens=12)
    ids = list(prompt)
    for _ in range(12):
        nxt = model(ids)[0, -1, :model.tokenizer.vocab_size].argmax().item()
        if nxt in model.tokenizer.eos_ids:
            break
        ids.append(nxt)
    assert new == ids[len(prompt):]


def test_result_types_follow_the_prompt_type(model):
    text = model.generate(PROMPTS[0], max_new_tokens=5)
    assert isinstance(text, str)
    ids = model.generate(model.tokenizer.encode(PROMPTS[0]), max_new_tokens=5)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids) and 0 < len(ids) <= 5
    assert model.tokenizer.decode(ids) == text
    assert isinstance(model.generate(PROMPTS[:2], max_new_tokens=3), list)


def test_a_batch_of_different_lengths_equals_one_by_one(model):
    batched = model.generate(PROMPTS, max_new_tokens=10)
    assert batched == [model.generate(p, max_new_tokens=10) for p in PROMPTS]


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.95)
    a = model.generate(PROMPTS[1], seed=123, **kwargs)
    assert a == model.generate(PROMPTS[1], seed=123, **kwargs)
    assert len({model.generate(PROMPTS[1], seed=s, **kwargs) for s in range(4)}) > 1
    # Each prompt of a batch gets seed + index, so a batch reproduces the single runs.
    batch = model.generate([PROMPTS[1], PROMPTS[2]], seed=123, **kwargs)
    assert batch == [a, model.generate(PROMPTS[2], seed=124, **kwargs)]


def test_stream_reproduces_generate(model):
    for kwargs in (dict(), dict(temperature=0.9, seed=5, top_k=50)):
        pieces = list(model.stream(PROMPTS[2], max_new_tokens=20, **kwargs))
        assert "".join(pieces) == model.generate(PROMPTS[2], max_new_tokens=20, **kwargs)


def test_stop_strings_cut_the_text_and_stream_never_leaks_them(model):
    full = model.generate(PROMPTS[0], max_new_tokens=24)
    stop = full[5:8]
    assert stop and stop in full
    cut = model.generate(PROMPTS[0], max_new_tokens=24, stop=[stop, "\x00never"])
    assert cut == full[:full.index(stop)]
    assert "".join(model.stream(PROMPTS[0], max_new_tokens=24, stop=stop)) == cut


def test_eos_ends_generation(model):
    first = model.generate(model.tokenizer.encode(PROMPTS[0]), max_new_tokens=1)[0]
    eos = model.tokenizer.eos_ids
    model.tokenizer.eos_ids = (first,)
    try:
        assert model.generate(model.tokenizer.encode(PROMPTS[0]), max_new_tokens=8) == []
    finally:
        model.tokenizer.eos_ids = eos


def test_repetition_penalty_changes_greedy_output(model):
    plain = model.generate(PROMPTS[0], max_new_tokens=30)
    assert model.generate(PROMPTS[0], max_new_tokens=30, repetition_penalty=1.0) == plain
    assert model.generate(PROMPTS[0], max_new_tokens=30, repetition_penalty=5.0) != plain


def test_generation_stops_at_the_end_of_the_context(model):
    n = model.config.max_position_embeddings
    eos = model.tokenizer.eos_ids
    model.tokenizer.eos_ids = ()  # only the context can end this generation
    try:
        assert len(model.generate([5] * (n - 3), max_new_tokens=50)) == 4  # 3 free positions + 1 token never cached
    finally:
        model.tokenizer.eos_ids = eos


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate("hi", max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (lambda m: m.generate("hi", max_new_tokens=2.5), "max_new_tokens must be an integer >= 1"),
    (lambda m: m.generate([5] * 257), "longer than the model's context of 256"),
    (lambda m: m([[5] * 257]), "longer than the model's context of 256"),
    (lambda m: m.generate([1, 99999]), r"must lie in \[0, 448\)"),
    (lambda m: m(torch.tensor([[1, -1]])), r"must lie in \[0, 448\)"),
    (lambda m: m(torch.zeros(2, 2, 2, dtype=torch.long)), "shape \\(batch, seq\\)"),
    (lambda m: m.generate(3.5), "must be a str, or token ids as a non-empty list"),
    (lambda m: m.generate([]), "must be a str, or token ids as a non-empty list"),
    (lambda m: m.generate(["a", [1, 2]]), "all strings or all token id lists"),
    (lambda m: m.generate("hi", temperature=-0.5), "temperature must be a finite number >= 0"),
    (lambda m: m.generate("hi", stop=[""]), "stop must be a non-empty string"),
    (lambda m: list(m.stream(["a", "b"])), "stream\\(\\) takes one prompt"),
])
def test_bad_requests_get_clear_errors(model, call, message):
    with pytest.raises(GenerationError, match=message):
        call(model)


def test_cache_sizes_must_be_positive(tmp_path):
    with pytest.raises(GenerationError, match="max_seq_len must be a positive integer"):
        OLMo2.from_pretrained(make_checkpoint(tmp_path), device="cpu", max_seq_len=-4)


def test_a_preallocated_cache_refuses_requests_that_do_not_fit(tmp_path):
    model = OLMo2.from_pretrained(make_checkpoint(tmp_path), device="cpu", max_batch_size=2, max_seq_len=32)
    assert model.generate(PROMPTS[:2], max_new_tokens=4)
    with pytest.raises(GenerationError, match="max_batch_size=2, max_seq_len=32"):
        model.generate(PROMPTS, max_new_tokens=4)
    with pytest.raises(GenerationError, match="max_batch_size=2, max_seq_len=32"):
        model.generate(PROMPTS[0], max_new_tokens=40)


def test_a_growing_cache_is_freed_before_the_larger_one_is_allocated(tmp_path, monkeypatch):
    import olmo2_fast.api as api

    model = OLMo2.from_pretrained(make_checkpoint(tmp_path), device="cpu")
    model.generate(PROMPTS[0], max_new_tokens=4)
    old, allocate = weakref.ref(model._cache), api.KVCache
    alive = []

    def allocating(*args, **kwargs):
        alive.append(old() is not None)
        return allocate(*args, **kwargs)
    monkeypatch.setattr(api, "KVCache", allocating)
    model.generate(PROMPTS, max_new_tokens=4)  # three rows where there was one
    assert alive == [False]


def test_the_grown_cache_is_reused(model):
    model.generate(PROMPTS, max_new_tokens=4)
    cache = model._cache
    model.generate(PROMPTS[0], max_new_tokens=4)
    assert model._cache is cache


def test_chat_applies_the_template(model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = model.chat(messages, max_new_tokens=6)
    assert reply == model.generate(model.tokenizer.apply_chat_template(messages), max_new_tokens=6)
    assert "".join(model.stream_chat(messages, max_new_tokens=6)) == reply


# ---------------------------------------------------------------- one model, many callers


def test_threads_sharing_a_model_get_their_sequential_results(model):
    import threading
    expected = [model.generate(p, max_new_tokens=12) for p in PROMPTS] + [
        model.generate(PROMPTS[0], max_new_tokens=12, temperature=0.9, seed=4)]
    calls = [dict(prompt=p, max_new_tokens=12) for p in PROMPTS] + [
        dict(prompt=PROMPTS[0], max_new_tokens=12, temperature=0.9, seed=4)]
    results, errors = [None] * len(calls), []

    def worker(i):
        try:
            for _ in range(2):
                results[i] = model.generate(**calls[i]) if i % 2 else "".join(model.stream(**calls[i]))
        except Exception as e:  # surfaced below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and results == expected


def test_nested_or_interleaved_use_in_one_thread_is_refused_not_mixed(model):
    first = model.stream(PROMPTS[0], max_new_tokens=20)
    next(first)
    with pytest.raises(GenerationError, match="already generating in this thread"):
        model.generate(PROMPTS[1], max_new_tokens=3)
    with pytest.raises(GenerationError, match="already generating in this thread"):
        next(model.stream(PROMPTS[1], max_new_tokens=3))
    rest = "".join(first)  # the open stream is unharmed
    assert rest and first.result.finish_reason in ("length", "eos")


def test_a_broken_off_stream_does_not_change_the_next_result(model):
    expected = model.generate(PROMPTS[1], max_new_tokens=10)
    stream = model.stream(PROMPTS[0], max_new_tokens=30)
    next(stream)
    stream.close()
    assert model.generate(PROMPTS[1], max_new_tokens=10) == expected
    for _ in model.stream(PROMPTS[2], max_new_tokens=5):
        break  # dropped without close(): the generator is finalised when its reference goes
    assert model.generate(PROMPTS[1], max_new_tokens=10) == expected


def test_every_generation_says_why_it_stopped(model):
    details = model.generate(PROMPTS[0], max_new_tokens=12, return_details=True)
    assert details.finish_reason == "length" and len(details.token_ids) == 12 and details.text
    assert details.prompt_tokens == len(model.tokenizer.encode(PROMPTS[0])) and details.cached_prompt_tokens == 0
    assert 0 < details.time_to_first_token <= details.total_time and details.decode_tokens_per_s > 0
    stop = details.text[3:6]
    assert model.generate(PROMPTS[0], max_new_tokens=12, stop=stop, return_details=True).finish_reason == "stop"
    eos = model.tokenizer.eos_ids
    model.tokenizer.eos_ids = (details.token_ids[0],)
    try:
        assert model.generate(PROMPTS[0], max_new_tokens=12, return_details=True).finish_reason == "eos"
        model.tokenizer.eos_ids = ()
        n = model.config.max_position_embeddings
        ended = model.generate([5] * (n - 3), max_new_tokens=50, return_details=True)
        assert ended.finish_reason == "context" and len(ended.token_ids) == 4
    finally:
        model.tokenizer.eos_ids = eos
    stream = model.stream(PROMPTS[1], max_new_tokens=6)
    text = "".join(stream)
    assert stream.result.text == text and stream.result.finish_reason in ("length", "eos")
    batch = model.generate(PROMPTS[:2], max_new_tokens=5, return_details=True)
    assert [b.text for b in batch] == model.generate(PROMPTS[:2], max_new_tokens=5)


def test_non_finite_logits_raise_naming_the_step(model, monkeypatch):
    step = model.engine.step
    calls = []

    def overflowing(batch, cache):
        logits = step(batch, cache)
        calls.append(1)
        if len(calls) == 3:
            logits[:, 7] = float("nan")
        return logits
    monkeypatch.setattr(model.engine, "step", overflowing)
    with pytest.raises(GenerationError, match="non-finite logits at step 3 .*dtype='bfloat16'"):
        model.generate(PROMPTS[0], max_new_tokens=8)
    monkeypatch.undo()
    assert model.generate(PROMPTS[0], max_new_tokens=3)  # the model is usable afterwards


def test_prompts_as_tensors_and_arrays(model):
    import numpy as np
    ids = model.tokenizer.encode(PROMPTS[0])
    expected = model.generate(ids, max_new_tokens=5)
    assert model.generate(torch.tensor(ids), max_new_tokens=5) == expected
    assert model.generate(np.array(ids, dtype=np.int32), max_new_tokens=5) == expected
    assert model.generate([torch.tensor(ids), np.array(ids)], max_new_tokens=5) == [expected, expected]
    torch.testing.assert_close(model(np.array([ids])), model([ids]))


@pytest.mark.parametrize("call, message", [
    (lambda m: m([[1, 2, 3], [4, 5]]), "rectangular"),
    (lambda m: m(["a prompt"]), "integer token ids, got <U8"),
    (lambda m: m("a prompt"), "integer token ids .*got str"),
    (lambda m: m([[1.5, 2.0]]), "integer token ids, got float64"),
    (lambda m: m.generate("hi", seed="7"), r"seed must be an integer .* got '7' \(str\)"),
    (lambda m: m.generate("hi", seed=1.5), "seed must be an integer"),
    (lambda m: m.generate("hi", seed=2**64), "seed must be an integer"),
    (lambda m: m.generate("hi", top_k=True), "top_k must be a positive integer"),
    (lambda m: m.generate("hi", temperature="0.5"), r"got '0.5' \(str\)"),
    (lambda m: m.generate("hi", temperature=float("inf")), "temperature must be a finite number"),
    (lambda m: m.generate("hi", repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
    (lambda m: m.generate("hi", stop=5), "stop must be a non-empty string"),
    (lambda m: m.generate("caf\udce9"), "lone surrogate"),
    (lambda m: m.generate(torch.tensor([1.0, 2.0])), "must be a str, or token ids"),
])
def test_more_bad_requests_are_one_clear_error(model, call, message):
    with pytest.raises(GenerationError, match=message):
        call(model)


# ---------------------------------------------------------------- chat sessions


def test_a_chat_session_prefills_only_the_new_turn(model, tmp_path):
    session = model.chat_session(system="Be brief.", max_new_tokens=8)
    prefilled = []
    for turn in ["Hello there", "What is a cache?", "Tell me more", "And then?"]:
        reply = "".join(session.send(turn))
        result = session.last_result
        assert result.text == reply and session.messages[-1] == {"role": "assistant", "content": reply}
        prefilled.append(result.prompt_tokens - result.cached_prompt_tokens)
    turn_tokens = len(model.tokenizer.encode("\n<|user|>\nWhat is a cache?\n<|assistant|>\n"))
    assert all(p <= turn_tokens + 2 for p in prefilled[1:]), prefilled  # not the whole history
    assert len(session.messages) == 9


def test_a_chat_longer_than_the_context_drops_the_oldest_turns(tmp_path, caplog):
    short = OLMo2.from_pretrained(make_checkpoint(tmp_path, max_position_embeddings=64), device="cpu")
    session = short.chat_session(system="Sys", max_new_tokens=8)
    with caplog.at_level("WARNING", logger="olmo2_fast"):
        for turn in ["one two three four five six", "seven eight nine ten", "eleven twelve thirteen",
                     "fourteen fifteen sixteen", "seventeen"]:
            "".join(session.send(turn))
    assert "dropped the oldest" in caplog.text
    assert session.messages[0] == {"role": "system", "content": "Sys"}
    assert session.messages[-2]["content"] == "seventeen"
    with pytest.raises(GenerationError, match="longer than the model's context"):
        "".join(session.send("word " * 100))


def test_a_checkpoint_without_a_chat_template_is_refused_at_once(tmp_path):
    import json
    from olmo2_fast.errors import TokenizerError
    path = make_checkpoint(tmp_path)
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    with pytest.raises(TokenizerError, match="no chat template"):
        OLMo2.from_pretrained(path, device="cpu").chat_session()

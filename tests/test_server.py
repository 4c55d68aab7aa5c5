"""The OpenAI-compatible server (olmo2_fast/server.py): uvicorn on a free loopback port, driven by the
real `openai` client (and httpx or a raw socket where the bytes matter), on a tiny torch-backend model.

The oracles: `model.generate` / `model.chat` for greedy text, a full forward `model(ids)` for
logprobs, each request's solo run for concurrent runs, lm-eval's scores through our own adapter.
Every request loop is bounded in count and time."""
import copy
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")
openai = pytest.importorskip("openai", reason="the serve extra is not installed")

from checkpoints import make_checkpoint  # noqa: E402
from olmo2_fast import OLMo2  # noqa: E402
from olmo2_fast.cli import main  # noqa: E402
from olmo2_fast.serve_cli import exposure_warning  # noqa: E402
from olmo2_fast.server import create_app, serving  # noqa: E402

NAME = "tiny-olmo2"
PROMPTS = ["The capital of France is", "Once upon a time there", "A key-value cache keeps the keys", "x",
           "def fibonacci(n):", "Language models predict", "Zürich 東京 café", "It was a dark and stormy"]
WAIT_S = 20  # the longest any poll of the server waits


class ControlledEngine:
    """The model's engine with the knobs tests turn: a delay per step (so that requests surely overlap),
    a step that raises, and non-finite logits."""

    def __init__(self, engine):
        self.engine, self.delay, self.fail, self.nan = engine, 0.0, False, False

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, ids):
        return self.engine(ids)

    def step(self, batch, cache):
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("injected engine failure")
        logits = self.engine.step(batch, cache)
        return torch.full_like(logits, float("nan")) if self.nan else logits


class NanForward:
    """An engine whose full forward `engine(ids)` returns NaN logits."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, ids):
        return torch.full_like(self.engine(ids), float("nan"))


@dataclass
class Served:
    url: str
    worker: object
    engine: ControlledEngine

    def client(self, api_key="unused", **kwargs):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def post(self, path, body=None, timeout=60, **kwargs):
        if body is not None:
            kwargs["json"] = body
        return httpx.post(f"{self.url}{path}", timeout=timeout, **kwargs)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def wait_idle(self) -> dict:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            health = self.health()
            if health["running"] == health["waiting"] == health["outstanding"] == 0:
                return health
            time.sleep(0.02)
        raise AssertionError(f"the server did not become idle: {self.health()}")


@contextmanager
def serve(model, **options):
    engine = ControlledEngine(model.engine)
    controlled = copy.copy(model)
    controlled.engine = engine
    app = create_app(controlled, model_name=NAME, **options)
    with serving(app) as url:
        yield Served(url, app.state.worker, engine)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"), seed=7)


@pytest.fixture(scope="module")
def model(checkpoint):
    return OLMo2.from_pretrained(checkpoint, device="cpu", backend="torch")


@pytest.fixture(scope="module")
def served(model):
    with serve(model, max_batch_size=4, max_queue=16) as s:
        yield s


@pytest.fixture
def engine(served):
    yield served.engine
    served.engine.delay, served.engine.fail, served.engine.nan = 0.0, False, False
    served.wait_idle()


def greedy(model, prompt, n):
    return model.generate(prompt, max_new_tokens=n)


# ---------------------------------------------------------------- completions and chat


def test_models_and_health(served, model):
    listed = served.client().models.list().data
    assert [m.id for m in listed] == [NAME] and listed[0].max_model_len == model.config.max_position_embeddings
    health = served.health()
    assert health["status"] == "ok" and health["cache_rows"] == 4 and health["capacity"] == 20


def test_completion_equals_generate(served, model):
    client = served.client()
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == greedy(model, PROMPTS[0], 12) and r.choices[0].finish_reason == "length"
    prompt_ids = model.tokenizer.encode(PROMPTS[0])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt_ids), 12,
                                                                                          len(prompt_ids) + 12)
    by_ids = client.completions.create(model=NAME, prompt=prompt_ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    several = client.completions.create(model=NAME, prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert [c.text for c in several.choices] == [greedy(model, p, 6) for p in PROMPTS[:3]]
    assert several.usage.prompt_tokens == sum(len(model.tokenizer.encode(p)) for p in PROMPTS[:3])


def test_stop_strings_and_the_context_end(served, model):
    client = served.client()
    free = greedy(model, PROMPTS[1], 16)
    stop = free[5:8]
    r = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop, "\x00"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == free[:free.index(stop)]
    context = model.config.max_position_embeddings
    long = list(range(10, 10 + context - 3))  # room for 4 new tokens: max_tokens is capped there
    r = client.completions.create(model=NAME, prompt=long, max_tokens=100, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


def test_seeded_sampling_is_reproducible_and_prompt_i_uses_seed_plus_i(served):
    client = served.client()

    def sample(prompt, seed):
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0.9, top_p=0.95,
                                         seed=seed)

    first = sample(PROMPTS[0], 11).choices[0].text
    assert sample(PROMPTS[0], 11).choices[0].text == first
    assert any(sample(PROMPTS[0], s).choices[0].text != first for s in (12, 13, 14))
    pair = sample(PROMPTS[:2], 21)
    assert [c.text for c in pair.choices] == [sample(PROMPTS[0], 21).choices[0].text,
                                              sample(PROMPTS[1], 22).choices[0].text]


def test_logprobs_of_generated_tokens_equal_a_full_forward(served, model):
    r = served.client().completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    prompt = model.tokenizer.encode(PROMPTS[2])
    generated = greedy(model, prompt, 8)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 8
    assert lp.tokens == [model.tokenizer.decode([t]) for t in generated]
    # the scheduler's logprobs: float32 log-softmax over every logit, as prompt scoring normalises
    logits = model(prompt + generated)[0, len(prompt) - 1:-1].float()
    want = logits.log_softmax(-1).gather(1, torch.tensor(generated)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), want, atol=1e-4, rtol=1e-4)
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and max(top.values()) == value  # greedy: the chosen token is the best
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]


def test_echo_scores_the_prompt_with_one_forward(served, model):
    client = served.client()
    prompt = model.tokenizer.encode(PROMPTS[0])
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text == PROMPTS[0] and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(prompt)
    assert "".join(lp.tokens) == PROMPTS[0]
    full = torch.log_softmax(model(prompt)[0].double(), -1)  # as lm-eval's hf model scores: the full softmax
    want = full[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:], dtype=torch.float64), want, atol=1e-6, rtol=1e-6)
    # lm-eval's request: echo, one new token, logprobs 1 -> the prompt's entries, then the new token's
    lm_eval_form = client.completions.create(model=NAME, prompt=[prompt], max_tokens=1, echo=True, logprobs=1,
                                             temperature=0)
    lp1 = lm_eval_form.choices[0].logprobs
    assert len(lp1.token_logprobs) == len(prompt) + 1 and lp1.token_logprobs[:-1] == lp.token_logprobs
    assert lm_eval_form.choices[0].text == PROMPTS[0] + greedy(model, PROMPTS[0], 1)
    plain = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=3, echo=True, temperature=0)
    assert plain.choices[0].text == PROMPTS[0] + greedy(model, PROMPTS[0], 3) and plain.choices[0].logprobs is None


def test_chat_uses_the_chat_template(served, model):
    client = served.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a KV cache?"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == model.chat(messages, max_new_tokens=10)
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(model.tokenizer.apply_chat_template(messages)))
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "What is a "},
                                                       {"type": "text", "text": "KV cache?"}]}]
    with_logprobs = client.chat.completions.create(model=NAME, messages=parts, max_tokens=10, temperature=0,
                                                   logprobs=True, top_logprobs=2)
    assert with_logprobs.choices[0].message.content == r.choices[0].message.content
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == 10 and all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob
                                      for c in content)


def test_streaming_equals_the_whole_response(served, model):
    client = served.client()
    whole = client.completions.create(model=NAME, prompt=PROMPTS[6], max_tokens=20, temperature=0, logprobs=1)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[6], max_tokens=20, temperature=0, logprobs=1,
                                            stream=True))
    text_chunks, usage = [c for c in chunks if c.choices], chunks[-1].usage
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    # approx: the second run finds its prompt cached in a free row (prefix reuse), which rounds differently
    assert [t for c in text_chunks for t in c.choices[0].logprobs.token_logprobs] == \
        pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert not chunks[-1].choices and usage.completion_tokens == 20 and usage.prompt_tokens == whole.usage.prompt_tokens

    messages = [{"role": "user", "content": "Tell me a story"}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    stream = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length" and stream[-1].usage

    echoed = list(client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=1,
                                            stream=True))
    assert echoed[0].choices[0].text == PROMPTS[0] and echoed[0].choices[0].logprobs.token_logprobs[0] is None
    raw = served.post("/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True}).text
    events = [line for line in raw.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 3


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("field, value", [
    ("temperature", "0.5"), ("temperature", -1), ("temperature", float("nan")), ("top_p", 1.5), ("top_p", 0),
    ("seed", 2**64), ("seed", -1), ("seed", True), ("seed", 1.5), ("stop", [1]), ("stop", ""),
    ("stop", ["a", "b", "c", "d", "e"]), ("max_tokens", -1), ("max_tokens", "10"), ("max_tokens", 0),
    ("logprobs", 21), ("logprobs", True), ("prompt", []), ("prompt", [[]]), ("prompt", [10**6]), ("prompt", [1.5]),
    ("prompt", ""), ("prompt", None), ("prompt", [1, "a"]), ("n", 2), ("presence_penalty", 0.5), ("echo", "yes"),
    ("stream", 1), ("top_k", "5"), ("model", 7),
], ids=lambda v: repr(v)[:20])
def test_invalid_completion_fields_are_400s_naming_the_field(served, field, value):
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 2, field: value}
    if value is None:
        del body[field]
    if isinstance(value, float) and value != value:  # JSON has no NaN: send Python's literal, which json.loads takes
        r = served.post("/v1/completions", content=json.dumps(body).encode(),
                        headers={"content-type": "application/json"})
    else:
        r = served.post("/v1/completions", body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == field and error["type"] == "invalid_request_error", r.text
    assert field in error["message"]


@pytest.mark.parametrize("body, param", [
    ({}, "messages"), ({"messages": []}, "messages"), ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
])
def test_invalid_chat_fields_are_400s_naming_the_field(served, body, param):
    r = served.post("/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_errors_through_the_openai_client(served, model):
    client = served.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="Hi", temperature="hot")
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=[5] * (model.config.max_position_embeddings + 1))
    assert e.value.body["code"] == "context_length_exceeded" and "context of 256" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi")
    assert e.value.body["code"] == "model_not_found" and NAME in e.value.message
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=NAME, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])


def test_garbage_oversized_and_unreadable_bodies(served):
    json_header = {"content-type": "application/json"}
    for content, status in [(b"garbage", 400), (b"\xff\xfe\x00{", 400), (b"[1, 2]", 400), (b'{"prompt": ', 400),
                            (b"[" * 200_000, 400), (b"", 400), (b"x" * (2**20 + 1), 413)]:
        r = served.post("/v1/completions", content=content, headers=json_header)
        assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error", (content[:20], r.text)

    def chunked():  # no Content-Length: the limit holds while reading
        for _ in range(5):
            yield b" " * 300_000
    r = served.post("/v1/completions", content=chunked(), headers=json_header)
    assert r.status_code == 413
    r = served.post("/v1/completions", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    assert httpx.get(f"{served.url}/v1/nowhere").json()["error"]["message"].endswith("Not Found")
    assert httpx.get(f"{served.url}/v1/completions").status_code == 405
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:  # not even HTTP
        raw.sendall(b"\x16\x03\x01 definitely not http\r\n\r\n")
        raw.recv(1024)
    assert served.health()["status"] == "ok"
    assert served.client().completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_engine_failures_are_500s_and_the_server_keeps_serving(served, engine):
    client = served.client()
    engine.fail = True
    with pytest.raises(openai.InternalServerError, match="injected engine failure"):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=4)
    with pytest.raises(openai.APIError, match="injected engine failure"):
        list(client.completions.create(model=NAME, prompt="Hi", max_tokens=4, stream=True))
    engine.fail, engine.nan = False, True
    with pytest.raises(openai.InternalServerError, match="non-finite logits.*bfloat16"):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=4)
    engine.nan = False
    engine.engine = NanForward(engine.engine)  # the full forward that scores an echoed prompt
    try:
        with pytest.raises(openai.InternalServerError, match="non-finite logits for the prompt"):
            client.completions.create(model=NAME, prompt="Hi", max_tokens=0, echo=True, logprobs=1)
    finally:
        engine.engine = engine.engine.engine
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=4).usage.completion_tokens == 4
    assert served.wait_idle()["finished"]["error"] >= 3


# ---------------------------------------------------------------- concurrency


def _job(i: int) -> dict:
    """Request i of the concurrency test: greedy or seeded sampling, streamed or not, chat or completion."""
    body = {"model": NAME, "max_tokens": 6 + 3 * i, "temperature": 0 if i % 2 == 0 else 0.8, "seed": 100 + i}
    if i % 4 == 3:
        return {**body, "chat": True, "messages": [{"role": "user", "content": PROMPTS[i]}], "stream": i == 7}
    return {**body, "prompt": PROMPTS[i], "stream": i % 3 == 0, "stop": ["\n\n"] if i == 5 else None}


def _run_job(client, job: dict) -> tuple:
    """-> (text, finish_reason, completion_tokens) of one request."""
    kwargs = {k: v for k, v in job.items() if k != "chat" and v is not None}
    create = client.chat.completions.create if job.get("chat") else client.completions.create
    if not job["stream"]:
        r = create(**kwargs)
        c = r.choices[0]
        return (c.message.content if job.get("chat") else c.text), c.finish_reason, r.usage.completion_tokens
    chunks = list(create(**kwargs))
    text = "".join((c.choices[0].delta.content or "") if job.get("chat") else c.choices[0].text
                   for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage.completion_tokens


def test_eight_concurrent_clients_equal_their_solo_runs(served, engine):
    jobs = [_job(i) for i in range(8)]
    solo = [_run_job(served.client(), job) for job in jobs]
    steps_before = served.wait_idle()["steps"]
    engine.delay = 0.005  # every request is still running when the last one arrives
    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def client_thread(i):
        try:
            barrier.wait(timeout=WAIT_S)
            results[i] = _run_job(served.client(), jobs[i])
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == solo
    health = served.wait_idle()
    tokens = sum(r[2] for r in results)
    # 8 requests on 4 rows: four join a running batch, and the batch shares its steps
    assert health["steps"] - steps_before < tokens, (health, tokens)


def test_a_short_request_is_not_held_behind_a_long_one(served, engine, model):
    engine.delay = 0.02
    client = served.client()
    long = client.completions.create(model=NAME, prompt=PROMPTS[4], max_tokens=120, temperature=0, stream=True)
    next(iter(long))  # the long request is running
    start = time.monotonic()
    short = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    short_s = time.monotonic() - start
    rest = list(long)
    long_s = time.monotonic() - start
    assert short.choices[0].text == greedy(model, PROMPTS[0], 3)
    assert rest[-1].usage.completion_tokens == 120
    # a few shared steps, not the ~118 the long one still had to go
    assert short_s < long_s / 4, (short_s, long_s)


def test_a_client_that_disconnects_mid_stream_frees_its_row(served, engine):
    engine.delay = 0.02
    cancelled = served.health()["finished"].get("cancelled", 0)
    with httpx.Client(timeout=30) as h, h.stream("POST", f"{served.url}/v1/completions",
                                                 json={"prompt": PROMPTS[4], "max_tokens": 200, "stream": True}) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break  # leaving both blocks closes the connection mid-stream
    health = served.wait_idle()
    assert health["finished"].get("cancelled", 0) == cancelled + 1
    # a whole response the client gave up on (its timeout) is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        served.post("/v1/completions", {"prompt": PROMPTS[4], "max_tokens": 200}, timeout=0.5)
    assert served.wait_idle()["finished"].get("cancelled", 0) == cancelled + 2
    engine.delay = 0
    assert served.client().completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2
    assert served.worker.scheduler.idle


# ---------------------------------------------------------------- auth, the queue, a model without a chat template


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """One row, no queue, an API key, and a checkpoint without a chat template (a base model)."""
    directory = make_checkpoint(tmp_path_factory.mktemp("base"), seed=8)
    tok_config = json.loads((directory / "tokenizer_config.json").read_text())
    del tok_config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    base = OLMo2.from_pretrained(directory, device="cpu", backend="torch")
    with serve(base, api_key="s3cret", max_batch_size=1, max_queue=0) as s:
        yield s


def test_api_key(guarded):
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="wrong").completions.create(model=NAME, prompt="Hi", max_tokens=2)
    r = httpx.post(f"{guarded.url}/v1/completions", json={"prompt": "Hi"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{guarded.url}/v1/models", timeout=30).status_code == 401
    assert guarded.client(api_key="s3cret").completions.create(model=NAME, prompt="Hi", max_tokens=2).choices
    assert guarded.health()["status"] == "ok"  # health needs no key


def test_a_full_queue_is_a_429_with_retry_after(guarded):
    client = guarded.client(api_key="s3cret")
    guarded.engine.delay = 0.02
    try:
        long = client.completions.create(model=NAME, prompt="Hello", max_tokens=100, stream=True)
        next(iter(long))  # the one row is taken, and there is no queue
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=NAME, prompt="Hi", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        long.close()
    finally:
        guarded.engine.delay = 0
    guarded.wait_idle()
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_a_model_without_a_chat_template_is_a_400(guarded):
    with pytest.raises(openai.BadRequestError, match="no chat template") as e:
        guarded.client(api_key="s3cret").chat.completions.create(model=NAME, messages=[{"role": "user",
                                                                                         "content": "Hi"}])
    assert e.value.body["code"] == "no_chat_template"


# ---------------------------------------------------------------- lm-eval's local-completions model


@pytest.fixture
def loopback_only(monkeypatch):
    """Offline switches on; any connection or DNS look-up beyond this machine is recorded and refused."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local, attempts = {"127.0.0.1", "localhost", "::1"}, []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(self, address):
        if isinstance(address, tuple) and address[0] not in local:
            attempts.append(address)
            raise OSError("network access attempted in a test")
        return connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in local:
            attempts.append(host)
            raise OSError("network access attempted in a test")
        return getaddrinfo(host, *args, **kwargs)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


def test_lm_eval_local_completions_scores_equal_our_adapter(served, checkpoint, tmp_path, loopback_only,
                                                            monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (the eval extra)")
    pytest.importorskip("transformers", reason="local-completions tokenizes with transformers (the parity extra)")
    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity (the serve extra)")
    import functools

    import lm_eval
    import lm_eval.tasks

    import olmo2_fast.lm_eval_adapter  # noqa: F401  (registers the model olmo2_fast)
    from test_eval import TASKS, loglikelihoods, write_tasks

    write_tasks(tmp_path)
    local_tasks = functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)  # ours only: fast
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", local_tasks)

    def evaluate(model, model_args):
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), batch_size=2,
                                       task_manager=local_tasks(include_path=str(tmp_path)), device="cpu",
                                       log_samples=True)
    # batch_size 2: local-completions sends lists of token-id prompts
    # max_length 257: lm-eval keeps one token for generation, so prompts fill the 256-position context
    server = evaluate("local-completions", f"base_url={served.url}/v1/completions,model={NAME},"
                                           f"tokenizer_backend=huggingface,tokenizer={checkpoint},max_length=257,"
                                           "max_retries=1")
    ours = evaluate("olmo2_fast", f"pretrained={checkpoint},dtype=float32,backend=torch")
    for task in TASKS:
        got, want = (sorted((s["doc_id"], loglikelihoods(s)) for s in run["samples"][task]) for run in (server, ours))
        assert [doc for doc, _ in got] == [doc for doc, _ in want] == list(range(len(TASKS[task][1])))
        for (_, g), (_, w) in zip(got, want):
            assert g == pytest.approx(w, rel=1e-5, abs=1e-5), task
    assert server["results"]["tiny_mc"]["acc,none"] == ours["results"]["tiny_mc"]["acc,none"]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert server["results"]["tiny_rolling"][metric] == pytest.approx(ours["results"]["tiny_rolling"][metric],
                                                                          rel=1e-5)
    assert loopback_only == []


# ---------------------------------------------------------------- the command line and the bench


def test_exposure_warning():
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("localhost", None) is None and exposure_warning("0.0.0.0", "key") is None
    assert "--api-key" in exposure_warning("0.0.0.0", None) and "--api-key" in exposure_warning("my-host", None)


def test_serve_argument_errors_are_one_line(capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2  # refused before any model loads
    assert capsys.readouterr().err.strip().startswith(f"olmo2-fast: error: cannot listen on 127.0.0.1:{port}")
    for args in (["--port", "70000"], ["--max-batch-size", "0"], ["--max-queue", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(["serve", *args])
        assert e.value.code == 2


def test_olmo2_fast_serve_end_to_end(checkpoint):
    env = {**os.environ, "OLMO2_FAST_API_KEY": "k3y"}
    process = subprocess.Popen([sys.executable, "-m", "olmo2_fast", "serve", "--model", str(checkpoint), "--port", "0",
                                "--backend", "torch", "--max-batch-size", "2", "--served-model-name", NAME],
                               stderr=subprocess.PIPE, text=True, env=env)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr] + [lines.put("")], daemon=True).start()
    try:
        deadline, url = time.monotonic() + 60, None
        while url is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))  # queue.Empty: it never started
            assert line, "olmo2-fast serve exited before serving"
            if " serving " in line:
                url = line.split(" at ")[1].split()[0]
        assert url and "API key required" in line
        client = openai.OpenAI(base_url=url, api_key="k3y", max_retries=0, timeout=60)
        assert client.completions.create(model=NAME, prompt="Hello", max_tokens=3).usage.completion_tokens == 3
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130  # uvicorn shuts down, re-raises the interrupt: the CLI's Ctrl-C status
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_bench_serve_smoke(checkpoint, tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--smoke", "--model", str(checkpoint), "--clients", "1", "3", "--requests", "2",
                 "--max-tokens", "5", "--prompt-tokens", "16", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "serve" and doc["complete"] and [r["clients"] for r in doc["rows"]] == [1, 3]
    for row in doc["rows"]:
        assert row["requests"] == 2 * row["clients"] and row["errors"] == 0 and row["tokens_per_s"] > 0
        assert 0 < row["ttft_ms_p50"] <= row["ttft_ms_p90"] <= row["ttft_ms_p99"] <= row["total_ms_p99"]
        assert row["mode"] == doc["environment"]["mode"]
    assert "tokens/s" in capsys.readouterr().out


def test_a_one_sequence_server_decodes_speculatively(checkpoint):
    lookup = OLMo2.from_pretrained(checkpoint, device="cpu", backend="torch", prompt_lookup=2)
    plain = OLMo2.from_pretrained(checkpoint, device="cpu", backend="torch")
    prompt = "one two three one two three one two"
    with serve(lookup, max_batch_size=1, max_queue=4) as s:
        assert type(s.worker.scheduler).__name__ == "SpeculativeDecoder"
        r = s.client().completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == plain.generate(prompt, max_new_tokens=12)
        assert r.usage.completion_tokens == len(plain.generate(plain.tokenizer.encode(prompt), max_new_tokens=12))
    with serve(lookup, max_batch_size=2, max_queue=4) as s:  # batches decode without speculation
        assert type(s.worker.scheduler).__name__ == "Scheduler" and s.worker.scheduler.max_running == 2

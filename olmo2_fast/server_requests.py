"""OpenAI request bodies -> validated `Job`s; every refusal is an `ApiError` that names its field.

Types are checked, never coerced: the JSON string "0.5" is not a temperature, `true` is not a
seed, and a number outside its range is refused rather than clamped. The one deliberate cap:
`max_tokens` is cut to what the model's context leaves after the prompt (the sequence then ends
with finish_reason "length"). Defaults are OpenAI's: temperature 1, top_p 1, max_tokens 16 for
completions and the rest of the context for chat. Fields we cannot honour are refused unless
they hold their neutral value (n = 1, presence_penalty = 0, ...): accepting and ignoring them
would be a silent wrong answer. Fields that change nothing (user, metadata, ...) are ignored.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from .errors import Olmo2Error
from .sampling import MAX_SEED, SamplingParams
from .scheduler import Request

MAX_LOGPROBS = 20   # alternatives per token, the scheduler's bound
MAX_STOP = 4        # stop strings per request, OpenAI's bound
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_ROLES = ("system", "user", "assistant")
# Accepted only at these values (or null): anything else asks for something this server does not do.
NEUTRAL = {"n": (1,), "best_of": (1,), "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},),
           "suffix": ("",)}
CHAT_NEUTRAL = {**NEUTRAL, "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
                "response_format": ({"type": "text"},)}


class ApiError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, *,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Job:
    """What one HTTP request asks for, one entry per prompt (a completion may carry a list of prompts)."""
    prompts: tuple[tuple[int, ...], ...]
    prompt_texts: tuple[str, ...]            # each prompt as text, for echo
    requests: tuple[Request | None, ...]     # None: nothing to generate (max_tokens 0 with echo)
    logprobs: int | None                     # alternatives per token; None: no logprobs at all
    echo: bool
    stream: bool
    chat: bool

    @property
    def scores_prompts(self) -> bool:
        """Whether the prompt tokens' own log-probabilities are wanted (echo with logprobs)."""
        return self.echo and self.logprobs is not None


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse(name: str, rule: str, value) -> ApiError:
    return ApiError(400, f"{name} must be {rule}, got {_show(value)}", param=name)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(body: dict, name: str, default, low: float, high: float, *, low_open: bool = False):
    """A finite JSON number in [low, high] ((low, high] with low_open); null or absent -> default."""
    value = body.get(name)
    if value is None:
        return default
    numeric = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not (numeric and (low < value if low_open else low <= value) and value <= high):
        raise _refuse(name, f"a number in {'(' if low_open else '['}{low:g}, {high:g}]", value)
    return float(value)


def integer(body: dict, name: str, default, low: int, high: int):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        raise _refuse(name, f"an integer in [{low}, {high}]", value)
    return value


def boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _refuse(name, "true or false", value)
    return value


def _neutral_only(body: dict, table: dict):
    for name, allowed in table.items():
        value = body.get(name)
        # == alone would take true for 1 and false for 0
        if value is not None and not any(isinstance(value, bool) == isinstance(a, bool) and value == a
                                         for a in allowed):
            raise ApiError(400, f"{name} is not supported by this server (accepted: {', '.join(map(_show, allowed))} "
                                f"or null), got {_show(value)}", param=name, code="unsupported_parameter")


def check_model(body: dict, served: str):
    """The `model` field may be left out; when given it must name the model this server runs."""
    value = body.get("model")
    if value is None:
        return
    if not isinstance(value, str):
        raise _refuse("model", "a string", value)
    if value != served:
        raise ApiError(404, f"the model {value!r} does not exist: this server runs {served!r} (GET /v1/models)",
                       param="model", code="model_not_found")


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not stops or len(stops) > MAX_STOP or any(
            not isinstance(s, str) or not s for s in stops):
        raise _refuse("stop", f"a non-empty string or a list of 1 to {MAX_STOP} of them", value)
    return tuple(stops)


def _sampling(body: dict) -> SamplingParams:
    top_k = integer(body, "top_k", None, -1, 2**31 - 1)  # vLLM's extension; -1 (or 0) = off
    try:
        return SamplingParams(temperature=number(body, "temperature", 1.0, 0, 2),
                              top_k=top_k if top_k and top_k > 0 else None,
                              top_p=number(body, "top_p", 1.0, 0, 1, low_open=True),
                              min_p=number(body, "min_p", None, 0, 1),
                              repetition_penalty=number(body, "repetition_penalty", 1.0, 0, 10, low_open=True),
                              seed=integer(body, "seed", None, 0, MAX_SEED))
    except Olmo2Error as e:  # the checks above cover SamplingParams' rules; this keeps any other one a 400
        raise ApiError(400, str(e)) from None


def _token_ids(item, vocab: int, name: str) -> tuple[int, ...]:
    if not item or not all(_is_int(t) for t in item):
        raise ApiError(400, f"{name} must be a non-empty list of integer token ids", param="prompt")
    bad = [t for t in item if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"{name}: token ids must lie in [0, {vocab}), got {bad[:5]}", param="prompt")
    return tuple(item)


def _encode(tokenizer, text: str, name: str, param: str) -> tuple[int, ...]:
    try:
        ids = tokenizer.encode(text)
    except Olmo2Error as e:
        raise ApiError(400, f"{name}: {e}", param=param) from None
    if not ids:
        raise ApiError(400, f"{name} is empty: give at least one token", param=param)
    return tuple(ids)


def _prompts(body: dict, model, max_prompts: int) -> list[tuple[tuple[int, ...], str]]:
    """prompt: a string, a list of token ids, or a list of either -> [(ids, text)]."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                  or all(isinstance(p, list) for p in prompt)):
        items = prompt
    else:
        raise ApiError(400, "prompt must be a string, a list of token ids, or a non-empty list of strings or of "
                            f"token id lists, got {_show(prompt)}", param="prompt")
    if len(items) > max_prompts:
        raise ApiError(400, f"prompt holds {len(items)} prompts; this server takes at most {max_prompts} per request",
                       param="prompt")
    tokenizer, vocab = model.tokenizer, model.config.vocab_size
    parsed = []
    for i, item in enumerate(items):
        name = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            parsed.append((_encode(tokenizer, item, name, "prompt"), item))
        else:
            ids = _token_ids(item, vocab, name)
            parsed.append((ids, tokenizer.decode(list(ids))))
    return parsed


def _requests(prompts: list[tuple[int, ...]], max_tokens: int | None, params: SamplingParams,
              stop: tuple[str, ...], logprobs: int | None, context: int, param: str) -> tuple[Request | None, ...]:
    """One scheduler Request per prompt, max_tokens capped at the context; prompt i samples with seed + i."""
    try:
        seeds = params.seeds(len(prompts))
    except Olmo2Error as e:
        raise ApiError(400, str(e), param="seed") from None
    requests = []
    for ids, seed in zip(prompts, seeds):
        if len(ids) > context:
            raise ApiError(400, f"{param} has {len(ids)} tokens, more than the model's context of {context}",
                           param=param, code="context_length_exceeded")
        room = context - len(ids) + 1  # the last new token never enters the cache
        count = room if max_tokens is None else min(max_tokens, room)
        requests.append(Request(ids, count, replace(params, seed=seed), stop, logprobs) if count else None)
    return tuple(requests)


def parse_completion(body: dict, model, served: str, max_prompts: int) -> Job:
    """A /v1/completions body."""
    check_model(body, served)
    _neutral_only(body, NEUTRAL)
    echo = boolean(body, "echo", False)
    max_tokens = integer(body, "max_tokens", COMPLETION_MAX_TOKENS, 0, 2**31 - 1)
    if max_tokens == 0 and not echo:
        raise ApiError(400, "max_tokens must be >= 1 (0 only with echo, to score the prompt)", param="max_tokens")
    logprobs = integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    stream = boolean(body, "stream", False)
    prompts = _prompts(body, model, max_prompts)
    params, stop = _sampling(body), _stop(body)
    ids = [p for p, _ in prompts]
    requests = _requests(ids, max_tokens, params, stop, logprobs, model.config.max_position_embeddings, "prompt")
    return Job(tuple(ids), tuple(t for _, t in prompts), requests, logprobs, echo, stream, chat=False)


def _messages(body: dict) -> list[dict]:
    """messages: [{"role", "content"}], content a string or a list of {"type": "text", "text"} parts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _refuse("messages", "a non-empty list of {\"role\", \"content\"} objects", messages)
    plain = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _refuse(where, "an object with role and content", message)
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise _refuse(f"{where}.role", " or ".join(map(repr, CHAT_ROLES)), role)
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _refuse(f"{where}.content", "a string or a list of {\"type\": \"text\", \"text\"} parts", content)
        plain.append({"role": role, "content": content})
    return plain


def parse_chat(body: dict, model, served: str) -> Job:
    """A /v1/chat/completions body, rendered with the checkpoint's chat template."""
    check_model(body, served)
    _neutral_only(body, CHAT_NEUTRAL)
    tokenizer = model.tokenizer
    if not tokenizer.chat_templates:
        raise ApiError(400, "this model's checkpoint has no chat template (base models have none): use "
                            "/v1/completions with a plain prompt", param="messages", code="no_chat_template")
    messages = _messages(body)
    # max_completion_tokens is the newer name; None: up to the end of the context
    max_tokens = integer(body, "max_completion_tokens", None, 1, 2**31 - 1)
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens", None, 1, 2**31 - 1)
    wants_logprobs = boolean(body, "logprobs", False)
    top = integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not wants_logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    stream = boolean(body, "stream", False)
    params, stop = _sampling(body), _stop(body)
    try:
        text = tokenizer.apply_chat_template(messages)
    except Olmo2Error as e:
        raise ApiError(400, str(e), param="messages") from None
    ids = _encode(tokenizer, text, "the rendered conversation", "messages")
    logprobs = (top or 0) if wants_logprobs else None
    requests = _requests([ids], max_tokens, params, stop, logprobs, model.config.max_position_embeddings, "messages")
    return Job((ids,), (text,), requests, logprobs, echo=False, stream=stream, chat=True)

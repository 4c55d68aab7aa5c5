"""A conversation kept turn by turn: each reply reuses the KV cache of everything before it.

`ChatSession.send(text)` renders the conversation with the checkpoint's chat template and
streams the reply. The prompt of turn n is built at the token level: the token ids of the
conversation so far exactly as the model saw and produced them (the previous prompt, the
reply's sampled tokens, its EOS), followed by the tokens of the new turn's text. The cache
row still holds the former, so only the new turn is prefilled (`Request.reuse_prefix`); the
cost of a turn does not grow with the history. The template renders an assistant message
as its text followed by the EOS token, and a special token splits tokenisation, so these
ids are the template's text, with the reply as sampled rather than re-tokenised.

A reply cut by a stop string (its text is no longer its tokens) or by the context end
falls back to tokenising the rendered text; the cache still supplies every token it shares.
When the conversation no longer fits the context, the oldest turns are dropped (the system
message stays) with a warning.
"""
from __future__ import annotations

import logging
from typing import Iterator

from .errors import GenerationError, TokenizerError
from .sampling import SamplingParams
from .scheduler import Request

logger = logging.getLogger("olmo2_fast")


class ChatSession:
    """`session = model.chat_session(system="Be brief.")`; `for piece in session.send("Hi"): ...`.

    defaults: max_new_tokens (256), temperature, top_k, top_p, min_p, repetition_penalty, seed,
    stop — as for OLMo2.generate, overridable per send(). `messages` holds the conversation.
    """

    def __init__(self, model, system: str | None = None, **defaults):
        if not model.tokenizer.chat_templates:
            raise TokenizerError("this checkpoint has no chat template (base models have none): chat needs an "
                                 "instruct checkpoint; use generate with a plain prompt instead")
        unknown = set(defaults) - {"max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                   "seed", "stop"}
        if unknown:
            raise GenerationError(f"unknown chat option(s): {', '.join(sorted(unknown))}")
        self.model, self.defaults = model, {"max_new_tokens": 256, **defaults}
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._ids: list[int] = []  # the conversation's tokens as the cache holds them, after the last reply
        self._text = ""            # the template text those ids stand for
        model.prepare(1, model.config.max_position_embeddings)  # the cache now, not in the middle of a turn

    def send(self, content: str, **options) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply as text pieces; once the reply is complete it
        joins `messages`. Closing the stream early leaves the conversation as it was."""
        if not isinstance(content, str):
            raise GenerationError(f"a chat message must be a str, got {type(content).__name__}")
        o = {**self.defaults, **options}
        messages = self.messages + [{"role": "user", "content": content}]
        ids, text, messages = self._prompt(messages, o["max_new_tokens"])
        params = SamplingParams(o.get("temperature", 0.0), o.get("top_k"), o.get("top_p"), o.get("min_p"),
                                o.get("repetition_penalty", 1.0), o.get("seed"))
        stop = o.get("stop") or ()
        request = Request(tuple(ids), o["max_new_tokens"], params, (stop,) if isinstance(stop, str) else tuple(stop),
                          reuse_prefix=True)
        stream = self.model.stream_request(request)
        yield from stream
        result = stream.result
        self.messages = messages + [{"role": "assistant", "content": result.text}]
        self.last_result = result
        if result.finish_reason in ("eos", "length"):  # the text is the sampled tokens' whole decode
            eos_text = self.model.tokenizer.special_text["eos_token"]
            self._ids = ids + result.token_ids + self.model.tokenizer.encode(eos_text)
            self._text = text + result.text + eos_text
        else:
            self._ids, self._text = [], ""

    def _prompt(self, messages: list[dict], max_new_tokens: int) -> tuple[list[int], str, list[dict]]:
        """(prompt ids, their template text, the messages kept), dropping the oldest turns when needed."""
        tokenizer, context = self.model.tokenizer, self.model.config.max_position_embeddings
        dropped = 0
        while True:
            text = tokenizer.apply_chat_template(messages)
            if self._text and text.startswith(self._text):
                ids = self._ids + tokenizer.encode(text[len(self._text):])
            else:
                ids = tokenizer.encode(text)
            first = 1 if messages[0]["role"] == "system" else 0
            if len(ids) + max_new_tokens - 1 <= context or len(messages) - first <= 1:
                break
            messages = messages[:first] + messages[first + 2:]  # the oldest user turn and its reply
            self._ids, self._text = [], ""
            dropped += 1
        if len(ids) > context:
            raise GenerationError(f"this message makes a prompt of {len(ids)} tokens, longer than the model's "
                                  f"context of {context}")
        if dropped:
            logger.warning("the conversation no longer fits the model's context of %d tokens: dropped the oldest "
                           "%d turn(s)", context, dropped)
        return ids, text, messages

"""The dolma2 tokenizer (a `tokenizers` BPE from tokenizer.json), special ids and streaming decode.

OLMo 2's tokenizer adds no special tokens when encoding. Its embedding is padded past
the vocabulary (100278 real entries, 100352 rows), so `vocab_size` here — the ids the
tokenizer can decode — is the bound sampling must respect, not config.vocab_size.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .config import Olmo2Config, optional_token_id, token_ids
from .errors import GenerationError, TokenizerError

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves the template
DEFAULT_TEMPLATE = "default"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(entry) -> str:
    """tokenizer_config.json names special tokens as a string or as {"content": ...}."""
    text = entry.get("content") if isinstance(entry, dict) else entry
    return text if isinstance(text, str) else ""


def _chat_templates(directory: Path, tok_config: dict) -> dict[str, str]:
    """Named chat templates: tokenizer_config.json's `chat_template` (a string, or Hugging Face's list
    of {"name", "template"}), else chat_template.jinja. The unnamed one is called "default"."""
    source = directory / "tokenizer_config.json"
    entry = tok_config.get("chat_template")
    if entry is None and (directory / CHAT_TEMPLATE_FILE).is_file():
        return {DEFAULT_TEMPLATE: (directory / CHAT_TEMPLATE_FILE).read_text()}
    if entry is None:
        return {}
    if isinstance(entry, str):
        return {DEFAULT_TEMPLATE: entry}
    if isinstance(entry, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in entry):
        return {t["name"]: t["template"] for t in entry}
    raise TokenizerError(f"{source}: chat_template must be a string or a list of {{'name': str, 'template': str}}, "
                         f"got {type(entry).__name__}")


class Tokenizer:
    def __init__(self, directory: str | Path, config: Olmo2Config):
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"tokenizer.json not found in {directory}")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"could not load {path}: {e}") from None
        tok_config = _read_json(directory / "tokenizer_config.json")
        gen_config = _read_json(directory / "generation_config.json")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if self.vocab_size > config.vocab_size:
            raise TokenizerError(f"tokenizer.json has {self.vocab_size} tokens but the model's embedding has only "
                                 f"{config.vocab_size} rows")
        self.chat_templates = _chat_templates(directory, tok_config)
        self.special_text = {name: _token_text(tok_config.get(name)) for name in ("bos_token", "eos_token")}

        def token_id(entry):
            text = _token_text(entry)
            return self._tok.token_to_id(text) if text else None

        gen_source = str(directory / "generation_config.json")
        eos = list(token_ids(gen_config.get("eos_token_id"), "eos_token_id", gen_source)) + list(config.eos_token_id)
        eos.append(token_id(tok_config.get("eos_token")))
        self.eos_ids = tuple(sorted({i for i in eos if i is not None and 0 <= i < self.vocab_size}))
        bos = optional_token_id(gen_config.get("bos_token_id", config.bos_token_id), "bos_token_id", gen_source)
        self.bos_id = bos if bos is not None else token_id(tok_config.get("bos_token"))
        pad = optional_token_id(gen_config.get("pad_token_id", config.pad_token_id), "pad_token_id", gen_source)
        self.pad_id = pad if pad is not None else token_id(tok_config.get("pad_token"))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added). Text that is not valid Unicode (a lone
        surrogate, e.g. from undecodable bytes on the command line) is refused with its position."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise GenerationError(f"the text is not valid Unicode: {text[e.start]!r} at character {e.start} is a lone "
                                  "surrogate (undecodable input bytes?); pass valid UTF-8 text") from None
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            template: str | None = None) -> str:
        """Render `messages` ([{"role": "user", "content": ...}, ...]) with the checkpoint's template.

        template: the name of one of several named templates (Hugging Face's list form); default
        "default". Rendered the way transformers does it (sandboxed Jinja, trim_blocks,
        lstrip_blocks), so the special tokens in the text (e.g. <|endoftext|> as BOS) encode as their ids.
        """
        if not self.chat_templates:
            raise TokenizerError("this checkpoint has no chat_template in tokenizer_config.json (base models have "
                                 "none): use generate() with a plain prompt")
        name = DEFAULT_TEMPLATE if template is None else template
        if name not in self.chat_templates:
            raise TokenizerError(f"no chat template named {name!r}; this checkpoint has "
                                 f"{', '.join(map(repr, self.chat_templates))}")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages) or not messages:
            raise TokenizerError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TokenizerError(f"chat template: {message}")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_templates[name]).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_text)
        except TemplateError as e:
            raise TokenizerError(f"chat template failed to render: {e}") from None

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, whole characters only.

    A byte-level BPE token may end in the middle of a multi-byte UTF-8 character; the
    partial decode then ends in U+FFFD and nothing is emitted until the character
    completes. Decoding a short window that starts a few tokens back (rather than
    each token alone) keeps decoders that depend on context, such as leading-space
    handling, exact: the pieces always concatenate to `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window already turned into text
        self._read = 0    # end of the part already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix:self._read])
        text = decode(self._ids[self._prefix:])
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(emitted):]
        return ""

    def flush(self) -> str:
        """Whatever remains (an incomplete character decodes as U+FFFD)."""
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix:self._read])
        text = decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted):]

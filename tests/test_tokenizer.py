import json

import pytest
import torch

from checkpoints import config, make_checkpoint
from olmo2_fast.errors import TokenizerError
from olmo2_fast.sampling import SamplingParams, sample
from olmo2_fast.tokenizer import Tokenizer

TEXT = "Café in 東京 🙂 costs €5 — naïve Zürich."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("tok"))
    return Tokenizer(path, config())


def test_encode_adds_no_special_tokens_and_round_trips(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert 0 not in ids and tokenizer.decode(ids) == TEXT


def test_special_ids_from_the_config_files(tokenizer):
    assert tokenizer.eos_ids == (0,) and tokenizer.pad_id == 1
    assert tokenizer.bos_id == 0  # bos_token_id is null in config.json; tokenizer_config.json names <|endoftext|>
    assert tokenizer.vocab_size == 400 < config().vocab_size


def test_streaming_pieces_are_whole_characters_and_concatenate_to_the_full_decode(tokenizer):
    ids = tokenizer.encode(TEXT)
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)


def test_a_multibyte_character_split_over_byte_tokens_is_emitted_once_complete(tokenizer):
    # Byte-level BPE: every byte has its own token; feed 東's three bytes one at a time.
    byte_tokens = [tokenizer.encode(ch) for ch in ("a", "b")]
    assert all(len(t) == 1 for t in byte_tokens)
    alphabet = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    ids = [tokenizer.token_to_id(alphabet[b]) for b in "東".encode()]
    decoder = tokenizer.stream_decoder()
    assert [decoder.push(i) for i in ids] == ["", "", "東"]


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table that byte-level BPE uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def test_sampling_never_returns_ids_the_tokenizer_cannot_decode(tokenizer):
    logits = torch.zeros(4, config().vocab_size)
    logits[:, tokenizer.vocab_size:] = 100.0  # the padded embedding rows are the most likely
    greedy = sample(logits, SamplingParams(), tokenizer.vocab_size)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    sampled = sample(logits, SamplingParams(temperature=1.0), tokenizer.vocab_size, gens)
    assert (greedy < tokenizer.vocab_size).all() and (sampled < tokenizer.vocab_size).all()


def test_broken_tokenizer_files(tmp_path):
    path = make_checkpoint(tmp_path)
    (path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer(path, config())
    (path / "tokenizer.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(TokenizerError, match="could not load"):
        Tokenizer(path, config())


def test_chat_template_renders_the_tulu_format(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    text = tokenizer.apply_chat_template(messages)
    assert text == ("<|endoftext|><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!<|endoftext|>\n"
                    "<|user|>\nCapital of France?\n<|assistant|>\n")
    assert tokenizer.encode(text)[0] == 0  # the BOS text encodes as the special token's id


def test_chat_template_errors(tokenizer, tmp_path):
    with pytest.raises(TokenizerError, match="non-empty list"):
        tokenizer.apply_chat_template([{"role": "user"}])
    path = make_checkpoint(tmp_path)
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    with pytest.raises(TokenizerError, match="no chat_template"):
        Tokenizer(path, config()).apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_matches_transformers(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[parity]'")
    path = make_checkpoint(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "More"}]
    assert Tokenizer(path, config()).apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_named_chat_templates_and_the_jinja_file(tmp_path):
    from olmo2_fast.demo import CHAT_TEMPLATE
    path = make_checkpoint(tmp_path / "a")
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = [{"name": "default", "template": CHAT_TEMPLATE},
                                   {"name": "tool_use", "template": "TOOLS {{ messages[0]['content'] }}"}]
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    tok = Tokenizer(path, config())
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == "<|endoftext|><|user|>\nHi\n<|assistant|>\n"
    assert tok.apply_chat_template(messages, template="tool_use") == "TOOLS Hi"
    with pytest.raises(TokenizerError, match="no chat template named 'rag'; this checkpoint has 'default', 'tool_use'"):
        tok.apply_chat_template(messages, template="rag")
    tok_config["chat_template"] = {"default": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(TokenizerError, match="chat_template must be a string or a list"):
        Tokenizer(path, config())
    del tok_config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (path / "chat_template.jinja").write_text("JINJA {{ messages[0]['content'] }}")
    assert Tokenizer(path, config()).apply_chat_template(messages) == "JINJA Hi"


def test_text_that_is_not_unicode_is_refused_with_its_position(tokenizer):
    from olmo2_fast.errors import GenerationError
    with pytest.raises(GenerationError, match=r"'\\udcff' at character 3 is a lone surrogate"):
        tokenizer.encode("abc\udcffdef")


@pytest.mark.parametrize("field, value, message", [
    ("eos_token_id", "0", "eos_token_id must be a non-negative integer or null, got '0'"),
    ("eos_token_id", [0, None], "eos_token_id entry must be a non-negative integer"),
    ("pad_token_id", 1.0, "pad_token_id must be a non-negative integer"),
])
def test_generation_config_ids_of_the_wrong_type_are_named(tmp_path, field, value, message):
    from olmo2_fast.errors import ConfigError
    path = make_checkpoint(tmp_path)
    (path / "generation_config.json").write_text(json.dumps({field: value}))
    with pytest.raises(ConfigError, match=f"generation_config.json: {message}"):
        Tokenizer(path, config())

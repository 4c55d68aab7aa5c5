"""Random-weight OLMo 2 checkpoints in the exact Hugging Face format.

Used for the built-in demo model (what `olmo2-fast generate` runs without `--model`, so a
fresh machine can exercise the whole loader -> tokenizer -> generation path offline) and
by the tests, which build many small variants. Weights are random: the text they produce
is gibberish by construction. The tokenizer is a byte-level BPE trained with `tokenizers`
on a small built-in corpus, with dolma2's special tokens.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .checkpoint import expected_shapes, save_checkpoint
from .config import Olmo2Config

ENDOFTEXT, PAD = "<|endoftext|>", "<|pad|>"
# Tulu-style template of the OLMo 2 Instruct releases: BOS first, then <|user|> / <|assistant|> turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.",
    "OLMo 2 is a family of fully open language models trained by the Allen Institute for AI.",
    "Language models predict the next token of a text, one token at a time, from the tokens before it.",
    "A key-value cache keeps the keys and values of earlier tokens so that each new token costs one step.",
    "Café, naïve, Zürich, 東京, Ελληνικά, emoji 🙂 and other multi-byte characters must stream correctly.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Once upon a time there was a small model that wanted to run fast on a big GPU.",
]

DEMO_CONFIG = Olmo2Config(
    hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=500000.0,
    torch_dtype="float32", bos_token_id=None, pad_token_id=1, eos_token_id=(0,),
)
DEMO_VERSION = "1"


def train_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """Byte-level BPE with <|endoftext|> = 0 and <|pad|> = 1; deterministic for a given corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def random_state_dict(config: Olmo2Config, seed: int = 0, dtype: torch.dtype = torch.float32,
                      device="cpu") -> dict[str, torch.Tensor]:
    """Random tensors under every Hugging Face name: matrices ~ N(0, 1/fan_in), norm weights ~ 1 + U(-0.5, 0.5)
    (non-unit, so a norm that forgets its weight fails the tests)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:
            t = 1 + (torch.rand(shape, generator=generator, device=device) - 0.5)
        else:
            t = torch.randn(shape, generator=generator, device=device) * shape[-1] ** -0.5
        tensors[name] = t.to(dtype)
    return tensors


def write_random_checkpoint(directory: str | Path, config: Olmo2Config = DEMO_CONFIG, *, seed: int = 0,
                            dtype: torch.dtype = torch.float32, num_shards: int = 1,
                            tokenizer: Tokenizer | None = None) -> Path:
    """A complete checkpoint directory: config.json, safetensors, tokenizer files, generation_config.json."""
    directory = Path(directory)
    tokenizer = tokenizer or train_tokenizer(min(400, config.vocab_size))
    save_checkpoint(directory, config, random_state_dict(config, seed, dtype), num_shards=num_shards)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": PAD, "unk_token": ENDOFTEXT,
        "chat_template": CHAT_TEMPLATE, "model_max_length": config.max_position_embeddings,
    }, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps({
        "eos_token_id": tokenizer.token_to_id(ENDOFTEXT), "pad_token_id": tokenizer.token_to_id(PAD),
    }, indent=2) + "\n")
    return directory


def demo_checkpoint() -> Path:
    """The built-in demo checkpoint, written once under $OLMO2_FAST_HOME (default ~/.cache/olmo2_fast)."""
    home = Path(os.environ.get("OLMO2_FAST_HOME", Path.home() / ".cache" / "olmo2_fast"))
    target = home / f"demo-v{DEMO_VERSION}"
    if (target / "generation_config.json").is_file():
        return target
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=home, prefix=".demo-"))
    write_random_checkpoint(staging)
    try:
        staging.rename(target)  # atomic: a reader never sees half a checkpoint
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target

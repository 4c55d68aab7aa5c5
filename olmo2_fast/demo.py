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
from .errors import CheckpointError

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

# Widths of 128 so that int4 (groups of 128 input features) applies; head_dim 32 for the kernels.
DEMO_CONFIG = Olmo2Config(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=500000.0,
    torch_dtype="float32", bos_token_id=None, pad_token_id=1, eos_token_id=(0,),
)
DEMO_VERSION = "2"


def train_tokenizer(vocab_size: int = 400, texts: list[str] = CORPUS) -> Tokenizer:
    """Byte-level BPE with <|endoftext|> = 0 and <|pad|> = 1; deterministic for given texts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def tokenizer_files(directory: Path, tokenizer: Tokenizer, config: Olmo2Config) -> dict[str, Path]:
    """Write tokenizer.json, tokenizer_config.json (dolma2's special tokens, the Tulu chat template) and
    generation_config.json into `directory`; -> name -> path, as save_checkpoint's extra_files takes them."""
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": PAD, "unk_token": ENDOFTEXT,
        "chat_template": CHAT_TEMPLATE, "model_max_length": config.max_position_embeddings,
    }, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps({
        "eos_token_id": tokenizer.token_to_id(ENDOFTEXT), "pad_token_id": tokenizer.token_to_id(PAD),
    }, indent=2) + "\n")
    return {name: directory / name for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")}


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
    tokenizer = tokenizer or train_tokenizer(min(400, config.vocab_size))
    with tempfile.TemporaryDirectory() as scratch:
        extra = tokenizer_files(Path(scratch), tokenizer, config)
        return save_checkpoint(directory, config, random_state_dict(config, seed, dtype), num_shards=num_shards,
                               extra_files=extra)


REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json")
DEMO_MODELS = Path(__file__).parent / "demo_models"  # package data: olmo2_fast/demo_train.py trained them
TRAINED_DEMO = DEMO_MODELS / "target"


def demo_model() -> tuple[Path, str]:
    """(checkpoint directory, one line saying what it is) of the model `olmo2-fast` runs without --model:
    the trained demo model shipped with the package, else the random-weight checkpoint."""
    if all((TRAINED_DEMO / name).is_file() for name in REQUIRED_FILES):
        facts = json.loads((DEMO_MODELS / "training.json").read_text())["target"]
        return TRAINED_DEMO, (f"the built-in demo model, a {facts['parameters'] / 1e6:.1f}M-parameter OLMo 2 trained "
                              f"for {facts['train_seconds'] / 60:.0f} minutes on a CPU on Python's documentation: it "
                              "writes in that style and knows no facts (pass --model PATH for a real OLMo 2)")
    path = demo_checkpoint()
    return path, (f"the built-in demo checkpoint at {path} (tiny, RANDOM weights: the text is gibberish; pass "
                  "--model PATH for a real OLMo 2)")


def demo_checkpoint() -> Path:
    """The random-weight demo checkpoint, written once under $OLMO2_FAST_HOME (default ~/.cache/olmo2_fast);
    an incomplete one (an interrupted write, a deleted file) is written again."""
    home = Path(os.environ.get("OLMO2_FAST_HOME", Path.home() / ".cache" / "olmo2_fast"))
    target = home / f"demo-v{DEMO_VERSION}"
    if all((target / name).is_file() for name in REQUIRED_FILES):
        return target
    try:
        home.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=home, prefix=".demo-"))
    except OSError as e:
        raise CheckpointError(f"cannot write the demo checkpoint under {home} ({e.strerror or e}): set "
                              "OLMO2_FAST_HOME to a writable directory, or pass --model PATH") from None
    write_random_checkpoint(staging)
    if target.exists():  # damaged: replace it
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)  # atomic: a reader never sees half a checkpoint
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target

"""Tiny OLMo 2 checkpoints in the exact Hugging Face format, for the tests.

`make_checkpoint(tmp_path, **config_changes, dtype=..., num_shards=..., seed=...)` writes
config.json, safetensors (single or sharded), tokenizer.json (byte-level BPE trained
with `tokenizers`), tokenizer_config.json and generation_config.json. The default
shape has odd sizes, GQA and non-unit norm weights.
"""
from functools import lru_cache

import torch

from olmo2_fast.config import Olmo2Config
from olmo2_fast.demo import train_tokenizer, write_random_checkpoint

BASE = dict(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=448, max_position_embeddings=256, rms_norm_eps=1e-6,
            rope_theta=10000.0, torch_dtype="float32", pad_token_id=1, eos_token_id=(0,))

# Shapes the tests sweep: MHA, GQA with a group of 5 (as the 32B model), tied embeddings, linear RoPE scaling.
VARIANTS = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "gqa5": dict(hidden_size=80, num_attention_heads=10, num_key_value_heads=2),
    "tied": dict(tie_word_embeddings=True),
    "rope_linear": dict(rope_scaling_factor=4.0),
}


@lru_cache(maxsize=None)
def tokenizer():
    return train_tokenizer(400)


def config(**changes) -> Olmo2Config:
    return Olmo2Config(**{**BASE, **changes})


def make_checkpoint(directory, *, dtype=torch.float32, num_shards=1, seed=0, **changes):
    return write_random_checkpoint(directory, config(**changes), seed=seed, dtype=dtype, num_shards=num_shards,
                                   tokenizer=tokenizer())

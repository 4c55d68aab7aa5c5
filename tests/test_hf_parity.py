"""Optional: logits equal Hugging Face transformers' Olmo2ForCausalLM on the same checkpoint.

Skips when transformers (or its Olmo2 model) is not installed; the README's commands do not need it.
"""
import pytest
import torch

from checkpoints import VARIANTS, make_checkpoint
from olmo2_fast import OLMo2

transformers = pytest.importorskip("transformers")
Olmo2ForCausalLM = getattr(transformers, "Olmo2ForCausalLM", None)


@pytest.mark.skipif(Olmo2ForCausalLM is None, reason="this transformers has no Olmo2ForCausalLM")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    path = make_checkpoint(tmp_path, seed=3, **VARIANTS[variant])
    ours = OLMo2.from_pretrained(path, device="cpu", dtype="float32", backend="torch")
    theirs = Olmo2ForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 37))
    with torch.no_grad():
        expected = theirs(ids).logits
    torch.testing.assert_close(ours(ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(Olmo2ForCausalLM is None, reason="this transformers has no Olmo2ForCausalLM")
def test_bf16_logits_and_greedy_tokens_match_transformers(tmp_path):
    path = make_checkpoint(tmp_path, seed=4, dtype=torch.bfloat16, **VARIANTS["gqa"])
    ours = OLMo2.from_pretrained(path, device="cpu", dtype="bfloat16", backend="torch")
    theirs = Olmo2ForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, attn_implementation="eager").eval()
    ids = torch.randint(0, ours.tokenizer.vocab_size, (1, 24))
    with torch.no_grad():
        expected = theirs(ids).logits.float()
    got = ours(ids).float()
    # Attention differs only in where bf16 rounding happens (HF: bf16 matmuls; ours: float32).
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9

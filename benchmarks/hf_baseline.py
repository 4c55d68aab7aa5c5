"""Hugging Face transformers as the end-to-end baseline: `Olmo2ForCausalLM` on the same weights.

The model is built on the meta device and loaded with `assign=True` from the same (name, tensor)
stream our engines use, so it holds exactly our weights without a disk round trip or a second
copy. On a GPU it generates the way HF recommends for speed: a static KV cache, with which
`generate` compiles the decode step itself (torch.compile, mode "reduce-overhead", i.e. CUDA
graphs); on a CPU it runs plain `generate`. Greedy, `min_new_tokens` = `max_new_tokens`, so
every run produces the same number of tokens as ours.
"""
from __future__ import annotations

import importlib.util
import itertools
import time

import torch

from olmo2_fast.config import Olmo2Config


def unavailable_reason(config: Olmo2Config) -> str | None:
    """Why the HF baseline cannot run here, or None when it can."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    import transformers

    if not hasattr(transformers, "Olmo2ForCausalLM"):
        return f"transformers {transformers.__version__} has no Olmo2ForCausalLM"
    if config.quantization:
        return f"the checkpoint is quantised ({config.quantization}), which transformers cannot load"
    return None


def build_hf_model(config: Olmo2Config, tensors, device: torch.device):
    """Olmo2ForCausalLM holding the tensors of `tensors` ((HF name, tensor) pairs, on `device`)."""
    from transformers import Olmo2Config as HFOlmo2Config, Olmo2ForCausalLM

    hf_config = HFOlmo2Config(**config.to_hf_dict())
    with torch.device("meta"):
        model = Olmo2ForCausalLM(hf_config)
    state = dict(tensors)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=True, assign=True)
    # The rotary frequencies are a non-persistent buffer: built on meta above, so compute them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_config).to(device)
    on_meta = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"HF model tensors left on the meta device: {on_meta[:4]}")
    return model.eval()


def hf_generate_seconds(model, prompts: torch.Tensor, new_tokens: int) -> float:
    """Wall time of one greedy `generate` call producing exactly `new_tokens` per row."""
    static = prompts.device.type == "cuda"
    kwargs = dict(cache_implementation="static") if static else {}
    mask = torch.ones_like(prompts)
    if static:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=model.config.pad_token_id or 0, **kwargs)
    if static:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if out.shape[1] != prompts.shape[1] + new_tokens:
        raise RuntimeError(f"HF generate produced {out.shape[1] - prompts.shape[1]} tokens, expected {new_tokens}")
    return seconds


def describe(model) -> str:
    """How the HF baseline ran: attention implementation, cache, and whether generate compiled."""
    compiled = getattr(model, "_compiled_call", None) is not None
    cache = "static cache, auto torch.compile" if compiled else (
        "static cache, NOT compiled" if model.device.type == "cuda" else "dynamic cache, eager")
    return f"HF {getattr(model.config, '_attn_implementation', '?')} attention, {cache}"

"""Plain-PyTorch OLMo 2: the oracle every kernel and the fast model are tested against,
and the CPU backend. Plain PyTorch throughout: quantised projections (quantization.py)
dequantise and matmul in PyTorch too, so nothing here imports triton.

OLMo 2's quirks, as Hugging Face transformers computes them (after its May 2025 change):
  * no pre-norm: `h = x + post_attention_layernorm(attn(x))`, `out = h + post_feedforward_layernorm(mlp(h))`;
  * q_norm / k_norm are RMSNorms over the WHOLE projection (all heads at once), before
    the split into heads; RoPE comes after them; the cache stores k after norm and RoPE;
  * RMSNorm multiplies its weight in float32 and casts once: `(w * x32 * rsqrt(...)).to(dtype)`;
  * RoPE is non-interleaved ("rotate half"), cos/sin and the products in float32;
  * no biases; untied lm_head in every release (tied supported); GQA when
    num_key_value_heads < num_attention_heads.

Parameter names equal the Hugging Face checkpoint keys, so a checkpoint loads with
`load_state_dict(..., assign=True)` and no name map.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import quantization
from .cache import KVCache, StepBatch
from .checkpoint import fused_projections
from .config import Olmo2Config
from .errors import CheckpointError


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the model's dtypes, as HF computes; float64 when a test feeds a float64 oracle."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(compute_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(xf.dtype) * y).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling_factor: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[head_dim/2] in `dtype`, on the CPU (also while a model is built on the meta device); linear
    scaling divides the frequencies (i.e. the positions) by the factor."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu").to(dtype) / head_dim))
    return inv_freq / scaling_factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + [head_dim], in inv_freq's dtype (float32 for the model)."""
    freqs = positions[..., None].to(inv_freq.dtype) * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, H, D) or any shape whose last dim is D, cos/sin broadcastable; products in float32."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor) -> torch.Tensor:
    """q (Tq, Hq, D); k, v (Hkv, Tk, D) for key positions 0..Tk-1; q_positions (Tq,).

    Query i sees keys j <= q_positions[i]. GQA: query head h reads KV head h // group.
    Scores and softmax in float32 (as HF's default SDPA path computes them); returns (Tq, Hq, D)
    in q's dtype. kernels.attention.attention_reference instead rounds scores to the dtype, as
    HF's eager path does: it is the same-dtype baseline that bounds the kernels' error.
    """
    n_q_heads, n_kv_heads, head_dim = q.shape[1], k.shape[0], q.shape[2]
    group = n_q_heads // n_kv_heads
    qf = q.float().transpose(0, 1)                                     # (Hq, Tq, D)
    kf = k.float().repeat_interleave(group, dim=0)                     # (Hq, Tk, D)
    vf = v.float().repeat_interleave(group, dim=0)
    scores = qf @ kf.transpose(1, 2) * head_dim ** -0.5                # (Hq, Tq, Tk)
    key_pos = torch.arange(k.shape[1], device=q.device)
    visible = key_pos[None, :] <= q_positions[:, None].to(q.device)    # (Tq, Tk)
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(0, 1).to(q.dtype)       # (Tq, Hq, D)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor,
                     max_len: int) -> torch.Tensor:
    """One query per sequence, batched: q (B, Hq, D) at position kv_lens[b] - 1 against cache rows
    0..B-1 (B', Hkv, S, D); max_len >= every kv_len. Same math as causal_attention, without a
    host loop over sequences. Returns (B, Hq, D) in q's dtype."""
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    k = k_cache[:batch, :, :max_len].float()                                        # (B, Hkv, L, D)
    v = v_cache[:batch, :, :max_len].float()
    qf = q.float().view(batch, n_kv_heads, n_q_heads // n_kv_heads, head_dim)       # (B, Hkv, G, D)
    scores = qf @ k.transpose(-1, -2) * head_dim ** -0.5                            # (B, Hkv, G, L)
    hidden = torch.arange(max_len, device=q.device)[None, :] >= kv_lens[:, None]    # (B, L)
    scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).view(batch, n_q_heads, head_dim).to(q.dtype)


def _weight(*shape: int) -> nn.Parameter:
    """An uninitialised parameter on the current device; on a real device initialised as nn.Linear's.

    The model is built on the meta device and then takes the checkpoint's tensors, so nothing is
    initialised there: torch's meta implementation of the random initialisers imports
    torch._dynamo, which imports triton, and a later backend="triton" on a CPU then finds triton
    already imported without its interpreter.
    """
    weight = nn.Parameter(torch.empty(*shape))
    if not weight.is_meta:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


class Linear(nn.Module):
    """A bias-free nn.Linear (OLMo 2 has no biases) that builds on the meta device without initialising."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = _weight(out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class QuantizedLinear(nn.Module):
    """A projection with a quantised weight (olmo2_fast.quantization): dequantise and matmul in plain
    PyTorch, the numerics of the kernel's twin. Slow next to the kernels; any CPU runs it."""

    def __init__(self, method, weight):
        super().__init__()
        self.method, self.quantized = method, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.matmul_reference(x, self.quantized)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = _weight(num_embeddings, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Olmo2Attention(nn.Module):
    def __init__(self, config: Olmo2Config):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.q_proj = Linear(h, config.q_width)
        self.k_proj = Linear(h, config.kv_width)
        self.v_proj = Linear(h, config.kv_width)
        self.o_proj = Linear(config.q_width, h)
        self.q_norm = RMSNorm(config.q_width, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.kv_width, config.rms_norm_eps)
        self.head_dim = d

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (..., T, hidden) -> q (..., T, Hq, D), k and v (..., T, Hkv, D); q and k normed and roped."""
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_norm(self.q_proj(x)).view(shape)
        k = self.k_norm(self.k_proj(x)).view(shape)
        v = self.v_proj(x).view(shape)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Olmo2MLP(nn.Module):
    def __init__(self, config: Olmo2Config):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Olmo2Layer(nn.Module):
    def __init__(self, config: Olmo2Config):
        super().__init__()
        self.self_attn = Olmo2Attention(config)
        self.mlp = Olmo2MLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The block after attention: o_proj, both post-norms and residuals."""
        h = x + self.post_attention_layernorm(self.self_attn.o_proj(attn_out))
        return h + self.post_feedforward_layernorm(self.mlp(h))


def _pop_prefixed(state: dict, prefix: str) -> dict:
    """The entries of `state` whose names start with `prefix`, removed from it."""
    return {k: state.pop(k) for k in list(state) if k.startswith(prefix)}


def _set_projection(layer: nn.Module, name: str, module: nn.Module):
    """Replace a layer's projection, e.g. name "self_attn.q_proj"."""
    parent, _, attr = name.rpartition(".")
    setattr(layer.get_submodule(parent), attr, module)


class Olmo2Reference(nn.Module):
    """OLMo 2 for causal LM, in plain PyTorch.

    `forward(input_ids)` recomputes a whole batch of equal-length sequences;
    `step(batch, cache)` runs packed tokens of several sequences against a KV cache
    (prefill chunks and decode steps), the interface the generation loop drives.
    """

    def __init__(self, config: Olmo2Config):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Olmo2Layer(config) for _ in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta,
                                                       config.rope_scaling_factor), persistent=False)

    @classmethod
    def from_tensors(cls, config: Olmo2Config, tensors, device, quantize: str | None = None,
                     quantize_lm_head: bool = False) -> "Olmo2Reference":
        """Build on the meta device and take the (HF name, tensor) pairs as they are, so memory peaks
        at the loaded model, not twice it. quantize="int4" quantises every projection after loading
        (and lm_head with quantize_lm_head); a checkpoint saved quantised brings its projections packed
        (fused, split here per projection), and its lm_head when it was quantised."""
        load = quantization.plan_load(config, quantize, quantize_lm_head)
        method, saved = load.quantize, load.saved
        with torch.device("meta"):
            model = cls(config)
        state = dict(tensors)
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        if saved is not None:
            for index, layer in enumerate(model.model.layers):
                for fused, parts in fused_projections(config).items():
                    prefix = f"model.layers.{index}.{fused}."
                    weight = saved.from_tensors(_pop_prefixed(state, prefix), prefix)
                    start = 0
                    for part, width in parts:
                        _set_projection(layer, part, QuantizedLinear(saved, saved.columns(weight, start, start + width)))
                        start += width
            if load.lm_head:
                model.lm_head = QuantizedLinear(saved, saved.from_tensors(_pop_prefixed(state, "lm_head."), "lm_head."))
        model.load_state_dict(state, strict=True, assign=True)
        if method is not None:
            for layer in model.model.layers:
                for parts in fused_projections(config).values():
                    for part, _ in parts:
                        weight = layer.get_submodule(part).weight
                        _set_projection(layer, part, QuantizedLinear(method, method.quantize(weight.detach())))
            if load.lm_head:  # a tied lm_head: the embedding stays dense for the lookup, lm_head an int4 copy
                model.lm_head = QuantizedLinear(method, method.quantize(model.lm_head_weight().detach()))
        model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling_factor).to(device)
        return model.eval()

    @property
    def quantization(self):
        """The quantisation method of the projections, or None."""
        q_proj = self.model.layers[0].self_attn.q_proj
        return q_proj.method if isinstance(q_proj, QuantizedLinear) else None

    @property
    def quantized_lm_head(self) -> bool:
        return isinstance(getattr(self, "lm_head", None), QuantizedLinear)

    def checkpoint_tensors(self) -> tuple[Olmo2Config, dict[str, torch.Tensor]]:
        """(config, tensors by checkpoint name): the Hugging Face names, or, when quantised, the fused packed
        layout of the quantisation method that both engines load."""
        method = self.quantization
        tensors = dict(self.state_dict())
        if method is None:
            return self.config.with_(quantization_config=()), tensors
        for index, layer in enumerate(self.model.layers):
            for fused, parts in fused_projections(self.config).items():
                weight = method.stack([layer.get_submodule(part).quantized for part, _ in parts])
                tensors.update(method.to_tensors(weight, prefix=f"model.layers.{index}.{fused}."))
        if self.quantized_lm_head:
            tensors.update(method.to_tensors(self.lm_head.quantized, prefix="lm_head."))
        entry = method.config_entry(lm_head=self.quantized_lm_head)
        return self.config.with_(quantization_config=tuple(entry.items())), tensors

    def cache_rows(self, batch: int) -> int:
        return batch

    def release_cache(self):
        pass  # nothing here holds a cache between steps

    def greedy_ids(self, rows: int) -> None:
        return None  # logits only: the scheduler samples

    def lm_head_weight(self) -> torch.Tensor:
        """The dense lm_head weight (the embedding when tied; a quantised lm_head has none)."""
        if self.quantized_lm_head:
            raise ValueError("this model's lm_head is quantised: it has no dense weight")
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(h)
        return self.lm_head(h) if self.quantized_lm_head else F.linear(h, self.lm_head_weight())

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), full causal recomputation, no cache."""
        batch, seq = input_ids.shape
        positions = torch.arange(seq, device=input_ids.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq)                # (T, D)
        x = self.model.embed_tokens(input_ids)                           # (B, T, hidden)
        for layer in self.model.layers:
            q, k, v = layer.self_attn.project(x, cos, sin)               # (B, T, H, D)
            attn = torch.stack([causal_attention(q[b], k[b].transpose(0, 1), v[b].transpose(0, 1), positions)
                                for b in range(batch)])                  # (B, T, Hq, D)
            x = layer.finish(x, attn.flatten(-2))
        return self.logits(x)

    @torch.inference_mode()
    def step(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """Packed tokens (T,) of B sequences -> logits (B, vocab) of each sequence's last token.

        Writes each token's k (normed, roped) and v into cache row `seq_ids[t]` at
        `positions[t]`, then attends each sequence's queries to its cached keys.
        """
        cos, sin = rope_cos_sin(batch.positions, self.inv_freq)          # (T, D)
        x = self.model.embed_tokens(batch.input_ids)                     # (T, hidden)
        seq_ids, positions = batch.seq_ids.long(), batch.positions.long()
        decode = batch.max_q_len == 1 and len(batch.host_segments) == len(batch.input_ids)
        max_len = max(kv_len for _, _, kv_len in batch.host_segments)
        for index, layer in enumerate(self.model.layers):
            k_cache, v_cache = cache.layer(index)                        # (B, Hkv, S, D)
            q, k, v = layer.self_attn.project(x, cos, sin)               # (T, H, D)
            k_cache[seq_ids, :, positions] = k
            v_cache[seq_ids, :, positions] = v
            if decode:
                attn = decode_attention(q, k_cache, v_cache, batch.kv_lens, max_len)
            else:
                attn = torch.empty_like(q)
                for b, (start, end, kv_len) in enumerate(batch.host_segments):
                    attn[start:end] = causal_attention(q[start:end], k_cache[b, :, :kv_len], v_cache[b, :, :kv_len],
                                                       batch.positions[start:end])
            x = layer.finish(x, attn.flatten(-2))
        return self.logits(x[batch.last_token_rows])

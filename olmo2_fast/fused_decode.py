"""The fused decode step: five launches per layer, each filling the GPU (issue 11's design).

Per layer, for B <= 16 sequences of one new token each:
  qkv  = decode_gemv(Wqkv, prologue: x = h + norm(d_prev) * w_ff_prev)   layer 0: x = embed[ids]
  attn = fused_attention_decode(qkv): all-heads QK-norm, RoPE, k/v cache write, split-KV, combine
  o    = decode_gemv(Wo, attn)
  gu   = decode_gemv(Wgate_up, prologue: h = x + norm(o) * w_attn)
  d    = decode_gemv(Wdown, prologue: silu(gate) * up)
then lm_head with the last post-norm and the final norm as its prologue and the greedy argmax
as its epilogue: 5 x layers + 1 launches in all, no torch op between them. The prologues
write the residual stream into two ping-pong buffers (x, h: a prologue's output never
overlaps its inputs). Numerics are the unfused step's (kernels/decode_gemv.py,
kernels/fused_attention_decode.py), up to float32 summation order. Projections and lm_head may be
dense or int4 (Int4Weight), in any mix: the GEMV reads either format with the same prologues.

The step reads only device tensors of the batch (input_ids, kv_lens) and writes only the
cache and its own buffers, so it is what a CUDA graph captures (graphs.py). Workspaces are
made on first use, which the graphs' warm-up reaches before any capture.
"""
from __future__ import annotations

import torch

from .cache import KVCache, StepBatch
from .kernels.decode_gemv import DECODE_MAX_ROWS, decode_gemv, decode_gemv_embedding, decode_gemv_lm_head, \
    decode_gemv_residual_norm, decode_gemv_swiglu, decode_gemv_workspace
from .kernels.fused_attention_decode import fused_attention_decode, fused_attention_decode_supports, \
    fused_attention_decode_workspace


class FusedDecode:
    """The fused decode step of one Olmo2Fast engine, with its workspaces and residual buffers."""

    def __init__(self, engine):
        self.engine = engine
        self._gemv = None        # DecodeGemvWorkspace, one for every projection shape
        self._attention = {}     # batch size -> DecodeWorkspace (the split count depends on it)
        self._buffers = None     # (x, h, next_ids): [16, hidden] x 2 and [16] int64

    def supports(self, rows: int) -> bool:
        """Whether a decode step of `rows` sequences can take this path (else the cuBLAS one)."""
        e = self.engine
        return rows <= DECODE_MAX_ROWS and fused_attention_decode_supports(e.config.head_dim, e.embed.dtype)

    def __call__(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """One token per sequence -> logits (B, vocab); the greedy ids land in `greedy_ids(B)`."""
        e, cfg = self.engine, self.engine.config
        rows = batch.input_ids.shape[0]
        gemv, attention_ws = self.prepare(rows, cache)
        x, h, next_ids = (buffer[:rows] for buffer in self._buffers)
        eps = cfg.rms_norm_eps
        d = previous = None
        for index, w in enumerate(e.layers):
            k_cache, v_cache = cache.layer(index)
            if previous is None:
                qkv = decode_gemv_embedding(batch.input_ids, e.embed, w.qkv, gemv, x)
            else:
                qkv = decode_gemv_residual_norm(h, d, previous.post_feedforward_norm, w.qkv, gemv, x, eps=eps)
            attn = fused_attention_decode(qkv, w.q_norm, w.k_norm, batch.kv_lens, k_cache, v_cache, attention_ws,
                                          eps=eps, rope_theta=cfg.rope_theta,
                                          rope_scaling_factor=cfg.rope_scaling_factor)
            o = decode_gemv(attn, w.o, gemv)
            gate_up = decode_gemv_residual_norm(x, o, w.post_attention_norm, w.gate_up, gemv, h, eps=eps)
            d = decode_gemv_swiglu(gate_up, w.down, gemv)
            previous = w
        return decode_gemv_lm_head(h, d, previous.post_feedforward_norm, e.norm, e.lm_head, gemv, eps=eps,
                                   next_ids=next_ids, n_valid=e.greedy_vocab)

    def greedy_ids(self, rows: int) -> torch.Tensor:
        """argmax over the greedy vocabulary of the last step's logits (int64, on the device)."""
        return self._buffers[2][:rows]

    def release(self):
        """Forget the attention workspaces sized for a cache that is going away."""
        self._attention.clear()

    def prepare(self, rows: int, cache: KVCache):
        """The workspaces for steps of `rows` sequences over `cache`, made on first use (allocations, which
        a CUDA-graph capture must not see: the graphs' warm-up gets here first)."""
        e, cfg = self.engine, self.engine.config
        device, dtype = e.embed.device, e.embed.dtype
        if self._gemv is None:
            shapes = [(w.shape[0], w.shape[1]) for w in (e.layers[0].qkv, e.layers[0].o, e.layers[0].gate_up,
                                                          e.layers[0].down, e.lm_head)]
            self._gemv = decode_gemv_workspace(shapes, dtype, device)
            self._buffers = (torch.empty(DECODE_MAX_ROWS, cfg.hidden_size, dtype=dtype, device=device),
                             torch.empty(DECODE_MAX_ROWS, cfg.hidden_size, dtype=dtype, device=device),
                             torch.zeros(DECODE_MAX_ROWS, dtype=torch.int64, device=device))
        key = (rows, cache.max_seq)
        if key not in self._attention:
            self._attention[key] = fused_attention_decode_workspace(
                rows, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cache.max_seq, device)
        return self._gemv, self._attention[key]

"""The lean OLMo 2 forward on our Triton kernels (backend "triton").

Same math as reference.py, laid out for speed:
  * q/k/v fused into one (Hq + 2*Hkv)*D x hidden matrix and gate/up into one 2*I x hidden
    matrix, once, at load time; projections go through cuBLAS (`F.linear`) or, with
    quantize="int4", through the int4 kernel (lm_head too with quantize_lm_head);
  * one `qk_norm_rope` launch per layer norms q and k over all heads, rotates them and
    writes k and v straight into the static cache;
  * attention runs over the cache (`attention_prefill` for prompts and chunks,
    `attention_decode` with split-KV for one token per sequence);
  * each sublayer ends in one `residual_rmsnorm` (OLMo 2's post-norm plus the residual);
  * lm_head runs only on the rows whose logits are needed.
On CUDA, decode steps replay a captured CUDA graph (graphs.py captures `decode_step`).
Every launch runs on its tensors' device, which need not be the current one. On a CPU the
kernels run under Triton's interpreter: slow, for tests only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .cache import KVCache, StepBatch
from . import quantization
from .checkpoint import expected_shapes, fused_projections
from .config import Olmo2Config
from .errors import CheckpointError
from .fused_decode import FusedDecode
from .graphs import DecodeGraphs, DecodeStep, bucket_for
from .kernels.attention import SUPPORTED_HEAD_DIMS, attention_decode, attention_prefill
from .kernels.int4_format import Int4Weight
from .kernels.int4_matmul import int4_matmul
from .kernels.qk_norm_rope import qk_norm_rope
from .kernels.rmsnorm import residual_rmsnorm, rmsnorm
from .kernels.swiglu import swiglu

Weight = torch.Tensor | Int4Weight


def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """x (T, in) @ weight (out, in)^T; the one place that picks cuBLAS or the int4 kernel."""
    return int4_matmul(x, weight) if isinstance(weight, Int4Weight) else F.linear(x, weight)


@dataclass
class LayerWeights:
    qkv: Weight                    # ((Hq + 2*Hkv) * D, hidden): q rows, then k, then v
    q_norm: torch.Tensor           # (Hq * D,)
    k_norm: torch.Tensor           # (Hkv * D,)
    o: Weight                      # (hidden, Hq * D)
    gate_up: Weight                # (2 * intermediate, hidden): gate rows, then up
    down: Weight                   # (hidden, intermediate)
    post_attention_norm: torch.Tensor
    post_feedforward_norm: torch.Tensor


DECODE_PATHS = ("auto", "fused", "cublas")
_FIELDS = {"self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_up_proj": "gate_up",
           "mlp.down_proj": "down"}  # checkpoint.fused_projections name -> LayerWeights field


class Olmo2Fast:
    """Kernel-backed engine with the reference's interface: `step(batch, cache)` and `__call__(input_ids)`."""

    def __init__(self, config: Olmo2Config, embed: torch.Tensor, layers: list[LayerWeights], norm: torch.Tensor,
                 lm_head: Weight, quantization=None, decode_path: str = "auto", greedy_vocab: int | None = None):
        """decode_path: "fused" (fused_decode.py: five launches per layer), "cublas" (the step below) or
        "auto" (fused where it applies; with CUDA graphs, each bucket keeps whichever replays faster).
        greedy_vocab: the ids the fused step's in-kernel argmax may pick (the tokenizer's vocabulary)."""
        if decode_path not in DECODE_PATHS:
            raise CheckpointError(f"unknown decode_path {decode_path!r}; choose one of {', '.join(DECODE_PATHS)}")
        self.config, self.embed, self.layers, self.norm, self.lm_head = config, embed, layers, norm, lm_head
        self.quantization = quantization  # the olmo2_fast.quantization method of the projections, or None
        self.decode_path = decode_path
        self.greedy_vocab = greedy_vocab or config.vocab_size
        self.fused = FusedDecode(self)
        self.graphs: DecodeGraphs | None = None  # replays decode steps when set (engine.build_engine: on CUDA)
        self.last_decode_path: str | None = None  # the path the last decode step took

    @classmethod
    def from_tensors(cls, config: Olmo2Config, tensors: Iterator[tuple[str, torch.Tensor]],
                     quantize: str | None = None, quantize_lm_head: bool = False, **options) -> "Olmo2Fast":
        """Build from (HF name, tensor) pairs as checkpoint.iter_checkpoint yields them, fusing q/k/v and
        gate/up per layer as soon as a layer's pieces have arrived (so memory peaks at one extra layer).
        quantize / quantize_lm_head: quantisation at load (quantization.plan_load)."""
        if config.head_dim not in SUPPORTED_HEAD_DIMS:
            raise CheckpointError(f"the attention kernels support head_dim {SUPPORTED_HEAD_DIMS}, this model has "
                                  f"{config.head_dim}: use backend='torch'")
        load = quantization.plan_load(config, quantize, quantize_lm_head)
        method, saved = load.quantize, load.saved
        fused_names = fused_projections(config)

        def fused(p: dict[str, torch.Tensor], name: str) -> Weight:
            if saved is not None:
                return saved.from_tensors(p, prefix=f"{name}.")
            dense = torch.cat([p.pop(f"{part}.weight") for part, _ in fused_names[name]])
            return dense if method is None else method.quantize(dense)

        per_layer = sum(1 for n in expected_shapes(config) if n.startswith("model.layers.0."))
        pending: dict[int, dict[str, torch.Tensor]] = {}
        layers: list[LayerWeights | None] = [None] * config.num_hidden_layers
        top: dict[str, torch.Tensor] = {}
        for name, tensor in tensors:
            if not name.startswith("model.layers."):
                top[name] = tensor
                continue
            index_text, _, rest = name[len("model.layers."):].partition(".")
            parts = pending.setdefault(int(index_text), {})
            parts[rest] = tensor
            if len(parts) == per_layer:  # every tensor of this layer has arrived: fuse it now
                p = pending.pop(int(index_text))
                layers[int(index_text)] = LayerWeights(
                    **{field: fused(p, name) for name, field in _FIELDS.items()},
                    q_norm=p["self_attn.q_norm.weight"], k_norm=p["self_attn.k_norm.weight"],
                    post_attention_norm=p["post_attention_layernorm.weight"],
                    post_feedforward_norm=p["post_feedforward_layernorm.weight"],
                )
        embed = top["model.embed_tokens.weight"]
        if load.lm_head and saved is not None:
            lm_head = saved.from_tensors(top, prefix="lm_head.")
        else:
            lm_head = embed if config.tie_word_embeddings else top["lm_head.weight"]
            if load.lm_head:  # a tied lm_head: the embedding stays dense for the lookup, lm_head an int4 copy
                lm_head = method.quantize(lm_head)
        return cls(config, embed, layers, top["model.norm.weight"], lm_head, load.method, **options)

    def checkpoint_tensors(self) -> tuple[Olmo2Config, dict[str, torch.Tensor]]:
        """(config, tensors by checkpoint name) to save: HF names when unquantised; the fused layout of the
        quantisation method (see checkpoint.expected_shapes) when quantised, so loading skips quantisation."""
        method, lm_head_quantized = self.quantization, isinstance(self.lm_head, Int4Weight)
        entry = method.config_entry(lm_head=lm_head_quantized) if method else {}
        cfg = self.config.with_(quantization_config=tuple(entry.items()))
        tensors = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if lm_head_quantized:
            tensors.update(method.to_tensors(self.lm_head, prefix="lm_head."))
        elif not cfg.tie_word_embeddings:
            tensors["lm_head.weight"] = self.lm_head
        for index, w in enumerate(self.layers):
            p = f"model.layers.{index}."
            tensors.update({p + "self_attn.q_norm.weight": w.q_norm, p + "self_attn.k_norm.weight": w.k_norm,
                            p + "post_attention_layernorm.weight": w.post_attention_norm,
                            p + "post_feedforward_layernorm.weight": w.post_feedforward_norm})
            for name, parts in fused_projections(cfg).items():
                weight = getattr(w, _FIELDS[name])
                if method is not None:
                    tensors.update(method.to_tensors(weight, prefix=f"{p}{name}."))
                    continue
                pieces = weight.split([width for _, width in parts])
                tensors.update({f"{p}{part}.weight": piece for (part, _), piece in zip(parts, pieces)})
        return cfg, tensors

    def cache_rows(self, batch: int) -> int:
        return batch if self.graphs is None else bucket_for(batch)  # a graph bucket pads with spare rows

    def release_cache(self):
        if self.graphs is not None:
            self.graphs.release()
        self.fused.release()

    # ------------------------------------------------------------------ forward

    def step(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """Packed tokens of B sequences -> logits (len(batch.last_token_rows), vocab); k/v go into the cache."""
        decode = batch.max_q_len == 1 and len(batch.host_segments) == batch.input_ids.shape[0]
        if not decode:
            self.last_decode_path = None
            return self.forward(batch, cache, decode=False)
        if self.graphs is not None:
            logits = self.graphs.replay(batch, cache)
            self.last_decode_path = self.graphs.last_choice
            return logits
        return self.decode_step(batch, cache)

    def decode_candidates(self, rows: int) -> dict[str, DecodeStep]:
        """The decode steps a batch of `rows` may take, preferred first: what CUDA graphs time against each
        other per bucket. Each reads only the batch's device tensors and launches no autotuned kernel."""
        fused = self.decode_path != "cublas" and self.fused.supports(rows)
        if self.decode_path == "fused" and not fused:
            raise CheckpointError(f"decode_path='fused' does not apply to this step ({rows} rows, "
                                  f"head_dim {self.config.head_dim}, "
                                  f"{self.embed.dtype}): use decode_path='auto' or 'cublas'")
        steps = {"fused": self.fused} if fused else {}
        if self.decode_path != "fused":
            steps["cublas"] = self.cublas_decode_step
        return steps

    def decode_step(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """One token per sequence -> logits (B, vocab), on the preferred path for the batch."""
        name, step = next(iter(self.decode_candidates(batch.input_ids.shape[0]).items()))
        self.last_decode_path = name
        return step(batch, cache)

    def cublas_decode_step(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """One token per sequence on cuBLAS projections and the unfused kernels (~10 launches per layer)."""
        return self.forward(batch, cache, decode=True)

    def greedy_ids(self, rows: int) -> torch.Tensor | None:
        """The argmax ids of the last decode step when its path computed them in-kernel, else None."""
        return self.fused.greedy_ids(rows) if self.last_decode_path == "fused" else None

    def forward(self, batch: StepBatch, cache: KVCache, decode: bool) -> torch.Tensor:
        cfg = self.config
        x = self.embed[batch.input_ids]                                           # (T, hidden)
        for index, w in enumerate(self.layers):
            k_cache, v_cache = cache.layer(index)                                 # (B, Hkv, S, D)
            q = qk_norm_rope(linear(x, w.qkv), w.q_norm, w.k_norm, batch.positions, batch.seq_ids, k_cache, v_cache,
                             eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                             rope_scaling_factor=cfg.rope_scaling_factor)         # (T, Hq, D)
            if decode:
                attn = attention_decode(q, k_cache, v_cache, batch.kv_lens)
            else:
                attn = attention_prefill(q, k_cache, v_cache, batch.cu_seqlens, batch.kv_lens, batch.max_q_len)
            x = residual_rmsnorm(x, linear(attn.view(x.shape[0], -1), w.o), w.post_attention_norm, cfg.rms_norm_eps)
            x = residual_rmsnorm(x, linear(swiglu(linear(x, w.gate_up)), w.down), w.post_feedforward_norm,
                                 cfg.rms_norm_eps)
        h = rmsnorm(x[batch.last_token_rows], self.norm, cfg.rms_norm_eps)
        return linear(h, self.lm_head)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), through a scratch cache of exactly B x T."""
        n_seq, seq_len = input_ids.shape
        cache = KVCache(self.config, n_seq, seq_len, self.embed.dtype, self.embed.device)
        batch = StepBatch.build(input_ids.tolist(), [0] * n_seq, self.embed.device)
        batch = dataclasses.replace(batch, last_token_rows=torch.arange(n_seq * seq_len, device=self.embed.device))
        return self.forward(batch, cache, decode=False).view(n_seq, seq_len, -1)

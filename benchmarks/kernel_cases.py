"""What `bench kernels` measures: for each kernel at a model's shapes, the random inputs, the
Triton launcher, the eager PyTorch it replaces, the roofline cost and a float64 oracle.

The eager baselines are the `*_reference` functions the tests and the torch backend use. Two
exceptions, both the same math: attention_reference loops over sequences on the host, so the
attention baseline is HF's eager attention batched (`attention_eager`), which can be compiled
and captured; and int4 is compared with the unfused `dequantize_int4` + matmul it replaces and
with a plain matmul of the unquantised weight (what int4 has to beat). Attention also gets
PyTorch's fused `scaled_dot_product_attention` (HF's default implementation). The fused decode
step's kernels run against what they replace: the decode GEMV (`decode_gemv`, dense, and
`decode_gemv_int4`) runs each projection with its fused prologue, against the unfused eager
sequence (on the dequantised weights for int4; its roofline is the int4 floor: codes, scales
and zeros read once); `fused_attention_decode` against the unfused kernels (qk_norm_rope, then
attention_decode) and their eager twins.

Input sets: `Case.make_set(i)` builds the i-th set of fresh random data (never zeros); tensors
a call only writes a few rows of (the KV cache of qk_norm_rope) are shared by all sets.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from olmo2_fast.config import Olmo2Config
from olmo2_fast.kernels.attention import (attention_decode, attention_decode_cost, attention_prefill,
                                          attention_prefill_cost, attention_reference)
from olmo2_fast.kernels.decode_gemv import (DECODE_MAX_ROWS, Prologue, WeightFormat, decode_gemv, decode_gemv_cost,
                                            decode_gemv_lm_head, decode_gemv_lm_head_reference, decode_gemv_reference,
                                            decode_gemv_residual_norm, decode_gemv_residual_norm_reference,
                                            decode_gemv_swiglu, decode_gemv_swiglu_reference, decode_gemv_workspace)
from olmo2_fast.kernels.fused_attention_decode import (fused_attention_decode, fused_attention_decode_cost,
                                                       fused_attention_decode_reference,
                                                       fused_attention_decode_workspace)
from olmo2_fast.kernels.int4_format import Int4Weight, dequantize_int4, quantize_int4
from olmo2_fast.kernels.int4_matmul import DECODE_MAX_M, int4_matmul, int4_matmul_cost
from olmo2_fast.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_cost, qk_norm_rope_reference
from olmo2_fast.kernels.rmsnorm import residual_rmsnorm, residual_rmsnorm_cost, residual_rmsnorm_reference
from olmo2_fast.kernels.roofline import Cost, itemsize
from olmo2_fast.kernels.swiglu import swiglu, swiglu_cost, swiglu_reference

from .shapes import KERNELS, Grid

TRITON, EAGER = "triton", "torch eager"


@dataclass
class Candidate:
    impl: str
    fn: Callable[..., torch.Tensor]  # called with one input set's tensors
    cost: Cost | None = None         # default: the case's (the op's minimum traffic)
    oracle: Callable[..., torch.Tensor] | None = None  # default: the case's
    compile: bool = False            # the runner adds a torch.compile row of this callable
    eager_baseline: bool = False     # `speedup` is relative to this one
    dense_baseline: bool = False     # `speedup_vs_dense` (int4) is relative to this one


@dataclass
class Case:
    kernel: str
    phase: str                       # "decode" or "prefill"
    shape: dict                      # named sizes, also the JSON row's shape fields
    cost: Cost
    make_set: Callable[[int], tuple]
    oracle: Callable[..., torch.Tensor]  # float64 result for one input set
    candidates: list[Candidate]
    shared: tuple = field(default_factory=tuple)  # tensors every set reuses (not rotated)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


def tensors_of(items) -> Iterator[torch.Tensor]:
    """The tensors of an input set, looking inside Int4Weight."""
    for item in items:
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, Int4Weight):
            yield from (item.packed, item.scales, item.zeros)


def _randn(shape, dtype, generator, device, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)


def _norm_weight(width, dtype, generator, device) -> torch.Tensor:
    """Non-unit norm weights, as the demo checkpoints draw them."""
    return (1 + torch.rand(width, generator=generator, device=device) - 0.5).to(dtype)


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


# --------------------------------------------------------------------------- attention baselines


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """HF's repeat_kv: (B, Hkv, L, D) -> (B, Hkv * group, L, D), KV head h serving query heads
    h*group .. h*group+group-1. expand + reshape, not repeat_interleave, which may read the
    repeat count back to the host and could then not be captured in a CUDA graph."""
    batch, n_kv_heads, length, head_dim = x.shape
    return x[:, :, None].expand(batch, n_kv_heads, group, length, head_dim).reshape(batch, -1, length, head_dim)


def attention_eager(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """HF OLMo 2's eager attention (attention_reference's math) batched over B sequences that each
    have n = T / B new tokens at the end of a full cache (kv_len = max_seq); no host loop.

    q [T, Hq, D] packed; k_cache, v_cache [B, Hkv, L, D]. Returns [T, Hq, D].
    """
    batch, n_kv_heads, kv_len, head_dim = k_cache.shape
    n_heads = q.shape[1]
    n_new = q.shape[0] // batch
    qb = q.view(batch, n_new, n_heads, head_dim).transpose(1, 2)                   # (B, Hq, n, D)
    k, v = _repeat_kv(k_cache, n_heads // n_kv_heads), _repeat_kv(v_cache, n_heads // n_kv_heads)  # (B, Hq, L, D)
    scores = torch.matmul(qb, k.transpose(2, 3)) * head_dim ** -0.5                # (B, Hq, n, L)
    visible = torch.ones(n_new, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - n_new)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2).reshape(q.shape)                 # (T, Hq, D)


def attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """The same through F.scaled_dot_product_attention (GQA without repeat). Its causal mask is
    aligned top-left, which is right for a decode token (no mask) and for a prefill that fills
    the whole cache (n == L), the two cases benchmarked."""
    batch, _, kv_len, head_dim = k_cache.shape
    n_new = q.shape[0] // batch
    qb = q.view(batch, n_new, q.shape[1], head_dim).transpose(1, 2)                # (B, Hq, n, D)
    out = F.scaled_dot_product_attention(qb, k_cache, v_cache, is_causal=n_new > 1, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape)


# --------------------------------------------------------------------------- cases per kernel


def qk_norm_rope_cases(cfg: Olmo2Config, dtype, device, grid: Grid) -> list[Case]:
    cases = []
    rope = dict(eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, rope_scaling_factor=cfg.rope_scaling_factor)
    d, n_q, n_kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    # decode: B sequences, one token each at the end of a `context`-long cache; prefill: one prompt of S tokens
    points = [("decode", b, 1, grid.contexts[0]) for b in grid.batches] + [("prefill", 1, s, s) for s in grid.seqs]
    for phase, batch, n_new, max_seq in points:
        n_tokens = batch * n_new
        g = _generator(device, 0)
        shared = (_norm_weight(cfg.q_width, dtype, g, device), _norm_weight(cfg.kv_width, dtype, g, device),
                  torch.empty(batch, n_kv, max_seq, d, dtype=dtype, device=device),
                  torch.empty(batch, n_kv, max_seq, d, dtype=dtype, device=device))

        def make_set(i, n_tokens=n_tokens, batch=batch, n_new=n_new, max_seq=max_seq, shared=shared, phase=phase):
            g = _generator(device, 1000 + i)
            qkv = _randn((n_tokens, cfg.q_width + 2 * cfg.kv_width), dtype, g, device)
            if phase == "decode":  # set i writes its own cache slot, so the sets do not share written lines
                positions = torch.full((batch,), max_seq - 1 - i % max_seq, dtype=torch.int32, device=device)
            else:
                positions = torch.arange(n_new, dtype=torch.int32, device=device).repeat(batch)
            seq_ids = torch.arange(batch, dtype=torch.int32, device=device).repeat_interleave(n_new)
            return (qkv, shared[0], shared[1], positions, seq_ids, shared[2], shared[3])

        def oracle(qkv, wq, wk, positions, seq_ids, k_cache, v_cache):
            return qk_norm_rope_reference(qkv.double(), wq.double(), wk.double(), positions, seq_ids,
                                          torch.empty_like(k_cache, dtype=torch.float64),
                                          torch.empty_like(v_cache, dtype=torch.float64), **rope)

        cases.append(Case(
            "qk_norm_rope", phase, {"T": n_tokens}, qk_norm_rope_cost(n_tokens, n_q, n_kv, d, dtype), make_set, oracle,
            [Candidate(TRITON, lambda *a: qk_norm_rope(*a, **rope)),
             Candidate(EAGER, lambda *a: qk_norm_rope_reference(*a, **rope), compile=True, eager_baseline=True)],
            shared=shared))
    return cases


def _token_points(grid: Grid) -> list[tuple[str, int]]:
    return [("decode", b) for b in grid.batches] + [("prefill", s) for s in grid.seqs]


def residual_rmsnorm_cases(cfg: Olmo2Config, dtype, device, grid: Grid) -> list[Case]:
    cases, eps, hidden = [], cfg.rms_norm_eps, cfg.hidden_size
    for phase, n_tokens in _token_points(grid):
        weight = _norm_weight(hidden, dtype, _generator(device, 0), device)

        def make_set(i, n_tokens=n_tokens, weight=weight):
            g = _generator(device, 1000 + i)
            return _randn((n_tokens, hidden), dtype, g, device), _randn((n_tokens, hidden), dtype, g, device), weight

        cases.append(Case(
            "residual_rmsnorm", phase, {"T": n_tokens, "H": hidden}, residual_rmsnorm_cost(n_tokens, hidden, dtype),
            make_set, lambda r, x, w: residual_rmsnorm_reference(r.double(), x.double(), w.double(), eps),
            [Candidate(TRITON, lambda r, x, w: residual_rmsnorm(r, x, w, eps)),
             Candidate(EAGER, lambda r, x, w: residual_rmsnorm_reference(r, x, w, eps), compile=True,
                       eager_baseline=True)],
            shared=(weight,)))
    return cases


def swiglu_cases(cfg: Olmo2Config, dtype, device, grid: Grid) -> list[Case]:
    cases, inter = [], cfg.intermediate_size
    for phase, n_tokens in _token_points(grid):
        def make_set(i, n_tokens=n_tokens):
            return (_randn((n_tokens, 2 * inter), dtype, _generator(device, 1000 + i), device),)

        cases.append(Case(
            "swiglu", phase, {"T": n_tokens, "I": inter}, swiglu_cost(n_tokens, inter, dtype), make_set,
            lambda gate_up: swiglu_reference(gate_up.double()),
            [Candidate(TRITON, swiglu), Candidate(EAGER, swiglu_reference, compile=True, eager_baseline=True)]))
    return cases


def _attention_case(kernel, phase, cfg: Olmo2Config, dtype, device, batch: int, n_new: int, kv_len: int) -> Case:
    d, n_q, n_kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=device) * n_new
    kv_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=device)

    def make_set(i):
        g = _generator(device, 1000 + i)
        return (_randn((batch * n_new, n_q, d), dtype, g, device), _randn((batch, n_kv, kv_len, d), dtype, g, device),
                _randn((batch, n_kv, kv_len, d), dtype, g, device))

    if phase == "decode":
        kernel_fn = lambda q, k, v: attention_decode(q, k, v, kv_lens)  # noqa: E731
        cost = attention_decode_cost([kv_len] * batch, n_q, n_kv, d, dtype)
        shape = {"B": batch, "ctx": kv_len}
    else:
        kernel_fn = lambda q, k, v: attention_prefill(q, k, v, cu_seqlens, kv_lens, n_new)  # noqa: E731
        cost = attention_prefill_cost([n_new] * batch, [kv_len] * batch, n_q, n_kv, d, dtype)
        shape = {"B": batch, "S": n_new}
    return Case(
        kernel, phase, shape, cost, make_set,
        lambda q, k, v: attention_reference(q.double(), k.double(), v.double(), cu_seqlens, kv_lens),
        [Candidate(TRITON, kernel_fn), Candidate(EAGER, attention_eager, compile=True, eager_baseline=True),
         Candidate("torch sdpa", attention_sdpa)],
        shared=(cu_seqlens, kv_lens))


def attention_prefill_cases(cfg, dtype, device, grid: Grid) -> list[Case]:
    """One prompt of S tokens into an empty cache (kv_len = S)."""
    return [_attention_case("attention_prefill", "prefill", cfg, dtype, device, 1, s, s) for s in grid.seqs]


def attention_decode_cases(cfg, dtype, device, grid: Grid) -> list[Case]:
    return [_attention_case("attention_decode", "decode", cfg, dtype, device, b, 1, ctx)
            for ctx in grid.contexts for b in grid.batches]


def fused_attention_decode_cases(cfg: Olmo2Config, dtype, device, grid: Grid) -> list[Case]:
    """The fused decode step's attention (all-heads QK-norm, RoPE, cache write, split-KV, combine: one
    launch) at each decode batch and context, against the unfused kernels it replaces (qk_norm_rope then
    attention_decode, with its reduce launch) and their eager PyTorch (qk_norm_rope_reference, then
    attention_eager, which attends the whole cache: so the new token takes the cache's last slot)."""
    cases = []
    rope = dict(eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, rope_scaling_factor=cfg.rope_scaling_factor)
    d, n_q, n_kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    for context in grid.contexts:
        for batch in grid.batches:
            g = _generator(device, 0)
            rows = torch.arange(batch, dtype=torch.int32, device=device)
            kv_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            shared = (_norm_weight(cfg.q_width, dtype, g, device), _norm_weight(cfg.kv_width, dtype, g, device),
                      kv_lens, _randn((batch, n_kv, context, d), dtype, g, device),
                      _randn((batch, n_kv, context, d), dtype, g, device), rows)
            workspace = fused_attention_decode_workspace(batch, n_q, n_kv, d, context, device)

            def make_set(i, batch=batch, shared=shared):
                qkv = _randn((batch, cfg.q_width + 2 * cfg.kv_width), dtype, _generator(device, 1000 + i), device)
                return (qkv, *shared[:5])

            def fused(qkv, wq, wk, kv_lens, k_cache, v_cache, workspace=workspace):
                return fused_attention_decode(qkv, wq, wk, kv_lens, k_cache, v_cache, workspace, **rope)

            def unfused(qkv, wq, wk, kv_lens, k_cache, v_cache, rows=rows):
                q = qk_norm_rope(qkv, wq, wk, kv_lens - 1, rows, k_cache, v_cache, **rope)
                return attention_decode(q, k_cache, v_cache, kv_lens).flatten(1)

            def eager(qkv, wq, wk, kv_lens, k_cache, v_cache, rows=rows):
                q = qk_norm_rope_reference(qkv, wq, wk, kv_lens - 1, rows, k_cache, v_cache, **rope)
                return attention_eager(q, k_cache, v_cache).flatten(1)

            def oracle(qkv, wq, wk, kv_lens, k_cache, v_cache):
                return eager(qkv.double(), wq.double(), wk.double(), kv_lens, k_cache.double(), v_cache.double())

            cases.append(Case(
                "fused_attention_decode", "decode", {"B": batch, "ctx": context},
                fused_attention_decode_cost([context] * batch, n_q, n_kv, d, dtype), make_set, oracle,
                [Candidate(TRITON, fused), Candidate("triton unfused", unfused),
                 Candidate(EAGER, eager, compile=True, eager_baseline=True)],
                shared=shared + tuple(workspace)))
    return cases


def projections(cfg: Olmo2Config) -> dict[str, tuple[int, int]]:
    """The model's linear layers as (N, K) = (out_features, in_features), fused as model.py fuses them."""
    return {"qkv": (cfg.q_width + 2 * cfg.kv_width, cfg.hidden_size), "o": (cfg.hidden_size, cfg.q_width),
            "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size), "down": (cfg.hidden_size, cfg.intermediate_size)}


def dense_matmul_cost(m: int, n: int, k: int, dtype) -> Cost:
    """x [M, K] @ W[N, K]^T with W unquantised: read W and x, write out."""
    return Cost(bytes=(n * k + m * k + m * n) * itemsize(dtype), flops=2 * m * n * k)


def int4_matmul_cases(cfg: Olmo2Config, dtype, device, grid: Grid, names=None) -> list[Case]:
    """Decode (M = each batch size, <= 16) and prefill (M = each prompt length) for each projection."""
    cases = []
    dtype_name = str(dtype).removeprefix("torch.")
    for name, (n, k) in projections(cfg).items():
        if names is not None and name not in names:
            continue
        for m in [b for b in grid.batches] + list(grid.seqs):
            def make_set(i, m=m, n=n, k=k):
                g = _generator(device, 1000 + i)
                w = _randn((n, k), dtype, g, device, scale=k ** -0.5)
                return _randn((m, k), dtype, g, device), quantize_int4(w), w

            cases.append(Case(
                "int4_matmul", "decode" if m <= DECODE_MAX_M else "prefill", {"W": name, "M": m, "N": n, "K": k},
                int4_matmul_cost(m, n, k, dtype), make_set,
                lambda x, qw, w: x.double() @ dequantize_int4(qw).double().T,
                [Candidate(TRITON, lambda x, qw, w: int4_matmul(x, qw)),
                 Candidate("torch dequant+matmul", lambda x, qw, w: F.linear(x, dequantize_int4(qw)), compile=True,
                           eager_baseline=True),
                 Candidate(f"torch {dtype_name} matmul", lambda x, qw, w: F.linear(x, w),
                           cost=dense_matmul_cost(m, n, k, dtype), oracle=lambda x, qw, w: x.double() @ w.double().T,
                           dense_baseline=True)]))
    return cases


def decode_gemv_cases(cfg: Olmo2Config, dtype, device, grid: Grid,
                      weight_format: WeightFormat = WeightFormat.DENSE) -> list[Case]:
    """The decode GEMV of each projection with the prologue the fused decode step gives it (qkv and
    gate_up: residual + post-norm; o: none; down: SwiGLU; lm_head: the final norm and the greedy argmax),
    at each decode batch (<= 16 rows), dense or int4 weights, against the unfused eager sequence (on the
    dequantised weights for int4). One workspace per case, made once (as the fused step does)."""
    kernel_name = "decode_gemv" if weight_format == WeightFormat.DENSE else "decode_gemv_int4"
    cases, eps = [], cfg.rms_norm_eps
    shapes = dict(projections(cfg), lm_head=(cfg.vocab_size, cfg.hidden_size))
    prologues = dict(qkv=Prologue.RESIDUAL_NORM, o=Prologue.NONE, gate_up=Prologue.RESIDUAL_NORM, down=Prologue.SWIGLU,
                     lm_head=Prologue.FINAL_NORM)
    for name, (n, k) in shapes.items():
        prologue = prologues[name]
        for m in [b for b in grid.batches if b <= DECODE_MAX_ROWS]:
            workspace = decode_gemv_workspace([(n, k)], dtype, device, max_rows=m)
            next_ids = torch.empty(m, dtype=torch.int64, device=device)  # the argmax epilogue's output, made once

            def make_set(i, m=m, n=n, k=k, prologue=prologue):
                g = _generator(device, 1000 + i)
                qw = _randn((n, k), dtype, g, device, scale=k ** -0.5)
                if weight_format == WeightFormat.INT4:
                    qw = quantize_int4(qw)
                if prologue == Prologue.NONE:
                    return _randn((m, k), dtype, g, device), qw
                if prologue == Prologue.SWIGLU:
                    return _randn((m, 2 * k), dtype, g, device), qw
                rows = tuple(_randn((m, k), dtype, g, device) for _ in range(2))
                if prologue == Prologue.RESIDUAL_NORM:  # residual, delta, norm weight, weight, residual_out
                    return (*rows, _norm_weight(k, dtype, g, device), qw, torch.empty_like(rows[0]))
                return (*rows, _norm_weight(k, dtype, g, device), _norm_weight(k, dtype, g, device), qw)

            def kernel(*args, prologue=prologue, workspace=workspace, next_ids=next_ids):
                if prologue == Prologue.NONE:
                    return decode_gemv(*args, workspace)
                if prologue == Prologue.SWIGLU:
                    return decode_gemv_swiglu(*args, workspace)
                if prologue == Prologue.RESIDUAL_NORM:
                    residual, delta, norm, qw, residual_out = args
                    return decode_gemv_residual_norm(residual, delta, norm, qw, workspace, residual_out, eps=eps)
                residual, delta, ff_norm, final_norm, qw = args
                return decode_gemv_lm_head(residual, delta, ff_norm, final_norm, qw, workspace, eps=eps,
                                           next_ids=next_ids)

            def reference(*args, prologue=prologue):
                if prologue == Prologue.NONE:
                    return decode_gemv_reference(*args)
                if prologue == Prologue.SWIGLU:
                    return decode_gemv_swiglu_reference(*args)
                if prologue == Prologue.RESIDUAL_NORM:
                    return decode_gemv_residual_norm_reference(*args[:4], eps)[0]
                return decode_gemv_lm_head_reference(*args, eps)[0]

            def oracle(*args, reference=reference):
                return reference(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))

            cases.append(Case(
                kernel_name, "decode", {"W": name, "M": m, "N": n, "K": k},
                decode_gemv_cost(m, n, k, dtype, prologue, argmax=name == "lm_head", weight_format=weight_format),
                make_set, oracle,
                [Candidate(TRITON, kernel), Candidate(EAGER, reference, compile=True, eager_baseline=True)],
                shared=(*workspace, next_ids)))
    return cases


BUILDERS = {
    "qk_norm_rope": qk_norm_rope_cases,
    "residual_rmsnorm": residual_rmsnorm_cases,
    "swiglu": swiglu_cases,
    "attention_prefill": attention_prefill_cases,
    "attention_decode": attention_decode_cases,
    "int4_matmul": int4_matmul_cases,
    "decode_gemv": decode_gemv_cases,
    "decode_gemv_int4": functools.partial(decode_gemv_cases, weight_format=WeightFormat.INT4),
    "fused_attention_decode": fused_attention_decode_cases,
}


def build_cases(cfg: Olmo2Config, dtype, device, grid: Grid, kernels=KERNELS) -> list[Case]:
    return [case for name in kernels for case in BUILDERS[name](cfg, dtype, device, grid)]

"""The reference model against independent, straightforward computations of each piece."""
import math

import pytest
import torch

from checkpoints import VARIANTS, make_checkpoint
from olmo2_fast import OLMo2
from olmo2_fast.cache import KVCache, StepBatch
from olmo2_fast.reference import apply_rope, causal_attention, decode_attention, rms_norm, rope_cos_sin, rope_inv_freq


def test_rms_norm_multiplies_the_weight_in_float32_then_casts_once():
    x = torch.randn(7, 33, dtype=torch.float64) * 3
    w = torch.rand(33, dtype=torch.float64) + 0.5
    expected = w * x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms_norm(x.float(), w.float(), 1e-6).double(), expected, rtol=1e-6, atol=1e-6)
    xb, wb = x.bfloat16(), w.bfloat16()
    x32 = xb.float()
    olmo2 = (wb.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6))).bfloat16()
    assert torch.equal(rms_norm(xb, wb, 1e-6), olmo2)
    llama = wb * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()  # cast first: not OLMo 2
    assert not torch.equal(rms_norm(xb, wb, 1e-6), llama)


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_rope_rotates_pairs_i_and_i_plus_half_by_position_times_frequency(factor):
    head_dim, theta = 16, 10000.0
    positions = torch.tensor([0, 1, 5, 1000])
    x = torch.randn(4, 3, head_dim, dtype=torch.float64)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(head_dim, theta, factor))
    out = apply_rope(x.float(), cos[:, None], sin[:, None]).double()
    half = head_dim // 2
    for t, pos in enumerate(positions.tolist()):
        for i in range(half):
            angle = (pos / factor) / theta ** (2 * i / head_dim)
            z = complex(x[t, 0, i], x[t, 0, i + half]) * complex(math.cos(angle), math.sin(angle))
            assert out[t, 0, i].item() == pytest.approx(z.real, abs=1e-4)
            assert out[t, 0, i + half].item() == pytest.approx(z.imag, abs=1e-4)


def test_causal_attention_with_gqa_against_a_loop_over_heads():
    hq, hkv, d, tq, tk = 10, 2, 8, 3, 6
    q = torch.randn(tq, hq, d, dtype=torch.float64)
    k, v = torch.randn(hkv, tk, d, dtype=torch.float64), torch.randn(hkv, tk, d, dtype=torch.float64)
    q_positions = torch.tensor([3, 4, 5])  # the last three positions: a chunk appended to a cache
    out = causal_attention(q, k, v, q_positions)
    for h in range(hq):
        kv = h // (hq // hkv)
        for i, pos in enumerate(q_positions.tolist()):
            scores = torch.stack([q[i, h] @ k[kv, j] / math.sqrt(d) for j in range(pos + 1)])
            expected = (scores.softmax(0)[:, None] * v[kv, :pos + 1]).sum(0)
            torch.testing.assert_close(out[i, h], expected.to(out.dtype), rtol=1e-5, atol=1e-6)


def manual_layer(layer, x, positions, cfg):
    """One OLMo 2 block written out from the facts, for one sequence x (T, hidden)."""
    attn = layer.self_attn
    q = rms_norm(x @ attn.q_proj.weight.T, attn.q_norm.weight, cfg.rms_norm_eps)  # all heads at once
    k = rms_norm(x @ attn.k_proj.weight.T, attn.k_norm.weight, cfg.rms_norm_eps)
    v = x @ attn.v_proj.weight.T
    q, k, v = (t.view(len(x), -1, cfg.head_dim) for t in (q, k, v))
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor))
    q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
    o = causal_attention(q, k.transpose(0, 1), v.transpose(0, 1), positions).flatten(1) @ attn.o_proj.weight.T
    h = x + rms_norm(o, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
    mlp = layer.mlp
    m = (torch.nn.functional.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return h + rms_norm(m, layer.post_feedforward_layernorm.weight, cfg.rms_norm_eps)


@pytest.mark.parametrize("variant", ["gqa", "gqa5", "tied", "rope_linear"])
def test_whole_model_equals_the_written_out_blocks(tmp_path, variant):
    model = OLMo2.from_pretrained(make_checkpoint(tmp_path, seed=1, **VARIANTS[variant]), device="cpu")
    ref, cfg = model.engine, model.config
    ids = torch.randint(0, cfg.vocab_size, (11,))
    positions = torch.arange(11)
    with torch.no_grad():
        x = ref.model.embed_tokens.weight[ids]
        for layer in ref.model.layers:
            x = manual_layer(layer, x, positions, cfg)
        head = ref.model.embed_tokens.weight if cfg.tie_word_embeddings else ref.lm_head.weight
        expected = rms_norm(x, ref.model.norm.weight, cfg.rms_norm_eps) @ head.T
    torch.testing.assert_close(model(ids[None])[0], expected, rtol=1e-5, atol=1e-5)


def test_qk_norm_is_over_all_heads_not_per_head(tmp_path):
    model = OLMo2.from_pretrained(make_checkpoint(tmp_path, seed=2), device="cpu")
    attn, cfg = model.engine.model.layers[0].self_attn, model.config
    x = torch.randn(5, cfg.hidden_size)
    cos, sin = rope_cos_sin(torch.zeros(5), rope_inv_freq(cfg.head_dim, cfg.rope_theta))  # position 0: no rotation
    with torch.no_grad():
        q, _, _ = attn.project(x, cos, sin)
        raw = (x @ attn.q_proj.weight.T).view(5, -1, cfg.head_dim)
        per_head = rms_norm(raw, attn.q_norm.weight.view(-1, cfg.head_dim), cfg.rms_norm_eps)
    torch.testing.assert_close(q, rms_norm(raw.flatten(1), attn.q_norm.weight, cfg.rms_norm_eps).view_as(q))
    assert not torch.allclose(q, per_head, atol=1e-3)


@pytest.mark.parametrize("variant", ["gqa", "mha", "gqa5"])
def test_cached_steps_equal_full_recomputation(tmp_path, variant):
    """Ragged batch: prefill two prompts in one packed step, then a chunk and single-token decode steps."""
    model = OLMo2.from_pretrained(make_checkpoint(tmp_path, seed=4, **VARIANTS[variant]), device="cpu")
    ref, cfg = model.engine, model.config
    seqs = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (9, 4)]
    cache = KVCache(cfg, max_batch=2, max_seq=32, dtype=torch.float32, device="cpu")
    plan = [([s[:6] for s in (seqs[0], seqs[1][:3])], [0, 0]),   # prefill of unequal prompts
            ([seqs[0][6:8], seqs[1][3:4]], [6, 3]),              # a chunk for one, a decode for the other
            ([seqs[0][8:9], [seqs[1][3]]], [8, 4])]              # decode both (seq 1 repeats a token)
    history = [[], []]
    for chunks, starts in plan:
        logits = ref.step(StepBatch.build(chunks, starts, "cpu"), cache)
        for b, chunk in enumerate(chunks):
            history[b] += chunk
            full = ref(torch.tensor([history[b]]))[0, -1]
            torch.testing.assert_close(logits[b], full, rtol=1e-5, atol=1e-5)


def test_batched_decode_attention_equals_the_per_sequence_loop():
    hq, hkv, d, lens = 10, 2, 8, [1, 7, 3]
    k_cache, v_cache = torch.randn(4, hkv, 9, d), torch.randn(4, hkv, 9, d)
    q = torch.randn(len(lens), hq, d)
    out = decode_attention(q, k_cache, v_cache, torch.tensor(lens), max(lens))
    for b, n in enumerate(lens):
        expected = causal_attention(q[b:b + 1], k_cache[b, :, :n], v_cache[b, :, :n], torch.tensor([n - 1]))
        torch.testing.assert_close(out[b:b + 1], expected)

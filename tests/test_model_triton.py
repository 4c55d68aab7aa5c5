"""The kernel-backed forward (backend="triton") against the plain-PyTorch reference.

On a CPU the kernels run under Triton's interpreter (every dtype, bf16 included: see
conftest.py's bf16 patches); on a GPU the same tests run natively, with CUDA graphs too.
"""
import copy

import pytest
import torch
import triton.runtime.interpreter as interpreter

from checkpoints import make_checkpoint
from harness import ALL_DTYPES, DEVICE, INTERPRETED, assert_close_to_ref, dtype_id
from olmo2_fast import OLMo2
from olmo2_fast.cache import KVCache, StepBatch
from olmo2_fast.errors import CheckpointError
from olmo2_fast.kernels.int4_format import dequantize_int4, quantize_int4

# head_dim >= 16 for the attention kernels: MHA, GQA with a group of 5, tied + linear RoPE.
SHAPES = {
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4),
    "gqa5": dict(hidden_size=160, num_attention_heads=10, num_key_value_heads=2),
    "tied_rope": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      rope_scaling_factor=2.0),
}
INT4_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
PROMPTS = ["The capital of France is", "Once upon a time", "A key-value cache keeps the keys of earlier tokens"]


def pair(path, dtype="float32", **kwargs):
    fast = OLMo2.from_pretrained(path, device=DEVICE, dtype=dtype, backend="triton", **kwargs)
    ref = OLMo2.from_pretrained(path, device=DEVICE, dtype=dtype, backend="torch")
    return fast, ref


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), seed=21, **SHAPES[request.param])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_logits_match_the_reference(checkpoint, dtype):
    # The harness rule on the whole forward: the oracle is the reference on the same
    # (dtype-rounded) weights in float64; the same-dtype baseline is the reference backend.
    fast, ref = pair(checkpoint, dtype_id(dtype))
    oracle = copy.deepcopy(ref.engine).double()
    ids = torch.randint(0, 400, (2, 13), device=DEVICE)
    assert_close_to_ref(fast(ids), oracle(ids), ref(ids))


def test_greedy_tokens_batching_and_streaming_match_the_reference(checkpoint):
    # Batched, one by one and streamed on the cuBLAS decode step: ~60 decode steps, which on the fused step's
    # kernels take minutes under the interpreter. The fused step's generation is tested token for token
    # against the reference in tests/test_fused_decode.py (batched and sampled, the same three shapes).
    fast, ref = pair(checkpoint, decode_path="cublas")
    expected = ref.generate(PROMPTS, max_new_tokens=10)
    assert fast.generate(PROMPTS, max_new_tokens=10) == expected
    assert [fast.generate(p, max_new_tokens=10) for p in PROMPTS] == expected
    assert "".join(fast.stream(PROMPTS[2], max_new_tokens=10)) == expected[2]
    sampled = dict(max_new_tokens=10, temperature=0.8, top_k=40, seed=3)
    assert fast.generate(PROMPTS[0], **sampled) == ref.generate(PROMPTS[0], **sampled)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_chunked_steps_write_the_cache_like_the_reference(checkpoint, dtype):
    # Prefill chunks on top of cached tokens, then a decode step (the decode attention kernel);
    # logits and cache under the harness rule, the reference stepping in float64 as the oracle.
    fast, ref = pair(checkpoint, dtype_id(dtype))
    oracle = copy.deepcopy(ref.engine).double()
    engines = (fast.engine, ref.engine, oracle)
    caches = [KVCache(fast.config, 2, 24, cache_dtype, DEVICE) for cache_dtype in (dtype, dtype, torch.float64)]
    plan = [([[5, 6, 7, 8, 9], [10, 11]], [0, 0]), ([[12, 13], [14]], [5, 2]), ([[15], [16]], [7, 3])]
    for chunks, starts in plan:
        batch = StepBatch.build(chunks, starts, DEVICE)
        with torch.inference_mode():
            got, want, exact = (engine.step(batch, cache) for engine, cache in zip(engines, caches))
        assert_close_to_ref(got, exact, want)
    for name in ("k", "v"):  # positions 0..7 of row 0, 0..3 of row 1 (the rest stays zero)
        got, want, exact = (getattr(cache, name)[:, :, :, :8] for cache in caches)
        assert_close_to_ref(got, exact, want)


@pytest.mark.skipif(not INTERPRETED, reason="counts launches through Triton's interpreter")
def test_a_decode_step_launches_six_kernels_per_layer(checkpoint, monkeypatch):
    fast, _ = pair(checkpoint)
    launches = []
    original = interpreter.GridExecutor.__call__

    def counting(self, *args, **kwargs):
        launches.append(self.fn.__name__ if hasattr(self.fn, "__name__") else str(self.fn))
        return original(self, *args, **kwargs)
    cache = KVCache(fast.config, 1, 16, torch.float32, DEVICE)
    with torch.inference_mode():
        fast.engine.step(StepBatch.build([[3, 4, 5]], [0], DEVICE), cache)
        monkeypatch.setattr(interpreter.GridExecutor, "__call__", counting)
        fast.engine.step(StepBatch.build([[6]], [3], DEVICE), cache)
    layers = fast.config.num_hidden_layers
    # qk_norm_rope, attention (decode + split reduction), 2 x residual_rmsnorm, swiglu; + the final rmsnorm.
    assert len(launches) <= 6 * layers + 1, launches


def test_int4_forward_equals_the_reference_on_dequantised_weights(tmp_path):
    path = make_checkpoint(tmp_path, seed=8, **INT4_SHAPE)
    fast = OLMo2.from_pretrained(path, device=DEVICE, backend="triton", quantize="int4")
    ref = OLMo2.from_pretrained(path, device=DEVICE, backend="torch")
    plain = OLMo2.from_pretrained(path, device=DEVICE, backend="torch")
    with torch.no_grad():  # the reference with every projection replaced by its int4 round trip
        for layer in ref.engine.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(dequantize_int4(quantize_int4(lin.weight)))
    ids = torch.randint(0, 400, (2, 11), device=DEVICE)
    got = fast(ids)
    torch.testing.assert_close(got, ref(ids), rtol=1e-4, atol=1e-4)
    exact = plain(ids)
    rel = ((got - exact).norm() / exact.norm()).item()
    top1 = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
    print(f"int4 vs float logits: relative error {rel:.4f}, top-1 agreement {top1:.3f}")
    # Random weights give near-flat logits, so this is a sanity bound only (measured: ~0.29, 0.59);
    # the equality with the dequantised reference above is the real check.
    assert rel < 0.5


def test_backend_errors(tmp_path):
    path = make_checkpoint(tmp_path)  # hidden 48: head_dim 12, not a kernel size; widths not multiples of 128
    with pytest.raises(CheckpointError, match="head_dim"):
        OLMo2.from_pretrained(path, device=DEVICE, backend="triton")
    with pytest.raises(CheckpointError, match="unsupported quantize='int8'"):
        OLMo2.from_pretrained(path, device=DEVICE, quantize="int8")
    path = make_checkpoint(tmp_path / "b", hidden_size=64, num_attention_heads=4)
    for backend in ("triton", "torch"):
        with pytest.raises(CheckpointError, match="divisible by 128; this model has hidden_size=64"):
            OLMo2.from_pretrained(path, device=DEVICE, backend=backend, quantize="int4")


@pytest.mark.cuda
def test_cuda_graph_decode_equals_eager(checkpoint):
    graphed = OLMo2.from_pretrained(checkpoint, device="cuda", dtype="bfloat16", backend="triton")
    eager = OLMo2.from_pretrained(checkpoint, device="cuda", dtype="bfloat16", backend="triton", cuda_graphs=False)
    assert graphed.engine.graphs is not None
    for batch in (PROMPTS[:1], PROMPTS):
        assert graphed.generate(batch, max_new_tokens=12) == eager.generate(batch, max_new_tokens=12)


def test_an_int4_model_saves_and_reloads_without_requantising(tmp_path, monkeypatch):
    source = make_checkpoint(tmp_path / "src", seed=9, **INT4_SHAPE)
    quantized = OLMo2.from_pretrained(source, device=DEVICE, backend="triton", quantize="int4")
    saved = quantized.save_pretrained(tmp_path / "int4", num_shards=2)
    assert (saved / "tokenizer.json").is_file()
    from olmo2_fast.quantization import Int4GroupWise

    def no_quantize(*args, **kwargs):
        raise AssertionError("a saved int4 checkpoint must load without quantising")
    monkeypatch.setattr(Int4GroupWise, "quantize", no_quantize)
    reloaded = OLMo2.from_pretrained(saved, device=DEVICE, backend="triton")
    ids = torch.randint(0, 400, (1, 7), device=DEVICE)
    torch.testing.assert_close(reloaded(ids), quantized(ids), rtol=0, atol=0)
    assert reloaded.config.quantization == "olmo2_fast_int4"
    on_torch = OLMo2.from_pretrained(saved, device=DEVICE, backend="torch")  # the same packed weights, dequantised
    torch.testing.assert_close(on_torch(ids), quantized(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unquantised_models_save_in_the_hugging_face_layout(tmp_path, backend):
    source = make_checkpoint(tmp_path / "src", seed=10, **SHAPES["gqa5"])
    model = OLMo2.from_pretrained(source, device=DEVICE, backend=backend)
    saved = model.save_pretrained(tmp_path / "out")
    reloaded = OLMo2.from_pretrained(saved, device=DEVICE, backend="torch")
    ids = torch.randint(0, 400, (1, 9), device=DEVICE)
    torch.testing.assert_close(reloaded(ids), OLMo2.from_pretrained(source, device=DEVICE, backend="torch")(ids),
                               rtol=0, atol=0)

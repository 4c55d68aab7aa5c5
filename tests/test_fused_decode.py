"""The fused decode step (olmo2_fast/fused_decode.py): numerics against the reference, generation
token for token, the path choice, and the launch budget at the published widths (launches recorded
under the interpreter, not executed)."""
import copy

import pytest
import torch

from checkpoints import make_checkpoint
from fake_graphs import FakeGraphRecorder
from harness import DEVICE, INTERPRETED, assert_close_to_ref
from launch_plan import record_launches
from olmo2_fast import OLMo2
from olmo2_fast.cache import KVCache, StepBatch
from olmo2_fast.config import PRESETS
from olmo2_fast.errors import CheckpointError
from olmo2_fast.graphs import DecodeGraphs
from olmo2_fast.kernels.int4_format import Int4Weight, dequantize_int4
from olmo2_fast.model import LayerWeights, Olmo2Fast

SHAPES = {  # head_dim >= 16 for the kernels; MHA, GQA with a group of 5, odd widths, tied + linear RoPE
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=100),
    "gqa5": dict(hidden_size=160, num_attention_heads=10, num_key_value_heads=2, intermediate_size=136),
    "tied_rope": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=72,
                      tie_word_embeddings=True, rope_scaling_factor=2.0),
}
INT4_SHAPE = dict(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=1)  # int4 needs in_features divisible by 128
PROMPTS = ["The capital of France is", "Once upon a time", "A key-value cache keeps the keys of earlier tokens"]


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), seed=41, max_position_embeddings=64,
                           num_hidden_layers=1, **SHAPES[request.param])  # one layer: interpreted launches are slow


def engines(path, dtype="float32"):
    fused = OLMo2.from_pretrained(path, device=DEVICE, dtype=dtype, backend="triton", decode_path="fused")
    ref = OLMo2.from_pretrained(path, device=DEVICE, dtype=dtype, backend="torch")
    return fused, ref


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_steps_match_the_reference_to_the_cache_end(checkpoint, dtype):
    if dtype == "bfloat16" and checkpoint.name.startswith("mha"):
        pytest.skip("bf16 runs on the GQA shapes only, to keep the interpreted suite short")
    """Logits of each decode step, and the caches, against a float64 oracle (the reference model in float64
    on the same rounded weights) by the harness rule: err <= 2 * err(the torch backend, same dtype) + atol."""
    fast, ref = engines(checkpoint, dtype)
    oracle = copy.deepcopy(ref.engine).double()
    torch_dtype = getattr(torch, dtype)
    max_seq = 24
    runs = [(fast.engine, KVCache(fast.config, 3, max_seq, torch_dtype, DEVICE)),
            (ref.engine, KVCache(fast.config, 3, max_seq, torch_dtype, DEVICE)),
            (oracle, KVCache(fast.config, 3, max_seq, torch.float64, DEVICE))]
    prompts = [[5, 6, 7], [8] * 21, [9, 10]]  # cached lengths 3, 21 and 2 after the prefill
    lengths = [len(p) for p in prompts]
    with torch.inference_mode():
        for engine, cache in runs:
            engine.step(StepBatch.build(prompts, [0, 0, 0], DEVICE), cache)
        for step in range(3):  # the middle sequence reaches the cache's last slot on the third step
            ids = torch.tensor([11 + step, 12 + step, 13 + step], device=DEVICE)
            positions = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
            batch = StepBatch.decode(ids, positions, lengths)
            got, baseline, exact = (engine.step(batch, cache) for engine, cache in runs)
            assert fast.engine.last_decode_path == "fused"
            assert_close_to_ref(got, exact, baseline)
            lengths = [n + 1 for n in lengths]
    assert lengths[1] == max_seq
    for name in ("k", "v"):
        got, baseline, exact = (getattr(cache, name) for _, cache in runs)
        assert_close_to_ref(got, exact, baseline)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_decode_steps_match_the_reference_on_dequantised_weights(tmp_path, dtype):
    """Every projection and lm_head int4: the fused step's logits against a float64 oracle (the dense reference
    on the dequantised weights) by the harness rule, the torch backend's int4 (dequantise, matmul) the baseline."""
    path = make_checkpoint(tmp_path, seed=46, max_position_embeddings=64, **INT4_SHAPE)
    options = dict(device=DEVICE, dtype=dtype, quantize="int4", quantize_lm_head=True)
    fast = OLMo2.from_pretrained(path, backend="triton", decode_path="fused", **options)
    ref = OLMo2.from_pretrained(path, backend="torch", **options)
    oracle = OLMo2.from_pretrained(path, device=DEVICE, dtype=dtype, backend="torch").engine
    with torch.no_grad():
        for layer, quantized in zip(oracle.model.layers, ref.engine.model.layers):
            for name, lin in layer.named_modules():
                if isinstance(lin, torch.nn.Linear):
                    lin.weight.copy_(dequantize_int4(quantized.get_submodule(name).quantized))
        oracle.lm_head.weight.copy_(dequantize_int4(ref.engine.lm_head.quantized))
    oracle = oracle.double()
    torch_dtype = getattr(torch, dtype)
    runs = [(fast.engine, KVCache(fast.config, 2, 16, torch_dtype, DEVICE)),
            (ref.engine, KVCache(fast.config, 2, 16, torch_dtype, DEVICE)),
            (oracle, KVCache(fast.config, 2, 16, torch.float64, DEVICE))]
    prompts, lengths = [[5, 6, 7], [8] * 9], [3, 9]
    with torch.inference_mode():
        for engine, cache in runs:
            engine.step(StepBatch.build(prompts, [0, 0], DEVICE), cache)
        for step in range(2):
            batch = StepBatch.decode(torch.tensor([11 + step, 12 + step], device=DEVICE),
                                     torch.tensor(lengths, dtype=torch.int32, device=DEVICE), lengths)
            got, baseline, exact = (engine.step(batch, cache) for engine, cache in runs)
            assert fast.engine.last_decode_path == "fused"
            assert_close_to_ref(got, exact, baseline)
            lengths = [n + 1 for n in lengths]


def test_generation_equals_the_reference_token_for_token(checkpoint):
    fast, ref = engines(checkpoint)
    assert fast.generate(PROMPTS[1:], max_new_tokens=4) == ref.generate(PROMPTS[1:], max_new_tokens=4)
    sampled = dict(max_new_tokens=3, temperature=0.9, top_p=0.95, seed=5)
    assert fast.generate(PROMPTS[0], **sampled) == ref.generate(PROMPTS[0], **sampled)


def test_sixteen_rows_take_the_fused_path(tmp_path):
    path = make_checkpoint(tmp_path, seed=42, num_hidden_layers=1, **SHAPES["mha"])
    fast, ref = engines(path)
    prompts = [[(3 * i) % 400 + 2, (5 * i) % 400 + 7][: 1 + i % 2] for i in range(16)]
    assert fast.generate(prompts, max_new_tokens=2) == ref.generate(prompts, max_new_tokens=2)
    assert fast.engine.last_decode_path == "fused"


def test_the_path_choice(tmp_path):
    path = make_checkpoint(tmp_path, seed=43, num_hidden_layers=1, **SHAPES["mha"])
    auto = OLMo2.from_pretrained(path, device=DEVICE, backend="triton")
    assert list(auto.engine.decode_candidates(1)) == ["fused", "cublas"]      # graphs time both
    assert list(auto.engine.decode_candidates(17)) == ["cublas"]               # the GEMV takes <= 16 rows
    cublas = OLMo2.from_pretrained(path, device=DEVICE, backend="triton", decode_path="cublas")
    assert list(cublas.engine.decode_candidates(1)) == ["cublas"]
    assert auto.generate(PROMPTS[0], max_new_tokens=3) == cublas.generate(PROMPTS[0], max_new_tokens=3)
    int4 = make_checkpoint(tmp_path / "int4", seed=44, **INT4_SHAPE)
    quantized = OLMo2.from_pretrained(int4, device=DEVICE, backend="triton", quantize="int4", quantize_lm_head=True)
    assert list(quantized.engine.decode_candidates(1)) == ["fused", "cublas"]  # int4 weights take it too
    cublas_int4 = OLMo2.from_pretrained(int4, device=DEVICE, backend="triton", quantize="int4", quantize_lm_head=True,
                                        decode_path="cublas")
    assert quantized.generate(PROMPTS[:2], max_new_tokens=3) == cublas_int4.generate(PROMPTS[:2], max_new_tokens=3)
    assert quantized.engine.last_decode_path == "fused"
    with pytest.raises(CheckpointError, match="unknown decode_path 'fast'"):
        OLMo2.from_pretrained(path, device=DEVICE, backend="triton", decode_path="fast")


class TimedFake(FakeGraphRecorder):
    """A fake recorder that can time: a bucket captures its candidates in order (fused, then cuBLAS), and
    each capture's replay "takes" the seconds listed for its place in that order."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds, self.order = seconds, []

    def capture(self, step, device):
        captured = super().capture(step, device)
        self.order.append(captured)
        return captured

    def time(self, captured):
        place = next(i for i, c in enumerate(self.order) if c is captured)
        return self.seconds[place % len(self.seconds)]


@pytest.mark.parametrize("seconds, kept", [((2e-3, 1e-3), "cublas"), ((1e-3, 2e-3), "fused")])
def test_graphs_keep_the_faster_path_per_bucket(tmp_path, caplog, seconds, kept):
    path = make_checkpoint(tmp_path, seed=45, num_hidden_layers=1, **SHAPES["mha"])
    model = OLMo2.from_pretrained(path, device=DEVICE, backend="triton")
    expected = model.generate(PROMPTS[0], max_new_tokens=3)  # eager
    graphs = DecodeGraphs(model.engine.decode_step, TimedFake(seconds), candidates=model.engine.decode_candidates)
    model.engine.graphs = graphs
    with caplog.at_level("INFO", logger="olmo2_fast"):
        assert model.generate(PROMPTS[0], max_new_tokens=3) == expected
    assert graphs.choices == {1: kept} and model.engine.last_decode_path == kept
    assert (f"decode step for batch bucket 1: {kept} (fused {seconds[0] * 1e3:.3f} ms, "
            f"cublas {seconds[1] * 1e3:.3f} ms)") in caplog.text


# ---------------------------------------------------------------- the launch budget at the published widths


def published_engine(name: str, weights: str = "bf16") -> Olmo2Fast:
    """Two layers at a published model's widths, weights allocated but never touched (recorded launches
    read nothing), so the plan of a real decode step costs seconds and no memory. weights "int4": every
    projection and lm_head int4 (quantize_lm_head)."""
    cfg = PRESETS[name].with_(num_hidden_layers=2)
    h, i, qkv_n = cfg.hidden_size, cfg.intermediate_size, cfg.q_width + 2 * cfg.kv_width

    def empty(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16)

    def weight(n, k):
        if weights == "bf16":
            return empty(n, k)
        return Int4Weight(torch.empty(n // 8, k // 32, 8, 4, dtype=torch.int32), empty(k // 128, n), empty(k // 128, n),
                          (n, k))
    layers = [LayerWeights(qkv=weight(qkv_n, h), q_norm=empty(cfg.q_width), k_norm=empty(cfg.kv_width),
                           o=weight(h, cfg.q_width), gate_up=weight(2 * i, h), down=weight(h, i),
                           post_attention_norm=empty(h), post_feedforward_norm=empty(h))
              for _ in range(cfg.num_hidden_layers)]
    return Olmo2Fast(cfg, empty(cfg.vocab_size, h), layers, empty(h), weight(cfg.vocab_size, h),
                     decode_path="fused", greedy_vocab=100278)


@pytest.mark.h100_plan
@pytest.mark.skipif(not INTERPRETED, reason="records launches through Triton's interpreter")
@pytest.mark.parametrize("weights", ["bf16", "int4"])
@pytest.mark.parametrize("context", [512, 4000])
@pytest.mark.parametrize("size", ["1b", "7b", "13b", "32b"])
def test_a_decode_step_at_published_widths_is_five_launches_per_layer_each_filling_an_h100(size, context, weights):
    engine = published_engine(size, weights)
    cache = KVCache(engine.config, 1, 4096, torch.bfloat16, "cpu")
    batch = StepBatch.decode(torch.zeros(1, dtype=torch.int64), torch.tensor([context - 1], dtype=torch.int32),
                             [context - 1])
    engine.fused.prepare(1, cache)  # the workspaces: allocated before the step, as the graphs' warm-up does
    with record_launches() as plan:
        engine.step(batch, cache)
    layers = engine.config.num_hidden_layers
    assert engine.last_decode_path == "fused"
    assert plan.torch_ops == [] and plan.host_syncs == []
    per_layer = [launch.kernel for launch in plan.launches[:-1]]
    assert len(per_layer) == 5 * layers, per_layer                  # <= 5 per layer
    assert [launch.kernel for launch in plan.launches[-1:]] == ["_decode_gemv_kernel"]  # + lm_head: 1 per token
    small = [(launch.kernel, launch.grid) for launch in plan.launches if launch.programs < 132]
    assert not small, small                                         # every launch fills an H100's 132 SMs

"""qk_norm_rope: interpreter numerics vs float64 (q and the cache slots), untouched
cache slots, HF parity of the reference, errors, registered op, roofline, GPU compile."""
import pytest
import torch

from harness import ALL_DTYPES, DEVICE, INTERPRETED, assert_close_to_ref, assert_compiles_clean, kernel_spec, poisoned, run_without_interpreter
from olmo2_fast.kernels import qk_norm_rope as qk_module
from olmo2_fast.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_cost, qk_norm_rope_reference
from olmo2_fast.kernels.roofline import Cost

EPS = 1e-6
THETA = 500000.0
# (Hq, Hkv) of OLMo-2 1B, 7B, 13B, 32B; head_dim 128 in all.
PUBLISHED_HEADS = ((16, 16), (32, 32), (40, 40), (40, 8))

# The interpreter turns runtime loop bounds into 1-element arrays; numpy warns on each int().
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# (seq_ids, positions, max_batch, max_seq): one decode token at a large position, and a
# packed step mixing a 4-token prefill, a decode and a 2-token chunk; cache row 3 and
# all other positions must stay untouched.
DECODE = ([1], [1234], 2, 1240)
MIXED = ([0, 0, 0, 0, 2, 1, 1], [0, 1, 2, 3, 1500, 3070, 3071], 4, 3100)


def _inputs(n_q_heads, n_kv_heads, head_dim, dtype, seq_ids, positions, max_batch, max_seq):
    n_tokens = len(positions)
    cache_shape = (max_batch, n_kv_heads, max_seq, head_dim)
    return dict(
        qkv=(2 * torch.randn(n_tokens, (n_q_heads + 2 * n_kv_heads) * head_dim, device=DEVICE)).to(dtype),
        q_norm_weight=(1 + 0.5 * torch.randn(n_q_heads * head_dim, device=DEVICE)).to(dtype),
        k_norm_weight=(1 + 0.5 * torch.randn(n_kv_heads * head_dim, device=DEVICE)).to(dtype),
        positions=torch.tensor(positions, dtype=torch.int32, device=DEVICE),
        seq_ids=torch.tensor(seq_ids, dtype=torch.int32, device=DEVICE),
        k_cache=poisoned(cache_shape, dtype),
        v_cache=poisoned(cache_shape, dtype),
    )


def _run_and_check(inputs, rope_scaling_factor=1.0):
    """Kernel vs float64 reference for q and the addressed cache slots; the rest untouched."""
    rope = dict(eps=EPS, rope_theta=THETA, rope_scaling_factor=rope_scaling_factor)
    q = qk_norm_rope(**inputs, **rope)
    as64 = {name: t.double() if t.is_floating_point() else t for name, t in inputs.items()}
    same_dtype = dict(inputs, k_cache=inputs["k_cache"].clone(), v_cache=inputs["v_cache"].clone())
    assert_close_to_ref(q, qk_norm_rope_reference(**as64, **rope), qk_norm_rope_reference(**same_dtype, **rope))

    seq, pos = inputs["seq_ids"].long(), inputs["positions"].long()
    k_cache, v_cache = inputs["k_cache"], inputs["v_cache"]
    assert_close_to_ref(k_cache[seq, :, pos], as64["k_cache"][seq, :, pos], same_dtype["k_cache"][seq, :, pos])
    n_tokens, _, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    assert torch.equal(v_cache[seq, :, pos], inputs["qkv"][:, -n_kv_heads * head_dim:].view(n_tokens, n_kv_heads, head_dim))
    untouched = torch.ones(k_cache.shape[0], k_cache.shape[2], dtype=torch.bool, device=DEVICE)
    untouched[seq, pos] = False
    for cache in (k_cache, v_cache):
        assert cache.transpose(1, 2)[untouched].isnan().all(), "a cache slot no token addresses was written"


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("batch", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("n_q_heads, n_kv_heads, head_dim", [(4, 4, 64), (4, 2, 64), (10, 2, 64), (6, 3, 48)],
                         ids=["group1", "group2", "group5", "head_dim48"])
def test_matches_float64(n_q_heads, n_kv_heads, head_dim, batch, dtype, nan_allocations):
    _run_and_check(_inputs(n_q_heads, n_kv_heads, head_dim, dtype, *batch))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n_q_heads, n_kv_heads", PUBLISHED_HEADS, ids=["1B", "7B", "13B", "32B"])
def test_published_widths(n_q_heads, n_kv_heads, dtype, nan_allocations):
    """Real q/k widths (2048..5120, not all powers of two) on a small cache."""
    _run_and_check(_inputs(n_q_heads, n_kv_heads, 128, dtype, [2, 0, 1], [5, 77, 130], 3, 136))


@pytest.mark.heavy
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_prefill_32b(dtype, nan_allocations):
    """A 1000-token prefill step of two sequences at 32B widths (Hq=40, Hkv=8)."""
    seq_ids = [0] * 600 + [1] * 400
    positions = list(range(600)) + list(range(1000, 1400))
    _run_and_check(_inputs(40, 8, 128, dtype, seq_ids, positions, 2, 1400))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_q_heads, n_kv_heads, head_dim", [(10, 2, 64), (40, 8, 128)])
def test_rounds_like_hf(n_q_heads, n_kv_heads, head_dim, dtype):
    """In 16-bit dtypes the kernel reproduces HF's roundings (norm output rounded to the
    dtype before RoPE, RoPE in float32): at small positions q and k equal the reference
    bit for bit; at positions > 1000 float32 trig/freq ulps flip a few percent at most.
    A float64 bound alone would accept a kernel that skips the intermediate rounding."""
    inputs = _inputs(n_q_heads, n_kv_heads, head_dim, dtype, *MIXED)
    same_dtype = dict(inputs, k_cache=inputs["k_cache"].clone(), v_cache=inputs["v_cache"].clone())
    q = qk_norm_rope(**inputs, eps=EPS, rope_theta=THETA)
    q_ref = qk_norm_rope_reference(**same_dtype, eps=EPS, rope_theta=THETA)
    seq, pos = inputs["seq_ids"].long(), inputs["positions"].long()
    k, k_ref = inputs["k_cache"][seq, :, pos], same_dtype["k_cache"][seq, :, pos]
    small = pos < 4
    for out, ref in ((q, q_ref), (k, k_ref)):
        assert (out[small] != ref[small]).float().mean().item() < 0.002
        assert (out != ref).float().mean().item() < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rope_scaling(dtype, nan_allocations):
    _run_and_check(_inputs(4, 2, 64, dtype, *MIXED), rope_scaling_factor=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_reference_is_hf_olmo2(dtype, factor):
    """The reference equals HF's q_norm/k_norm + Olmo2RotaryEmbedding + apply_rotary_pos_emb bit for bit."""
    pytest.importorskip("transformers.models.olmo2", reason="optional parity check: transformers is not installed")
    from transformers import Olmo2Config
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm, Olmo2RotaryEmbedding, apply_rotary_pos_emb

    n_q_heads, n_kv_heads, head_dim = 10, 2, 64
    inputs = _inputs(n_q_heads, n_kv_heads, head_dim, dtype, *MIXED)
    q = qk_norm_rope_reference(**inputs, eps=EPS, rope_theta=THETA, rope_scaling_factor=factor)

    rope = {"rope_type": "linear", "factor": factor} if factor != 1.0 else {"rope_type": "default"}
    config = Olmo2Config(hidden_size=n_q_heads * head_dim, num_attention_heads=n_q_heads,
                         num_key_value_heads=n_kv_heads, rms_norm_eps=EPS, rope_parameters=dict(rope, rope_theta=THETA))
    q_norm, k_norm = Olmo2RMSNorm(n_q_heads * head_dim, EPS).to(dtype), Olmo2RMSNorm(n_kv_heads * head_dim, EPS).to(dtype)
    n_tokens = len(inputs["positions"])
    with torch.no_grad():
        q_norm.weight.copy_(inputs["q_norm_weight"])
        k_norm.weight.copy_(inputs["k_norm_weight"])
        q_hf, k_hf, _ = inputs["qkv"].split([n_q_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], -1)
        q_hf = q_norm(q_hf).view(1, n_tokens, n_q_heads, head_dim).transpose(1, 2)  # (1, H, T, D)
        k_hf = k_norm(k_hf).view(1, n_tokens, n_kv_heads, head_dim).transpose(1, 2)
        cos, sin = Olmo2RotaryEmbedding(config)(q_hf, inputs["positions"].long()[None])
        q_hf, k_hf = apply_rotary_pos_emb(q_hf, k_hf, cos, sin)
    assert torch.equal(q, q_hf[0].transpose(0, 1))
    seq, pos = inputs["seq_ids"].long(), inputs["positions"].long()
    assert torch.equal(inputs["k_cache"][seq, :, pos], k_hf[0].transpose(0, 1))


@pytest.mark.skipif(not INTERPRETED, reason="counts interpreter launches")
def test_one_launch(monkeypatch):
    from triton.runtime.interpreter import GridExecutor

    launches = []
    launch = GridExecutor.__call__
    monkeypatch.setattr(GridExecutor, "__call__", lambda self, *a, **k: launches.append(1) or launch(self, *a, **k))
    qk_norm_rope(**_inputs(10, 2, 64, torch.bfloat16, *MIXED), eps=EPS, rope_theta=THETA)
    assert len(launches) == 1


def test_zero_tokens():
    inputs = _inputs(4, 2, 64, torch.float32, [], [], 2, 8)
    assert qk_norm_rope(**inputs, eps=EPS, rope_theta=THETA).shape == (0, 4, 64)
    assert inputs["k_cache"].isnan().all()


def test_registered_op():
    inputs = _inputs(4, 2, 64, torch.float32, *DECODE)
    expected = dict(inputs, k_cache=inputs["k_cache"].clone(), v_cache=inputs["v_cache"].clone())
    q = torch.ops.olmo2_fast.qk_norm_rope(*inputs.values(), EPS, THETA, 1.0)
    # At position 1234 float32 freqs carry ~1e-4 rad of rounding: compare loosely.
    close = dict(atol=1e-3, rtol=1e-3, equal_nan=True)
    torch.testing.assert_close(q, qk_norm_rope_reference(**expected, eps=EPS, rope_theta=THETA), **close)
    torch.testing.assert_close(inputs["k_cache"], expected["k_cache"], **close)
    torch.testing.assert_close(inputs["v_cache"], expected["v_cache"], **close)


def test_op_on_meta_tensors():
    run_without_interpreter("""
import torch
import olmo2_fast.kernels.qk_norm_rope
meta = dict(dtype=torch.bfloat16, device="meta")
qkv = torch.empty(3, (40 + 16) * 128, **meta)
w_q, w_k = torch.empty(40 * 128, **meta), torch.empty(8 * 128, **meta)
ids = torch.empty(3, dtype=torch.int32, device="meta")
cache = torch.empty(2, 8, 64, 128, **meta)
q = torch.ops.olmo2_fast.qk_norm_rope(qkv, w_q, w_k, ids, ids, cache, cache.clone(), 1e-6, 5e5, 1.0)
assert q.shape == (3, 40, 128) and q.dtype == torch.bfloat16 and q.device.type == "meta"
""")


def _bad(**changes):
    inputs = dict(_inputs(4, 2, 64, torch.float16, *DECODE), **changes)
    return lambda: qk_norm_rope(**inputs, eps=EPS, rope_theta=THETA)


@pytest.mark.parametrize("error, match, call", [
    (TypeError, "qkv must be float32", lambda: _bad(qkv=torch.ones(1, 512, dtype=torch.int32, device=DEVICE))()),
    (TypeError, "k_cache dtype", lambda: _bad(k_cache=torch.zeros(2, 2, 1240, 64, device=DEVICE))()),
    (TypeError, "q_norm_weight dtype", lambda: _bad(q_norm_weight=torch.ones(256, device=DEVICE))()),
    (TypeError, "positions must be int32", lambda: _bad(positions=torch.tensor([3], device=DEVICE))()),
    (ValueError, "qkv has 500 columns", lambda: _bad(qkv=torch.ones(1, 500, device=DEVICE).half())()),
    (ValueError, "k_norm_weight must be", lambda: _bad(k_norm_weight=torch.ones(64, device=DEVICE).half())()),
    (ValueError, "v_cache shape", lambda: _bad(v_cache=torch.zeros(2, 2, 1000, 64, device=DEVICE).half())()),
    (ValueError, "head_dim must be even", lambda: _bad(k_cache=torch.zeros(2, 2, 1240, 63, device=DEVICE).half(),
                                                       v_cache=torch.zeros(2, 2, 1240, 63, device=DEVICE).half())()),
    (ValueError, "seq_ids must be", lambda: _bad(seq_ids=torch.zeros(2, dtype=torch.int32, device=DEVICE))()),
    (ValueError, "one device", lambda: _bad(positions=torch.zeros(1, dtype=torch.int32, device="meta"))()),
    (ValueError, "qkv must have a contiguous last dimension",
     lambda: _bad(qkv=torch.ones(1, 1024, device=DEVICE).half()[:, ::2])()),
    (ValueError, "k_cache must have a contiguous last dimension",
     lambda: _bad(k_cache=torch.zeros(2, 2, 1240, 128, device=DEVICE).half()[..., ::2])()),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs(error, match, call):
    with pytest.raises(error, match=match):
        call()


def test_cost():
    # 7B decode, one token, bf16: read qkv 3*4096*2 B, weights 2*4096*2 B, position+seq id 8 B;
    # write q, k, v 3*4096*2 B. FLOPs: 7 per q/k element.
    assert qk_norm_rope_cost(1, 32, 32, 128, torch.bfloat16) == Cost(bytes=24576 + 16384 + 8 + 24576, flops=7 * 8192)
    # 32B prefill of 10 tokens in float32: q 5120 wide, k/v 1024.
    assert qk_norm_rope_cost(10, 40, 8, 128, torch.float32) == Cost(
        bytes=10 * 7168 * 4 + 6144 * 4 + 80 + 10 * 7168 * 4, flops=7 * 10 * 6144)


def test_compiles_for_gpu():
    """Every config the launcher picks for the published sizes; the signature is read off
    the kernel's arguments so it cannot drift from them."""
    kernel = qk_module._qk_norm_rope_kernel
    configs = {tuple(sorted(qk_module._config(hq, hkv, 128).items())) for hq, hkv in PUBLISHED_HEADS}
    specs = []
    for ptr in ("*fp16", "*bf16"):
        for config in map(dict, configs):
            num_warps = config.pop("num_warps")
            signature = {
                name: "constexpr" if name.isupper() else
                "*i32" if name in ("positions_ptr", "seq_ids_ptr") else ptr if name.endswith("_ptr") else
                "fp32" if name in ("eps", "rope_theta", "rope_scaling_factor") else "i32"
                for name in kernel.arg_names
            }
            specs.append(kernel_spec(
                "olmo2_fast.kernels.qk_norm_rope:_qk_norm_rope_kernel", signature, config,
                # Pointers are 16-byte aligned and every stride is a multiple of D = 128;
                # head counts (40, 8) are not multiples of 16.
                aligned=[name for name in signature if name.endswith("_ptr") or name.startswith("stride")],
                num_warps=num_warps, name=f"qk_norm_rope {ptr} {config} w{num_warps}"))
    assert_compiles_clean(specs, need_vector_loads=True)

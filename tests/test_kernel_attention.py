"""Tests for kernels/attention.py: prefill and decode vs a float64 reference, GPU compile checks."""
import pytest
import torch
from harness import (
    ALL_DTYPES, DEVICE, assert_close_to_ref, assert_compiles_clean, dtype_id, kernel_spec, run_without_interpreter,
)

from olmo2_fast.kernels import attention as attn
from olmo2_fast.kernels.attention import (
    attention_decode, attention_decode_cost, attention_prefill, attention_prefill_cost, attention_reference,
)
from olmo2_fast.kernels.roofline import Cost

# Every launcher allocation (outputs and split partials) comes out NaN-filled: an element
# a kernel fails to write, or a partial the reducer reads unwritten, fails the check.
pytestmark = pytest.mark.usefixtures("nan_allocations")

# (Hq, Hkv, D): GQA groups 1, 2, 5 (OLMo-2 32B) and 8, both head widths.
HEADS = [(2, 2, 128), (4, 2, 64), (10, 2, 64), (8, 1, 128)]


def make_case(q_lens, kv_lens, n_heads, n_kv_heads, head_dim, dtype, *, max_batch=None, max_seq=None, seed=0):
    """Random q (a strided view of a fused qkv, as the model has it) and a cache whose
    unused slots and rows hold NaN, so any read past kv_lens poisons the output."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(kv_lens)
    max_batch = max_batch or batch + 1
    max_seq = max_seq or max(kv_lens) + 5
    n_tokens = sum(q_lens)
    qkv = torch.randn(n_tokens, (n_heads + 2 * n_kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : n_heads * head_dim].unflatten(1, (n_heads, head_dim))
    cache_shape = (max_batch, n_kv_heads, max_seq, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    for b, kv_len in enumerate(kv_lens):
        k_cache[b, :, :kv_len] = torch.randn(n_kv_heads, kv_len, head_dim, generator=gen).to(dtype)
        v_cache[b, :, :kv_len] = torch.randn(n_kv_heads, kv_len, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k_cache, v_cache, cu, lens)]


def check_against_reference(out, q, k_cache, v_cache, cu, lens):
    ref64 = attention_reference(q.double(), k_cache.double(), v_cache.double(), cu, lens)
    torch_out = attention_reference(q, k_cache, v_cache, cu, lens)
    assert_close_to_ref(out, ref64, torch_out)


# --------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}-D{h[2]}")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_prefill_ragged_batch(dtype, heads):
    # A fresh prompt (17/17), a single token (1/1), a chunk of 40 on top of 260 cached
    # positions, and a 3-token chunk after 2 cached ones.
    case = make_case([17, 1, 40, 3], [17, 1, 300, 5], *heads, dtype)
    check_against_reference(attention_prefill(*case, max_q_len=40), *case)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_prefill_long_cache_multi_block(dtype):
    # 130 queries span two 128-row blocks; the chunk of 20 sits at positions 1080..1099.
    case = make_case([130, 20], [130, 1100], 10, 2, 64, dtype, seed=1)
    check_against_reference(attention_prefill(*case, max_q_len=130), *case)


def test_prefill_grid_larger_than_sequences():
    # max_q_len only sizes the grid: a larger value launches programs that exit at once;
    # a sequence with no new tokens this step (n_b = 0) is skipped.
    case = make_case([5, 0, 2], [9, 4, 2], 4, 2, 64, torch.float16, seed=2)
    check_against_reference(attention_prefill(*case, max_q_len=9), *case)


# --------------------------------------------------------------------------- decode


def make_decode_case(kv_lens, heads, dtype, max_seq, seed=0):
    q, k_cache, v_cache, cu, lens = make_case([1] * len(kv_lens), kv_lens, *heads, dtype, max_seq=max_seq, seed=seed)
    return q, k_cache, v_cache, lens, cu


@pytest.mark.parametrize("num_splits", [None, 1, 3, attn.MAX_SPLITS])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}-D{h[2]}")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_decode_lengths_and_splits(dtype, heads, num_splits):
    # MAX_SPLITS over 1100 slots makes 64-slot splits: the length-1 sequence has 31
    # empty splits, and splits 18.. are empty for every sequence.
    q, k_cache, v_cache, lens, cu = make_decode_case([1, 17, 128, 1037], heads, dtype, max_seq=1100)
    out = attention_decode(q, k_cache, v_cache, lens, num_splits=num_splits)
    check_against_reference(out, q, k_cache, v_cache, cu, lens)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_empty_cache_gives_zeros(num_splits):
    # kv_lens 0 is outside the contract, but the -inf guards must turn it into 0, not NaN.
    q, k_cache, v_cache, lens, cu = make_decode_case([0, 5], (4, 2, 64), torch.float16, max_seq=64)
    out = attention_decode(q, k_cache, v_cache, lens, num_splits=num_splits)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    check_against_reference(out[1:], q[1:], k_cache[1:], v_cache[1:], cu[:2], lens[1:])


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_group_wider_than_block(num_splits):
    # 32 query heads on one KV head: two programs of DECODE_BLOCK_G heads per KV head.
    q, k_cache, v_cache, lens, cu = make_decode_case([3, 70], (32, 1, 16), torch.float16, max_seq=80)
    check_against_reference(attention_decode(q, k_cache, v_cache, lens, num_splits=num_splits), q, k_cache, v_cache, cu, lens)


@pytest.mark.parametrize("head_dim", [16, 32, 256])
def test_other_head_dims(head_dim):
    case = make_case([6, 1], [6, 40], 4, 2, head_dim, torch.float16, seed=3)
    check_against_reference(attention_prefill(*case, max_q_len=6), *case)
    q, k_cache, v_cache, lens, cu = make_decode_case([1, 40], (4, 2, head_dim), torch.float16, max_seq=40)
    check_against_reference(attention_decode(q, k_cache, v_cache, lens, num_splits=2), q, k_cache, v_cache, cu, lens)


@pytest.mark.skipif(DEVICE != "cpu", reason="counts launches through the interpreter")
@pytest.mark.parametrize("num_splits, launches", [(1, 1), (4, 2)])
def test_decode_launch_count(monkeypatch, num_splits, launches):
    from triton.runtime.interpreter import GridExecutor

    grids = []
    real_call = GridExecutor.__call__

    def counting_call(self, *args, **kwargs):
        grids.append(self.grid)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(GridExecutor, "__call__", counting_call)
    q, k_cache, v_cache, lens, _ = make_decode_case([1, 200], (4, 2, 64), torch.float16, max_seq=256)
    attention_decode(q, k_cache, v_cache, lens, num_splits=num_splits)
    assert len(grids) == launches
    assert tuple(grids[0]) == (num_splits, 2, 2)  # (splits, KV heads, sequences): shape-only


# OLMo-2 widths: 1B (16/16 heads) and 32B (40 query heads on 8 KV heads), D=128, 4096 slots.
REAL_HEADS = [(16, 16, 128), (40, 8, 128)]


@pytest.mark.heavy
@pytest.mark.parametrize("heads", REAL_HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_prefill_real_widths(dtype, heads):
    case = make_case([700, 1, 64], [700, 2000, 4096], *heads, dtype, max_seq=4096, seed=5)
    check_against_reference(attention_prefill(*case, max_q_len=700), *case)


@pytest.mark.heavy
@pytest.mark.parametrize("heads", REAL_HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_decode_real_widths(dtype, heads):
    q, k_cache, v_cache, lens, cu = make_decode_case([1, 257, 2049, 4096], heads, dtype, max_seq=4096, seed=6)
    check_against_reference(attention_decode(q, k_cache, v_cache, lens), q, k_cache, v_cache, cu, lens)


# --------------------------------------------------------------------------- ops, errors, roofline


def test_torch_library_ops():
    case = make_case([4, 2], [4, 9], 10, 2, 64, torch.float16, seed=4)
    check_against_reference(torch.ops.olmo2_fast.attention_prefill(*case, 4), *case)
    q, k_cache, v_cache, lens, cu = make_decode_case([5, 9], (10, 2, 64), torch.float16, max_seq=16)
    check_against_reference(torch.ops.olmo2_fast.attention_decode(q, k_cache, v_cache, lens, 2), q, k_cache, v_cache, cu, lens)


def test_ops_shape_inference():
    # triton_op derives the fake implementation; it needs compiled (not interpreted) kernels.
    run_without_interpreter("""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import olmo2_fast.kernels.attention
q = torch.empty(7, 10, 128, dtype=torch.bfloat16, device="meta")
cache = torch.empty(3, 2, 64, 128, dtype=torch.bfloat16, device="meta")
lens = torch.empty(2, dtype=torch.int32, device="meta")
cu = torch.empty(3, dtype=torch.int32, device="meta")
out = torch.ops.olmo2_fast.attention_prefill(q, cache, cache, cu, lens, 5)
assert out.shape == (7, 10, 128) and out.dtype == torch.bfloat16 and out.device.type == "meta"
out = torch.ops.olmo2_fast.attention_decode(q[:2], cache, cache, lens, 4)
assert out.shape == (2, 10, 128) and out.device.type == "meta"
with FakeTensorMode() as mode:
    q, cache = mode.from_tensor(torch.randn(2, 10, 64)), mode.from_tensor(torch.randn(3, 2, 16, 64))
    lens = mode.from_tensor(torch.ones(2, dtype=torch.int32))
    assert torch.ops.olmo2_fast.attention_decode(q, cache, cache, lens, 1).shape == (2, 10, 64)
""")


@pytest.mark.cuda
def test_decode_cuda_graph_replay():
    # The split count comes from shapes only, so one captured graph serves any kv_lens.
    q, k_cache, v_cache, lens, cu = make_decode_case([1024] * 4, (10, 2, 128), torch.bfloat16, max_seq=1024)
    lens.copy_(torch.tensor([5, 100, 700, 1000], dtype=torch.int32))
    attention_decode(q, k_cache, v_cache, lens)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_decode(q, k_cache, v_cache, lens)
    for new_lens in ([5, 100, 700, 1000], [1, 1024, 33, 512]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        check_against_reference(out, q, k_cache, v_cache, cu, lens)


def _good_inputs():
    q = torch.zeros(3, 4, 64, dtype=torch.float16)
    cache = torch.zeros(2, 2, 8, 64, dtype=torch.float16)
    return q, cache, cache.clone(), torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([2, 1], dtype=torch.int32)


PREFILL_ERRORS = [
    (lambda q, k, v, cu, n: (q[0], k, v, cu, n, 2), ValueError, "q must be 3-D"),
    (lambda q, k, v, cu, n: (q, k, v[:, :, :4], cu, n, 2), ValueError, "k_cache and v_cache"),
    (lambda q, k, v, cu, n: (q.int(), k, v, cu, n, 2), TypeError, "float32, float16 or bfloat16"),
    (lambda q, k, v, cu, n: (q, k.float(), v, cu, n, 2), TypeError, "must match q"),
    (lambda q, k, v, cu, n: (q, k, v, cu, n.long(), 2), TypeError, "kv_lens must be a 1-D int32"),
    (lambda q, k, v, cu, n: (q, k, v, cu, n.to("meta"), 2), ValueError, "one device"),
    (lambda q, k, v, cu, n: (q[..., :48], k[..., :48], v[..., :48], cu, n, 2), ValueError, "head_dim must be one of"),
    (lambda q, k, v, cu, n: (q[:, :3], k, v, cu, n, 2), ValueError, "multiple of Hkv"),
    (lambda q, k, v, cu, n: (q, k[:1], v[:1], cu, n, 2), ValueError, "cache holds only 1 rows"),
    (lambda q, k, v, cu, n: (q, k[..., ::2], v[..., ::2], cu, n, 2), ValueError, "head_dim"),
    (lambda q, k, v, cu, n: (q.transpose(0, 2).contiguous().transpose(0, 2), k, v, cu, n, 2), ValueError, "stride"),
    (lambda q, k, v, cu, n: (q, k, v.transpose(1, 2).contiguous().transpose(1, 2), cu, n, 2), ValueError, "same strides"),
    (lambda q, k, v, cu, n: (q, k, v, cu[:2], n, 2), ValueError, "expected B\\+1"),
    (lambda q, k, v, cu, n: (q, k, v, cu.long(), n, 2), TypeError, "cu_seqlens_q must be a 1-D int32"),
    (lambda q, k, v, cu, n: (q, k, v, cu, n, torch.tensor(2)), TypeError, "max_q_len must be a host int"),
    (lambda q, k, v, cu, n: (q, k, v, cu, n, -1), ValueError, "max_q_len must be >= 0"),
]


@pytest.mark.parametrize("mutate, error, message", PREFILL_ERRORS)
def test_prefill_rejects_bad_inputs(mutate, error, message):
    with pytest.raises(error, match=message):
        attention_prefill(*mutate(*_good_inputs()))


@pytest.mark.parametrize("kwargs, lens, error, message", [
    ({}, torch.tensor([2], dtype=torch.int32), ValueError, "q has 2 sequences but kv_lens has 1"),
    ({"num_splits": 0}, None, ValueError, "num_splits must be in"),
    ({"num_splits": attn.MAX_SPLITS + 1}, None, ValueError, "num_splits must be in"),
    ({"num_splits": 2.0}, None, TypeError, "num_splits must be an int"),
])
def test_decode_rejects_bad_inputs(kwargs, lens, error, message):
    q, k, v, _, good_lens = _good_inputs()
    with pytest.raises(error, match=message):
        attention_decode(q[:2], k, v, good_lens if lens is None else lens, **kwargs)


def test_prefill_cost_by_hand():
    # Sequence 0: 3 queries, fresh (3 + 2 + 1 = 6 pairs); sequence 1: 2 queries on top of
    # 8 cached keys (9 + 10 = 19 pairs). Hq=4, Hkv=2, D=8, fp16.
    cost = attention_prefill_cost([3, 2], [3, 10], 4, 2, 8, torch.float16)
    assert cost.flops == 4 * 8 * 4 * 25 == 3200
    assert cost.bytes == 2 * 5 * 4 * 8 * 2 + 2 * 13 * 2 * 8 * 2 == 1472  # q + out, then K + V
    full = attention_prefill_cost([4096], [4096], 32, 32, 128, torch.bfloat16)
    assert full.flops == 4 * 128 * 32 * 4096 * 4097 // 2  # the causal half


def test_decode_cost_by_hand():
    cost = attention_decode_cost([5, 1], 4, 2, 8, torch.bfloat16)
    assert cost == Cost(bytes=2 * 2 * 4 * 8 * 2 + 2 * 6 * 2 * 8 * 2, flops=4 * 8 * 4 * 6)


@pytest.mark.parametrize("batch, n_heads, n_kv_heads, max_seq, splits", [
    (1, 40, 8, 4096, 16),    # 32B, batch 1: 8 programs -> 16 splits of 256
    (2, 32, 32, 4096, 5),    # 64 programs want 5 splits (5 x 832 slots)
    (64, 16, 16, 4096, 1),   # 1024 programs fill the GPU alone
    (1, 16, 16, 300, 1),     # too short to split
    (1, 1, 1, 2100, 7),      # 8 wanted, 320-slot splits need only 7
    (1, 64, 2, 4096, 16),    # groups of 32 take 2 programs per KV head
])
def test_decode_split_heuristic(batch, n_heads, n_kv_heads, max_seq, splits):
    assert attn.decode_num_splits(batch, n_heads, n_kv_heads, max_seq, 64, sm_count=132) == splits


# --------------------------------------------------------------------------- compile checks

# Every launcher decision: the kernels' tile configs come from attn.prefill_config /
# attn.decode_config (the launcher's own functions) for each (D, dtype); the runtime int
# `group` is specialised by Triton (1 becomes a constant; 2, 5, 8 are one plain-i32
# specialisation, listed anyway); decode compiles with and without SPLIT.
OLMO_HEAD_DIMS = (64, 128)
OTHER_HEAD_DIMS = tuple(d for d in attn.SUPPORTED_HEAD_DIMS if d not in OLMO_HEAD_DIMS)
GROUPS = (1, 2, 5, 8)
PTR_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
INDEX_PTRS = ("cu_seqlens_ptr", "kv_lens_ptr")


def compile_spec(kernel_name, dtype, constexprs, group, num_warps, num_stages, label):
    """A spec whose signature is read off the kernel's own argument names, typed the way
    the launcher's real arguments are: cache/q/out pointers of `dtype`, int32 index
    pointers, float32 partials, 16-byte aligned pointers and strides (multiples of D)."""
    kernel = getattr(attn, kernel_name)
    signature, aligned = {}, []
    constexprs = dict(constexprs)
    for name in kernel.arg_names:
        if name.isupper():
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i32" if name in INDEX_PTRS else "*fp32" if "_part_" in name else PTR_TYPES[dtype]
            aligned.append(name)
        elif name == "qk_scale":
            signature[name] = "fp32"
        elif name == "group" and group == 1:
            signature[name], constexprs["group"] = "constexpr", 1
        else:
            signature[name] = "i32"
            if name.startswith("stride_") or name == "split_len" or (name == "group" and group % 16 == 0):
                aligned.append(name)
    return kernel_spec(f"olmo2_fast.kernels.attention:{kernel_name}", signature, constexprs, aligned=aligned,
                       num_warps=num_warps, num_stages=num_stages, name=f"{label} {str(dtype)[6:]} D={constexprs['HEAD_DIM']}")


def prefill_specs(head_dims, dtypes, groups=GROUPS):
    specs = []
    for dtype in dtypes:
        for head_dim in head_dims:
            cfg = attn.prefill_config(head_dim, dtype)
            for group in groups:
                specs.append(compile_spec("_prefill_kernel", dtype,
                                          {"HEAD_DIM": head_dim, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n},
                                          group, cfg.num_warps, cfg.num_stages, f"prefill G={group} {tuple(cfg)}"))
    return specs


def decode_specs(head_dims, dtypes, groups=GROUPS):
    specs = []
    for dtype in dtypes:
        for head_dim in head_dims:
            cfg = attn.decode_config(head_dim, dtype)
            for group in groups:
                for split in (False, True):
                    specs.append(compile_spec(
                        "_decode_kernel", dtype,
                        {"HEAD_DIM": head_dim, "BLOCK_G": cfg.block_m, "BLOCK_N": cfg.block_n, "SPLIT": split},
                        group, cfg.num_warps, cfg.num_stages, f"decode G={group} split={split} {tuple(cfg)}"))
            specs.append(compile_spec("_decode_reduce_kernel", dtype, {"HEAD_DIM": head_dim, "MAX_SPLITS": attn.MAX_SPLITS},
                                      None, attn.REDUCE_NUM_WARPS, 3, "reduce"))
    return specs


def test_compiles_for_gpu_olmo_head_dims():
    # The prefill dots must be mma (sm_80) / wgmma (sm_90) for bf16 and fp16.
    assert_compiles_clean(prefill_specs(OLMO_HEAD_DIMS, (torch.float16, torch.bfloat16)), need_mma=True)
    # Decode is memory-bound: its K/V tiles (and the reducer's partials) must load as ld.global.v4.
    assert_compiles_clean(decode_specs(OLMO_HEAD_DIMS, attn.FLOAT_DTYPES), need_vector_loads=True)
    # float32 prefill runs IEEE dots on FMA units: no mma, but no spills either.
    assert_compiles_clean(prefill_specs(OLMO_HEAD_DIMS, (torch.float32,)))


@pytest.mark.heavy
def test_compiles_for_gpu_other_head_dims():
    assert_compiles_clean(prefill_specs(OTHER_HEAD_DIMS, (torch.float16, torch.bfloat16)), need_mma=True)
    assert_compiles_clean(decode_specs(OTHER_HEAD_DIMS, attn.FLOAT_DTYPES) + prefill_specs(OTHER_HEAD_DIMS, (torch.float32,)))

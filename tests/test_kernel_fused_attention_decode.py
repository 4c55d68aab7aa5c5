"""fused_attention_decode: interpreter numerics vs float64 (output and the new cache slot), the
rest of the cache untouched, counters reset, determinism under any arrival order, equality
with the unfused qk_norm_rope + attention_decode, split ranges from the device kv_lens,
errors, the registered op (shape inference, launch_pdl reaching Triton), the roofline, grid
fill at the published widths, and GPU compiles (spills, shared memory, mma, 16-byte loads,
griddepcontrol iff PDL, the atomic's memory ordering)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import (
    ALL_DTYPES, DEVICE, INTERPRETED, SHARED_LIMIT, assert_close_to_ref, kernel_spec, run_without_interpreter,
)
from olmo2_fast.kernels import fused_attention_decode as fad
from olmo2_fast.kernels.attention import MAX_SPLITS, attention_decode
from olmo2_fast.kernels.fused_attention_decode import (
    DecodeWorkspace, fused_attention_decode, fused_attention_decode_cost, fused_attention_decode_reference,
    fused_attention_decode_workspace, fused_decode_num_splits,
)
from olmo2_fast.kernels.qk_norm_rope import qk_norm_rope
from olmo2_fast.kernels.roofline import Cost

EPS = 1e-6
THETA = 500000.0
# (Hq, Hkv) of OLMo-2 1B, 7B, 13B, 32B; head_dim 128 in all.
PUBLISHED_HEADS = {"1B": (16, 16), "7B": (32, 32), "13B": (40, 40), "32B": (40, 8)}
H100_SMS = 132

# Every launcher allocation (the output) comes out NaN-filled: an element the kernel fails
# to write fails the check. The interpreter turns runtime loop bounds into 1-element arrays,
# and numpy warns on each int().
pytestmark = [pytest.mark.usefixtures("nan_allocations"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]

# bf16 too under the interpreter: conftest.py makes its tl.dot and float32 -> bf16 cast
# compute what the GPU computes.
DTYPES = ALL_DTYPES


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")



def make_case(n_q_heads, n_kv_heads, head_dim, kv_lens, dtype, *, max_seq, num_splits, seed=0):
    """Random inputs for one decode step: qkv a row-strided view (as a slice of a wider
    buffer), a cache whose slots from kv_len - 1 on (and its spare row) hold NaN, and a
    workspace whose partials are NaN (the kernel must write each one before reading it)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(kv_lens)
    width = (n_q_heads + 2 * n_kv_heads) * head_dim
    qkv = (2 * torch.randn(batch, width + 48, generator=gen))[:, :width].to(dtype)
    cache_shape = (batch + 1, n_kv_heads, max_seq, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    for b, kv_len in enumerate(kv_lens):
        k_cache[b, :, :kv_len - 1] = torch.randn(n_kv_heads, kv_len - 1, head_dim, generator=gen).to(dtype)
        v_cache[b, :, :kv_len - 1] = torch.randn(n_kv_heads, kv_len - 1, head_dim, generator=gen).to(dtype)
    inputs = dict(
        qkv=qkv,
        q_norm_weight=(1 + 0.5 * torch.randn(n_q_heads * head_dim, generator=gen)).to(dtype),
        k_norm_weight=(1 + 0.5 * torch.randn(n_kv_heads * head_dim, generator=gen)).to(dtype),
        kv_lens=torch.tensor(kv_lens, dtype=torch.int32),
        k_cache=k_cache, v_cache=v_cache,
    )
    inputs = {name: t.to(DEVICE) for name, t in inputs.items()}
    workspace = fused_attention_decode_workspace(batch, n_q_heads, n_kv_heads, head_dim, max_seq, DEVICE,
                                                 num_splits=num_splits)
    for partial in (workspace.m, workspace.l, workspace.acc):
        partial.fill_(float("nan"))
    return inputs, workspace


def cloned(inputs, dtype=None):
    """A copy of the inputs (fresh caches) for a reference run, optionally cast to `dtype`."""
    return {name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).clone() for name, t in inputs.items()}


def run(inputs, workspace, **rope):
    return fused_attention_decode(**inputs, workspace=workspace, eps=EPS, rope_theta=THETA, **rope)


def new_slots(inputs):
    """(rows, positions) of the cache slots the step writes: row b, position kv_lens[b] - 1."""
    lens = inputs["kv_lens"].long()
    return torch.arange(len(lens), device=lens.device), lens - 1


def check_step(inputs, workspace, **rope):
    """Run the kernel on `inputs` and check everything a step promises."""
    before = cloned(inputs)
    out = run(inputs, workspace, **rope)
    ref64_inputs, same_dtype_inputs = cloned(before, torch.float64), cloned(before)
    ref64 = fused_attention_decode_reference(**ref64_inputs, eps=EPS, rope_theta=THETA, **rope)
    torch_out = fused_attention_decode_reference(**same_dtype_inputs, eps=EPS, rope_theta=THETA, **rope)
    assert_close_to_ref(out, ref64, torch_out)

    rows, pos = new_slots(inputs)
    k_cache, v_cache = inputs["k_cache"], inputs["v_cache"]
    assert_close_to_ref(k_cache[rows, :, pos], ref64_inputs["k_cache"][rows, :, pos],
                        same_dtype_inputs["k_cache"][rows, :, pos])
    assert torch.equal(v_cache[rows, :, pos], same_dtype_inputs["v_cache"][rows, :, pos])  # v is copied
    written = torch.zeros(k_cache.shape[0], k_cache.shape[2], dtype=torch.bool, device=k_cache.device)
    written[rows, pos] = True
    for new, old in ((k_cache, before["k_cache"]), (v_cache, before["v_cache"])):
        torch.testing.assert_close(new.transpose(1, 2)[~written], old.transpose(1, 2)[~written], rtol=0, atol=0,
                                   equal_nan=True, msg="a cache slot other than kv_lens[b] - 1 was written")
    assert torch.equal(workspace.counters, torch.zeros_like(workspace.counters)), "counters not reset"
    return out


# (Hq, Hkv, D, kv_lens, max_seq, splits): GQA groups 1, 2, 5 (OLMo-2 32B), 8; both head widths;
# batch 1..5; kv_lens from 1 to the cache end; Hkv = 3 (not a power of two); one split (the
# direct path), several, and more splits than some sequences have cached keys; a group wider
# than BLOCK_G (two chunks per KV head: only chunk 0 writes the cache).
CASES = {
    "group1-batch1-end": (2, 2, 128, [40], 40, 1),
    "group2-batch3": (6, 3, 64, [1, 24, 13], 24, 3),
    "group5-batch5": (10, 2, 64, [7, 1, 24, 16, 19], 24, 2),
    "group8-batch4": (8, 1, 128, [17, 2, 24, 1], 24, 3),
    "group32-two-chunks": (32, 1, 16, [3, 24], 24, 2),  # 2 programs of 16 query heads per KV head
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_float64(case, dtype):
    n_q_heads, n_kv_heads, head_dim, kv_lens, max_seq, splits = case
    check_step(*make_case(n_q_heads, n_kv_heads, head_dim, kv_lens, dtype, max_seq=max_seq, num_splits=splits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_linear_rope_scaling(dtype):
    check_step(*make_case(4, 2, 64, [3, 38], dtype, max_seq=40, num_splits=2, seed=1), rope_scaling_factor=4.0)


def test_deterministic_whatever_program_arrives_last(monkeypatch):
    """The combine reads every split's partial in split order, whichever program arrives
    last: reversing the order the interpreter runs programs in (split 0 now arrives last
    instead of the split that folds the new token) must give the same bits; and so must a
    repeated call (the counters were reset)."""
    inputs, workspace = make_case(10, 2, 64, [40, 1], torch.float16, max_seq=40, num_splits=4, seed=2)
    first_inputs = cloned(inputs)
    first = run(first_inputs, workspace)
    again = run(cloned(inputs), workspace)
    if INTERPRETED:
        from triton.runtime.interpreter import InterpreterBuilder

        in_order = InterpreterBuilder.set_grid_idx

        def reversed_order(self, x, y, z):
            nx, ny, nz = self.grid_dim
            in_order(self, nx - 1 - x, ny - 1 - y, nz - 1 - z)

        monkeypatch.setattr(InterpreterBuilder, "set_grid_idx", reversed_order)
    reversed_inputs = cloned(inputs)
    reverse = run(reversed_inputs, workspace)
    for out in (again, reverse):
        assert torch.equal(out, first)
    torch.testing.assert_close(reversed_inputs["k_cache"], first_inputs["k_cache"], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(workspace.counters, torch.zeros_like(workspace.counters))


@pytest.mark.skipif(not INTERPRETED, reason="counts the interpreter's stores")
def test_each_new_slot_is_written_by_exactly_one_program(monkeypatch):
    """Count every element stored into the caches during one launch (the interpreter's host
    view of a CPU tensor is the tensor itself, so store addresses are the caches' own):
    each element of the new slots exactly once, nothing else. A group of 32 has two
    programs per (split, KV head), and 3 splits: 6 programs could write each slot."""
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder

    inputs, workspace = make_case(32, 1, 16, [3, 24], torch.float16, max_seq=24, num_splits=3, seed=8)
    stored = []
    real_store = InterpreterBuilder.create_masked_store

    def recording_store(self, ptrs, value, mask, cache_modifier, eviction_policy):
        addresses, written = np.broadcast_arrays(ptrs.data, mask.data)
        stored.append(addresses[written.astype(bool)])
        return real_store(self, ptrs, value, mask, cache_modifier, eviction_policy)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_store", recording_store)
    run(inputs, workspace)
    addresses = np.concatenate(stored).astype(np.int64)
    rows, pos = new_slots(inputs)
    for cache in (inputs["k_cache"], inputs["v_cache"]):
        begin = cache.data_ptr()
        in_cache = addresses[(addresses >= begin) & (addresses < begin + cache.numel() * cache.element_size())]
        counts = np.bincount((in_cache - begin) // cache.element_size(), minlength=cache.numel()).reshape(cache.shape)
        expected = np.zeros(cache.shape, dtype=np.int64)
        expected[rows.numpy(), :, pos.numpy()] = 1
        assert (counts == expected).all(), f"stores per element: {np.unique(counts[expected == 1])} on the new slots, " \
                                           f"{int(counts[expected == 0].sum())} elsewhere"


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, dict(rtol=1e-5, atol=1e-5)),
                                              (torch.float16, dict(rtol=1e-3, atol=1e-3))], ids=["float32", "float16"])
def test_matches_unfused_sequence(dtype, tolerance):
    """Equal, to rounding, to today's decode step: qk_norm_rope then attention_decode."""
    inputs, workspace = make_case(10, 2, 64, [1, 30, 40], dtype, max_seq=40, num_splits=3, seed=3)
    unfused = cloned(inputs)
    out = run(inputs, workspace)
    rows, pos = new_slots(unfused)
    q = qk_norm_rope(unfused["qkv"], unfused["q_norm_weight"], unfused["k_norm_weight"], pos.int(), rows.int(),
                     unfused["k_cache"], unfused["v_cache"], eps=EPS, rope_theta=THETA)
    expected = attention_decode(q, unfused["k_cache"], unfused["v_cache"], unfused["kv_lens"], num_splits=2)
    torch.testing.assert_close(out, expected.flatten(1), **tolerance)
    torch.testing.assert_close(inputs["k_cache"], unfused["k_cache"], equal_nan=True, **tolerance)
    assert torch.equal(inputs["v_cache"][rows, :, pos], unfused["v_cache"][rows, :, pos])


def test_split_ranges_follow_device_kv_lens():
    """The split count is fixed by shapes, the ranges by kv_lens: 8 splits over a 256-slot
    cache holding 41 and 5 tokens. Sequence 0's 40 cached keys give every split 5 (each
    partial has l > 0); sequence 1's 4 cached keys go to splits 0..3, the new token to
    split 7, and splits 4..6 are empty (the neutral partial m = -inf, l = 0)."""
    inputs, workspace = make_case(4, 2, 64, [41, 5], torch.float16, max_seq=256, num_splits=8, seed=4)
    check_step(inputs, workspace)
    assert (workspace.l[0] > 0).all()
    busy = torch.tensor([True] * 4 + [False] * 3 + [True], device=DEVICE)
    assert (workspace.l[1][:, busy] > 0).all()
    assert (workspace.l[1][:, ~busy] == 0).all() and (workspace.m[1][:, ~busy] == float("-inf")).all()


def test_padding_rows_and_overlong_kv_lens_stay_in_their_row():
    """kv_lens 0 marks a padding row: its cache row is neither read nor written (slots hold
    NaN here) and its output is exactly its new token's v for each query head's KV head.
    kv_lens > max_seq is a caller bug the launcher cannot see without a sync: it is clamped
    to max_seq, so only the row's last slot is written (its output reads the row's NaN slots)."""
    n_q_heads, n_kv_heads, head_dim = 4, 2, 64
    inputs, workspace = make_case(n_q_heads, n_kv_heads, head_dim, [1, 1], torch.float16, max_seq=16, num_splits=2,
                                  seed=5)
    inputs["kv_lens"] = torch.tensor([0, 25], dtype=torch.int32, device=DEVICE)
    before = cloned(inputs)
    out = run(inputs, workspace)
    v_new = inputs["qkv"][0, -n_kv_heads * head_dim:].view(n_kv_heads, head_dim)
    assert torch.equal(out[0].view(n_q_heads, head_dim), v_new.repeat_interleave(n_q_heads // n_kv_heads, 0))
    written = torch.zeros(3, 16, dtype=torch.bool, device=DEVICE)
    written[1, 15] = True
    for name in ("k_cache", "v_cache"):
        new, old = inputs[name].transpose(1, 2), before[name].transpose(1, 2)
        torch.testing.assert_close(new[~written], old[~written], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(workspace.counters, torch.zeros_like(workspace.counters))


@pytest.mark.heavy
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("size", ["1B", "32B"])
def test_published_widths(size, dtype):
    """Real widths and a 4096-slot cache, the default split count, contexts 1 to the end."""
    n_q_heads, n_kv_heads = PUBLISHED_HEADS[size]
    check_step(*make_case(n_q_heads, n_kv_heads, 128, [513, 1, 4000, 4096], dtype, max_seq=4096, num_splits=None))


@pytest.mark.heavy
@pytest.mark.parametrize("head_dim", [16, 32, 256])
def test_other_head_dims(head_dim):
    check_step(*make_case(10, 2, head_dim, [3, 40], torch.float16, max_seq=40, num_splits=3, seed=6))


# --------------------------------------------------------------------------- grid fill


@pytest.mark.skipif(not INTERPRETED, reason="records interpreter launches")
@pytest.mark.parametrize("size", PUBLISHED_HEADS)
def test_grid_fills_an_h100_at_batch_1(monkeypatch, size):
    """The launcher's own launch at the published widths, recorded without executing: one
    launch, >= 132 programs (an H100's SMs) for a 4096-slot cache and for a cache sized to a
    512-token context (768 slots: the first request rounded up to 256), whatever kv_lens
    hold (512 or 4000): the grid depends on shapes only."""
    from triton.runtime.interpreter import GridExecutor

    grids = []
    monkeypatch.setattr(GridExecutor, "__call__", lambda self, *args, **kwargs: grids.append(tuple(self.grid)))
    n_q_heads, n_kv_heads = PUBLISHED_HEADS[size]
    for max_seq, contexts in ((4096, (512, 4000)), (768, (512,))):
        workspace = fused_attention_decode_workspace(1, n_q_heads, n_kv_heads, 128, max_seq, DEVICE)
        cache = torch.empty(1, n_kv_heads, max_seq, 128, dtype=torch.bfloat16, device=DEVICE)
        for context in contexts:
            grids.clear()
            fused_attention_decode(
                torch.empty(1, (n_q_heads + 2 * n_kv_heads) * 128, dtype=torch.bfloat16, device=DEVICE),
                torch.empty(n_q_heads * 128, dtype=torch.bfloat16, device=DEVICE),
                torch.empty(n_kv_heads * 128, dtype=torch.bfloat16, device=DEVICE),
                torch.tensor([context], dtype=torch.int32, device=DEVICE), cache, cache.clone(), workspace,
                eps=EPS, rope_theta=THETA)
            assert len(grids) == 1
            splits, heads, batch = grids[0]
            assert (heads, batch) == (n_kv_heads, 1) and splits == workspace.num_splits
            assert splits * heads * batch >= H100_SMS, f"{size}, {max_seq} slots: {grids[0]}"


@pytest.mark.parametrize("batch, n_q_heads, n_kv_heads, max_seq, splits", [
    (1, 16, 16, 4096, 9),    # 1B: 16 programs per split -> 9 splits, 144 programs
    (1, 32, 32, 4096, 5),    # 7B: 160
    (1, 40, 40, 4096, 4),    # 13B: 160
    (1, 40, 8, 4096, 17),    # 32B: 8 per split -> 136
    (1, 40, 8, 768, 17),     # a cache sized to a 512-token context splits as finely
    (4, 40, 8, 4096, 5),     # 32 per split
    (16, 16, 16, 4096, 1),   # 256 programs fill the GPU alone
    (1, 40, 8, 128, 8),      # at most one split per 16 cache slots
    (1, 1, 1, 4096, MAX_SPLITS),
    (1, 64, 2, 4096, MAX_SPLITS),  # groups of 32: 2 programs per KV head, 33 splits wanted
])
def test_split_count(batch, n_q_heads, n_kv_heads, max_seq, splits):
    assert fused_decode_num_splits(batch, n_q_heads, n_kv_heads, max_seq, sm_count=H100_SMS) == splits


# --------------------------------------------------------------------------- op, errors, roofline


def test_registered_op_matches_launcher():
    inputs, workspace = make_case(4, 2, 64, [5, 12], torch.float32, max_seq=16, num_splits=2, seed=7)
    via_op = cloned(inputs)
    out = run(inputs, workspace)
    op_out = torch.ops.olmo2_fast.fused_attention_decode(*via_op.values(), *workspace, EPS, THETA, 1.0)
    assert torch.equal(out, op_out)
    torch.testing.assert_close(via_op["k_cache"], inputs["k_cache"], rtol=0, atol=0, equal_nan=True)


def test_shape_inference_and_launch_options():
    """Compiled (not interpreted) kernels: the op's fake implementation on meta tensors, and
    what a launch hands Triton once PDL is on: USE_PDL and launch_pdl both reach
    JITFunction.run through triton_op + wrap_triton (the launch itself is recorded, not run)."""
    run_without_interpreter("""
import torch
import triton.runtime.jit as jit
from torch._subclasses.fake_tensor import FakeTensorMode
from olmo2_fast.kernels import fused_attention_decode as fad

def inputs(device, factory):
    return dict(qkv=factory(3, 56 * 128, dtype=torch.bfloat16, device=device),
                q_norm_weight=factory(40 * 128, dtype=torch.bfloat16, device=device),
                k_norm_weight=factory(8 * 128, dtype=torch.bfloat16, device=device),
                kv_lens=torch.ones(3, dtype=torch.int32, device=device),
                k_cache=factory(4, 8, 64, 128, dtype=torch.bfloat16, device=device),
                v_cache=factory(4, 8, 64, 128, dtype=torch.bfloat16, device=device))

ws = fad.fused_attention_decode_workspace(3, 40, 8, 128, 64, "meta", num_splits=4)
out = fad.fused_attention_decode(**inputs("meta", torch.empty), workspace=ws, eps=1e-6, rope_theta=5e5)
assert out.shape == (3, 40 * 128) and out.dtype == torch.bfloat16 and out.device.type == "meta"
with FakeTensorMode() as mode:
    fake = {name: mode.from_tensor(t) for name, t in inputs("cpu", torch.zeros).items()}
    ws = fad.DecodeWorkspace(*(mode.from_tensor(t) for t in fad.fused_attention_decode_workspace(3, 40, 8, 128, 64, "cpu")))
    assert fad.fused_attention_decode(**fake, workspace=ws, eps=1e-6, rope_theta=5e5).shape == (3, 5120)

seen = []
jit.JITFunction.run = lambda self, *args, grid, warmup, **kwargs: seen.append((grid, kwargs))
fad.pdl_enabled = lambda device: True
ws = fad.fused_attention_decode_workspace(3, 40, 8, 128, 64, "cpu", num_splits=4)
fad.fused_attention_decode(**inputs("cpu", torch.zeros), workspace=ws, eps=1e-6, rope_theta=5e5)
(grid, kwargs), = seen
assert tuple(grid) == (4, 8, 3), grid
assert kwargs["launch_pdl"] is True and kwargs["USE_PDL"] is True, kwargs
""")


def _good(**changes):
    inputs, workspace = make_case(4, 2, 64, [3, 5], torch.float16, max_seq=8, num_splits=2)
    inputs.update(changes)
    workspace = inputs.pop("workspace", workspace)
    return lambda: fused_attention_decode(**inputs, workspace=workspace, eps=EPS, rope_theta=THETA)


def _workspace(**changes):
    return fused_attention_decode_workspace(2, 4, 2, 64, 8, DEVICE, num_splits=2)._replace(**changes)


HALF = dict(dtype=torch.float16, device=DEVICE)
BAD_INPUTS = [
    (TypeError, "qkv must be a torch.Tensor", dict(qkv=[[0.0]])),
    (TypeError, "workspace must be a DecodeWorkspace", dict(workspace=(1, 2, 3, 4))),
    (TypeError, "qkv must be float32, float16 or bfloat16", dict(qkv=torch.zeros(2, 512, dtype=torch.int32))),
    (TypeError, "k_cache dtype", dict(k_cache=torch.zeros(3, 2, 8, 64), v_cache=torch.zeros(3, 2, 8, 64))),
    (TypeError, "q_norm_weight dtype", dict(q_norm_weight=torch.ones(256))),
    (TypeError, "kv_lens must be a 1-D int32", dict(kv_lens=torch.tensor([3, 5]))),
    (TypeError, "workspace.acc must be float32", dict(workspace=_workspace(acc=torch.zeros(2, 4, 2, 64, **HALF)))),
    (TypeError, "workspace.counters must be int32",
     dict(workspace=_workspace(counters=torch.zeros(2, 2, dtype=torch.int64)))),
    (ValueError, "all tensors must be on one device", dict(kv_lens=torch.tensor([3, 5], dtype=torch.int32, device="meta"))),
    (ValueError, "v_cache shape", dict(v_cache=torch.zeros(3, 2, 9, 64, **HALF))),
    (ValueError, "head_dim must be one of", dict(k_cache=torch.zeros(3, 2, 8, 48, **HALF),
                                                 v_cache=torch.zeros(3, 2, 8, 48, **HALF))),
    (ValueError, "q_norm_weight must be \\[Hq \\* D\\] with Hq a multiple of Hkv=2",
     dict(q_norm_weight=torch.ones(192, **HALF))),
    (ValueError, "k_norm_weight must be \\[Hkv \\* D\\] = \\[128\\]", dict(k_norm_weight=torch.ones(64, **HALF))),
    (ValueError, "qkv must be \\[B, \\(Hq \\+ 2\\*Hkv\\) \\* D\\] = \\[B, 512\\]", dict(qkv=torch.zeros(2, 500, **HALF))),
    (ValueError, "kv_lens must be \\[B\\] = \\[2\\]", dict(kv_lens=torch.ones(3, dtype=torch.int32))),
    (ValueError, "2 sequences but the cache holds only 1 rows", dict(k_cache=torch.zeros(1, 2, 8, 64, **HALF),
                                                                     v_cache=torch.zeros(1, 2, 8, 64, **HALF))),
    (ValueError, "qkv must have a contiguous last dimension", dict(qkv=torch.zeros(2, 1024, **HALF)[:, ::2])),
    (ValueError, "k_cache and v_cache must have the same strides",
     dict(v_cache=torch.zeros(3, 8, 2, 64, **HALF).transpose(1, 2))),
    (ValueError, "workspace.m must be \\[batch >= 2, Hq = 4",
     dict(workspace=fused_attention_decode_workspace(1, 4, 2, 64, 8, DEVICE))),
    (ValueError, "workspace.m must be .*splits in 1..",
     dict(workspace=_workspace(m=torch.zeros(2, 4, MAX_SPLITS + 1)))),
    (ValueError, "workspace.acc must be \\[2, 4, 2, 64\\]", dict(workspace=_workspace(acc=torch.zeros(2, 4, 2, 32)))),
    (ValueError, "workspace.counters must be \\[2, 2\\]",
     dict(workspace=_workspace(counters=torch.zeros(2, 4, dtype=torch.int32)))),
    (ValueError, "workspace.l must be contiguous", dict(workspace=_workspace(l=torch.zeros(2, 8, 2)[:, ::2]))),
]


@pytest.mark.parametrize("error, match, changes", BAD_INPUTS, ids=[m for _, m, _ in BAD_INPUTS])
def test_bad_inputs_are_named(error, match, changes):
    with pytest.raises(error, match="fused_attention_decode: " + match):
        _good(**{name: t.to(DEVICE) if isinstance(t, torch.Tensor) and t.device.type != "meta" else t
                 for name, t in changes.items()})()


def test_bad_workspace_requests():
    with pytest.raises(ValueError, match="num_splits must be an int in \\[1, 32\\]"):
        fused_attention_decode_workspace(1, 4, 2, 64, 8, DEVICE, num_splits=0)
    with pytest.raises(ValueError, match="Hq \\(5\\) must be a multiple of Hkv \\(2\\)"):
        fused_attention_decode_workspace(1, 5, 2, 64, 8, DEVICE)
    workspace = fused_attention_decode_workspace(2, 40, 8, 128, 4096, DEVICE)
    assert isinstance(workspace, DecodeWorkspace) and workspace.num_splits == 9  # 16 programs per split
    assert workspace.counters.shape == (2, 8) and not workspace.counters.any()


def test_float32_at_head_dim_256_is_refused():
    """The one (D, dtype) the kernel does not take (it spills on every config): refused by name."""
    assert not fad.fused_attention_decode_supports(256, torch.float32)
    assert all(fad.fused_attention_decode_supports(d, dtype) for d in (16, 32, 64, 128) for dtype in ALL_DTYPES)
    f32 = dict(dtype=torch.float32, device=DEVICE)
    cache = torch.zeros(1, 1, 8, 256, **f32)
    with pytest.raises(ValueError, match="float32 with head_dim 256 is not supported"):
        fused_attention_decode(torch.zeros(1, 4 * 256, **f32), torch.ones(2 * 256, **f32), torch.ones(256, **f32),
                               torch.ones(1, dtype=torch.int32, device=DEVICE), cache, cache.clone(),
                               fused_attention_decode_workspace(1, 2, 1, 256, 8, DEVICE), eps=EPS, rope_theta=THETA)


def test_cost_by_hand():
    # 32B widths in bf16, two sequences with 512 and 1 cached positions after the step:
    # qkv 2*7168, weights 6144, K/V read 2*511*1024, new k/v 2*2*1024, out 2*5120 elements,
    # 2 bytes each, + 8 bytes of kv_lens; FLOPs 7 per q/k element, 4*D*Hq per visible key.
    cost = fused_attention_decode_cost([512, 1], 40, 8, 128, torch.bfloat16)
    elements = 2 * 7168 + 6144 + 2 * 511 * 1024 + 2 * 2 * 1024 + 2 * 5120
    assert cost == Cost(bytes=2 * elements + 8, flops=7 * 2 * 6144 + 4 * 128 * 40 * 513)


# --------------------------------------------------------------------------- compile checks

PTR_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
INT_PTRS = ("kv_lens_ptr", "counters_ptr")
FLOAT_SCALARS = ("eps", "rope_theta", "rope_scaling_factor", "qk_scale")


def compile_specs(head_dims, dtypes, split_counts, n_q_heads=40):
    """Specs of the configs the launcher picks (fad.kernel_meta, its own function) with USE_PDL
    on, as it is on sm_90 (pdl_enabled), and off, as on sm_80: (specs for sm_80, for sm_90).
    Signatures are read off the kernel's arguments; pointers are 16-byte aligned and the
    strides and max_seq multiples of 16, as on a real launch."""
    kernel = fad._fused_attention_decode_kernel
    specs = {False: [], True: []}
    for dtype in dtypes:
        for head_dim in filter(lambda d: fad.fused_attention_decode_supports(d, dtype), head_dims):
            for splits in split_counts:
                for use_pdl in (False, True):
                    meta = fad.kernel_meta(n_q_heads, head_dim, dtype, splits, use_pdl)
                    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
                    signature = {
                        name: "constexpr" if name.isupper() else
                        ("*i32" if name in INT_PTRS else "*fp32" if "_part_" in name else PTR_TYPES[dtype])
                        if name.endswith("_ptr") else "fp32" if name in FLOAT_SCALARS else "i32"
                        for name in kernel.arg_names}
                    aligned = [n for n in signature if n.endswith("_ptr") or n.startswith("stride") or n == "max_seq"]
                    specs[use_pdl].append(kernel_spec(
                        "olmo2_fast.kernels.fused_attention_decode:_fused_attention_decode_kernel", signature, meta,
                        aligned=aligned, num_warps=num_warps, num_stages=num_stages,
                        name=f"fused decode {str(dtype)[6:]} D={head_dim} splits={splits} pdl={use_pdl}"))
    return specs[False], specs[True]


def compile_and_check(specs_by_capability):
    """Compile each spec for its capability in one subprocess without the interpreter
    (tests/gpu_compile.compile_one: registers, spills, shared memory) and check, besides
    no spills, shared memory within the card's limit, 16-byte loads and mma in 16-bit dots,
    what the resource report does not show, from the PTX (a compile-cache hit):
    griddepcontrol iff USE_PDL; with splits, exactly one acq_rel gpu-scope atomic, a bar.sync
    after the last partial store and before it, and a bar.sync between the shared-memory
    broadcast of its result and the next shared-memory store (reduction scratch may reuse
    the broadcast slot: facebookexperimental/triton PR 3547). Returns the reports."""
    code = f"""
import importlib, json, re, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gpu_compile import compile_one

def ptx_problems(spec, ptx):
    atoms = re.findall(r"atom\\.[\\w.]+", ptx)
    if ("griddepcontrol.wait" in ptx) != spec["constexprs"]["USE_PDL"]:
        return "griddepcontrol present iff USE_PDL"
    if not spec["constexprs"]["SPLIT"]:
        return "atomics without splits" if atoms else None
    if atoms != ["atom.global.gpu.acq_rel.add.u32"]:
        return f"atomics {{atoms}}"
    before, after = ptx.split(atoms[0], 1)
    last_partial_store = max(m.start() for m in re.finditer(r"st\\.global", before))
    if "bar.sync" not in before[last_partial_store:]:
        return "no barrier between the partial stores and the atomic"
    broadcast = re.search(r"ld\\.shared\\S*\\s+%r\\d+, \\[global_smem(\\+\\d+)?\\]", after)
    if not broadcast:
        return "no shared-memory broadcast of the atomic's result"
    rest = after[broadcast.end():]
    store = re.search(r"st\\.shared", rest)
    if store and "bar.sync" not in rest[:store.start()]:
        return "the broadcast slot is reused without a barrier"
    return None

reports = []
for capability, specs in json.load(sys.stdin):
    for spec in specs:
        report = compile_one(spec, capability)
        report.pop("sass_loops", None)
        module, name = spec["kernel"].split(":")
        names = list(spec["signature"])
        attrs = {{(names.index(a),): [["tt.divisibility", 16]] for a in spec["aligned"]}}
        src = ASTSource(getattr(importlib.import_module(module), name), signature=spec["signature"],
                        constexprs=spec["constexprs"], attrs=attrs)
        options = dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"])
        ptx = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options).asm["ptx"]
        report["ptx_problem"] = ptx_problems(spec, ptx)
        reports.append(report)
print(json.dumps(reports))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(list(specs_by_capability.items())),
                          capture_output=True, text=True, env=env, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(proc.stdout.splitlines()[-1])
    problems = []
    for r in reports:
        where = f"{r['name']} sm_{r['capability']}"
        if r["stack"] or r["local"]:
            problems.append(f"{where}: spills (REG {r['regs']} STACK {r['stack']} LOCAL {r['local']})")
        if r["shared"] > SHARED_LIMIT[r["capability"]]:
            problems.append(f"{where}: shared memory {r['shared']} > {SHARED_LIMIT[r['capability']]}")
        if not r["vector_loads"]:
            problems.append(f"{where}: no 16-byte vector loads (ld.global.v4) in the PTX")
        if "float32" not in r["name"] and not (r["mma"] or r["wgmma"]):
            problems.append(f"{where}: no mma/wgmma in the PTX")
        if r["ptx_problem"]:
            problems.append(f"{where}: {r['ptx_problem']}")
    assert not problems, "\n".join(problems)
    return reports


def _by_capability(*spec_pairs):
    return {80: [s for sm80, _ in spec_pairs for s in sm80], 90: [s for _, sm90 in spec_pairs for s in sm90]}


def test_compiles_for_gpu_olmo_head_dim():
    """D = 128 (every published size), USE_PDL as the launcher sets it on each target: bf16
    (the production dtype) with one split and with the most (the widest combine tile);
    fp16 and float32 (8 warps) with the most. The rest is the heavy test below."""
    compile_and_check(_by_capability(compile_specs((128,), (torch.bfloat16,), (1, MAX_SPLITS)),
                                     compile_specs((128,), (torch.float16, torch.float32), (MAX_SPLITS,))))


@pytest.mark.heavy
def test_compiles_for_gpu_other_configs():
    """Every other (dtype, D, split tile) the launcher can pick."""
    split_counts = (1, 2, 3, 5, 9, 17)  # SPLITS_BLOCK 1, 2, 4, 8, 16, 32
    compile_and_check(_by_capability(
        compile_specs((128,), (torch.float16, torch.float32), (1,)),
        compile_specs((128,), tuple(PTR_TYPES), split_counts[1:-1]),
        compile_specs((16, 32, 64, 256), tuple(PTR_TYPES), split_counts)))

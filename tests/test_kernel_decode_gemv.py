"""decode_gemv: every prologue and the argmax epilogue against float64, dense and int4 weights,
split-K on and off (deterministic, counters reset, NaN partials never leak), residual_out written
exactly once, argmax ties / NaN / n_valid, errors, registered ops, the grid of every decode launch
at the published widths (recorded, not executed), roofline, GPU compiles and the SASS loop."""
import inspect

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from harness import (
    ALL_DTYPES, DEVICE, INTERPRETED, SHARED_LIMIT, assert_close_to_ref, compile_for_gpu, kernel_spec,
    run_without_interpreter,
)
from launch_plan import record_launches
from olmo2_fast.config import PRESETS
from olmo2_fast.kernels import decode_gemv as gemv_module
from olmo2_fast.kernels.decode_gemv import (
    DECODE_MAX_ROWS, LOWEST_KEY, DecodeGemvWorkspace, Prologue, WeightFormat, decode_gemv, decode_gemv_cost,
    decode_gemv_embedding, decode_gemv_embedding_reference, decode_gemv_lm_head, decode_gemv_lm_head_reference,
    decode_gemv_reference, decode_gemv_residual_norm, decode_gemv_residual_norm_reference, decode_gemv_swiglu,
    decode_gemv_swiglu_reference, decode_gemv_workspace, gemv_plan,
)
from olmo2_fast.kernels.int4_format import Int4Weight, quantize_int4
from olmo2_fast.kernels.roofline import Cost

EPS = 1e-6
H100_SMS = 132


def _randn(*shape, dtype, scale=1.0):
    return (scale * torch.randn(*shape, device=DEVICE)).to(dtype)


def _workspace(n, k, dtype, max_splits=8):
    """A workspace with room for any split up to max_splits (tests override the plan's split)."""
    workspace = decode_gemv_workspace([(n, k)], dtype, DEVICE)
    partials = torch.empty(max_splits * DECODE_MAX_ROWS * n, dtype=torch.float32, device=DEVICE)
    return workspace._replace(partials=partials)


def _assert_workspace_reset(workspace):
    assert torch.count_nonzero(workspace.counters).item() == 0, "a counter was left non-zero"
    assert (workspace.best == LOWEST_KEY).all(), "argmax keys were not reset"


class _Inputs:
    """Fresh random inputs of one launch at (M, N, K), in `dtype` and as float64 (the oracle); the
    weight dense or int4 (quantised from the dense draw; the oracle multiplies by its exact ŵ)."""

    def __init__(self, m, n, k, dtype, vocab=50, weight_format=WeightFormat.DENSE):
        self.dtype, self.m, self.n, self.k = dtype, m, n, k
        self.weight = _randn(n, k, dtype=dtype, scale=k ** -0.5)
        if weight_format == WeightFormat.INT4:
            self.weight = quantize_int4(self.weight)
        self.x = _randn(m, k, dtype=dtype)
        self.residual = _randn(m, k, dtype=dtype)
        self.delta = _randn(m, k, dtype=dtype, scale=3.0)
        self.norm_weight = (0.5 + torch.rand(k, device=DEVICE)).to(dtype)
        self.final_norm_weight = (0.5 + torch.rand(k, device=DEVICE)).to(dtype)
        self.gate_up = _randn(m, 2 * k, dtype=dtype, scale=2.0)
        self.embed = _randn(vocab, k, dtype=dtype)
        self.ids = torch.randint(0, vocab, (m,), device=DEVICE)

    def f64(self, name):
        value = getattr(self, name)
        return value if isinstance(value, Int4Weight) else value.double()

    def run(self, prologue, workspace, num_splits, n_valid=None):
        """(out, residual_out or None, next_ids or None) from the kernel; outputs poisoned first."""
        residual_out = torch.full((self.m, self.k), float("nan"), dtype=self.dtype, device=DEVICE)
        next_ids = torch.full((self.m,), -1, dtype=torch.int64, device=DEVICE)
        if prologue == Prologue.NONE:
            return decode_gemv(self.x, self.weight, workspace, num_splits=num_splits), None, None
        if prologue == Prologue.EMBEDDING:
            out = decode_gemv_embedding(self.ids, self.embed, self.weight, workspace, residual_out, num_splits=num_splits)
            return out, residual_out, None
        if prologue == Prologue.RESIDUAL_NORM:
            out = decode_gemv_residual_norm(self.residual, self.delta, self.norm_weight, self.weight, workspace,
                                            residual_out, eps=EPS, num_splits=num_splits)
            return out, residual_out, None
        if prologue == Prologue.SWIGLU:
            return decode_gemv_swiglu(self.gate_up, self.weight, workspace, num_splits=num_splits), None, None
        out = decode_gemv_lm_head(self.residual, self.delta, self.norm_weight, self.final_norm_weight, self.weight,
                                  workspace, eps=EPS, next_ids=next_ids, n_valid=n_valid, num_splits=num_splits)
        return out, None, next_ids

    def reference(self, prologue, as_float64):
        """(out, residual_out or None): the unfused sequence, in float64 or in the dtype."""
        t = self.f64 if as_float64 else (lambda name: getattr(self, name))
        if prologue == Prologue.NONE:
            return decode_gemv_reference(t("x"), t("weight")), None
        if prologue == Prologue.EMBEDDING:
            return decode_gemv_embedding_reference(self.ids, t("embed"), t("weight"))
        if prologue == Prologue.RESIDUAL_NORM:
            return decode_gemv_residual_norm_reference(t("residual"), t("delta"), t("norm_weight"), t("weight"), EPS)
        if prologue == Prologue.SWIGLU:
            return decode_gemv_swiglu_reference(t("gate_up"), t("weight")), None
        logits, _ = decode_gemv_lm_head_reference(t("residual"), t("delta"), t("norm_weight"), t("final_norm_weight"),
                                                  t("weight"), EPS)
        return logits, None


def _check(inputs, prologue, workspace, num_splits, n_valid=None):
    out, residual_out, next_ids = inputs.run(prologue, workspace, num_splits, n_valid)
    assert out.shape == (inputs.m, inputs.n) and out.dtype == inputs.dtype and out.is_contiguous()
    ref64, residual64 = inputs.reference(prologue, as_float64=True)
    same_dtype, residual_same_dtype = inputs.reference(prologue, as_float64=False)
    assert_close_to_ref(out, ref64, same_dtype)
    if residual_out is not None:
        assert_close_to_ref(residual_out, residual64, residual_same_dtype)
    if next_ids is not None:  # exactly torch.argmax of the logits the kernel wrote (sampling.py's greedy pick)
        assert torch.equal(next_ids, out[:, :n_valid].float().argmax(-1))
    _assert_workspace_reset(workspace)
    return out


# (prologue, M, dtype, N, K, splits): M = 1 is the CUDA-core path (BLOCK_K = 1024 in 16-bit, 512 in
# float32, so K > BLOCK_K to split), 2..16 the tl.dot path (BLOCK_K = 128 / 64). N and K are odd
# or ragged against the tiles; every prologue runs split and unsplit, in every dtype.
P = Prologue
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [
    (P.NONE, 1, F32, 37, 700, 1), (P.NONE, 1, BF16, 37, 1100, 2), (P.NONE, 2, F16, 45, 300, 3),
    (P.NONE, 16, BF16, 70, 300, 1),
    (P.EMBEDDING, 1, F16, 21, 1037, 2), (P.EMBEDDING, 3, BF16, 40, 200, 1), (P.EMBEDDING, 5, F32, 33, 130, 3),
    (P.RESIDUAL_NORM, 1, BF16, 19, 1100, 1), (P.RESIDUAL_NORM, 1, F32, 29, 1001, 2),
    (P.RESIDUAL_NORM, 3, F16, 50, 300, 2), (P.RESIDUAL_NORM, 16, BF16, 33, 257, 3),
    (P.SWIGLU, 1, F16, 23, 1030, 2), (P.SWIGLU, 2, BF16, 40, 200, 2), (P.SWIGLU, 5, F32, 37, 100, 1),
    (P.FINAL_NORM, 1, BF16, 45, 1100, 2), (P.FINAL_NORM, 1, F32, 45, 300, 1), (P.FINAL_NORM, 3, F16, 40, 300, 1),
    (P.FINAL_NORM, 16, BF16, 37, 300, 2),
]


@pytest.mark.parametrize("prologue, m, dtype, n, k, splits", CASES,
                         ids=[f"{p.name}-M{m}-{str(d)[6:]}-N{n}-K{k}-split{s}" for p, m, d, n, k, s in CASES])
def test_matches_float64(prologue, m, dtype, n, k, splits, nan_allocations):
    inputs = _Inputs(m, n, k, dtype)
    _check(inputs, prologue, _workspace(n, k, dtype), splits, n_valid=n - 3 if prologue == P.FINAL_NORM else None)


# int4 (N % 8 == 0, K % 128 == 0): M = 1 is the CUDA-core GEMV on 8-row blocks (K = 2304 takes 1
# warp, 3 steps of 1024, the last ragged: split 2 and 3 slices), 2..16 the dequantised tl.dot
# (steps of 128, 32 in float32); N ragged against the 8-, 16- and 64-row tiles. Every prologue,
# split and unsplit, in every dtype (float32 takes the CENTRED GEMV).
INT4_CASES = [
    (P.NONE, 1, BF16, 40, 2304, 2), (P.NONE, 1, F32, 24, 384, 1), (P.NONE, 3, F16, 40, 384, 3),
    (P.NONE, 16, BF16, 72, 256, 1),
    (P.EMBEDDING, 1, F16, 16, 2304, 3), (P.EMBEDDING, 5, BF16, 40, 256, 2),
    (P.RESIDUAL_NORM, 1, BF16, 24, 2304, 1), (P.RESIDUAL_NORM, 3, F32, 40, 384, 3),
    (P.RESIDUAL_NORM, 1, F32, 40, 2304, 2),
    (P.SWIGLU, 1, F16, 40, 2304, 2), (P.SWIGLU, 16, BF16, 72, 384, 1),
    (P.FINAL_NORM, 1, BF16, 48, 2304, 2), (P.FINAL_NORM, 7, F16, 40, 256, 1),
]


@pytest.mark.parametrize("prologue, m, dtype, n, k, splits", INT4_CASES,
                         ids=[f"{p.name}-M{m}-{str(d)[6:]}-N{n}-K{k}-split{s}" for p, m, d, n, k, s in INT4_CASES])
def test_int4_matches_float64(prologue, m, dtype, n, k, splits, nan_allocations):
    inputs = _Inputs(m, n, k, dtype, weight_format=WeightFormat.INT4)
    _check(inputs, prologue, _workspace(n, k, dtype), splits, n_valid=n - 3 if prologue == P.FINAL_NORM else None)


@pytest.mark.parametrize("prologue", [P.NONE, P.FINAL_NORM], ids=lambda p: p.name)
def test_int4_gemv_on_16_row_blocks(prologue, monkeypatch, nan_allocations):
    """M = 1 takes two row blocks per program where the 16-row column blocks fill the GPU (planned here
    for 2 SMs): N = 40 is 3 blocks, the last one's second half past N (its loads clamped, never stored)."""
    monkeypatch.setattr(gemv_module, "_sm_count", lambda device: 2)
    assert gemv_plan(1, 40, 384, torch.bfloat16, 2, weight_format=WeightFormat.INT4).block_n == 16
    inputs = _Inputs(1, 40, 384, torch.bfloat16, weight_format=WeightFormat.INT4)
    _check(inputs, prologue, _workspace(40, 384, torch.bfloat16), None, n_valid=37 if prologue == P.FINAL_NORM else None)


def test_split_k_is_deterministic_and_partials_never_leak(nan_allocations):
    """Three slices of uneven length (K = 700: 6 steps of 128, the last ragged, 2 per slice), on a
    workspace whose partials start as NaN (nan_allocations), then again after poisoning them: bit-identical."""
    inputs = _Inputs(3, 40, 700, torch.float16)
    workspace = _workspace(40, 700, torch.float16)
    first = _check(inputs, P.SWIGLU, workspace, 3)
    workspace.partials.fill_(float("nan"))
    again, _, _ = inputs.run(P.SWIGLU, workspace, 3)
    assert torch.equal(first, again)
    _assert_workspace_reset(workspace)


def test_default_plan_splits_small_shapes(nan_allocations):
    """The plan (132 SMs under the interpreter) splits a 1-column-block launch into every K step
    (3 slices: 128, 128, 44), and the default workspace fits it."""
    plan = gemv_plan(4, 40, 300, torch.bfloat16, H100_SMS)
    assert (plan.col_blocks, plan.splits, plan.k_split) == (1, 3, 128)
    inputs = _Inputs(4, 40, 300, torch.bfloat16)
    _check(inputs, P.NONE, decode_gemv_workspace([(40, 300)], torch.bfloat16, DEVICE), None)


@pytest.mark.parametrize("weight_format, m, hidden, inter, vocab", [
    (WeightFormat.DENSE, 2, 70, 100, 50), (WeightFormat.INT4, 1, 128, 256, 56), (WeightFormat.INT4, 3, 128, 256, 56)],
    ids=["dense", "int4-M1", "int4-M3"])
def test_one_workspace_serves_a_decode_step(weight_format, m, hidden, inter, vocab, nan_allocations):
    """qkv (embedding), o, gate_up, down and lm_head of a tiny layer in turn on one workspace, as a
    decode step runs them: each matches the unfused sequence, and the workspace ends as it began.
    int4: every weight quantised, lm_head included (a decode step of an int4 model with quantize_lm_head)."""
    dtype, qkv = torch.bfloat16, 3 * hidden
    workspace = decode_gemv_workspace([(qkv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter),
                                       (vocab, hidden)], dtype, DEVICE)
    embed = _randn(vocab, hidden, dtype=dtype)
    ids = torch.tensor([5, 49, 0][:m], device=DEVICE)
    w = {name: _randn(n, k, dtype=dtype, scale=k ** -0.5) for name, n, k in
         (("qkv", qkv, hidden), ("o", hidden, hidden), ("gate_up", 2 * inter, hidden), ("down", hidden, inter),
          ("lm", vocab, hidden))}
    if weight_format == WeightFormat.INT4:
        w = {name: quantize_int4(weight) for name, weight in w.items()}
    norm_attn, norm_ff, norm_final = ((0.5 + torch.rand(hidden, device=DEVICE)).to(dtype) for _ in range(3))
    x, h = (torch.empty(m, hidden, dtype=dtype, device=DEVICE) for _ in range(2))
    next_ids = torch.empty(m, dtype=torch.int64, device=DEVICE)

    qkv_out = decode_gemv_embedding(ids, embed, w["qkv"], workspace, x)
    attn = qkv_out[:, :hidden]  # stands in for attention's output
    o = decode_gemv(attn, w["o"], workspace)
    gate_up = decode_gemv_residual_norm(x, o, norm_attn, w["gate_up"], workspace, h, eps=EPS)
    down = decode_gemv_swiglu(gate_up, w["down"], workspace)
    logits = decode_gemv_lm_head(h, down, norm_ff, norm_final, w["lm"], workspace, eps=EPS, next_ids=next_ids,
                                 n_valid=45)

    # The unfused sequence on the same intermediate values (each launch is checked against float64 above).
    def close(a, b):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    ref_qkv, ref_x = decode_gemv_embedding_reference(ids, embed, w["qkv"])
    close(qkv_out, ref_qkv)
    assert torch.equal(x, ref_x)
    close(o, decode_gemv_reference(attn, w["o"]))
    ref_gate_up, ref_h = decode_gemv_residual_norm_reference(x, o, norm_attn, w["gate_up"], EPS)
    close(gate_up, ref_gate_up)
    close(h, ref_h)
    close(down, decode_gemv_swiglu_reference(gate_up, w["down"]))
    close(logits, decode_gemv_lm_head_reference(h, down, norm_ff, norm_final, w["lm"], EPS)[0])
    assert torch.equal(next_ids, logits[:, :45].float().argmax(-1))
    _assert_workspace_reset(workspace)


def test_residual_out_written_exactly_once(monkeypatch):
    """Count the interpreter's stores per address of residual_out: column block 0's slices cover
    it once, the other column blocks never store there (split into 2 slices)."""
    from triton.runtime import interpreter

    inputs = _Inputs(3, 70, 300, torch.float32)
    residual_out = torch.zeros(3, 300, device=DEVICE)
    first, last = residual_out.data_ptr(), residual_out.data_ptr() + residual_out.numel() * 4
    writes = []
    store = interpreter.InterpreterBuilder.create_masked_store

    def counting_store(self, ptrs, value, mask, cache_modifier, eviction_policy):
        addresses = ptrs.data[mask.data.astype(bool)] if mask is not None else ptrs.data.ravel()
        writes.append(addresses[(addresses >= first) & (addresses < last)].astype(np.int64))
        return store(self, ptrs, value, mask, cache_modifier, eviction_policy)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", counting_store)
    decode_gemv_residual_norm(inputs.residual, inputs.delta, inputs.norm_weight, inputs.weight,
                              _workspace(70, 300, torch.float32), residual_out, eps=EPS, num_splits=2)
    counts = np.bincount((np.concatenate(writes) - first) // 4, minlength=residual_out.numel())
    assert counts.min() == 1 and counts.max() == 1, f"writes per element range {counts.min()}..{counts.max()}"


# The 1B decode step's projections (N, K) per prologue; lm_head's vocabulary cut to 8192 rows so the
# interpreter can run it (the column blocks are independent; the argmax still spans 1024 of them).
PUBLISHED_1B = {P.EMBEDDING: (6144, 2048), P.RESIDUAL_NORM: (16384, 2048), P.NONE: (2048, 2048),
                P.SWIGLU: (2048, 8192), P.FINAL_NORM: (8192, 2048)}


@pytest.mark.heavy
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("prologue", list(PUBLISHED_1B), ids=[p.name for p in PUBLISHED_1B])
def test_published_widths(prologue, m, nan_allocations):
    """bf16 at the 1B widths with the plan's own split (batch 16 splits o_proj and down_proj 6 ways)."""
    n, k = PUBLISHED_1B[prologue]
    inputs = _Inputs(m, n, k, torch.bfloat16, vocab=1000)
    workspace = decode_gemv_workspace([(n, k)], torch.bfloat16, DEVICE)
    _check(inputs, prologue, workspace, None, n_valid=n - 100 if prologue == P.FINAL_NORM else None)


@pytest.mark.cuda
def test_split_k_and_argmax_repeat_bit_for_bit_on_a_gpu():
    """On a GPU the slices and column blocks really race: 200 calls of a 6-way split (1B o_proj at
    batch 16) and of the lm_head argmax give one result, and leave the workspace reset."""
    inputs = _Inputs(16, 2048, 2048, torch.bfloat16)
    workspace = decode_gemv_workspace([(2048, 2048)], torch.bfloat16, DEVICE)
    assert gemv_plan(16, 2048, 2048, torch.bfloat16, torch.cuda.get_device_properties(0).multi_processor_count).splits > 1
    first = [inputs.run(P.NONE, workspace, None)[0], *inputs.run(P.FINAL_NORM, workspace, None, n_valid=2000)[::2]]
    for _ in range(200):
        again = [inputs.run(P.NONE, workspace, None)[0], *inputs.run(P.FINAL_NORM, workspace, None, n_valid=2000)[::2]]
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    torch.cuda.synchronize()
    _assert_workspace_reset(workspace)


# --------------------------------------------------------------------------- argmax


@triton.jit
def _keys_kernel(keys_ptr, values_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    keys = gemv_module._argmax_keys(tl.load(values_ptr + offs)[None, :], offs, N)
    tl.store(keys_ptr + offs[None, :], keys)


def _argmax_by_keys(values: torch.Tensor) -> int:
    keys = torch.empty(1, values.numel(), dtype=torch.int64, device=DEVICE)
    _keys_kernel[(1,)](keys, values, values.numel())
    return int(0x7FFFFFFF - (keys.max().item() & 0x7FFFFFFF))


@pytest.mark.parametrize("case", ["ties", "negative", "signed_zeros", "nan", "inf"])
def test_argmax_keys_follow_torch_argmax(case):
    """The int64 keys pick what torch.argmax picks: the first maximum, -0.0 == +0.0, NaN above all."""
    values = -torch.rand(64, device=DEVICE) - 1.0
    if case == "ties":
        values[[9, 3, 40]] = 2.5
    elif case == "negative":
        values[[17, 50]] = -0.75
    elif case == "signed_zeros":
        values[5], values[2], values[30] = 0.0, -0.0, 0.0
    elif case == "nan":
        values[[44, 12]] = float("nan")
        values[3] = float("inf")
    else:
        values[[20, 7]] = float("inf")
    assert _argmax_by_keys(values) == values.argmax().item()


@pytest.mark.parametrize("m", [1, 3])
def test_argmax_ties_and_n_valid(m, nan_allocations):
    """Columns 7 and 71 get the same weights as the row's own input direction (so they lead every
    row) at the same position of their 64- and 8-wide column blocks (so their sums round alike):
    the exact tie goes to column 7; column 85 is larger still, but past n_valid = 80."""
    inputs = _Inputs(m, 90, 600, torch.float32)
    for name in ("residual", "delta"):  # identical rows: one leading direction for all of them
        getattr(inputs, name)[:] = getattr(inputs, name)[0]
    h = inputs.residual[0] + gemv_module.rms_norm_reference(inputs.delta[0], inputs.norm_weight, EPS)
    direction = gemv_module.rms_norm_reference(h, inputs.final_norm_weight, EPS)
    inputs.weight[7] = inputs.weight[71] = direction / direction.norm()
    inputs.weight[85] = 2 * inputs.weight[7]
    workspace = _workspace(90, 600, torch.float32)
    for splits in (1, 2):
        out, _, next_ids = inputs.run(P.FINAL_NORM, workspace, splits, n_valid=80)
        assert torch.equal(out[:, 7], out[:, 71]), "the tie is not exact"
        assert (out[:, 85] > out[:, 7]).all() and (out[:, 7] >= out[:, :80].max(-1).values).all()
        assert next_ids.tolist() == [7] * m
        _assert_workspace_reset(workspace)


# --------------------------------------------------------------------------- errors, ops, plan


def test_bad_inputs():
    inputs = _Inputs(2, 40, 64, torch.float32)
    ws = _workspace(40, 64, torch.float32)
    x, w = inputs.x, inputs.weight
    out_buf = torch.empty(2, 64, device=DEVICE)
    with pytest.raises(TypeError, match="x dtype torch.float16 != weight dtype torch.float32"):
        decode_gemv(x.half(), w, ws)
    with pytest.raises(TypeError, match="weight must be float32/float16/bfloat16"):
        decode_gemv(x, w.double(), ws)
    with pytest.raises(ValueError, match=r"x must be \[M, width\] with 1 <= M <= 16"):
        decode_gemv(torch.randn(17, 64, device=DEVICE), w, ws)
    with pytest.raises(ValueError, match=r"x must have shape \[2, 64\]"):
        decode_gemv(torch.randn(2, 63, device=DEVICE), w, ws)
    with pytest.raises(ValueError, match="x must have a contiguous last dimension"):
        decode_gemv(torch.randn(64, 2, device=DEVICE).T, w, ws)
    with pytest.raises(ValueError, match="weight must have a contiguous last dimension"):
        decode_gemv(x, torch.randn(64, 40, device=DEVICE).T, ws)
    with pytest.raises(TypeError, match="workspace must be a DecodeGemvWorkspace"):
        decode_gemv(x, w, tuple(ws))
    with pytest.raises(ValueError, match=r"workspace.partials holds 1 elements .* shapes including \(40, 300\)"):
        decode_gemv(torch.randn(2, 300, device=DEVICE), torch.randn(40, 300, device=DEVICE),
                    decode_gemv_workspace([(40, 32)], torch.float32, DEVICE), num_splits=2)
    with pytest.raises(ValueError, match=r"num_splits must be an int in 1..2 \(the K steps"):
        decode_gemv(x, w, ws, num_splits=3)  # K = 64 in float32 steps of 32
    with pytest.raises(ValueError, match="residual_out must not overlap residual"):
        decode_gemv_residual_norm(inputs.residual, inputs.delta, inputs.norm_weight, w, ws, inputs.residual, eps=EPS)
    with pytest.raises(ValueError, match="residual_out must not overlap embed"):
        decode_gemv_embedding(inputs.ids, inputs.embed, w, ws, inputs.embed[:2])
    with pytest.raises(ValueError, match=r"norm_weight must have shape \[64\]"):
        decode_gemv_residual_norm(inputs.residual, inputs.delta, inputs.norm_weight[:32], w, ws, out_buf, eps=EPS)
    with pytest.raises(TypeError, match="eps must be a positive float"):
        decode_gemv_residual_norm(inputs.residual, inputs.delta, inputs.norm_weight, w, ws, out_buf, eps=None)
    with pytest.raises(TypeError, match="ids must be an int64 tensor"):
        decode_gemv_embedding(inputs.ids.int(), inputs.embed, w, ws, out_buf)
    with pytest.raises(ValueError, match=r"gate_up must have shape \[2, 128\]"):
        decode_gemv_swiglu(inputs.x, w, ws)
    with pytest.raises(ValueError, match="n_valid must be an int in 1..N = 1..40"):
        decode_gemv_lm_head(inputs.residual, inputs.delta, inputs.norm_weight, inputs.norm_weight, w, ws, eps=EPS,
                            n_valid=41)
    with pytest.raises(TypeError, match="next_ids must be an int64 tensor"):
        decode_gemv_lm_head(inputs.residual, inputs.delta, inputs.norm_weight, inputs.norm_weight, w, ws, eps=EPS,
                            next_ids=torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="workspace.counters holds 1 elements"):
        decode_gemv(x, w, ws._replace(counters=torch.zeros(1, dtype=torch.int32, device=DEVICE)))
    with pytest.raises(ValueError, match="on meta but weight is on"):
        decode_gemv(x, w, ws._replace(best=ws.best.to("meta")))


def test_registered_ops():
    """The op takes a dense weight as (weight, None, None) and an int4 one as (packed, scales, zeros)."""
    inputs = _Inputs(2, 40, 64, torch.float32)
    ws = _workspace(40, 64, torch.float32)
    out = torch.ops.olmo2_fast.decode_gemv(inputs.x, inputs.weight, None, None, *ws, 1)
    assert torch.equal(out, decode_gemv(inputs.x, inputs.weight, ws, num_splits=1))
    int4 = _Inputs(1, 40, 128, torch.float32, weight_format=WeightFormat.INT4)
    qw = int4.weight
    out = torch.ops.olmo2_fast.decode_gemv(int4.x, qw.packed, qw.scales, qw.zeros, *ws, 1)
    assert torch.equal(out, decode_gemv(int4.x, qw, ws))


def test_ops_on_meta_and_fake_tensors_and_launch_options():
    """Compiled (not interpreted) kernels: every op's shape inference on meta tensors, a public
    launcher (validation included) on fake tensors, and what a launch hands Triton once PDL is on:
    USE_PDL and launch_pdl both reach JITFunction.run through triton_op + wrap_triton (recorded, not run)."""
    run_without_interpreter("""
import torch
import triton.runtime.jit as jit
from torch._subclasses.fake_tensor import FakeTensorMode
from olmo2_fast.kernels import decode_gemv as g
def ws(device):
    return (torch.zeros(600, dtype=torch.int32, device=device), torch.empty(4096, device=device),
            torch.zeros(16, dtype=torch.int64, device=device))
m, n, k = 3, 4096, 2048
bf = dict(dtype=torch.bfloat16, device="meta")
w, rows, vec = torch.empty(n, k, **bf), torch.empty(m, k, **bf), torch.empty(k, **bf)
ops = torch.ops.olmo2_fast
int4 = (torch.empty(n // 8, k // 32, 8, 4, dtype=torch.int32, device="meta"), torch.empty(k // 128, n, **bf),
        torch.empty(k // 128, n, **bf))
outs = [ops.decode_gemv(rows, w, None, None, *ws("meta"), 1),
        ops.decode_gemv_embedding(torch.zeros(m, dtype=torch.int64, device="meta"), torch.empty(100, k, **bf), w,
                                  None, None, *ws("meta"), torch.empty(m, k, **bf), 1),
        ops.decode_gemv_residual_norm(rows, rows, vec, w, None, None, *ws("meta"), torch.empty(m, k, **bf), 1e-6, 1),
        ops.decode_gemv_swiglu(torch.empty(m, 2 * k, **bf), w, None, None, *ws("meta"), 1),
        ops.decode_gemv_lm_head(rows, rows, vec, vec, w, None, None, *ws("meta"),
                                torch.empty(m, dtype=torch.int64, device="meta"), 1e-6, n - 10, 1),
        ops.decode_gemv(rows, *int4, *ws("meta"), 1),
        ops.decode_gemv_lm_head(rows, rows, vec, vec, *int4, *ws("meta"), None, 1e-6, n, 1)]
for out in outs:
    assert out.shape == (m, n) and out.dtype == torch.bfloat16 and out.device.type == "meta", out
with FakeTensorMode() as mode:
    fake = lambda *shape: mode.from_tensor(torch.zeros(*shape))
    workspace = g.DecodeGemvWorkspace(*(mode.from_tensor(t) for t in ws("cpu")))
    out = g.decode_gemv_residual_norm(fake(2, 64), fake(2, 64), fake(64), fake(40, 64), workspace, fake(2, 64), eps=1e-6)
assert out.shape == (2, 40)

seen = []
jit.JITFunction.run = lambda self, *args, grid, warmup, **kwargs: seen.append((grid, kwargs))
g.pdl_enabled = lambda device: True
g.decode_gemv(torch.zeros(1, 2048), torch.zeros(2048, 2048), g.decode_gemv_workspace([(2048, 2048)], torch.float32, "cpu"))
(grid, kwargs), = seen
assert tuple(grid) == (256, 1), grid
assert kwargs["launch_pdl"] is True and kwargs["USE_PDL"] is True and kwargs["num_warps"] == 4, kwargs
""")


def _empty_int4(n, k, dtype):
    """A full-size Int4Weight of untouched torch.empty tensors (for recorded launches only)."""
    return Int4Weight(torch.empty(n // 8, k // 32, 8, 4, dtype=torch.int32, device=DEVICE),
                      torch.empty(k // 128, n, dtype=dtype, device=DEVICE), torch.empty(k // 128, n, dtype=dtype,
                                                                                         device=DEVICE), (n, k))


def _decode_step_launches(preset, rows, weight_format=WeightFormat.DENSE):
    """The five GEMV launches of one decode step at a published width (full-size torch.empty weights,
    never touched: the recorder does not run the kernels); int4: every projection and lm_head."""
    c = PRESETS[preset]
    h, i, qkv, vocab = c.hidden_size, c.intermediate_size, c.q_width + 2 * c.kv_width, c.vocab_size
    dtype = torch.bfloat16
    shapes = {"qkv": (qkv, h), "o": (h, c.q_width), "gate_up": (2 * i, h), "down": (h, i), "lm_head": (vocab, h)}
    if weight_format == WeightFormat.INT4:
        weights = {name: _empty_int4(n, k, dtype) for name, (n, k) in shapes.items()}
    else:
        weights = {name: torch.empty(n, k, dtype=dtype, device=DEVICE) for name, (n, k) in shapes.items()}
    workspace = decode_gemv_workspace(shapes.values(), dtype, DEVICE)
    empty = lambda *shape: torch.empty(*shape, dtype=dtype, device=DEVICE)  # noqa: E731
    ids = torch.zeros(rows, dtype=torch.int64, device=DEVICE)
    with record_launches() as plan:
        x, hidden = empty(rows, h), empty(rows, h)
        decode_gemv_embedding(ids, empty(vocab, h), weights["qkv"], workspace, x)          # layer 0
        decode_gemv_residual_norm(hidden, empty(rows, h), empty(h), weights["qkv"], workspace, x, eps=EPS)
        decode_gemv(empty(rows, c.q_width), weights["o"], workspace)
        decode_gemv_residual_norm(x, empty(rows, h), empty(h), weights["gate_up"], workspace, hidden, eps=EPS)
        decode_gemv_swiglu(empty(rows, 2 * i), weights["down"], workspace)
        decode_gemv_lm_head(hidden, empty(rows, h), empty(h), empty(h), weights["lm_head"], workspace, eps=EPS,
                            next_ids=ids, n_valid=100278)
    return plan


@pytest.mark.parametrize("weight_format", list(WeightFormat), ids=lambda f: f.name.lower())
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_decode_launch_fills_an_h100_at_batch_1(preset, weight_format):
    """Recorded, not executed: each GEMV of a batch-1 decode step has >= 132 programs, with no torch
    ops and no host sync beside the launches; batch 16 too (split-K where the column blocks fall short).
    Dense and int4 weights (a quantised lm_head included)."""
    for rows in (1, DECODE_MAX_ROWS):
        plan = _decode_step_launches(preset, rows, weight_format)
        assert [launch.kernel for launch in plan.launches] == ["_decode_gemv_kernel"] * 6
        assert all(launch.constexprs["WEIGHT_FORMAT"] == weight_format for launch in plan.launches)
        assert plan.torch_ops == [] and plan.host_syncs == []
        programs = [launch.programs for launch in plan.launches]
        print(f"{preset} {weight_format.name.lower()} batch {rows}: programs per launch "
              f"(qkv0, qkv, o, gate_up, down, lm_head) {programs}")
        assert min(programs) >= H100_SMS, programs


def test_plan_at_published_widths():
    """The grid table the README quotes (H100, bf16): split-K only where the column blocks fall short."""
    def grid(m, n, k, weight_format=WeightFormat.DENSE):
        plan = gemv_plan(m, n, k, torch.bfloat16, H100_SMS, weight_format=weight_format)
        return plan.col_blocks, plan.splits
    assert grid(1, 2048, 2048) == (256, 1)          # 1B o_proj, batch 1: 256 column blocks of 8
    assert grid(1, 100352, 2048) == (12544, 1)      # lm_head
    assert grid(16, 6144, 2048) == (96, 2)          # 1B qkv, batch 16: blocks of 64, 2 K slices
    assert grid(16, 2048, 2048) == (32, 6)          # 1B o_proj: 5 wanted, 16 steps -> 6 slices of <= 3
    assert grid(16, 2048, 8192) == (32, 6)          # 1B down_proj
    assert grid(16, 4096, 11008) == (64, 4)         # 7B down_proj (86 steps, ragged)
    assert grid(16, 5120, 27648) == (80, 2)         # 32B down_proj
    assert grid(16, 27648 * 2, 5120) == (864, 1)    # 32B gate_up
    int4 = WeightFormat.INT4  # M = 1: 16-row blocks where they fill the GPU, else 8 (1B o_proj, down_proj)
    assert grid(1, 12288, 4096, int4) == (768, 1)   # 7B qkv
    assert grid(1, 4096, 11008, int4) == (256, 1)   # 7B down_proj
    assert grid(1, 2048, 2048, int4) == (256, 1)    # 1B o_proj
    assert grid(1, 100352, 2048, int4) == (6272, 1)  # lm_head
    assert grid(16, 4096, 11008, int4) == (64, 4)   # batch 16: the dense dot plan
    assert [gemv_plan(1, 4096, k, torch.bfloat16, H100_SMS, weight_format=int4).num_warps
            for k in (2048, 4096, 5120, 11008, 13824)] == [2, 4, 2, 4, 4]  # steps of 1024 per warp


def test_cost():
    # 7B o_proj at batch 1 in bf16: weights, x in, out.
    assert decode_gemv_cost(1, 4096, 4096, torch.bfloat16) == Cost(
        bytes=2 * (4096 * 4096 + 4096 + 4096), flops=2 * 4096 * 4096)
    # int4: packed codes (half a byte a weight), a bf16 scale and zero per 128 weights.
    assert decode_gemv_cost(1, 4096, 4096, torch.bfloat16, weight_format=WeightFormat.INT4) == Cost(
        bytes=4096 * 4096 // 2 + 2 * 2 * 4096 * 4096 // 128 + 2 * (4096 + 4096), flops=2 * 4096 * 4096)
    # residual + norm: residual and delta in, norm weight once, residual_out written.
    assert decode_gemv_cost(2, 96, 64, torch.float32, Prologue.RESIDUAL_NORM) == Cost(
        bytes=4 * (96 * 64 + 2 * (2 * 64 + 64 + 96) + 64), flops=2 * 2 * 96 * 64 + 2 * 5 * 64)
    # lm_head with the argmax: two norm weights, next ids (int64) written.
    assert decode_gemv_cost(1, 100, 8, torch.bfloat16, Prologue.FINAL_NORM, argmax=True) == Cost(
        bytes=2 * (100 * 8 + 2 * 8 + 100 + 2 * 8) + 8, flops=2 * 100 * 8 + 9 * 8)


# --------------------------------------------------------------------------- GPU compile

KERNEL = "olmo2_fast.kernels.decode_gemv:_decode_gemv_kernel"
_INDEX_POINTERS = {"ids_ptr": "*i64", "next_ids_ptr": "*i64", "best_ptr": "*i64", "counters_ptr": "*i32",
                   "partials_ptr": "*fp32"}


def _signature(act, weight_format):
    def kind(name, param):
        if param.annotation is tl.constexpr:
            return "constexpr"
        if name == "w_ptr" and weight_format == WeightFormat.INT4:
            return "*i32"
        if name.endswith("_ptr"):
            return _INDEX_POINTERS.get(name, f"*{act}")
        return "fp32" if name == "eps" else "i32"
    params = inspect.signature(gemv_module._decode_gemv_kernel.fn, eval_str=True).parameters
    return {name: kind(name, param) for name, param in params.items()}


def _step_launches(c):
    """(N, K, prologue, argmax) of every GEMV launch of a decode step of config c."""
    h, i, qkv = c.hidden_size, c.intermediate_size, c.q_width + 2 * c.kv_width
    return [(qkv, h, P.EMBEDDING, False), (qkv, h, P.RESIDUAL_NORM, False), (h, c.q_width, P.NONE, False),
            (2 * i, h, P.RESIDUAL_NORM, False), (h, i, P.SWIGLU, False), (c.vocab_size, h, P.FINAL_NORM, True)]


def _specs(dtypes, capability, weight_format=WeightFormat.DENSE, presets=tuple(PRESETS), rows=None):
    """Every distinct config the launcher picks for a decode step at the published widths (of `presets`),
    batch 1..16 (or `rows`)."""
    act_names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    chosen = {}
    for dtype in dtypes:
        for preset in presets:
            for m in rows or range(1, DECODE_MAX_ROWS + 1):
                for n, k, prologue, argmax in _step_launches(PRESETS[preset]):
                    plan = gemv_plan(m, n, k, dtype, H100_SMS, weight_format=weight_format)
                    constexprs = dict(
                        PROLOGUE=prologue.value, WEIGHT_FORMAT=weight_format.value, ARGMAX=argmax,
                        SPLIT=plan.splits > 1, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
                        STATS_BLOCK_K=plan.stats_block_k, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                        USE_PDL=capability >= 90)
                    key = (act_names[dtype], tuple(constexprs.items()), plan.num_warps, plan.num_stages, plan.maxnreg)
                    chosen[key] = (prologue, plan)
    specs = []
    for (act, constexprs, warps, stages, maxnreg), (prologue, plan) in chosen.items():
        signature = _signature(act, weight_format)
        aligned = [a for a, t in signature.items() if t.startswith("*") or a in ("N", "K", "K_SPLIT")
                   or a.startswith("stride")]
        constexprs = dict(constexprs)
        name = (f"{act}{' int4' if weight_format == WeightFormat.INT4 else ''} {prologue.name} M{plan.block_m} "
                f"N{plan.block_n} K{plan.block_k} w{warps} {'split ' if constexprs['SPLIT'] else ''}"
                f"{'pdl' if constexprs['USE_PDL'] else 'no-pdl'}")
        spec = kernel_spec(KERNEL, signature, constexprs, aligned=aligned, num_warps=warps, num_stages=stages, name=name)
        specs.append(dict(spec, options={} if maxnreg is None else {"maxnreg": maxnreg}))
    return specs


def _assert_clean(reports):
    problems = []
    for r in reports:
        where = f"{r['name']} sm_{r['capability']}"
        constexprs = r["constexprs"]
        if r["stack"] or r["local"]:
            problems.append(f"{where}: spills (REG {r['regs']} STACK {r['stack']} LOCAL {r['local']})")
        if r["shared"] > SHARED_LIMIT[r["capability"]]:
            problems.append(f"{where}: shared memory {r['shared']} > {SHARED_LIMIT[r['capability']]}")
        if not r["vector_loads"]:
            problems.append(f"{where}: no 16-byte loads")
        # float32 dots are exact ("ieee"): FMAs by design, no tensor-core instruction to find.
        if constexprs["BLOCK_M"] > 1 and constexprs["DOT_PRECISION"] != "ieee" and not (r["mma"] or r["wgmma"]):
            problems.append(f"{where}: M >= 2 without mma/wgmma")
        if r["griddepcontrol"] != constexprs["USE_PDL"]:
            problems.append(f"{where}: griddepcontrol {'missing' if constexprs['USE_PDL'] else 'present'}")
        arrivals = constexprs["SPLIT"] + constexprs["ARGMAX"]  # counters each program increments
        if r["acq_rel_atomics"] != arrivals or (arrivals and not r["release_after_barrier"]):
            problems.append(f"{where}: {r['acq_rel_atomics']} acq_rel gpu-scope atomics (want {arrivals}), "
                            f"barrier before each release: {r['release_after_barrier']}")
    assert not problems, "\n".join(problems)


def _compile(specs, capabilities):
    reports = compile_for_gpu(specs, capabilities)
    for spec, r in zip([s for s in specs for _ in capabilities], reports):
        r["constexprs"], r["num_warps"] = spec["constexprs"], spec["num_warps"]
    return reports


@pytest.fixture(scope="module")
def bf16_reports():
    """Compile reports of every bf16 config, sm_80 without PDL and sm_90 with it (one subprocess)."""
    return {capability: _compile(_specs([torch.bfloat16], capability), (capability,)) for capability in (80, 90)}


@pytest.mark.parametrize("capability", [80, 90])
def test_every_bf16_config_compiles_clean(bf16_reports, capability):
    """No spills, shared memory in bounds, 16-byte loads, mma when M >= 2, griddepcontrol iff USE_PDL
    (sm_90), one acq_rel gpu-scope atomic per counter a program bumps, after a CTA barrier."""
    for r in bf16_reports[capability]:
        print(f"{r['name']} sm_{r['capability']}: REG {r['regs']} shared {r['shared']}")
    _assert_clean(bf16_reports[capability])


@pytest.mark.heavy
@pytest.mark.parametrize("capability", [80, 90])
def test_every_fp16_and_fp32_config_compiles_clean(capability):
    """As the bf16 test, for the dtypes a GPU runs less (float32 dots on FMAs)."""
    _assert_clean(_compile(_specs([torch.float16, torch.float32], capability), (capability,)))


def _multiply_loop(report) -> dict:
    """The innermost SASS loop that multiplies the weights: the most tensor-core instructions
    (HGMMA / HMMA) where there are any, else the most FFMA (the norm passes' loops have FFMA too)."""
    def count(loop, prefixes):
        return sum(n for op, n in loop["opcodes"].items() if op.startswith(prefixes))
    return max(report["sass_loops"], key=lambda loop: (count(loop, ("HGMMA", "HMMA")), count(loop, ("FFMA",))))


def _per_weight(report) -> float:
    """Instructions of the multiply loop per weight one thread handles per step, printed with the
    loop's commonest opcodes."""
    constexprs = report["constexprs"]
    weights = constexprs["BLOCK_N"] * constexprs["BLOCK_K"] // (32 * report["num_warps"])
    loop = _multiply_loop(report)
    figure = loop["instructions"] / weights
    print(f"{report['name']} sm_{report['capability']}: REG {report['regs']}, {loop['instructions']} instructions / "
          f"{weights} weights = {figure:.2f} per weight; {dict(sorted(loop['opcodes'].items(), key=lambda kv: -kv[1])[:6])}")
    return figure


def test_sass_instructions_per_weight(bf16_reports):
    """The multiply loop of every sm_90 bf16 config: SASS instructions per weight one thread handles
    per step (an H100 issues ~19 per weight at its HBM rate in bf16). Asserted for the plain M = 1 GEMV
    and, looser, for every prologue."""
    figures = {}
    for report in bf16_reports[90]:
        figures[report["name"]] = _per_weight(report)
        constexprs = report["constexprs"]
        if constexprs["BLOCK_M"] == 1:  # one FFMA per weight: nothing is recomputed
            weights = constexprs["BLOCK_N"] * constexprs["BLOCK_K"] // (32 * report["num_warps"])
            assert _multiply_loop(report)["opcodes"].get("FFMA", 0) == weights, report["name"]
    assert figures["bf16 NONE M1 N8 K1024 w4 pdl"] <= 4.5
    assert max(figures.values()) <= 10, figures


# int4 in CI: the batch-1 configs of the 1B and 7B decode steps (8- and 16-row blocks, 2 and 4 warps;
# 13B/32B batch 1 takes the same kinds), sm_90 bf16; the rest of the int4 configs (batch 2..16,
# every width, sm_80, fp16 / fp32) compile in the heavy run.
@pytest.fixture(scope="module")
def int4_reports():
    return _compile(_specs([torch.bfloat16], 90, WeightFormat.INT4, presets=("1b", "7b"), rows=[1]), (90,))


def test_int4_batch_1_configs_compile_clean(int4_reports):
    _assert_clean(int4_reports)


def test_int4_sass_instructions_per_weight(int4_reports):
    """The int4 GEMV's multiply loop (M = 1, sm_90, bf16): at most 3.5 SASS instructions per weight with no
    prologue, the dequantisation included (an H100 issues ~4.4 per int4 weight at its HBM rate: 3.35 TB/s
    over 0.53 bytes a weight, against 132 SMs x 4 warp-instructions x 32 lanes x 1.75 GHz). The loop:
    3 shifts and 8 LOP3s per 8 codes, one FFMA per weight, per unit the x sums and per row the scale."""
    figures = {report["name"]: _per_weight(report) for report in int4_reports}
    plain = {name: figure for name, figure in figures.items() if " NONE " in name}
    assert len(plain) == 2 and max(plain.values()) <= 3.5, plain
    assert max(figures.values()) <= 5.5, figures


@pytest.mark.heavy
@pytest.mark.parametrize("capability", [80, 90])
def test_every_int4_config_compiles_clean(capability):
    """Every int4 config the launcher picks at the published widths, batch 1..16, in every dtype; sm_90
    prints the instructions per weight (for all 16 rows at M >= 2, where the tile is dequantised to the
    dtype for the dot: bounded at 12)."""
    reports = _compile(_specs(ALL_DTYPES, capability, WeightFormat.INT4), (capability,))
    _assert_clean(reports)
    if capability == 90:
        figures = [_per_weight(r) for r in reports if r["constexprs"]["BLOCK_M"] > 1 and "bf16" in r["name"]]
        assert max(figures) <= 12, figures

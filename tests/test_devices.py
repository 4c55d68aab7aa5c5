"""Device placement: kernels launch on their tensors' device, decode positions never come from the host.

On a CPU: every launch of every launcher happens inside `launch_device(<its tensors' device>)`
(counted through Triton's interpreter), and the generation loop builds no tensor from host
values after the prefill. On GPUs: a model on cuda:1 runs while device 0 is current (needs
two cards), and a decode step copies nothing from pageable host memory.
"""
import contextlib

import pytest
import torch
import triton.runtime.interpreter as interpreter

from checkpoints import make_checkpoint
from harness import DEVICE, INTERPRETED
from olmo2_fast import OLMo2
from olmo2_fast.kernels import _launch, attention, int4_matmul, qk_norm_rope, rmsnorm, swiglu
from olmo2_fast.kernels.int4_format import quantize_int4

SMALL_MODEL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2)  # head_dim 16, the smallest the attention kernels take
PROMPTS = [[5, 6, 7], [8, 9]]


def test_launch_device_is_a_cuda_device_guard_and_a_no_op_elsewhere():
    assert isinstance(_launch.launch_device(torch.device("cpu")), contextlib.nullcontext)
    guard = _launch.launch_device(torch.device("cuda", 1))  # built, not entered: no CUDA needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def _int4_case(m):
    weight = quantize_int4(torch.randn(64, 256))  # K = 256: two groups, so M = 1 splits K (a reduce launch too)
    return lambda: int4_matmul.int4_matmul(torch.randn(m, 256), weight)


def _qk_norm_rope_case():
    qkv = torch.randn(3, (2 + 2) * 16)
    caches = torch.zeros(2, 2, 1, 8, 16)
    return lambda: qk_norm_rope.qk_norm_rope(
        qkv, torch.rand(32), torch.rand(16), torch.tensor([0, 1, 0], dtype=torch.int32),
        torch.tensor([0, 0, 1], dtype=torch.int32), caches[0], caches[1], eps=1e-6, rope_theta=1e4)


def _attention_cases():
    q = torch.randn(2, 2, 16)
    k, v = torch.randn(2, 1, 8, 16), torch.randn(2, 1, 8, 16)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    return {
        "attention_prefill": lambda: attention.attention_prefill(q, k, v, torch.tensor([0, 1, 2], dtype=torch.int32),
                                                                 lens, 1),
        "attention_decode": lambda: attention.attention_decode(q, k, v, lens, num_splits=2),  # + the reduce launch
    }


LAUNCHERS = {
    "swiglu": (swiglu, lambda: swiglu.swiglu(torch.randn(3, 40))),
    "rmsnorm": (rmsnorm, lambda: rmsnorm.rmsnorm(torch.randn(3, 24), torch.rand(24), 1e-6)),
    "residual_rmsnorm": (rmsnorm, lambda: rmsnorm.residual_rmsnorm(torch.randn(3, 24), torch.randn(3, 24),
                                                                   torch.rand(24), 1e-6)),
    "qk_norm_rope": (qk_norm_rope, _qk_norm_rope_case()),
    **{name: (attention, case) for name, case in _attention_cases().items()},
    **{f"int4_matmul M={m}": (int4_matmul, _int4_case(m)) for m in (1, 3, 20, 65)},  # GEMV, dot, fixed GEMM, autotuned
}


@pytest.mark.skipif(not INTERPRETED, reason="watches launches through Triton's interpreter")
@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_every_launch_runs_under_its_tensors_device(name, monkeypatch):
    module, call = LAUNCHERS[name]
    entered, launches = [], []

    @contextlib.contextmanager
    def watched(device):
        entered.append(device)
        try:
            yield
        finally:
            entered.pop()

    real_launch = interpreter.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        launches.append(list(entered))
        return real_launch(self, *args, **kwargs)

    monkeypatch.setattr(module, "launch_device", watched)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch)
    call()
    assert launches, f"{name} launched nothing"
    assert all(devices == [torch.device("cpu")] for devices in launches), launches


def test_decode_steps_build_no_tensor_from_host_values(tmp_path, monkeypatch):
    """After the prefill, positions and lengths advance on the device: the number of tensors the
    loop builds from host data does not grow with the number of tokens."""
    model = OLMo2.from_pretrained(make_checkpoint(tmp_path, seed=4), device="cpu", backend="torch")
    model.tokenizer.eos_ids = ()  # every sequence runs to max_new_tokens
    built = []
    real_tensor = torch.tensor

    def counting(*args, **kwargs):
        built.append(args[0] if args else kwargs.get("data"))
        return real_tensor(*args, **kwargs)

    counts = []
    for new_tokens in (2, 7):
        built.clear()
        monkeypatch.setattr(torch, "tensor", counting)
        out = model.generate(PROMPTS, max_new_tokens=new_tokens, repetition_penalty=1.3)
        monkeypatch.setattr(torch, "tensor", real_tensor)
        assert [len(ids) for ids in out] == [new_tokens] * 2
        counts.append(len(built))
    assert counts[0] == counts[1], counts


# --------------------------------------------------------------------------- on GPUs


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_on_the_second_gpu_runs_while_the_first_is_current(tmp_path):
    path = make_checkpoint(tmp_path, seed=5, **SMALL_MODEL)
    expected = OLMo2.from_pretrained(path, device="cuda:0", dtype="float32", backend="triton",
                                     cuda_graphs=False).generate(PROMPTS, max_new_tokens=6)
    sampled = dict(max_new_tokens=6, temperature=0.9, top_k=20, seed=3)
    expected_sampled = OLMo2.from_pretrained(path, device="cuda:0", dtype="float32", backend="triton",
                                             cuda_graphs=False).generate(PROMPTS, **sampled)
    with torch.cuda.device(0):
        for graphs in (False, True):
            model = OLMo2.from_pretrained(path, device="cuda:1", dtype="float32", backend="triton", cuda_graphs=graphs)
            assert model.generate(PROMPTS, max_new_tokens=6) == expected
            assert model.generate(PROMPTS, **sampled) == expected_sampled
            assert model._cache.k.device == torch.device("cuda", 1)
        assert torch.cuda.current_device() == 0


@pytest.mark.cuda
def test_decode_steps_copy_nothing_from_pageable_host_memory(tmp_path):
    model = OLMo2.from_pretrained(make_checkpoint(tmp_path, seed=6, **SMALL_MODEL), device=DEVICE, backend="triton")
    model.tokenizer.eos_ids = ()
    model.generate(PROMPTS, max_new_tokens=4)  # capture the graphs first
    counts = []
    for new_tokens in (2, 9):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            model.generate(PROMPTS, max_new_tokens=new_tokens)
            torch.cuda.synchronize()
        counts.append(sum("Pageable" in e.name and "HtoD" in e.name for e in profile.events()))
    assert counts[0] > 0, "the prefill's pageable copies must show, or this test proves nothing"
    assert counts[0] == counts[1], f"pageable host-to-device copies grow with the tokens: {counts}"

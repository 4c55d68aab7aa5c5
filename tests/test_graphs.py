"""CUDA-graph mechanics (graphs.py) on any device: buckets, static buffers, padding, recapture, fallback.

The captured step here is a probe in plain PyTorch that writes each row's id into the cache
at (seq_ids, positions) and returns what it saw, so a test can tell exactly which inputs a
replay ran on and which cache slots it touched. On a CPU the recorder is the fake
(tests/fake_graphs.py); the `cuda` test runs the same probe through real CUDA graphs.
"""
import pytest
import torch

from checkpoints import config
from fake_graphs import CaptureViolation, FakeGraphRecorder, capture_rules
from harness import DEVICE
from olmo2_fast.cache import KVCache, StepBatch
from olmo2_fast.graphs import BUCKETS, CudaGraphRecorder, DecodeGraphs, bucket_for
from olmo2_fast.kernels import int4_matmul
from olmo2_fast.kernels.int4_format import quantize_int4

MAX_SEQ = 16
CONFIG = config(num_hidden_layers=1, hidden_size=16, num_attention_heads=1, num_key_value_heads=1)  # head_dim 16


def probe_step(batch: StepBatch, cache: KVCache) -> torch.Tensor:
    """Writes id + 1 into k[0, seq_ids, 0, positions, 0]; returns per row (id, position, kv_len, the sum of
    its cache row's first kv_len slots). Device ops only, like a real decode step."""
    k = cache.k
    k[0, batch.seq_ids.long(), 0, batch.positions.long(), 0] = batch.input_ids.to(k.dtype) + 1
    rows = batch.input_ids.shape[0]
    visible = torch.arange(cache.max_seq, device=k.device)[None, :] < batch.kv_lens[:, None]
    sums = (k[0, :rows, 0, :, 0] * visible).sum(-1)
    return torch.stack([batch.input_ids.to(k.dtype), batch.positions.to(k.dtype), batch.kv_lens.to(k.dtype), sums], 1)


def new_cache(rows: int) -> KVCache:
    cache = KVCache(CONFIG, rows, MAX_SEQ, torch.float32, DEVICE)
    cache.k.uniform_(-1, 1)  # stale data everywhere: a slot a replay must not touch keeps its value
    return cache


def decode_batch(ids, positions) -> StepBatch:
    return StepBatch.decode(torch.tensor(ids, device=DEVICE), torch.tensor(positions, dtype=torch.int32, device=DEVICE),
                            list(positions))


def written_slots(before: KVCache, after: KVCache) -> set[tuple[int, int]]:
    changed = (before.k != after.k).any(-1)[0, :, 0]  # (rows, max_seq)
    return {tuple(index) for index in changed.nonzero().tolist()}


def copy_of(cache: KVCache) -> KVCache:
    twin = KVCache(CONFIG, cache.max_batch, cache.max_seq, torch.float32, DEVICE)
    twin.k.copy_(cache.k)
    return twin


def test_bucket_for():
    assert [bucket_for(b) for b in (1, 2, 3, 5, 9, 16, 17, 33, 64)] == [1, 2, 4, 8, 16, 16, 32, 64, 64]
    assert bucket_for(65) == 65 and bucket_for(1000) == 1000  # no bucket: the step runs eagerly, unpadded
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="decode batch must be a positive int"):
            bucket_for(bad)


def test_no_bucket_launches_an_autotuned_int4_kernel():
    # int4_matmul autotunes only above FIXED_CONFIG_MAX_M rows; a decode step has at most BUCKETS[-1].
    assert BUCKETS[-1] <= int4_matmul.FIXED_CONFIG_MAX_M
    weight = quantize_int4(torch.randn(64, 128, device=DEVICE))
    for rows in (1, 2, 16, 17, BUCKETS[-1]):  # GEMV, tl.dot, the fixed-config GEMM at both ends
        with capture_rules():
            int4_matmul.int4_matmul(torch.randn(rows, 128, device=DEVICE), weight)
    with pytest.raises(CaptureViolation, match="autotuned"), capture_rules():  # the trap works: prefill autotunes
        int4_matmul.int4_matmul(torch.randn(BUCKETS[-1] + 1, 128, device=DEVICE), weight)


def test_a_replay_fills_the_static_rows_and_pads_the_rest():
    cache = new_cache(8)
    before = copy_of(cache)
    graphs = DecodeGraphs(probe_step, FakeGraphRecorder())
    out = graphs.replay(decode_batch([7, 8, 9], [3, 0, 5]), cache)
    assert list(graphs.graphs) == [4]
    torch.testing.assert_close(out[:, :3], torch.tensor([[7, 3, 4], [8, 0, 1], [9, 5, 6]], dtype=torch.float32,
                                                         device=DEVICE), rtol=0, atol=0)
    static = graphs.graphs[4].static
    assert static.input_ids.tolist() == [7, 8, 9, 0]
    assert static.positions.tolist() == [3, 0, 5, MAX_SEQ - 1]
    assert static.kv_lens.tolist() == [4, 1, 6, 0]  # padding: an empty cache
    # Live rows wrote their own slot; capture (and warm-up) and the padding row wrote only the last slot.
    assert written_slots(before, cache) == {(0, 3), (1, 0), (2, 5)} | {(row, MAX_SEQ - 1) for row in range(4)}
    assert [cache.k[0, row, 0, pos, 0].item() for row, pos in ((0, 3), (1, 0), (2, 5))] == [8, 9, 10]


def test_a_shrinking_batch_gives_its_rows_back_to_padding():
    cache = new_cache(8)
    graphs = DecodeGraphs(probe_step, FakeGraphRecorder())
    graphs.replay(decode_batch([1, 2, 3, 4, 5, 6, 7], [2] * 7), cache)   # bucket 8, 7 rows filled
    cache.k[0, 5:7, 0, 2, 0] = -5.0  # rewriting what rows 5 and 6 wrote there would now show
    before = copy_of(cache)
    out = graphs.replay(decode_batch([8, 9, 10, 11, 12], [3] * 5), cache)  # the same bucket, 5 rows
    assert list(graphs.graphs) == [8] and out.shape[0] == 5
    static = graphs.graphs[8].static
    assert static.input_ids.tolist() == [8, 9, 10, 11, 12, 0, 0, 0]
    assert static.positions.tolist() == [3] * 5 + [MAX_SEQ - 1] * 3 and static.kv_lens.tolist() == [4] * 5 + [0] * 3
    # Rows 5 and 6 no longer rewrite their old slot 2: only the live rows' slot 3 and the last slots change.
    assert written_slots(before, cache) <= {(row, 3) for row in range(5)} | {(row, MAX_SEQ - 1) for row in range(8)}


def test_graphed_steps_equal_eager_steps_as_the_batch_shrinks():
    graphed_cache = new_cache(8)
    eager_cache = copy_of(graphed_cache)
    recorder = FakeGraphRecorder()
    graphs = DecodeGraphs(probe_step, recorder)
    plan = [([11, 12, 13, 14, 15], [0, 1, 2, 3, 4]), ([21, 22, 23, 24, 25], [1, 2, 3, 4, 5]), ([31, 32, 33], [2, 3, 4]),
            ([41, 42], [3, 4]), ([51], [4])]
    for ids, positions in plan:
        got = graphs.replay(decode_batch(ids, positions), graphed_cache)
        want = probe_step(decode_batch(ids, positions), eager_cache)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert sorted(graphs.graphs) == [1, 2, 4, 8] and len(recorder.captures) == 4  # each bucket captured once


def test_a_new_cache_drops_the_graphs_and_captures_again():
    recorder = FakeGraphRecorder()
    graphs = DecodeGraphs(probe_step, recorder)
    first, second = new_cache(2), KVCache(CONFIG, 4, MAX_SEQ - 4, torch.float32, DEVICE)
    graphs.replay(decode_batch([1, 2], [0, 0]), first)
    graphs.replay(decode_batch([3, 4], [1, 1]), first)
    assert len(recorder.captures) == 1
    out = graphs.replay(decode_batch([5, 6], [0, 3]), second)
    assert len(recorder.captures) == 2 and graphs.cache is second and list(graphs.graphs) == [2]
    assert graphs.graphs[2].static.positions.tolist() == [0, 3]
    assert out[:, 3].tolist() == [6.0, 7.0]  # the new graph reads and writes the new cache: id + 1 at each position
    graphs.release()
    assert graphs.graphs == {} and graphs.cache is None


def test_batches_without_a_bucket_or_spare_rows_decode_eagerly():
    recorder = FakeGraphRecorder()
    graphs = DecodeGraphs(probe_step, recorder)
    big = KVCache(CONFIG, 65, 4, torch.float32, DEVICE)
    out = graphs.replay(decode_batch(list(range(65)), [1] * 65), big)  # above the largest bucket
    assert out.shape[0] == 65 and out[:, 0].tolist() == list(range(65))
    tight = new_cache(3)
    out = graphs.replay(decode_batch([1, 2, 3], [0, 0, 0]), tight)  # bucket 4 > the cache's 3 rows
    assert out[:, 0].tolist() == [1, 2, 3]
    assert recorder.captures == [] and graphs.graphs == {}


@pytest.mark.parametrize("host_read", [lambda t: t.sum().item(), lambda t: t.tolist(), lambda t: bool(t.any())])
def test_the_fake_capture_refuses_host_reads(host_read):
    def step(batch, cache):
        host_read(batch.positions)
        return probe_step(batch, cache)
    with pytest.raises(CaptureViolation, match="host"):
        DecodeGraphs(step, FakeGraphRecorder()).replay(decode_batch([1], [0]), new_cache(1))


@pytest.mark.cuda
def test_real_cuda_graphs_replay_like_the_fake():
    results = []
    for recorder in (CudaGraphRecorder(), FakeGraphRecorder()):
        torch.manual_seed(0)
        cache = new_cache(8)
        graphs = DecodeGraphs(probe_step, recorder)
        outs = [graphs.replay(decode_batch(ids, pos), cache).clone()
                for ids, pos in (([1, 2, 3], [0, 4, 2]), ([4, 5, 6], [1, 5, 3]), ([7], [2]))]
        results.append((outs, cache.k.clone()))
    for got, want in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)

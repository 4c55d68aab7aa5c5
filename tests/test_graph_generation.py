"""Generation through graphed decode steps equals eager generation, token for token.

On a CPU the kernel-backed model runs under Triton's interpreter and the graphs are the
fake recorder (tests/fake_graphs.py): the bucket choice, static buffers, padding rows and
recapture are the production code, and every captured step runs under the capture rules
(no host reads, no autotuned launch). On a GPU the same tests use real CUDA graphs.
The model is the smallest the kernels take (head_dim 16, hidden 64, one layer); batch
sizes 1, 2, 3, 5, 9, 17 fill every bucket from 1 to 32 with and without padding.
"""
import weakref

import pytest

from checkpoints import make_checkpoint
from fake_graphs import FakeGraphRecorder
from harness import DEVICE
from olmo2_fast import OLMo2, api
from olmo2_fast.graphs import DecodeGraphs

SMALL_MODEL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2)
INT4_MODEL = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=8,
                  num_key_value_heads=4)  # widths of 128 for the int4 groups, head_dim 16
NEW_TOKENS = 3
SAMPLED = dict(temperature=0.9, top_k=50, seed=11)


def prompts(batch: int) -> list[list[int]]:
    return [[(7 * i) % 400 + 3, (11 * i) % 400 + 5][: 1 + i % 2] for i in range(batch)]


def graphed(path, **kwargs) -> OLMo2:
    model = OLMo2.from_pretrained(path, device=DEVICE, backend="triton", **kwargs)
    recorder = FakeGraphRecorder() if DEVICE == "cpu" else None
    model.engine.graphs = DecodeGraphs(model.engine.decode_step, recorder)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("graphs"), seed=31, **SMALL_MODEL)


@pytest.fixture(scope="module")
def eager(checkpoint):
    return OLMo2.from_pretrained(checkpoint, device=DEVICE, backend="triton", cuda_graphs=False)


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 9, 17])
def test_graphed_generation_equals_eager(checkpoint, eager, batch):
    model = graphed(checkpoint)
    assert model.generate(prompts(batch), max_new_tokens=NEW_TOKENS) == eager.generate(prompts(batch),
                                                                                      max_new_tokens=NEW_TOKENS)
    if batch in (3, 9):  # seeded sampling, in padded buckets 4 and 16
        assert (model.generate(prompts(batch), max_new_tokens=NEW_TOKENS, **SAMPLED)
                == eager.generate(prompts(batch), max_new_tokens=NEW_TOKENS, **SAMPLED))
    assert model._cache.max_batch >= batch and sorted(model.engine.graphs.graphs) == [model._cache.max_batch]


def test_a_shrinking_batch_replays_smaller_buckets(checkpoint, eager):
    batch = prompts(5)
    eos = eager.tokenizer.eos_ids
    eager.tokenizer.eos_ids = ()
    try:
        full = eager.generate(batch, max_new_tokens=5)
    finally:
        eager.tokenizer.eos_ids = eos
    # An EOS that ends the most sequences early: the batch of 5 (bucket 8) drops to a smaller bucket.
    token = max(sorted({t for seq in full for t in seq[:3]}), key=lambda t: sum(t in seq[:3] for seq in full))
    expected = [seq[:seq.index(token)] if token in seq else seq for seq in full]
    model = graphed(checkpoint)
    model.tokenizer.eos_ids = (token,)
    assert model.generate(batch, max_new_tokens=5) == expected
    buckets = sorted(model.engine.graphs.graphs)
    assert buckets[-1] == 8 and len(buckets) >= 2, buckets


def test_a_larger_request_recaptures_on_the_new_cache(checkpoint, eager, monkeypatch):
    model = graphed(checkpoint)
    model.generate(prompts(2), max_new_tokens=2)
    first = weakref.ref(model._cache)
    assert model.engine.graphs.cache is first() and list(model.engine.graphs.graphs) == [2]
    expected = eager.generate(prompts(5), max_new_tokens=2)
    allocate, old_alive = api.KVCache, []

    def allocating(*args, **kwargs):
        old_alive.append(first() is not None)
        return allocate(*args, **kwargs)
    monkeypatch.setattr(api, "KVCache", allocating)
    assert model.generate(prompts(5), max_new_tokens=2) == expected
    assert old_alive == [False]  # the graphs let go of the old cache before the new one was allocated
    assert model._cache.max_batch == 8
    assert model.engine.graphs.cache is model._cache and list(model.engine.graphs.graphs) == [8]
    assert model.engine.graphs.graphs[8].static.positions.device == model._cache.k.device


def test_batches_above_the_largest_bucket_get_a_cache_of_their_own_size(checkpoint):
    model = graphed(checkpoint)
    assert model._cache_for(65, 10).max_batch == 65  # no bucket, no padding rows: that batch decodes eagerly
    assert model._cache_for(5, 10).max_batch == 65   # reused


def test_int4_graphed_steps_launch_no_autotuned_kernel(tmp_path):
    # Buckets 1 (GEMV), 4 (tl.dot over 16 padded rows): the fake capture fails if a launch autotunes.
    path = make_checkpoint(tmp_path, seed=32, **INT4_MODEL)
    model = graphed(path, quantize="int4")
    eager = OLMo2.from_pretrained(path, device=DEVICE, backend="triton", quantize="int4", cuda_graphs=False)
    for batch in (1, 3):
        assert model.generate(prompts(batch), max_new_tokens=2) == eager.generate(prompts(batch), max_new_tokens=2)
    assert sorted(model.engine.graphs.graphs) == [4]


@pytest.mark.cuda
def test_a_batch_of_65_decodes_on_a_gpu(checkpoint):
    model = OLMo2.from_pretrained(checkpoint, device="cuda", backend="triton")
    eager = OLMo2.from_pretrained(checkpoint, device="cuda", backend="triton", cuda_graphs=False)
    assert model.generate(prompts(65), max_new_tokens=4) == eager.generate(prompts(65), max_new_tokens=4)
    assert model._cache.max_batch == 65 and not model.engine.graphs.graphs

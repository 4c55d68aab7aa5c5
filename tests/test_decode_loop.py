"""The generation loop's running batch (generate.py), on the torch backend: it shrinks as sequences finish.

Finished sequences leave the decode batch; running ones move into their cache rows
(`KVCache.move_row`) along with their position, next id, repetition mask and generator.
Each sequence's tokens must stay exactly what it produces alone.
"""
import pytest
import torch

from checkpoints import make_checkpoint
from olmo2_fast import OLMo2
from olmo2_fast.cache import KVCache

PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19], [20]]
NEW_TOKENS = 10
MODES = {
    "greedy": dict(),
    "sampled": dict(temperature=1.0, top_k=40, seed=7),
    "repetition_penalty": dict(repetition_penalty=1.5),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return OLMo2.from_pretrained(make_checkpoint(tmp_path_factory.mktemp("loop"), seed=12), device="cpu",
                                 backend="torch")


def alone(model, kwargs) -> list[list[int]]:
    """Each prompt generated on its own (prompt i of a batch samples with seed + i)."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        single = dict(kwargs, seed=kwargs["seed"] + i) if "seed" in kwargs else kwargs
        out.append(model.generate(prompt, max_new_tokens=NEW_TOKENS, **single))
    return out


def staggered_eos(full: list[list[int]]) -> tuple[int, list[list[int]]]:
    """The token whose first occurrences end the most sequences at the most different steps, and the
    outputs that EOS leaves (each cut before its first occurrence)."""
    def finish_steps(token):
        return {seq.index(token) for seq in full if token in seq}
    token = max(sorted({t for seq in full for t in seq}), key=lambda t: (len(finish_steps(t)), -t))
    return token, [seq[:seq.index(token)] if token in seq else seq for seq in full]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_batch_that_shrinks_as_sequences_finish_equals_each_sequence_alone(model, mode, monkeypatch):
    kwargs = MODES[mode]
    eos = model.tokenizer.eos_ids
    model.tokenizer.eos_ids = ()
    try:
        token, expected = staggered_eos(alone(model, kwargs))
        model.tokenizer.eos_ids = (token,)
        assert len({len(seq) for seq in expected}) >= 3, "the chosen EOS must end sequences at different steps"
        decode_sizes, moves = [], []
        step, move_row = model.engine.step, KVCache.move_row

        def watched_step(batch, cache):
            if batch.max_q_len == 1:
                decode_sizes.append(batch.input_ids.shape[0])
            return step(batch, cache)

        def watched_move(cache, src, dst, length):
            moves.append((src, dst))
            return move_row(cache, src, dst, length)
        monkeypatch.setattr(model.engine, "step", watched_step)
        monkeypatch.setattr(KVCache, "move_row", watched_move)
        assert model.generate(PROMPTS, max_new_tokens=NEW_TOKENS, **kwargs) == expected
    finally:
        model.tokenizer.eos_ids = eos
    assert decode_sizes == sorted(decode_sizes, reverse=True) and decode_sizes[-1] < len(PROMPTS), decode_sizes
    assert moves and all(src > dst for src, dst in moves), moves  # a running row filled a finished one's place


def test_move_row_copies_the_cached_positions_of_every_layer(model):
    cache = KVCache(model.config, 3, 8, torch.float32, "cpu")
    cache.k.normal_(), cache.v.normal_()
    before_k, before_v = cache.k.clone(), cache.v.clone()
    cache.move_row(2, 0, 5)
    torch.testing.assert_close(cache.k[:, 0, :, :5], before_k[:, 2, :, :5], rtol=0, atol=0)
    torch.testing.assert_close(cache.v[:, 0, :, :5], before_v[:, 2, :, :5], rtol=0, atol=0)
    torch.testing.assert_close(cache.k[:, 0, :, 5:], before_k[:, 0, :, 5:], rtol=0, atol=0)  # past length: untouched
    torch.testing.assert_close(cache.k[:, 1:], before_k[:, 1:], rtol=0, atol=0)

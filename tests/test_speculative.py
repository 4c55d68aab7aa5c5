"""Speculative decoding (olmo2_fast/speculative.py) is exact: greedy output equals plain greedy token for
token, with a draft model or prompt lookup, on the torch backend and on the kernels (Triton's interpreter,
the verify step through the fake CUDA-graph recorder); EOS, stop strings, max_new_tokens, the context end,
streaming, logprobs, prefix reuse, cancelling and batches behave as without it; the options, the draft's
tokenizer check, the CLI flags and the bench rows. The sampled output's distribution is tested in
tests/test_speculative_sampling.py.

Drafts: "noisy" is the target with noise on every matrix (it agrees with the target on a few tokens in
three, so rounds keep some drafts and reject others), "other" a model of another shape and seed (it
almost never agrees: every round rejects), "self" the target itself (every draft kept: each round ends
with the catch-up of two tokens).
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import BASE, make_checkpoint
from fake_graphs import FakeGraphRecorder
from harness import DEVICE
from olmo2_fast import OLMo2
from olmo2_fast.api import TOKENIZER_FILES
from olmo2_fast.cache import KVCache
from olmo2_fast.chunk_steps import ChunkGraph
from olmo2_fast.checkpoint import save_checkpoint
from olmo2_fast.cli import main
from olmo2_fast.config import Olmo2Config
from olmo2_fast.drafting import PromptLookup
from olmo2_fast.errors import GenerationError, TokenizerError
from olmo2_fast.graphs import DecodeGraphs
from olmo2_fast.sampling import SamplingParams
from olmo2_fast.scheduler import Request, Scheduler
from olmo2_fast.speculative import Speculation, SpeculativeDecoder

PROMPTS = ["The capital of France is", "Once upon a time there was a small model that wanted to run fast",
           "x", "A key-value cache keeps the keys and values. A key-value cache keeps the"]
SMALL_MODEL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2)  # the smallest the kernels take (head_dim 16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from two intra-op threads, and on a shared 2-core machine each op then
    waits for a descheduled thread (10-15x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(source, directory, scale: float, seed: int = 0):
    """A copy of checkpoint `source` with Gaussian noise of `scale` x each matrix's spread added to it."""
    tensors = load_file(source / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    noisy = {name: t + scale * t.std() * torch.randn(t.shape, generator=generator) if t.dim() == 2 else t
             for name, t in tensors.items()}
    config = Olmo2Config.from_json_file(source / "config.json")
    return save_checkpoint(directory, config, noisy,
                           extra_files={n: source / n for n in TOKENIZER_FILES if (source / n).is_file()})


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative")
    target = make_checkpoint(root / "target", seed=41)
    return {"target": target, "noisy": perturbed(target, root / "noisy", 0.1),
            "other": make_checkpoint(root / "other", seed=42, hidden_size=32, intermediate_size=64,
                                     num_attention_heads=2, num_key_value_heads=1)}


@pytest.fixture(scope="module")
def plain(paths):
    return OLMo2.from_pretrained(paths["target"], device="cpu")


DRAFTERS = {
    "noisy_k4": lambda p: dict(draft=p["noisy"], num_speculative_tokens=4),
    "other_k3": lambda p: dict(draft=p["other"], num_speculative_tokens=3),
    "self_k2": lambda p: dict(draft=p["target"], num_speculative_tokens=2),
    "lookup2_k3": lambda p: dict(prompt_lookup=2, num_speculative_tokens=3),
    "lookup1_k6": lambda p: dict(prompt_lookup=1, num_speculative_tokens=6),
}


@pytest.fixture(scope="module", params=list(DRAFTERS))
def speculative(request, paths):
    return OLMo2.from_pretrained(paths["target"], device="cpu", **DRAFTERS[request.param](paths))


def test_greedy_output_equals_plain_greedy(plain, speculative):
    for prompt in PROMPTS:
        assert speculative.generate(prompt, max_new_tokens=40) == plain.generate(prompt, max_new_tokens=40), prompt


def test_rounds_keep_and_reject_drafts_as_each_drafter_should(paths, plain):
    def stats(**options):
        model = OLMo2.from_pretrained(paths["target"], device="cpu", **options)
        model.tokenizer.eos_ids = ()  # every generation makes its 40 tokens
        for prompt in PROMPTS:
            model.generate(prompt, max_new_tokens=40)
        counts = model._scheduler.stats
        assert counts.tokens == len(PROMPTS) * 40  # no round drafts past max_new_tokens
        return counts
    every = stats(draft=paths["target"], num_speculative_tokens=2)
    assert every.accepted == every.drafted > 0 and every.tokens_per_forward > 2.5  # 3 tokens per round but the last
    some = stats(draft=paths["noisy"], num_speculative_tokens=4)
    assert 0.1 < some.acceptance < 0.9
    lookup = stats(prompt_lookup=2)
    assert lookup.accepted > 0 and lookup.drafted > lookup.accepted


def test_finish_reasons_and_texts_equal_plain(plain, speculative):
    free = plain.generate(PROMPTS[0], max_new_tokens=24, return_details=True)
    stop = free.text[5:8]
    for options in (dict(max_new_tokens=24), dict(max_new_tokens=7), dict(max_new_tokens=1),
                    dict(max_new_tokens=24, stop=[stop]), dict(max_new_tokens=24, stop=[stop, free.text[2:4]])):
        ours = speculative.generate(PROMPTS[0], return_details=True, **options)
        theirs = plain.generate(PROMPTS[0], return_details=True, **options)
        assert (ours.text, ours.token_ids, ours.finish_reason) == (theirs.text, theirs.token_ids,
                                                                    theirs.finish_reason), options
    assert speculative.generate(PROMPTS[0], max_new_tokens=24, stop=[stop], return_details=True).finish_reason == "stop"
    eos = (free.token_ids[6],)
    saved = plain.tokenizer.eos_ids, speculative.tokenizer.eos_ids
    plain.tokenizer.eos_ids = speculative.tokenizer.eos_ids = eos
    try:
        ended = speculative.generate(PROMPTS[0], max_new_tokens=24, return_details=True)
        assert ended.finish_reason == "eos" and ended.token_ids == free.token_ids[:free.token_ids.index(eos[0])]
        plain.tokenizer.eos_ids = speculative.tokenizer.eos_ids = ()
        n = plain.config.max_position_embeddings
        for start in (n - 3, n - 1, n):  # 3, 1 or no free positions; the last token is never cached
            ours = speculative.generate([5] * start, max_new_tokens=50, return_details=True)
            assert ours.finish_reason == "context" and ours.token_ids == plain.generate([5] * start, max_new_tokens=50)
    finally:
        plain.tokenizer.eos_ids, speculative.tokenizer.eos_ids = saved


def test_streaming_holds_back_stop_strings_as_plain_does(plain, speculative):
    free = plain.generate(PROMPTS[1], max_new_tokens=30)
    stop = free[10:13]
    pieces = list(speculative.stream(PROMPTS[1], max_new_tokens=30, stop=stop))
    assert pieces and "".join(pieces) == plain.generate(PROMPTS[1], max_new_tokens=30, stop=stop)
    assert all(stop not in "".join(pieces[:i + 1]) for i in range(len(pieces)))


def test_repetition_penalty_greedy_equals_plain(plain, speculative):
    for prompt in PROMPTS[1:]:
        assert (speculative.generate(prompt, max_new_tokens=30, repetition_penalty=1.8)
                == plain.generate(prompt, max_new_tokens=30, repetition_penalty=1.8))


def test_seeded_sampling_is_reproducible(speculative):
    runs = [speculative.generate(PROMPTS[1], max_new_tokens=30, temperature=0.9, top_p=0.95, seed=s) for s in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]


def decoders(paths, plain, **options):
    """A SpeculativeDecoder and a Scheduler over caches of 128 positions (the context end in reach)."""
    speculation = Speculation.configure(paths["target"], plain.config, plain.device, **options,
                                        load_draft=lambda p: OLMo2.from_pretrained(p, device="cpu"))
    cache = KVCache(plain.config, 1, 128, torch.float32, "cpu")
    draft_cache = None
    if speculation.draft is not None:
        draft_cache = KVCache(speculation.draft.config, 1, 128, torch.float32, "cpu")
    return (SpeculativeDecoder(plain.engine, plain.tokenizer, cache, speculation, draft_cache),
            Scheduler(plain.engine, plain.tokenizer, KVCache(plain.config, 1, 128, torch.float32, "cpu")))


def run(loop, request: Request):
    sequence = loop.add(request)
    while not loop.idle:
        loop.step()
    return sequence


@pytest.mark.parametrize("options", [dict(draft="noisy", num_speculative_tokens=4), dict(prompt_lookup=2)],
                         ids=["draft", "lookup"])
def test_the_decoder_at_the_cache_end_with_logprobs_and_prefix_reuse(paths, plain, options):
    if "draft" in options:
        options = {**options, "draft": paths[options["draft"]]}
    ours, theirs = decoders(paths, plain, **options)
    eos, plain.tokenizer.eos_ids = plain.tokenizer.eos_ids, ()
    try:
        prompt = tuple(plain.tokenizer.encode(PROMPTS[3]) * 6)[:110]  # repetition: lookups hit
        full = [run(loop, Request(prompt, 50)) for loop in (ours, theirs)]
        assert full[0].finish_reason == full[1].finish_reason == "context" and full[0].ids == full[1].ids
        assert len(full[0].ids) == 128 - len(prompt) + 1
        scored = run(ours, Request(prompt[:40], 12, SamplingParams(0.8, seed=7), logprobs=3))
        ids = list(prompt[:40]) + scored.ids
        full_logprobs = torch.log_softmax(plain(ids)[0].float(), -1)  # the model's distribution, every logit
        assert [lp.token_id for lp in scored.logprobs] == scored.ids
        for i, lp in enumerate(scored.logprobs):
            row = full_logprobs[40 - 1 + i]
            assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
            assert [t for t, _ in lp.top] == row[:plain.tokenizer.vocab_size].topk(3).indices.tolist()
        first = run(ours, Request(prompt[:30], 10))
        follow_up = tuple(list(prompt[:30]) + first.sampled + [7, 8, 9])
        again = run(ours, Request(follow_up, 10, reuse_prefix=True))
        assert again.reused >= 30 + len(first.sampled) - 1
        assert again.ids == run(theirs, Request(follow_up, 10)).ids
    finally:
        plain.tokenizer.eos_ids = eos


def test_a_closed_stream_cancels_and_the_next_generation_is_unaffected(plain, paths):
    model = OLMo2.from_pretrained(paths["target"], device="cpu", draft=paths["noisy"])
    stream = model.stream(PROMPTS[1], max_new_tokens=40)
    next(stream)
    stream.close()
    assert model._scheduler.idle
    assert model.generate(PROMPTS[0], max_new_tokens=20) == plain.generate(PROMPTS[0], max_new_tokens=20)
    decoder, _ = decoders(paths, plain, prompt_lookup=2)
    waiting = [decoder.add(Request((5, 6), 5)), decoder.add(Request((5, 6), 5))]
    waiting[1].cancel()
    decoder.step()
    assert waiting[1].finish_reason == "cancelled" and not waiting[0].done
    waiting[0].cancel()
    decoder.step()
    assert waiting[0].finish_reason == "cancelled" and decoder.idle


def test_a_batch_decodes_without_speculation_and_single_prompts_resume_it(plain, paths):
    model = OLMo2.from_pretrained(paths["target"], device="cpu", draft=paths["noisy"])
    assert model.generate(PROMPTS[:3], max_new_tokens=10) == plain.generate(PROMPTS[:3], max_new_tokens=10)
    assert isinstance(model._scheduler, Scheduler)
    assert model.generate(PROMPTS[3], max_new_tokens=10) == plain.generate(PROMPTS[3], max_new_tokens=10)
    assert isinstance(model._scheduler, SpeculativeDecoder)


def test_a_chat_session_replies_as_without_and_reuses_its_cache(plain, paths):
    model = OLMo2.from_pretrained(paths["target"], device="cpu", draft=paths["noisy"])
    replies, reused = [], []
    for m in (plain, model):
        session = m.chat_session("Be brief.", max_new_tokens=12)
        replies.append(["".join(session.send(turn)) for turn in ("Hello", "And then?")])
        reused.append(session.last_result.cached_prompt_tokens)
    # The plain loop may also have cached the reply's last token (a step queued before it was read).
    assert replies[0] == replies[1] and reused[0] - 1 <= reused[1] > 0


def test_a_shared_draft_model_is_held_while_the_target_generates(paths):
    draft = OLMo2.from_pretrained(paths["noisy"], device="cpu")
    model = OLMo2.from_pretrained(paths["target"], device="cpu", draft=draft)
    stream = model.stream(PROMPTS[0], max_new_tokens=10)
    next(stream)
    with pytest.raises(GenerationError, match="already generating in this thread"):  # its cache is in use
        draft.generate(PROMPTS[1], max_new_tokens=2)
    stream.close()
    alone = OLMo2.from_pretrained(paths["noisy"], device="cpu")
    assert draft.generate(PROMPTS[1], max_new_tokens=6) == alone.generate(PROMPTS[1], max_new_tokens=6)


def test_prompt_lookup_proposes_what_followed_the_most_recent_occurrence():
    lookup = PromptLookup(2)
    assert lookup.propose([1, 2, 3, 4, 1, 2, 5, 6, 1, 2], 3) == [5, 6, 1]  # the later of two matches
    assert lookup.propose([1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 9], 3) == []      # (2, 9) never occurred before
    assert PromptLookup(3).propose([7, 7, 7, 7], 5) == [7]                # overlapping, up to the end
    assert PromptLookup(2).propose([4], 3) == []


def test_the_verify_graph_replays_each_chunk_on_its_own_inputs():
    """ChunkGraph over a probe step (plain torch, as tests/test_graphs.py's): every replay sees the chunk's
    ids in its first rows, positions start.., the cache length start + rows, and writes only its slots."""
    def probe(batch, cache):
        cache.k[0, 0, 0, batch.positions.long(), 0] = batch.input_ids.float()
        return torch.stack([batch.input_ids.float(), batch.positions.float(),
                            batch.kv_lens.float().expand(batch.input_ids.shape[0])], 1)
    cache = KVCache(Olmo2Config(**{**BASE, "num_hidden_layers": 1}), 1, 16, torch.float32, "cpu")
    recorder = FakeGraphRecorder()
    graph = ChunkGraph(probe, cache, 4, recorder)
    for ids, start in (([7, 8, 9, 10], 0), ([5, 6], 3), ([4], 12)):
        out = graph(torch.tensor(ids), start)
        assert out.tolist() == [[t, start + i, start + 4] for i, t in enumerate(ids)]
        assert cache.k[0, 0, 0, start:start + len(ids), 0].tolist() == ids
    assert len(recorder.captures) == 1 and graph.fits(torch.tensor([1]), 12) and not graph.fits(torch.tensor([1]), 13)


# ---------------------------------------------------------------------------------------- the kernels

def graphed(path, **options) -> OLMo2:
    """The kernel-backed model; on a CPU with the fake CUDA-graph recorder for decode and verify steps."""
    model = OLMo2.from_pretrained(path, device=DEVICE, backend="triton", **options)
    if DEVICE == "cpu":
        model.engine.graphs = DecodeGraphs(model.engine.decode_step, FakeGraphRecorder())
    return model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative_kernels")
    target = make_checkpoint(root / "target", seed=43, **SMALL_MODEL)
    return target, perturbed(target, root / "noisy", 0.1)


def test_kernels_greedy_equals_plain_with_graphed_draft_and_verify_steps(small):
    target, noisy = small
    prompt = [5, 6, 7, 5, 6, 7, 5]  # repeats, so prompt lookup proposes
    expected = OLMo2.from_pretrained(target, device=DEVICE, backend="triton", cuda_graphs=False).generate(
        prompt, max_new_tokens=5)
    draft = graphed(noisy)
    model = graphed(target, draft=draft, num_speculative_tokens=2)
    assert model.generate(prompt, max_new_tokens=5) == expected
    decoder = model._scheduler
    assert 2 <= decoder.stats.forwards < 5 and decoder.graph.captured is not None  # rounds after the prompt's replay it
    assert list(draft.engine.graphs.graphs) == [1]  # the draft's decode steps replayed its own graphs
    lookup = graphed(target, prompt_lookup=1, num_speculative_tokens=3)
    assert lookup.generate(prompt, max_new_tokens=5) == expected and lookup._scheduler.stats.drafted > 0


# ---------------------------------------------------------------------------------------- options and checks

def with_tokenizer(path, change):
    """Checkpoint `path` with its tokenizer.json content changed by `change(dict)`."""
    file = path / "tokenizer.json"
    content = json.loads(file.read_text())
    change(content)
    file.write_text(json.dumps(content))
    return path


def test_a_draft_that_tokenises_differently_is_refused_naming_both(paths, tmp_path):
    def other_pre_tokenizer(content):
        content["pre_tokenizer"]["add_prefix_space"] = True

    def swapped_ids(content):
        vocab = content["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[300:302]
        vocab[a], vocab[b] = vocab[b], vocab[a]

    def fewer_merges(content):
        content["model"]["merges"] = content["model"]["merges"][:-1]
    for name, change, what in (("pre", other_pre_tokenizer, "pre-tokenizers differ"),
                               ("ids", swapped_ids, "vocabularies differ"),
                               ("merges", fewer_merges, "merges differ")):
        draft = with_tokenizer(make_checkpoint(tmp_path / name, seed=44), change)
        with pytest.raises(TokenizerError, match=what) as error:
            OLMo2.from_pretrained(paths["target"], device="cpu", draft=draft)
        assert str(paths["target"]) in str(error.value) and str(draft) in str(error.value)


def test_the_same_tokenizer_in_another_file_layout_is_accepted(paths, plain, tmp_path):
    def legacy_merges(content):  # older tokenizers wrote each merge as "a b"
        content["model"]["merges"] = [" ".join(m) for m in content["model"]["merges"]]
    draft = with_tokenizer(make_checkpoint(tmp_path / "legacy", seed=45), legacy_merges)
    model = OLMo2.from_pretrained(paths["target"], device="cpu", draft=draft)
    assert model.generate(PROMPTS[0], max_new_tokens=8) == plain.generate(PROMPTS[0], max_new_tokens=8)


@pytest.mark.parametrize("options, error, message", [
    (dict(draft="wide"), GenerationError, "the draft's vocab_size is 512, the target's 448"),
    (dict(draft="short"), GenerationError, r"the draft's context \(128 positions\) is shorter"),
    (dict(draft="other", prompt_lookup=2), GenerationError, "choose one"),
    (dict(num_speculative_tokens=3), GenerationError, "needs draft="),
    (dict(prompt_lookup=0), GenerationError, "prompt_lookup must be a positive integer"),
    (dict(prompt_lookup=2, num_speculative_tokens=True), GenerationError, "num_speculative_tokens must be a positive"),
])
def test_bad_speculation_options_are_refused(paths, tmp_path, options, error, message):
    made = {"wide": dict(vocab_size=512), "short": dict(max_position_embeddings=128)}
    if options.get("draft") in made:
        options = {**options, "draft": make_checkpoint(tmp_path / "d", seed=46, **made[options["draft"]])}
    elif "draft" in options:
        options = {**options, "draft": paths[options["draft"]]}
    with pytest.raises(error, match=message):
        OLMo2.from_pretrained(paths["target"], device="cpu", **options)


def test_cli_flags(paths, capsys):
    argv = ["generate", "--model", str(paths["target"]), PROMPTS[1], "--max-new-tokens", "12", "--quiet"]
    assert main(argv) == 0
    plain_out = capsys.readouterr().out
    for flags in (["--draft", str(paths["noisy"]), "--num-speculative-tokens", "3"], ["--prompt-lookup", "1"]):
        assert main(argv + flags) == 0
        out, err = capsys.readouterr()
        assert out == plain_out and "speculative: " in err
    with pytest.raises(SystemExit):
        main(argv + ["--draft", str(paths["noisy"]), "--prompt-lookup", "2"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_bench_generate_rows_side_by_side(paths, tmp_path, capsys):
    out = tmp_path / "spec.json"
    argv = ["bench", "generate", "--model", str(paths["target"]), "--new-tokens", "6", "--warmup", "0", "--rep", "1",
            "--json", str(out)]
    assert main(argv + ["--draft", str(paths["noisy"]), "--num-speculative-tokens", "1", "3"]) == 0
    assert "x plain tok/s" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["k"] for r in rows] == [None, 1, 3] and all(r["same_as_plain"] for r in rows)
    assert rows[0]["vs_plain"] == 1.0 and all(0 <= r["acceptance"] <= 1 and r["tokens_per_forward"] >= 1
                                              for r in rows[1:])
    assert main(argv + ["--prompt-lookup", "2"]) == 0
    assert json.loads(out.read_text())["rows"][1]["drafting"] == "prompt lookup n=2"
    assert main(["bench", "generate", "--prompt-lookup", "2"]) == 2
    assert "needs --model PATH" in capsys.readouterr().err

"""The demo training script (olmo2_fast.demo_train) on a tiny model, and the pair it shipped.

The tiny run goes through the same `run` as `python -m olmo2_fast.demo_train`, on a slice of the corpus.
"""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from harness import DEVICE

import olmo2_fast
from olmo2_fast import OLMo2, demo_train
from olmo2_fast.demo_corpus import CORPUS_SHA256, PINNED_PYTHON, Corpus, build_corpus, chat_example, python_version
from olmo2_fast.tokenizer import Tokenizer

SHIPPED = Path(olmo2_fast.__file__).parent / "demo_models"
TINY = dict(hidden=64, intermediate=128, heads=2, tied=False)


def tiny_recipe(name, layers, seq_len=64, steps=30, **changes):
    config = demo_train.demo_config(layers=layers, **TINY).with_(vocab_size=512, max_position_embeddings=seq_len,
                                                                 **changes)
    return demo_train.Recipe(name, config, steps=steps, batch_size=4, lr=1e-2, warmup_steps=5, seq_len=seq_len)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As the training script runs: on a loaded 2-core machine two threads train several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_run")
    target = tiny_recipe("target", layers=2, num_key_value_heads=1)  # GQA, so the training forward's grouping is used
    draft = tiny_recipe("draft", layers=1, tie_word_embeddings=True)
    piece = Corpus(corpus.train[:80], corpus.heldout[:2], corpus.sha256)
    return out, demo_train.run(out, target, draft, piece), piece


def test_training_forward_is_the_reference_forward():
    config = tiny_recipe("t", layers=2, num_attention_heads=4, num_key_value_heads=2).config
    model = demo_train.init_model(config, seed=3)
    ids = torch.randint(0, config.vocab_size, (2, 33))
    logits = demo_train.training_logits(model, ids)
    assert logits.requires_grad
    torch.testing.assert_close(logits.detach(), model(ids), rtol=1e-5, atol=1e-5)


def test_training_is_seeded():
    recipe = tiny_recipe("t", layers=1, steps=3)
    tokens = torch.randint(0, 512, (5000,), generator=torch.Generator().manual_seed(0))
    runs = [demo_train.train(recipe, tokens, seed=7)[1]["loss_curve"] for _ in range(2)]
    assert runs[0] == runs[1]
    assert demo_train.train(recipe, tokens, seed=8)[1]["loss_curve"] != runs[0]


def test_held_out_split_is_by_name_and_disjoint(corpus):
    again = build_corpus()
    assert again.sha256 == corpus.sha256 and again.heldout == corpus.heldout
    train_names = {d.name for d in corpus.train}
    assert not train_names & {d.name for d in corpus.heldout}
    assert 0.03 < len(corpus.heldout) / (len(corpus.train) + len(corpus.heldout)) < 0.08
    if python_version() != PINNED_PYTHON:
        pytest.skip(f"the shipped corpus was read from Python {PINNED_PYTHON}, this is {python_version()}")
    assert corpus.sha256 == CORPUS_SHA256 and corpus.is_pinned
    assert (SHIPPED / "heldout.txt").read_text() == corpus.heldout_text()


def test_tiny_run_learns_and_ships_a_loadable_pair(tiny_run):
    out, record, piece = tiny_run
    for name in ("target", "draft"):
        r = record[name]
        assert r["final_train_loss"] < r["first_train_loss"] - 0.5  # 6.25 -> 5.34 when measured
        # well under a uniform guess over the vocabulary (190 of 512 when measured): the learning survived
        # the bf16 weights and the loader
        assert r["heldout"]["perplexity"] < 0.5 * r["config"]["vocab_size"]
        assert {p.name for p in (out / name).iterdir()} == {
            "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert 0.0 <= record["draft_top1_agreement_with_target"] <= 1.0
    assert json.loads((out / "training.json").read_text()) == json.loads(json.dumps(record))
    assert (out / "heldout.txt").read_text() == piece.heldout_text()


def test_chat_examples_are_the_template_rendered(tiny_run):
    out = tiny_run[0]
    tokenizer = Tokenizer(out / "target", OLMo2.from_pretrained(out / "target", device="cpu").config)
    messages = [{"role": "user", "content": "Explain the with statement."},
                {"role": "assistant", "content": "The with statement wraps a block."}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == chat_example(
        messages[0]["content"], messages[1]["content"])


# ------------------------------------------------------------------------------------ the shipped pair

@pytest.fixture(scope="module")
def shipped():
    return {name: OLMo2.from_pretrained(SHIPPED / name, device="cpu", backend="torch") for name in ("target", "draft")}


def test_shipped_pair_meets_its_budgets(shipped):
    target, draft = shipped["target"].config, shipped["draft"].config
    assert target.num_parameters() <= 10_000_000 and draft.num_parameters() <= 2_000_000
    for width in (target.hidden_size, target.intermediate_size, target.q_width):
        assert width % 128 == 0  # int4 group-128 applies
    assert target.head_dim in (16, 32, 64, 128, 256) and draft.head_dim in (16, 32, 64, 128, 256)
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    tokenizers = [json.loads((SHIPPED / name / "tokenizer.json").read_text())["model"] for name in shipped]
    assert tokenizers[0]["vocab"] == tokenizers[1]["vocab"] and tokenizers[0]["merges"] == tokenizers[1]["merges"]
    record = json.loads((SHIPPED / "training.json").read_text())
    assert record["corpus"]["sha256"] == CORPUS_SHA256
    assert record["target"]["parameters"] == target.num_parameters()


def test_shipped_target_writes_english(shipped):
    text = shipped["target"].generate('The "for" statement', max_new_tokens=40)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 10
    assert {"the", "is", "of", "a", "to"} & {w.lower() for w in words}  # random weights write no English words


def test_shipped_target_runs_on_the_kernels(shipped):
    ids = torch.tensor([shipped["target"].tokenizer.encode('The "with" statement is used to wrap')])
    kernels = OLMo2.from_pretrained(SHIPPED / "target", device=DEVICE, backend="triton")
    torch.testing.assert_close(kernels(ids.to(DEVICE)).cpu(), shipped["target"](ids), rtol=1e-4, atol=1e-4)


def test_the_corpus_ignores_what_third_party_imports_attach_to_the_stdlib():
    transformers = pytest.importorskip("transformers", reason="needs transformers, which patches logging.Logger")
    import logging

    from olmo2_fast.demo_corpus import build_corpus
    assert hasattr(logging.Logger, "warning_once"), "transformers no longer patches logging: pick another probe"
    names = {d.name for d in build_corpus().train + build_corpus().heldout}
    assert "logging.Logger.warning_once" not in names and "logging.Logger.warning" in names
    del transformers

"""Evaluation: the recipe's windows, perplexity against transformers, bits per byte, comparison metrics,
both backends and int4, the CLI, and the lm-evaluation-harness adapter against lm-eval's own `hf` model."""
import functools
import json
import math
import socket
import sys

import pytest
import torch
import torch.nn.functional as F

from checkpoints import make_checkpoint
from olmo2_fast import OLMo2
from olmo2_fast.cli import main
from olmo2_fast.demo import CORPUS, train_tokenizer
from olmo2_fast.errors import EvaluationError
from olmo2_fast.evaluate import compare, perplexity, windows

TEXT = "\n".join(CORPUS * 2)     # ~590 tokens of the test tokenizer, multi-byte characters included
SHORT = CORPUS[0] + " " + CORPUS[4]  # 108 tokens, multi-byte characters included
INTERPRETED = CORPUS[2]              # 32 tokens: 3 windows of 16 at stride 8, one forward under Triton's interpreter
KERNEL_SHAPE = dict(hidden_size=64, num_attention_heads=4)  # head_dim 16: a size the attention kernels take
INT4_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=5, **KERNEL_SHAPE)


@pytest.fixture(scope="module")
def model(checkpoint):
    return OLMo2.from_pretrained(checkpoint, device="cpu", dtype="float32", backend="torch")


def recipe_windows(n, max_len, stride):
    """transformers' recipe run on position indices: (begin, end, scored positions, the weight it gives the mean)."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_len, n)
        trg_len = end - prev_end
        labels = torch.arange(begin, end)[None].clone()
        labels[:, :-trg_len] = -100
        scored = labels[0, 1:]  # the model's shift: label 0 of a window is never scored
        out.append((begin, end, scored[scored != -100].tolist(), (labels != -100).sum().item() - 1))
        prev_end = end
        if end == n:
            break
    return out


@pytest.mark.parametrize("n, max_len, stride", [(100, 16, 5), (100, 16, 16), (97, 16, 16), (100, 16, 1),
                                                (10, 64, 32), (2, 2, 1), (33, 16, 15)])
def test_windows_are_the_recipes(n, max_len, stride):
    expected = [w for w in recipe_windows(n, max_len, stride) if w[2]]  # a window scoring nothing is dropped
    got = [(w.begin, w.end, list(range(w.score_from, w.end)), w.recipe_weight) for w in windows(n, max_len, stride)]
    assert got == expected
    scored = sorted(t for w in got for t in w[2])
    if stride < max_len:
        assert scored == list(range(1, n))  # every token but the first, exactly once
    else:
        assert scored == [t for t in range(n) if t % max_len]


def hf_recipe(hf_model, ids, max_length, stride):
    """transformers' "Perplexity of fixed-length models" loop, as its docs write it."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = hf_model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return torch.exp(nll_sum / n_tokens).item()


def test_perplexity_equals_transformers_recipe(checkpoint, model):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (the parity extra)")
    hf = transformers.Olmo2ForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    ids = torch.tensor([model.tokenizer.encode(TEXT)])
    for max_len, stride in [(64, 24), (64, 64), (50, 17), (256, 128)]:  # ragged last windows, no overlap, one
        got = perplexity(model, TEXT, max_len=max_len, stride=stride, batch_size=3)
        assert got.perplexity == pytest.approx(hf_recipe(hf, ids, max_len, stride), rel=1e-4), (max_len, stride)


def test_bits_per_byte_is_the_exact_nll_total_over_utf8_bytes(model):
    ids = model.tokenizer.encode(SHORT)
    with torch.no_grad():
        logits = model(ids)[0].double()
    nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
    for max_len, stride in [(len(ids), 1), (16, 8)]:  # one window, then overlapping ones: same tokens scored
        got = perplexity(model, SHORT, max_len=max_len, stride=stride)
        assert got.scored_tokens == len(ids) - 1 and got.tokens == len(ids)
        assert got.bytes == len(SHORT.encode("utf-8")) > len(SHORT)
        if max_len == len(ids):
            assert got.nll_nats == pytest.approx(nll, rel=1e-9)
            assert got.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-9)
        assert got.bits_per_byte == pytest.approx(got.nll_nats / math.log(2) / got.bytes, rel=1e-12)


def test_compare_identical_models(model):
    result = compare(model, model, TEXT, max_len=64, stride=32)
    assert result.top1_agreement == 1.0 and result.mean_kl == 0.0
    assert result.a == result.b == perplexity(model, TEXT, max_len=64, stride=32)
    assert result.positions == result.a.scored_tokens


def test_compare_different_models_against_a_direct_computation(tmp_path, model):
    other = OLMo2.from_pretrained(make_checkpoint(tmp_path, seed=6, **KERNEL_SHAPE), device="cpu", dtype="float32",
                                  backend="torch")
    ids = model.tokenizer.encode(SHORT)
    result = compare(model, other, SHORT, max_len=len(ids), stride=len(ids))  # one window: every position
    with torch.no_grad():
        la, lb = (F.log_softmax(m(ids)[0, :-1].double(), -1) for m in (model, other))
    vocab = model.tokenizer.vocab_size
    assert result.positions == len(ids) - 1
    assert result.mean_kl == pytest.approx(F.kl_div(lb, la, log_target=True, reduction="sum").item()
                                           / (len(ids) - 1), rel=1e-9)
    assert result.mean_kl > 0.1  # unrelated random models
    assert result.top1_agreement == (la[:, :vocab].argmax(-1) == lb[:, :vocab].argmax(-1)).double().mean().item()


def test_backends_agree(checkpoint, model):
    kernels = OLMo2.from_pretrained(checkpoint, device="cpu", dtype="float32", backend="triton")
    result = compare(model, kernels, INTERPRETED, max_len=16, stride=8)
    assert result.a.windows == 3
    assert result.b.perplexity == pytest.approx(result.a.perplexity, rel=1e-5)
    assert result.top1_agreement == 1.0 and 0 <= result.mean_kl < 1e-8


def test_cli_perplexity_writes_json(tmp_path, checkpoint, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", "--model", str(checkpoint), "--text", str(text), "--max-len", "64",
                 "--stride", "32", "--backend", "torch", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    model = OLMo2.from_pretrained(checkpoint, device="cpu", dtype="float32", backend="torch")
    assert data["perplexity"] == pytest.approx(perplexity(model, TEXT, max_len=64, stride=32).perplexity, rel=1e-12)
    assert data["model"]["backend"] == "torch" and data["windows"] == 18
    assert f"perplexity     {data['perplexity']:.4f}" in capsys.readouterr().out


def test_cli_compare_int4(tmp_path, capsys):
    path = make_checkpoint(tmp_path, seed=7, **INT4_SHAPE)  # widths multiples of 128: int4 applies
    text = tmp_path / "text.txt"
    text.write_text(INTERPRETED)
    out = tmp_path / "cmp.json"
    assert main(["eval", "compare", "--model", str(path), "--text", str(text), "--max-len", "16", "--int4",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["b"]["model"]["int4"] and not data["a"]["model"]["int4"]
    # int4 moves the distributions (random weights: a lot), but not beyond reason
    assert 0 < data["mean_kl"] < 1 and 0 <= data["top1_agreement"] <= 1
    assert data["b"]["perplexity"] != data["a"]["perplexity"]
    assert abs(math.log(data["b"]["perplexity"] / data["a"]["perplexity"])) < 0.5
    assert "top-1 agreement" in capsys.readouterr().out
    assert main(["eval", "compare", "--model", str(path), "--text", str(text), "--max-len", "16", "--int4",
                 "--int4-lm-head", "--json", str(out)]) == 0
    with_head = json.loads(out.read_text())
    assert with_head["b"]["model"]["int4_lm_head"] and not data["b"]["model"]["int4_lm_head"]
    assert with_head["b"]["perplexity"] != data["b"]["perplexity"]  # lm_head quantised too: other logits
    assert "int4 (lm_head too)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["perplexity", "--text", "{missing}"], "--text {missing}: no such file"),
    (["perplexity", "--text", "{binary}"], "is not UTF-8 text"),
    (["perplexity", "--text", "{empty}"], "is empty"),
    (["perplexity", "--text", "{text}", "--stride", "0"], "stride must be an integer >= 1, got 0"),
    (["perplexity", "--text", "{text}", "--max-len", "999"], "max_len must be at most 256"),
    (["perplexity", "--text", "{text}", "--max-len", "16", "--stride", "17"], "a larger stride would skip tokens"),
    (["perplexity", "--text", "{one}"], "the text has 1 token(s)"),
    (["compare", "--text", "{text}", "--backend", "torch"], "--backend torch is the backend model a already uses"),
    (["compare", "--text", "{text}", "--other", "{other}"], "tokenizers split the text differently"),
    (["compare", "--text", "{text}", "--other", "{other}", "--int4-lm-head"], "--int4-lm-head compares against b "
                                                                              "quantised to int4: give --int4 too"),
])
def test_cli_errors_are_one_line_with_exit_status_2(tmp_path, checkpoint, capsys, args, message):
    files = {"missing": tmp_path / "missing.txt", "binary": tmp_path / "b.txt", "empty": tmp_path / "e.txt",
             "text": tmp_path / "t.txt", "one": tmp_path / "one.txt", "other": tmp_path / "other"}
    files["binary"].write_bytes(b"caf\xe9")
    files["empty"].write_text("")
    files["text"].write_text(TEXT)
    files["one"].write_text("P")
    train_tokenizer(300).save(str(make_checkpoint(files["other"], **KERNEL_SHAPE) / "tokenizer.json"))
    names = {k: str(v) for k, v in files.items()}
    argv = ["eval", args[0], "--model", str(checkpoint)] + [a.format(**names) for a in args[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("olmo2-fast: error: ") and message.format(**names) in err


def test_perplexity_rejects_bad_arguments(model):
    with pytest.raises(EvaluationError, match="batch_size must be an integer >= 1"):
        perplexity(model, TEXT, batch_size=0)
    with pytest.raises(EvaluationError, match="empty"):
        perplexity(model, "")


# ---------------------------------------------------------------- lm-evaluation-harness

MC_DOCS = [
    {"q": "The capital of France is", "choices": [" Paris.", " Berlin.", " Rome."], "label": 0},
    {"q": "A key-value cache keeps", "choices": [" the keys and values.", " nothing at all."], "label": 0},
    {"q": "Once upon a time there was", "choices": [" a small model.", " a big GPU.", " Zürich 東京."], "label": 1},
    {"q": "def fibonacci(n):", "choices": ["\n    return n", "\n    pass"], "label": 0},
]
ROLLING_DOCS = ["The capital of France is Paris. " * 12, "Language models predict the next token.", "Café 🙂"]
TASKS = {
    "tiny_mc": ("mc.jsonl", MC_DOCS, 'output_type: multiple_choice\ndoc_to_text: "{{q}}"\n'
                'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
                '  - metric: acc_norm\n'),
    "tiny_rolling": ("rolling.jsonl", [{"text": t} for t in ROLLING_DOCS],
                     'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                     'metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n'
                     '  - metric: bits_per_byte\n'),
}


def write_tasks(directory):
    """A YAML task and its JSONL data per task, local only (the datasets cache too)."""
    for name, (data_file, docs, spec) in TASKS.items():
        (directory / data_file).write_text("".join(json.dumps(d) + "\n" for d in docs))
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / data_file}\n"
            f"  cache_dir: {directory / 'datasets-cache'}\ntest_split: test\n{spec}")


def loglikelihoods(sample) -> list[float]:
    """The log-likelihood of each request of a logged sample (saved samples hold them as strings)."""
    return [float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0]) for r in sample["resps"]]


@pytest.fixture
def no_network(monkeypatch):
    """Offline switches on, and any connection or DNS look-up is recorded and refused."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_lm_eval_adapter_scores_equal_lm_evals_hf_model(tmp_path, checkpoint, no_network, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (the eval extra)")
    pytest.importorskip("transformers", reason="transformers is not installed (the parity extra)")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate")
    import lm_eval
    import lm_eval.tasks

    from olmo2_fast.lm_eval_adapter import main as lm_eval_main

    write_tasks(tmp_path)
    # Index only our task directory: lm-eval's thousands of built-in task YAMLs cost ~14 s of CPU per index.
    local_tasks = functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", local_tasks)
    # Ours through the README's command line (lm-eval's CLI with the model registered) ...
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    assert lm_eval_main(["--model", "olmo2_fast", "--model_args",
                         f"pretrained={checkpoint},dtype=float32,backend=torch,max_length=64", "--batch_size", "3",
                         "--tasks", "tiny_mc,tiny_rolling", "--include_path", str(tmp_path), "--device", "cpu",
                         "--output_path", str(tmp_path / "out"), "--log_samples"]) == 0
    ours = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    ours_samples = {task: [json.loads(line) for line in next((tmp_path / "out").rglob(f"samples_{task}_*.jsonl"))
                           .read_text().splitlines()] for task in TASKS}
    # ... and lm-eval's own hf model on the same checkpoint (max_length 64: the rolling docs span several windows).
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={checkpoint},dtype=float32,max_length=64",
                                     tasks=list(TASKS), task_manager=local_tasks(include_path=str(tmp_path)),
                                     device="cpu", log_samples=True)
    for task in TASKS:
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-4), (task, metric)
        got, want = (sorted((s["doc_id"], loglikelihoods(s)) for s in samples)
                     for samples in (ours_samples[task], theirs["samples"][task]))
        assert [doc for doc, _ in got] == [doc for doc, _ in want] == list(range(len(TASKS[task][1])))
        for (_, g), (_, w) in zip(got, want):
            assert g == pytest.approx(w, rel=1e-4), task
    assert ours["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]
    assert no_network == []


def test_lm_eval_generate_until_equals_model_generate(checkpoint, model):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (the eval extra)")
    from lm_eval.api.instance import Instance

    from olmo2_fast.lm_eval_adapter import Olmo2LM

    lm = Olmo2LM(pretrained=str(checkpoint), dtype="float32", backend="torch", batch_size=2, device="cuda:0")
    contexts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    kwargs = {"until": [".", "\n"], "max_gen_toks": 12, "do_sample": False}
    requests = [Instance("generate_until", {}, (c, dict(kwargs)), i) for i, c in enumerate(contexts)]
    got = lm.generate_until(requests, disable_tqdm=True)
    assert got == [model.generate(c, max_new_tokens=12, stop=[".", "\n"]) for c in contexts]
    assert any(got)
    with pytest.raises(EvaluationError, match="gen_kwargs num_beams not supported"):
        lm.generate_until([Instance("generate_until", {}, ("Hi", {**kwargs, "num_beams": 2}), 0)])
    with pytest.raises(EvaluationError, match="batch_size must be a positive integer.*automatic"):
        Olmo2LM(pretrained=str(checkpoint), backend="torch", batch_size="auto")

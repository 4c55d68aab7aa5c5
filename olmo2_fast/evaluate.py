"""Perplexity, bits per byte, and the comparison of two models, over one text.

Knows nothing of how a model computes: it needs `model(input_ids) -> logits`, `model.tokenizer`
and `model.config`, so both backends (and int4 weights) are measured by the same code.

The windows are exactly those of Hugging Face's recipe ("Perplexity of fixed-length models",
transformers docs/source/en/perplexity.md):

    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_len, n); trg_len = end - prev_end
        labels = ids[begin:end], the first (end - begin) - trg_len of them set to -100
        loss = model(ids[begin:end], labels=labels).loss     # mean over the labels left after the
                                                              # model's shift: label 0 is never scored
        valid = count(labels != -100)
        nll_sum += loss * (valid - 1); n_tokens += valid - 1
        prev_end = end; stop once end == n
    perplexity = exp(nll_sum / n_tokens)

The recipe weights each window's mean loss by `valid - 1`. That is the number of tokens the mean
was taken over only when the whole window is labelled (the first window, or stride == max_len);
when windows overlap, the first label is already context, the shift drops nothing scored, and the
mean over `trg_len` tokens is weighted by `trg_len - 1`. We reproduce the recipe's weighting, so
`perplexity` is the number the recipe prints. Two deviations, both where the recipe has no
number: a last window of one token (stride == max_len and n % max_len == 1) scores nothing and
makes the recipe's loss NaN, so it is left out; stride > max_len (the recipe then skips tokens)
and texts of fewer than 2 tokens are refused.

`nll_nats` is the exact total instead: every scored token's negative log-likelihood, each token
counted once. With stride < max_len every token but the text's first is scored; with stride ==
max_len the first token of every window is not (it has no context in its window).
`bits_per_byte = nll_nats / ln 2 / len(text.encode("utf-8"))`: the code length of the scored
tokens, over all the text's bytes.

Log-probabilities are taken in float64 from the model's logits (softmax over all of the model's
`config.vocab_size` rows, as transformers' loss does), and every sum is float64.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .errors import EvaluationError
from .progress import Progress

# Logits kept per forward call, in float32 elements (windows are batched up to this, at least one).
LOGITS_BUDGET = 2**26
# float64 log-softmax is taken over this many elements at a time (rows x vocabulary).
LOG_SOFTMAX_CHUNK = 2**24


@dataclass(frozen=True)
class Window:
    """One forward of the recipe: input ids[begin:end]; labels from `labels_from` on (earlier ones are -100)."""
    begin: int
    end: int
    labels_from: int

    @property
    def score_from(self) -> int:
        """First token whose nll counts: the model's label shift never scores the window's first token."""
        return max(self.labels_from, self.begin + 1)

    @property
    def recipe_weight(self) -> int:
        """The recipe's `num_valid_tokens - batch_size`: what it multiplies this window's mean loss by."""
        return self.end - self.labels_from - 1


def windows(num_tokens: int, max_len: int, stride: int) -> list[Window]:
    """The recipe's windows over a text of `num_tokens` tokens (see the module docstring)."""
    result, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_len, num_tokens)
        # labels before prev_end were scored by the previous window (stride <= max_len: prev_end >= begin)
        result.append(Window(begin, end, prev_end))
        prev_end = end
        if end == num_tokens:
            break
    return [w for w in result if w.end > w.score_from]


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float     # the recipe's: exp(sum_w mean_w * recipe_weight_w / sum_w recipe_weight_w)
    bits_per_byte: float  # nll_nats / ln 2 / bytes
    nll_nats: float       # exact sum of the scored tokens' negative log-likelihoods
    scored_tokens: int
    tokens: int
    bytes: int
    windows: int
    max_len: int
    stride: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    a: PerplexityResult
    b: PerplexityResult
    top1_agreement: float  # fraction of scored positions where both argmaxes (tokenizer vocabulary) agree
    mean_kl: float         # mean over scored positions of KL(p_a || p_b), nats
    positions: int

    def as_dict(self) -> dict:
        return asdict(self)


class _Totals:
    """float64 running sums of one model over the windows."""

    def __init__(self):
        self.nll = self.recipe_nll = 0.0
        self.scored = self.recipe_tokens = 0

    def add(self, window: Window, nll: torch.Tensor):
        total = nll.sum().item()
        self.nll += total
        self.scored += nll.numel()
        self.recipe_nll += total / nll.numel() * window.recipe_weight
        self.recipe_tokens += window.recipe_weight

    def result(self, num_tokens: int, num_bytes: int, num_windows: int, max_len: int,
               stride: int) -> PerplexityResult:
        return PerplexityResult(
            perplexity=math.exp(self.recipe_nll / self.recipe_tokens),
            bits_per_byte=self.nll / math.log(2) / num_bytes, nll_nats=self.nll, scored_tokens=self.scored,
            tokens=num_tokens, bytes=num_bytes, windows=num_windows, max_len=max_len, stride=stride)


def perplexity(model, text: str, *, max_len: int | None = None, stride: int | None = None,
               batch_size: int | None = None, progress: bool | None = None) -> PerplexityResult:
    """Sliding-window perplexity and bits per byte of `text` under `model` (an OLMo2).

    max_len: tokens per window (default: the model's context, config.max_position_embeddings);
    stride: how far each window advances (default max_len // 2); batch_size: windows per forward
    (default: as many as keep the logits under LOGITS_BUDGET elements); progress: a bar on stderr
    (default: when stderr is a terminal).
    """
    results, _ = _run([model], text, max_len, stride, batch_size, progress)
    return results[0]


def compare(model_a, model_b, text: str, *, max_len: int | None = None, stride: int | None = None,
            batch_size: int | None = None, progress: bool | None = None) -> Comparison:
    """Perplexity of each model, top-1 agreement and mean KL(p_a || p_b) of the next-token
    distributions, over the same windows and scored positions (arguments as for `perplexity`).

    The models must tokenize `text` identically and have the same number of logits.
    """
    (a, b), (agree, kl, positions) = _run([model_a, model_b], text, max_len, stride, batch_size, progress)
    return Comparison(a, b, top1_agreement=agree / positions, mean_kl=kl / positions, positions=positions)


def _run(models: Sequence, text: str, max_len, stride, batch_size, progress):
    """-> (a PerplexityResult per model, (agreeing positions, summed KL, positions) of the first two models)."""
    if not isinstance(text, str):
        raise EvaluationError(f"the text to evaluate must be a str, got {type(text).__name__}")
    if not text:
        raise EvaluationError("the text to evaluate is empty")
    ids = models[0].tokenizer.encode(text)
    _check_comparable(models, text, ids)
    config = models[0].config
    max_len = config.max_position_embeddings if max_len is None else max_len
    _check_int("max_len", max_len, 2, config.max_position_embeddings,
               f"the model's context is {config.max_position_embeddings} positions")
    stride = max(1, max_len // 2) if stride is None else stride
    _check_int("stride", stride, 1, max_len, "a larger stride would skip tokens")
    if len(ids) < 2:
        raise EvaluationError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    if batch_size is None:
        batch_size = max(1, LOGITS_BUDGET // (max_len * config.vocab_size))
    _check_int("batch_size", batch_size, 1)

    spans = windows(len(ids), max_len, stride)
    totals = [_Totals() for _ in models]
    agree, kl, positions = 0, 0.0, 0
    vocab = min(m.tokenizer.vocab_size for m in models)
    bar = Progress(len(spans), "perplexity" if len(models) == 1 else "compare", progress)
    for batch in _batches(spans, batch_size):
        inputs = torch.tensor([ids[w.begin:w.end] for w in batch])
        logits = [m(inputs) for m in models]                                     # each (B, L, V)
        for row, w in enumerate(batch):
            targets = torch.tensor(ids[w.score_from:w.end])
            predicting = slice(w.score_from - w.begin - 1, w.end - w.begin - 1)  # logits row t predicts token t + 1
            rows = [x[row, predicting] for x in logits]                          # each (scored, V)
            for total, r in zip(totals, rows):
                total.add(w, token_nll(r, targets))
            if len(models) == 2:
                top_a, top_b = (r[:, :vocab].argmax(-1) for r in rows)  # ids the tokenizer can decode
                agree += (top_a == top_b).sum().item()
                kl += _kl_sum(*rows)
                positions += len(targets)
        bar.advance(len(batch))
    bar.close()
    results = [t.result(len(ids), len(text.encode("utf-8")), len(spans), max_len, stride) for t in totals]
    return results, (agree, kl, positions)


def _check_comparable(models: Sequence, text: str, ids: list[int]):
    if len(models) < 2:
        return
    a, b = models
    if a.config.vocab_size != b.config.vocab_size:
        raise EvaluationError(f"the models have different vocabularies ({a.config.vocab_size} and "
                              f"{b.config.vocab_size} logits): their next-token distributions cannot be compared")
    if b.tokenizer.encode(text) != ids:
        raise EvaluationError("the two models' tokenizers split the text differently: they cannot be compared "
                              "position by position")


def _check_int(name: str, value, low: int, high: int | None = None, why_high: str = ""):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise EvaluationError(f"{name} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise EvaluationError(f"{name} must be at most {high}, got {value} ({why_high})")


def _batches(spans: list[Window], batch_size: int):
    """Consecutive windows of equal length, batch_size at a time (only the last window can be shorter)."""
    batch: list[Window] = []
    for w in spans:
        if batch and (len(batch) == batch_size or w.end - w.begin != batch[0].end - batch[0].begin):
            yield batch
            batch = []
        batch.append(w)
    yield batch


def _log_softmax_chunks(rows: torch.Tensor):
    """float64 log-probabilities of logits rows (n, V), a few rows at a time: -> (start, (k, V))."""
    step = max(1, LOG_SOFTMAX_CHUNK // rows.shape[-1])
    for start in range(0, rows.shape[0], step):
        yield start, torch.log_softmax(rows[start:start + step].double(), dim=-1)


def token_nll(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (float64) of each target (n,) under the logits row (n, V) that predicts it;
    the lm-eval adapter scores with it too."""
    targets = targets.to(rows.device)
    parts = [-lp.gather(-1, targets[start:start + len(lp), None])[:, 0] for start, lp in _log_softmax_chunks(rows)]
    return torch.cat(parts)


def _kl_sum(rows_a: torch.Tensor, rows_b: torch.Tensor) -> float:
    """sum over rows of KL(p_a || p_b) = sum_v p_a (log p_a - log p_b), float64."""
    total = 0.0
    for (start, lp_a), (_, lp_b) in zip(_log_softmax_chunks(rows_a), _log_softmax_chunks(rows_b)):
        total += (lp_a.exp() * (lp_a - lp_b)).sum().item()
    return total

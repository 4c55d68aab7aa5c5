"""lm-evaluation-harness model `olmo2_fast`: lm-eval's tasks scored by our engine (either backend, int4).

    python -m olmo2_fast.lm_eval_adapter --model olmo2_fast \\
        --model_args pretrained=PATH,dtype=bfloat16,backend=auto,quantize=int4,max_length=4096,batch_size=8 \\
        --tasks hellaswag

lm-eval 0.4.13 finds models only in its own registry (no plugin entry points), so `lm_eval --model
olmo2_fast` cannot see us on its own: `python -m olmo2_fast.lm_eval_adapter` is lm-eval's CLI, same
arguments, after this module has registered the model; in Python, import this module before
`lm_eval.simple_evaluate(model="olmo2_fast", ...)`.

Requests are tokenized and windowed exactly as lm-eval's `hf` model does (TemplateLM's context /
continuation split, left truncation to `max_length + 1` tokens, lm-eval's rolling windows with
the prefix token), so on the same checkpoint the scores equal `hf`'s; log-probabilities come
from olmo2_fast.evaluate.token_nll (float64). Two deliberate differences: `is_greedy` takes the
argmax over the tokenizer's vocabulary only (OLMo 2 pads its logits past it, and our greedy
decoding never picks a padding id), and generation stops at EOS by token id, so lm-eval's EOS
*string* is not added to the stop strings (our decoded text never contains special tokens).
"""
from __future__ import annotations

import logging
import sys

import torch

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models: get_model() loads them only while its registry is empty)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:
    raise ImportError(f"olmo2_fast.lm_eval_adapter needs lm-eval (pip install -e '.[eval]'): {e}") from e

from .api import OLMo2
from .errors import Olmo2Error
from .errors import EvaluationError
from .evaluate import token_nll
from .progress import Progress

logger = logging.getLogger(__name__)

MODEL_NAME = "olmo2_fast"
# Sampling keys lm-eval tasks may pass in gen_kwargs, and the generate() argument each maps to.
SAMPLING_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty", "seed": "seed"}


class Olmo2LM(TemplateLM):
    """model_args: pretrained (checkpoint directory or hub id), dtype, backend, quantize ("int4"),
    quantize_lm_head (True: lm_head too), device, revision, max_length (default: the model's context),
    batch_size (requests per forward),
    max_gen_toks (default 256, as lm-eval's hf), prefix_token_id (default: BOS, else EOS)."""

    def __init__(self, pretrained: str, dtype: str | None = None, backend: str = "auto", quantize: str | None = None,
                 quantize_lm_head: bool = False, device: str | None = None, revision: str | None = None,
                 max_length: int | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, max_gen_toks: int = 256,
                 prefix_token_id: int | None = None):
        """max_batch_size is accepted because lm-eval always passes it; it only bounds automatic batch sizes,
        which this model does not do."""
        super().__init__()
        if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes device="cuda:0" unless told otherwise; its hf model falls back the same way
            logger.warning("device=%s requested but CUDA is not available: running on the CPU", device)
            device = None
        self.model = OLMo2.from_pretrained(pretrained, device=device, dtype=dtype, backend=backend, quantize=quantize,
                                           quantize_lm_head=quantize_lm_head, revision=revision)
        self.pretrained = str(pretrained)
        context = self.model.config.max_position_embeddings
        self.max_length = context if max_length is None else _positive_int("max_length", max_length)
        if self.max_length > context:
            raise EvaluationError(f"max_length={self.max_length} is longer than the model's context of {context}")
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        tokenizer = self.model.tokenizer
        if prefix_token_id is None:
            prefix_token_id = tokenizer.bos_id if tokenizer.bos_id is not None else self.eot_token_id
        self._prefix_token_id = prefix_token_id

    @property
    def eot_token_id(self) -> int:
        if not self.model.tokenizer.eos_ids:
            raise EvaluationError(f"{self.pretrained} has no EOS token id (generation_config.json, config.json, "
                                  "tokenizer_config.json): pass prefix_token_id=")
        return self.model.tokenizer.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_token_id

    @property
    def device(self):
        return self.model.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.model.tokenizer.encode(string)  # OLMo 2 adds no special tokens when encoding

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (log p, is greedy)."""
        for _, _, continuation in requests:
            if not continuation or len(continuation) > self.max_length:
                raise EvaluationError(f"a continuation of {len(continuation)} tokens cannot be scored with "
                                      f"max_length={self.max_length}")
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Longest first, as lm-eval does: batches pad less, and a request too large fails at once.
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        bar = Progress(len(requests), "loglikelihood", False if disable_tqdm else None)
        vocab = self.model.tokenizer.vocab_size
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            # the last max_length tokens of context + continuation, minus the last (it predicts nothing scored)
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in chunk]
            width = max(len(x) for x in inputs)
            # Right padding is never seen by the real positions: attention is causal.
            logits = self.model(torch.tensor([x + [0] * (width - len(x)) for x in inputs]))
            for row, i, inp in zip(logits, chunk, inputs):
                key, _, continuation = requests[i]
                rows = row[len(inp) - len(continuation):len(inp)]                  # (continuation, V)
                targets = torch.tensor(continuation, device=rows.device)
                logprob = -token_nll(rows, targets).sum().item()
                greedy = bool((rows[:, :vocab].argmax(-1) == targets).all())
                results[i] = (logprob, greedy)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
            bar.advance(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in lm-eval's disjoint rolling windows of max_length tokens."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Complete each context until a stop string, EOS or max_gen_toks (greedy unless the task samples)."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)  # same gen_kwargs, one batch
        bar = Progress(len(requests), "generate_until", False if disable_tqdm else None)
        for indices in groups.values():
            options = self._generation_options(requests[indices[0]].args[1])
            until, max_new = options.pop("stop"), options["max_new_tokens"]
            if max_new >= self.max_length:
                raise EvaluationError(f"max_gen_toks={max_new} leaves no room for a context in "
                                      f"max_length={self.max_length}")
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] or [self.prefix_token_id]
                           for i in chunk]
                for i, ids in zip(chunk, self.model.generate(prompts, stop=until or None, **options)):
                    results[i] = postprocess_generated_text(self.model.tokenizer.decode(ids), until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.advance(len(chunk))
        bar.close()
        return results

    def _generation_options(self, gen_kwargs: dict) -> dict:
        """lm-eval gen_kwargs -> generate() keyword arguments (with the stop strings under "stop")."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        options = {"stop": [s for s in kwargs.pop("until") if s], "max_new_tokens": kwargs.pop("max_gen_toks")}
        if not kwargs.pop("do_sample"):
            kwargs["temperature"] = 0.0
        unknown = sorted(set(kwargs) - set(SAMPLING_KEYS))
        if unknown:
            raise EvaluationError(f"gen_kwargs {', '.join(unknown)} not supported by {MODEL_NAME}; it takes "
                                  f"until, max_gen_toks, do_sample, {', '.join(SAMPLING_KEYS)}")
        options.update({SAMPLING_KEYS[k]: v for k, v in kwargs.items()})
        return options

    def get_model_info(self) -> dict:
        return {"model_name": self.pretrained, "backend": self.model.backend,
                "dtype": str(self.model.dtype).removeprefix("torch.")}


def _positive_int(name: str, value) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvaluationError(f"model_args {name} must be a positive integer, got {value!r}"
                              + (" (automatic batch sizes are not supported)" if name == "batch_size" else ""))
    return value


# A lazy placeholder rather than the class itself: `python -m olmo2_fast.lm_eval_adapter` runs this file as
# __main__, and lm-eval later imports it under its real name; both register the same string, never two classes.
model_registry.register(MODEL_NAME, target=f"olmo2_fast.lm_eval_adapter:{Olmo2LM.__name__}")


def main(argv: list[str] | None = None) -> int:
    """`python -m olmo2_fast.lm_eval_adapter ARGS`: lm-eval's CLI, same arguments, with `olmo2_fast` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]  # lm-eval's CLI reads sys.argv itself
    try:
        cli_evaluate()
    except Olmo2Error as e:
        print(f"olmo2-fast: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

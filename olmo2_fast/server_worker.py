"""The server's model thread: one `Scheduler` over the model's engine, fed through thread-safe queues.

The scheduler is not thread-safe, so this thread alone touches it, and the engine: the prompt
log-probabilities that `echo` asks for (one full forward `model(ids)` per prompt) run here too,
between two steps. An HTTP handler hands in a `Ticket` with `submit()`, which refuses work
beyond `max_batch_size + max_queue` sequences (`ServerBusy`); the worker calls the ticket's
`deliver` with `PromptLogprobs` and `Update`s on its own thread (the server turns that into
`loop.call_soon_threadsafe`). Requests join the running batch at the next step boundary and
leave it when done (the scheduler does both), so a short request waits for nothing but the
shared steps. A ticket cancelled from any thread (a client that went away) cancels its
sequences at the next step boundary, which frees their cache rows.

This module knows nothing of HTTP or asyncio.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from .cache import KVCache
from .errors import GenerationError
from .graphs import bucket_for
from .scheduler import Request, Scheduler, Sequence, TokenLogprob
from .speculative import SpeculativeDecoder

logger = logging.getLogger("olmo2_fast")

LOGPROB_ROWS = 256  # prompt positions per float64 log-softmax: (256, 100352) float64 is 200 MB


class ServerBusy(Exception):
    """More sequences are in the server than its batch and queue hold."""


@dataclass(frozen=True)
class Update:
    """What the sequence of prompt `index` did since its last update."""
    index: int
    text: str                               # new text that can no longer turn into a stop string
    logprobs: tuple[TokenLogprob, ...]      # the new tokens' entries, when logprobs were asked for
    completion_tokens: int                  # tokens generated so far, EOS included
    finish_reason: str | None = None        # one of scheduler.FINISH_REASONS once done
    error: str | None = None


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt tokens' own log-probabilities: None for the first (nothing predicts it), then one
    TokenLogprob per token with its `top` alternatives."""
    index: int
    logprobs: tuple[TokenLogprob | None, ...]
    error: str | None = None


class Ticket:
    """One HTTP request's work: a generation Request per prompt (None: nothing to generate), the prompts
    to score (`score`: alternatives per token, None: no scoring), and where its results go."""

    def __init__(self, prompts: tuple[tuple[int, ...], ...], requests: tuple[Request | None, ...],
                 score: int | None, deliver: Callable[[object], None]):
        self.prompts, self.requests, self.score, self.deliver = prompts, requests, score, deliver
        self.units = len(prompts)       # what it counts against the server's capacity
        self.cancelled = False

    def cancel(self):
        """Stop this ticket's sequences at the next step boundary (safe from any thread: one flag)."""
        self.cancelled = True


def prompt_logprobs(model, prompt: tuple[int, ...], top: int) -> tuple[TokenLogprob | None, ...]:
    """Each prompt token's log-probability given the tokens before it, from one full forward.

    float64 log-softmax over all of the model's logits (as lm-eval's `hf` model and our lm-eval
    adapter score); the `top` alternatives are taken over the tokenizer's vocabulary, from the same
    tensor, so a token that is the argmax has exactly the top value."""
    vocab = model.tokenizer.vocab_size
    logits = model(list(prompt))[0]                                     # (P, V)
    if not torch.isfinite(logits).all():
        raise GenerationError("the model produced non-finite logits for the prompt: float16 overflows on OLMo 2; "
                              "load the model with dtype='bfloat16'")
    targets = torch.tensor(prompt[1:], device=logits.device)
    entries: list[TokenLogprob | None] = [None]
    for start in range(0, len(prompt) - 1, LOGPROB_ROWS):
        rows = torch.log_softmax(logits[start:start + LOGPROB_ROWS].double(), -1)   # predict start+1 ...
        chosen = rows.gather(1, targets[start:start + rows.shape[0], None])[:, 0].tolist()
        best = torch.topk(rows[:, :vocab], top, dim=-1) if top else None
        for row, (token, logprob) in enumerate(zip(prompt[start + 1:], chosen)):
            alternatives = tuple(zip(best.indices[row].tolist(), best.values[row].tolist())) if top else ()
            entries.append(TokenLogprob(token, logprob, alternatives))
    return tuple(entries)


class Worker:
    """Owns the model and a Scheduler on one thread (see the module docstring)."""

    def __init__(self, model, max_batch_size: int, max_queue: int):
        rows = max_batch_size
        if getattr(model.engine, "graphs", None) is not None:
            rows = bucket_for(rows)  # a CUDA-graph bucket pads a smaller batch with spare cache rows
        cache = KVCache(model.config, rows, model.config.max_position_embeddings, model.dtype, model.device)
        self.model, self.cache, self.max_batch_size = model, cache, max_batch_size
        self.scheduler = self._new_scheduler()
        self.capacity = max_batch_size + max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outstanding = 0            # units submitted and not yet finished
        self._owners: dict[Sequence, tuple[Ticket, int]] = {}
        self._sent_logprobs: dict[Sequence, int] = {}
        self._open: dict[Ticket, int] = {}  # a ticket's sequences that have not finished
        self._steps = 0
        self._finished: Counter = Counter()
        self._thread = threading.Thread(target=self._run, name="olmo2-fast-worker", daemon=True)
        self.stats = self._snapshot()

    # ------------------------------------------------------------------ any thread

    def start(self):
        self._thread.start()

    def close(self, timeout: float = 10.0):
        """Stop after the current step; work still in the server is dropped."""
        self._inbox.put(None)
        self._thread.join(timeout)

    def submit(self, ticket: Ticket):
        with self._lock:
            if self._outstanding + ticket.units > self.capacity:
                raise ServerBusy(f"the server holds {self._outstanding} sequences, its batch and queue "
                                 f"{self.capacity}")
            self._outstanding += ticket.units
        self._inbox.put(ticket)

    # ------------------------------------------------------------------ the worker thread

    def _run(self):
        while True:
            try:
                tickets = [self._inbox.get()] if self.scheduler.idle else []
                while True:
                    tickets.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            if None in tickets:
                return
            for ticket in tickets:
                self._admit(ticket)
            for sequence, (ticket, _) in self._owners.items():
                if ticket.cancelled:
                    sequence.cancel()
            if not self.scheduler.idle:
                self._step()
            self.stats = self._snapshot()

    def _step(self):
        try:
            self.scheduler.step()
            self._steps += 1
        except Exception as e:  # an engine failure (out of memory, ...): fail what runs, keep serving
            logger.exception("generation step failed")
            error = f"the generation step failed: {type(e).__name__}: {e}"
            for sequence, (ticket, index) in list(self._owners.items()):
                self._deliver(ticket, Update(index, "", (), len(sequence.sampled), "error", error))
                self._forget(sequence, "error")
            self.scheduler = self._new_scheduler()
            return
        for sequence in list(self._owners):  # every one: a waiting sequence may have been cancelled
            self._report(sequence)

    def _new_scheduler(self):
        """The loop the worker steps: speculative decoding when the model is configured for it and the
        server runs one sequence at a time, else the batching Scheduler, capped at --max-batch-size
        (the cache may have more rows: a CUDA-graph bucket's padding)."""
        model = self.model
        if model.speculation is not None and self.max_batch_size == 1:
            return SpeculativeDecoder(model.engine, model.tokenizer, self.cache, model.speculation)
        return Scheduler(model.engine, model.tokenizer, self.cache, max_running=self.max_batch_size)

    def _admit(self, ticket: Ticket):
        if ticket.cancelled:
            self._release(ticket.units)
            return
        self._open[ticket] = 0
        for index, (prompt, request) in enumerate(zip(ticket.prompts, ticket.requests)):
            if ticket.score is not None:
                self._score(ticket, index, prompt)
            if request is None:
                continue
            try:
                sequence = self.scheduler.add(request)
            except Exception as e:  # the server validated the request; a refusal here is still an answer
                self._deliver(ticket, Update(index, "", (), 0, "error", str(e)))
                continue
            self._owners[sequence], self._sent_logprobs[sequence] = (ticket, index), 0
            self._open[ticket] += 1
        self._close_if_done(ticket)

    def _score(self, ticket: Ticket, index: int, prompt: tuple[int, ...]):
        try:
            result = PromptLogprobs(index, prompt_logprobs(self.model, prompt, ticket.score))
        except GenerationError as e:
            result = PromptLogprobs(index, (), str(e))
        except Exception as e:  # an engine failure: answer it, keep serving
            logger.exception("prompt log-probabilities failed")
            result = PromptLogprobs(index, (), f"scoring the prompt failed: {type(e).__name__}: {e}")
        self._deliver(ticket, result)

    def _report(self, sequence: Sequence):
        ticket, index = self._owners[sequence]
        sent = self._sent_logprobs[sequence]
        new = tuple(sequence.logprobs[sent:])
        self._sent_logprobs[sequence] = len(sequence.logprobs)
        text = sequence.pending_text()
        if text or new or sequence.done:
            self._deliver(ticket, Update(index, text, new, len(sequence.sampled), sequence.finish_reason,
                                         sequence.error))
        if sequence.done:
            self._forget(sequence, sequence.finish_reason)

    def _forget(self, sequence: Sequence, reason: str):
        ticket, _ = self._owners.pop(sequence)
        del self._sent_logprobs[sequence]
        self._finished[reason] += 1
        self._open[ticket] -= 1
        self._close_if_done(ticket)

    def _close_if_done(self, ticket: Ticket):
        if self._open[ticket] == 0:
            del self._open[ticket]
            self._release(ticket.units)

    def _deliver(self, ticket: Ticket, item):
        if ticket.cancelled:
            return
        try:
            ticket.deliver(item)
        except Exception:  # its reader is gone (an event loop that closed): stop its work
            logger.warning("a result could not be delivered; cancelling its request", exc_info=True)
            ticket.cancel()

    def _release(self, units: int):
        with self._lock:
            self._outstanding -= units

    def _snapshot(self) -> dict:
        """What /health reports, rebuilt after every step (a new dict: readers on other threads see one whole)."""
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "outstanding": self._outstanding, "capacity": self.capacity, "cache_rows": self.cache.max_batch,
                "steps": self._steps, "finished": dict(self._finished)}

"""Where speculative decoding's drafts come from, and which draft models are allowed.

  * `DraftModel`: a smaller model of the same tokenizer proposes m tokens by decoding them
    itself, over its own KV cache (row 0), in step with the target's: each round it first
    catches up on the context tokens it has not cached (the round's last token, or two after
    a round that kept every draft, or the prompt), then decodes m - 1 more from its own
    proposals on the device. Its decode steps go through its engine's `step`, so an engine
    with CUDA graphs replays them.
  * `PromptLookup`: no model; the last n tokens of the context (prompt and output so far) are
    looked up among their earlier occurrences, and the tokens that followed the most recent one
    are proposed. Free to compute, and right whenever the output copies its context
    (summaries, code edits, retrieval answers, and the loops small models fall into).
  * `check_draft`: the draft must tokenise exactly as the target (same vocabulary, merges,
    special tokens, normaliser and pre-tokeniser: tokenizer.json's content, not its name, since
    OLMo 2's early "-preview" post-trained models share the vocabulary but pre-tokenise
    differently), share its logit width and device, and have a context at least as long.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .cache import KVCache, StepBatch
from .chunk_steps import chunk_batch
from .errors import GenerationError, TokenizerError
from .sampling import SamplingParams
from .speculative_sampling import draft_token


class DraftModel:
    """Proposes tokens by decoding with a draft engine over its own cache row 0 (see the module docstring)."""

    def __init__(self, engine, cache: KVCache):
        self.engine, self.cache = engine, cache
        self.length = 0  # context positions row 0 holds

    def propose(self, ids: torch.Tensor, m: int, params: SamplingParams, seed: torch.Tensor,
                seen: torch.Tensor | None, vocab: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids (n,): the context tokens after the first `length` (device). -> (drafts (m,), q (m, vocab) or
        None when greedy). Afterwards row 0 holds the context and the first m - 1 drafts."""
        batch = chunk_batch(ids, self.length)
        context = self.length + ids.shape[0]
        seen = None if seen is None else seen.clone()
        drafts, probs = [], []
        for i in range(m):
            if i:
                batch = StepBatch.decode(drafts[-1], batch.kv_lens, [context + i - 1])
            logits = self.engine.step(batch, self.cache)[:, :vocab]
            token, q = draft_token(logits, params, seed, batch.kv_lens, seen)
            drafts.append(token)
            probs.append(q)
            if seen is not None:
                seen.index_fill_(0, token, True)
        self.length = context + m - 1
        return torch.cat(drafts), None if params.greedy else torch.cat(probs)

    def keep(self, length: int):
        """The context's first `length` tokens are what the round kept: positions past them are stale."""
        self.length = min(self.length, length)


class PromptLookup:
    """n-gram drafting over one sequence's context, indexed as it grows (one dict update per new token)."""

    def __init__(self, n: int):
        self.n = n
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> start of its most recent occurrence
        self.indexed = 0                               # n-grams starting before this are in `latest`

    def propose(self, context: list[int], m: int) -> list[int]:
        """Up to m tokens that followed the most recent earlier occurrence of the context's last n."""
        n = self.n
        for start in range(self.indexed, len(context) - n):  # only n-grams some token followed
            self.latest[tuple(context[start:start + n])] = start
        self.indexed = max(self.indexed, len(context) - n)
        start = self.latest.get(tuple(context[-n:])) if len(context) >= n else None
        return [] if start is None else context[start + n:start + n + m]


def _tokenizer_json(directory: Path) -> dict:
    path = directory / "tokenizer.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path} to compare it with the target's: {e}") from None


def _merge(entry) -> tuple[str, ...]:
    """A BPE merge as tokenizers writes it: "a b" (older files) or ["a", "b"]."""
    return tuple(entry.split(" ", 1)) if isinstance(entry, str) else tuple(entry)


def tokenizer_difference(target: dict, draft: dict) -> str | None:
    """What makes two tokenizer.json contents tokenise differently, in words, or None if nothing does."""
    tm, dm = target.get("model", {}), draft.get("model", {})
    tv, dv = tm.get("vocab", {}), dm.get("vocab", {})
    if tv != dv:
        token = min(set(tv.items()) ^ set(dv.items()), key=lambda entry: entry[1])[0]  # the lowest id that differs

        def id_in(vocab):
            return f"id {vocab[token]}" if token in vocab else "absent"
        return (f"the vocabularies differ ({len(tv)} and {len(dv)} entries, {len(tv.items() - dv.items())} of the "
                f"target's not the draft's), e.g. {token!r} is {id_in(tv)} in the target and {id_in(dv)} in the draft")
    tmerges, dmerges = [_merge(e) for e in tm.get("merges", [])], [_merge(e) for e in dm.get("merges", [])]
    if tmerges != dmerges:
        first = next((i for i, (a, b) in enumerate(zip(tmerges, dmerges)) if a != b), min(len(tmerges), len(dmerges)))
        return f"the merges differ ({len(tmerges)} and {len(dmerges)}; first at merge {first})"
    rest = {k: v for k, v in tm.items() if k not in ("vocab", "merges")}
    if rest != {k: v for k, v in dm.items() if k not in ("vocab", "merges")}:
        return "the tokenizer models' settings differ"
    for field, what in (("added_tokens", "special / added tokens"), ("normalizer", "normalizers"),
                        ("pre_tokenizer", "pre-tokenizers")):
        if target.get(field) != draft.get(field):
            return f"the {what} differ"
    return None


def check_draft(target_dir: Path, target_config, target_device: torch.device, draft) -> None:
    """Refuse a draft model (an OLMo2) that cannot draft for this target, naming both checkpoints."""
    names = f"target {target_dir}, draft {draft.source_dir}"
    difference = tokenizer_difference(_tokenizer_json(target_dir), _tokenizer_json(draft.source_dir))
    if difference:
        raise TokenizerError(f"the draft model tokenises differently from the target ({names}): {difference}; a "
                             "draft must use the target's tokenizer")
    if draft.config.vocab_size != target_config.vocab_size:
        raise GenerationError(f"the draft's vocab_size is {draft.config.vocab_size}, the target's "
                              f"{target_config.vocab_size} ({names}): speculative sampling compares the two models' "
                              "probabilities token by token, so their vocabularies must be the same size")
    if draft.device != target_device:
        raise GenerationError(f"the draft model is on {draft.device} and the target on {target_device} ({names}): "
                              "load both on one device")
    if draft.config.max_position_embeddings < target_config.max_position_embeddings:
        raise GenerationError(f"the draft's context ({draft.config.max_position_embeddings} positions) is shorter than "
                              f"the target's ({target_config.max_position_embeddings}) ({names}): it could not "
                              "draft to the end of the target's context")

"""The speculative acceptance rule: which drafted tokens the target keeps, and the token after them.

One verify step gives the target's logits for m + 1 consecutive positions: row i is the
distribution p_i of the token after the context and drafts d_0..d_{i-1}. `accept` returns how
many drafts are kept (j) and the j + 1 tokens the round emits: d_0..d_{j-1}, then one more
token drawn from row j.
  * greedy: d_i is kept while it equals argmax p_i; the token after them is argmax p_j, so the
    output is the target's own greedy output;
  * sampled (Leviathan et al. 2023, "Fast inference from transformers via speculative
    decoding"; Chen et al. 2023): d_i, drawn from the draft's q_i, is kept with probability
    min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn from
    normalize(max(0, p_j - q_j)); when every draft is kept, from p_m. Each emitted token is then
    distributed exactly as the target samples it. Prompt lookup proposes without a
    distribution: q_i is a point mass on d_i, so d_i is kept with probability p_i(d_i) and the
    residual is p_i without d_i.
p and q are what the plain sampler draws from (repetition penalty, temperature, top-k, top-p,
min-p: `sampling.filtered_probs`), normalised; the penalty sees the drafts before a row as context.

Randomness is counter-based, as the plain sampler's (`sampling.exponential_noise`): a pure
function of (seed, position, token id), in three streams per request: the target's token at
position n uses the same noise as plain sampling would, the draft's proposal and the
acceptance uniform use seeds XOR-ed with a constant. A seed reproduces its output on every
backend, and nothing here reads a value on the host.
"""
from __future__ import annotations

import torch

from .sampling import SamplingParams, apply_repetition_penalty, exponential_noise, filtered_probs

# XOR-ed into a request's seed (< 2**63) for the draft's and the acceptance test's noise: below 2**62,
# so the result stays a non-negative int64, and with high bits set, so the hash keys differ.
DRAFT_STREAM = 0x2F1B_7C3D_4E5A_6B71
ACCEPT_STREAM = 0x1D6E_95A3_C7B2_0F4D


def context_seen(seen: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """(V,) tokens of the context -> (m + 1, V): row i adds drafts d_0..d_{i-1}, the context of row i."""
    m = drafts.shape[0]
    added = torch.zeros(m + 1, seen.shape[0], dtype=torch.int32, device=seen.device)
    added[torch.arange(1, m + 1, device=seen.device), drafts] = 1
    return seen[None, :] | (added.cumsum(0) > 0)


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """What the plain sampler draws from, normalised: filtered_probs leaves the mass min-p and top-p
    remove out (the exponential race needs no normalising), but the rule's ratios and residuals do."""
    probs = filtered_probs(logits, params)
    return probs / probs.sum(-1, keepdim=True)


def uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(n,) acceptance uniforms in (0, 1), one per (seed, position): exp(-E) of an Exp(1) draw is uniform."""
    return torch.exp(-exponential_noise(seeds ^ ACCEPT_STREAM, positions, 1)[:, 0])


def draft_token(logits: torch.Tensor, params: SamplingParams, seed: torch.Tensor, position: torch.Tensor,
                seen: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The draft model's proposal from its (1, V) logits (already cut to the vocabulary) at `position`
    (1,): (token (1,), q (1, V)); q is None when greedy, where the rule needs no distribution."""
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen[None, :], params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1), None
    q = distribution(logits, params)
    return (q / exponential_noise(seed ^ DRAFT_STREAM, position, q.shape[-1])).argmax(-1), q


def accept(logits: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None, params: SamplingParams,
           seed: torch.Tensor, first_position: int, seen: torch.Tensor | None) -> torch.Tensor:
    """One round's outcome, on the device: (m + 2,) int64 = [j, token_0, ..., token_m], of which the
    first j + 1 tokens are emitted (the rest is padding); a token is -1 where its row's logits are not
    finite (the rows before it were).

    logits: (m + 1, V) float, the target's rows cut to the vocabulary; drafts: (m,) int64;
    draft_probs: (m, V) the draft's q, or None for a point mass on each draft (prompt lookup; and
    whenever greedy); seed: (1,) int64; first_position: the position of the token row 0 predicts;
    seen: (V,) bool tokens of the context, when a repetition penalty applies.
    """
    m = drafts.shape[0]
    rows = logits.float()
    finite = torch.isfinite(rows).all(-1)
    if params.repetition_penalty != 1.0:
        rows = apply_repetition_penalty(rows, context_seen(seen, drafts), params.repetition_penalty)
    index = torch.arange(m + 1, device=rows.device)
    positions = index + first_position
    if params.greedy:
        choice = rows.argmax(-1)
        keep = choice[:m] == drafts
    else:
        p = distribution(rows, params)
        p_draft = p[:m].gather(1, drafts[:, None])[:, 0]
        if draft_probs is None:
            q_draft = torch.ones_like(p_draft)
            residual = p[:m].scatter(1, drafts[:, None], 0.0)
        else:
            q_draft = draft_probs.gather(1, drafts[:, None])[:, 0]
            residual = (p[:m] - draft_probs).clamp(min=0)
        keep = uniforms(seed.expand(m), positions[:m]) * q_draft < p_draft
        # p == q leaves no residual, but then the draft is never rejected: any row will do.
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:m])
        final = torch.cat([residual, p[m:]])
        choice = (final / exponential_noise(seed.expand(m + 1), positions, final.shape[-1])).argmax(-1)
    kept = (keep & finite[:m]).long().cumprod(0).sum()
    choice = torch.where(finite, choice, -1)
    tokens = torch.where(index < kept, torch.cat([drafts, choice[m:]]), choice)
    return torch.cat([kept.view(1), tokens])

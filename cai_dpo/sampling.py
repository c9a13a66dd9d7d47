"""Next-token choice for the engine's decoding loop: greedy, or temperature + nucleus sampling.

Nucleus (top-p) sampling is usually written as a sort of the whole vocabulary per step,
which on CPU costs more than the model's own forward pass for a 135M model (sorting
64 x 49k logits takes ~0.15 s). :func:`next_tokens` first looks at the ``k`` most likely
tokens only: when they already hold ``top_p`` of the probability mass the nucleus lies
inside them and the result is the same distribution; rows where they do not fall back
to the full sort.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cai_dpo.config import SamplingSection

if TYPE_CHECKING:
    import torch

CANDIDATES = 64


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the tokens to drop (full-vocabulary sort; same rule as transformers' TopPLogitsWarper)."""
    import torch

    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False
    return drop_sorted.scatter(1, order, drop_sorted)


def next_tokens(
    logits: torch.Tensor,
    sampling: SamplingSection,
    generator: torch.Generator | None = None,
    candidates: int = CANDIDATES,
) -> torch.Tensor:
    """One token id per row of ``logits`` ``[B, V]``: argmax, or a sample after temperature and top-p."""
    import torch

    if not (sampling.do_sample and sampling.temperature > 0):
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_p >= 1.0:
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
    k = min(candidates, logits.shape[-1])
    top, idx = logits.topk(k, dim=-1)
    probs = (top - logits.logsumexp(dim=-1, keepdim=True)).exp()
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens, per candidate
    keep = before < sampling.top_p
    inside = (probs.sum(dim=-1) >= sampling.top_p) | (k == logits.shape[-1])
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if inside.any():
        rows = inside.nonzero().squeeze(1)
        p = probs[rows].masked_fill(~keep[rows], 0.0)
        pick = torch.multinomial(p, 1, generator=generator)
        out[rows] = idx[rows].gather(1, pick).squeeze(1)
    if not inside.all():
        rows = (~inside).nonzero().squeeze(1)
        masked = logits[rows].masked_fill(nucleus_mask(logits[rows], sampling.top_p), float("-inf"))
        out[rows] = torch.multinomial(masked.softmax(dim=-1), 1, generator=generator).squeeze(1)
    return out

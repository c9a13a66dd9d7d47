"""Next-token choice: greedy, and nucleus sampling that avoids sorting the vocabulary."""

from __future__ import annotations

import pytest
import torch

from cai_dpo.config import SamplingSection
from cai_dpo.sampling import CANDIDATES, next_tokens, nucleus_mask


def _draws(logits: torch.Tensor, sampling: SamplingSection, n: int = 4000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.stack([next_tokens(logits, sampling, g) for _ in range(n)])


def test_greedy_is_argmax():
    logits = torch.randn(5, 300)
    assert torch.equal(next_tokens(logits, SamplingSection(do_sample=False)), logits.argmax(-1))
    assert torch.equal(next_tokens(logits, SamplingSection(temperature=0.0)), logits.argmax(-1))


@pytest.mark.parametrize("peaked", [True, False], ids=["nucleus-in-candidates", "wide-nucleus-fallback"])
def test_nucleus_samples_follow_the_renormalised_nucleus(peaked):
    """Both paths draw from the same distribution the full-sort rule defines."""
    torch.manual_seed(1)
    vocab = 500
    logits = torch.randn(1, vocab) * (6.0 if peaked else 0.05)
    sampling = SamplingSection(temperature=0.7, top_p=0.9)
    scaled = logits / sampling.temperature
    allowed = ~nucleus_mask(scaled, sampling.top_p)[0]
    assert (int(allowed.sum()) < CANDIDATES) == peaked
    expected = torch.where(allowed, scaled[0].softmax(-1), 0.0)
    expected /= expected.sum()
    draws = _draws(logits, sampling)[:, 0]
    assert allowed[draws].all(), "sampled a token outside the nucleus"
    freq = torch.bincount(draws, minlength=vocab).float() / len(draws)
    assert (freq - expected).abs().max() < 0.03
    if not peaked:
        top = set(scaled[0].topk(CANDIDATES).indices.tolist())
        assert any(int(t) not in top for t in draws), "the fallback should reach beyond the candidates"


def test_rows_mix_both_paths():
    torch.manual_seed(2)
    logits = torch.stack([torch.randn(400) * 8, torch.randn(400) * 0.01])
    out = _draws(logits, SamplingSection(temperature=1.0, top_p=0.95), n=200)
    masks = ~nucleus_mask(logits, 0.95)
    assert masks[0][out[:, 0]].all() and masks[1][out[:, 1]].all()


def test_top_p_one_samples_the_full_distribution():
    logits = torch.zeros(1, 50)
    draws = _draws(logits, SamplingSection(temperature=1.0, top_p=1.0), n=2000)[:, 0]
    assert len(set(draws.tolist())) == 50

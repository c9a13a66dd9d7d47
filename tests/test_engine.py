"""Engine: reproducible batched generation, option scoring and log-probs."""

from __future__ import annotations

import numpy as np
import pytest

from cai_dpo.config import SamplingConfig
from cai_dpo.engine import Engine, naive_option_probs

CONVS = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Write one line about autumn leaves falling in a quiet park."}],
]


@pytest.fixture()
def engine(tiny_model):
    model, tok = tiny_model
    return Engine(model, tok, batch_size=2, progress=False)


def test_generation_reproducible_under_seed(engine):
    s = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=7, batch_size=2)
    a = engine.generate(CONVS, s, n=2)
    b = engine.generate(CONVS, s, n=2)
    c = engine.generate(CONVS, SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=8, batch_size=2), n=2)
    texts = lambda r: [g.text for gens in r for g in gens]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert len(a) == 3 and all(len(g) == 2 for g in a)
    assert all(0 < g.n_tokens <= 12 for gens in a for g in gens)


def test_batching_does_not_change_greedy_output(engine):
    s1 = SamplingConfig(max_new_tokens=10, do_sample=False, batch_size=1)
    s3 = SamplingConfig(max_new_tokens=10, do_sample=False, batch_size=3)
    assert [g[0].text for g in engine.generate(CONVS, s1)] == [g[0].text for g in engine.generate(CONVS, s3)]


def test_shared_prefix_cache_gives_same_output(engine):
    system = [{"role": "system", "content": "You are terse."}]
    prefix = engine.render(system, add_generation_prompt=False)
    full = [engine.render(system + c) for c in CONVS]
    rest = [f[len(prefix):] for f in full]
    s = SamplingConfig(max_new_tokens=10, do_sample=False)
    assert [g[0].text for g in engine.generate(full, s)] == [g[0].text for g in engine.generate(rest, s, prefix=prefix)]


def test_score_options_matches_naive(engine, tiny_model):
    model, tok = tiny_model
    contexts = [engine.render(c) + "Which is better? (A) one (B) two\nThe answer is:" for c in CONVS]
    probs, raw = engine.score_options(contexts, [" (A)", " (B)"])
    for ctx, p in zip(contexts, probs):
        assert np.allclose(p, naive_option_probs(model, tok, ctx, [" (A)", " (B)"]), atol=1e-4)
    multi, _ = engine.score_options(contexts, [" yes, clearly", " no", " maybe not"])
    for ctx, p in zip(contexts, multi):
        assert np.allclose(p, naive_option_probs(model, tok, ctx, [" yes, clearly", " no", " maybe not"]), atol=1e-4)
    assert np.allclose(probs.sum(1), 1.0)


def test_score_options_with_prefix_matches(engine):
    prefix = engine.render([{"role": "system", "content": "Judge fairly."}], add_generation_prompt=False)
    tails = ["<|im_start|>user\nPick one. (A) x (B) y<|im_end|>\n<|im_start|>assistant\nThe answer is:"] * 2
    with_prefix, _ = engine.score_options(tails, prefix=prefix)
    plain, _ = engine.score_options([prefix + t for t in tails])
    assert np.allclose(with_prefix, plain, atol=1e-4)


def test_logprob_sums_tokens_and_prefix_agrees(engine):
    ctx = engine.render(CONVS[0])
    [lp] = engine.logprob([ctx], ["The sea is wide."])
    assert lp.n_tokens > 1 and lp.total == pytest.approx(sum(lp.per_token))
    cut = ctx.index("<|im_start|>user")  # a message boundary keeps tokenization identical
    [lp2] = engine.logprob([ctx[cut:]], ["The sea is wide."], prefix=ctx[:cut])
    assert lp2.total == pytest.approx(lp.total, abs=1e-3)


def test_too_long_prompt_is_a_clear_error(tiny_model):
    model, tok = tiny_model
    engine = Engine(model, tok, progress=False, max_length=32)
    with pytest.raises(ValueError, match="exceed the model's context"):
        engine.generate([[{"role": "user", "content": "word " * 50}]], SamplingConfig(max_new_tokens=8))

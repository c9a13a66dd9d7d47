"""Engine: reproducible batched generation, option scoring and log-probs."""

from __future__ import annotations

import numpy as np
import pytest

from cai_dpo import kv_cache
from cai_dpo.config import SamplingSection
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
    s = SamplingSection(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=7, batch_size=2)
    a = engine.generate(CONVS, s, n=2)
    b = engine.generate(CONVS, s, n=2)
    c = engine.generate(
        CONVS, SamplingSection(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=8, batch_size=2), n=2
    )
    texts = lambda r: [g.text for gens in r for g in gens]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert len(a) == 3 and all(len(g) == 2 for g in a)
    assert all(0 < g.n_tokens <= 12 for gens in a for g in gens)


def test_batching_does_not_change_greedy_output(engine):
    s1 = SamplingSection(max_new_tokens=10, do_sample=False, batch_size=1)
    s3 = SamplingSection(max_new_tokens=10, do_sample=False, batch_size=3)
    assert [g[0].text for g in engine.generate(CONVS, s1)] == [g[0].text for g in engine.generate(CONVS, s3)]


def test_shared_prefix_cache_gives_same_output(engine):
    system = [{"role": "system", "content": "You are terse."}]
    prefix = engine.render(system, add_generation_prompt=False)
    full = [engine.render(system + c) for c in CONVS]
    rest = [f[len(prefix) :] for f in full]
    s = SamplingSection(max_new_tokens=10, do_sample=False)
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


def test_score_options_without_branch_masks_matches_naive(engine, tiny_model, monkeypatch):
    """Attention kernels without custom masks score option tails from the context's cache instead."""
    model, tok = tiny_model
    monkeypatch.setattr(Engine, "_branching_masks", property(lambda self: False))
    contexts = [engine.render(c) + "Which is better? (A) one (B) two\nThe answer is:" for c in CONVS]
    for options in ([" (A)", " (B)"], [" yes, clearly", " no", " maybe not"]):
        probs, _ = engine.score_options(contexts, options)
        for ctx, p in zip(contexts, probs):
            assert np.allclose(p, naive_option_probs(model, tok, ctx, options), atol=1e-4)


def test_common_prefix_of_a_batch_is_computed_once(engine, tiny_model, monkeypatch):
    model, tok = tiny_model
    shared = "Consider this long shared instruction that every judge context in the batch begins with. " * 2
    contexts = [shared + f"Question {i}: is {i} even? (A) yes (B) no\nThe answer is:" for i in range(4)]
    seen = []
    original = kv_cache.SharedPrefixes.get
    monkeypatch.setattr(
        kv_cache.SharedPrefixes,
        "get",
        lambda self, tokens, batch: seen.append(len(tokens)) or original(self, tokens, batch),
    )
    probs, _ = engine.score_options(contexts)
    assert seen and min(seen) >= len(tok(shared)["input_ids"]) - 2  # the shared text came from the cache
    for ctx, p in zip(contexts, probs):
        assert np.allclose(p, naive_option_probs(model, tok, ctx, [" (A)", " (B)"]), atol=1e-4)
    seen.clear()
    plain = engine.generate(contexts, SamplingSection(max_new_tokens=6, do_sample=False, batch_size=4))
    assert seen, "generation should reuse the batch's common prefix too"
    alone = [
        engine.generate([c], SamplingSection(max_new_tokens=6, do_sample=False, batch_size=1))[0] for c in contexts
    ]
    assert [g[0].text for g in plain] == [g[0].text for g in alone]


def test_greedy_generation_matches_transformers_generate(engine, tiny_model):
    model, tok = tiny_model
    ours = engine.generate(CONVS, SamplingSection(max_new_tokens=10, do_sample=False, batch_size=3))
    for conv, gens in zip(CONVS, ours):
        assert gens[0].text == tok.decode(_greedy_ids(model, tok, conv, 10), skip_special_tokens=True).strip()


def _greedy_ids(model, tok, conv, n: int) -> list[int]:
    import torch

    ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def test_rows_that_stop_early_leave_the_others_unchanged(engine, tiny_model, monkeypatch):
    """A row reaching EOS leaves the batch; the remaining rows decode exactly as before."""
    model, tok = tiny_model
    s = SamplingSection(max_new_tokens=10, do_sample=False, batch_size=3)
    before = engine.generate(CONVS, s)
    row0 = _greedy_ids(model, tok, CONVS[0], 10)
    stop = row0[2]  # make row 0's third token an end-of-sequence token
    others = [_greedy_ids(model, tok, c, 10) for c in CONVS[1:]]
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, stop])
    after = engine.generate(CONVS, s)
    assert after[0][0].finished and after[0][0].n_tokens == row0.index(stop)
    for ids, b, a in zip(others, before[1:], after[1:]):
        if stop not in ids:
            assert a[0].text == b[0].text and not a[0].finished


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
        engine.generate([[{"role": "user", "content": "word " * 50}]], SamplingSection(max_new_tokens=8))

"""Metrics: diversity, refusal and evasiveness detection, intervals, Elo."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cai_dpo import metrics as M

REFUSALS = [
    "I can't help with that.",
    "I cannot assist with this request.",
    "I won't do that.",
    "I'm sorry, but I can't provide those instructions.",
    "As an AI, I must decline.",
    "I am unable to help with that request.",
    "I’m not able to share that.",
]
NOT_REFUSALS = [
    "Sure! Here is a simple recipe for bread: flour, water, salt and yeast.",
    "I can't wait to hear how your trip goes. Pack light and bring a map.",
    "I can't help but notice the sky is lovely today.",
    "The capital of France is Paris.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_planted_refusals_detected(text):
    assert M.is_refusal(text)
    assert M.is_evasive(text)  # no reason given


@pytest.mark.parametrize("text", NOT_REFUSALS)
def test_ordinary_answers_are_not_refusals(text):
    assert not M.is_refusal(text)
    assert not M.is_evasive(text)


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that because it could hurt someone.",
        "I won't explain how to pick that lock, since breaking into a home is illegal.",
        "I cannot provide this. Making explosives is dangerous to you and others.",
    ],
)
def test_refusal_with_reason_is_not_evasive(text):
    assert M.is_refusal(text)
    assert not M.is_evasive(text)
    assert M.is_explained_refusal(text)


def test_distinct_and_repetition_on_known_inputs():
    varied = ["the cat sat on the mat", "a dog ran in a park"]
    # unigrams: 12 total; unique: the, cat, sat, on, mat, a, dog, ran, in, park = 10
    assert M.distinct_n(varied, 1) == pytest.approx(10 / 12)
    # bigrams: 5 + 5 = 10, all unique
    assert M.distinct_n(varied, 2) == pytest.approx(1.0)
    repetitive = ["go go go go go go go go go"]
    # 8 bigrams, 1 unique
    assert M.distinct_n(repetitive, 2) == pytest.approx(1 / 8)
    assert M.repetition_rate(repetitive, 2) == pytest.approx(1 - 1 / 8)
    assert M.repetition_rate(varied, 2) == pytest.approx(0.0)
    assert M.distinct_n(repetitive, 2) < 0.2 < M.distinct_n(varied, 2)
    assert M.repetition_rate(repetitive) > 0.8
    assert M.distinct_n([], 2) == 0.0
    assert M.repetition_rate(["one"], 2) == 0.0  # no bigram: excluded


def test_mean_length_and_diversity_summary():
    assert M.mean_length(["a b c", "d e", "f"]) == pytest.approx(2.0)
    assert M.mean_length([]) == 0.0
    d = M.diversity(["Hello, world!", "hello world"])
    assert d["distinct_1"] == pytest.approx(0.5)  # punctuation and case stripped
    assert d["n"] == 2


def test_rate_ci_known_values_and_edges():
    r, lo, hi = M.rate_ci(5, 10)
    assert r == 0.5 and lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    r, lo, hi = M.rate_ci(0, 20)
    assert r == 0.0 and lo == 0.0 and 0.1 < hi < 0.2
    r, lo, hi = M.rate_ci(0, 0)
    assert math.isnan(r) and (lo, hi) == (0.0, 1.0)
    with pytest.raises(ValueError):
        M.rate_ci(3, 2)
    s = M.rate_summary(3, 4)
    assert s["rate"] == 0.75 and s["n"] == 4 and s["lo"] < 0.75 < s["hi"]
    assert M.rate_summary(0, 0)["rate"] is None


def test_wilson_coverage_near_nominal():
    rng = np.random.default_rng(1)
    p, n, sims = 0.3, 40, 400
    ks = rng.binomial(n, p, size=sims)
    covered = sum(lo <= p <= hi for _, lo, hi in (M.rate_ci(int(k), n) for k in ks))
    assert 0.90 <= covered / sims <= 0.99


def test_bootstrap_mean_coverage_near_nominal():
    rng = np.random.default_rng(2)
    mu, sims = 1.5, 400
    covered = 0
    for i in range(sims):
        x = rng.normal(mu, 2.0, size=60)
        _, lo, hi = M.mean_ci(x, n_boot=400, seed=i)
        covered += lo <= mu <= hi
    assert 0.90 <= covered / sims <= 0.99
    assert M.mean_summary([1.0, 2.0, 3.0], n_boot=50)["mean"] == pytest.approx(2.0)
    assert math.isnan(M.mean_ci([])[0])


def _tournament(strengths: dict[str, float], games: int, seed: int) -> list[tuple[str, str, float]]:
    rng = np.random.default_rng(seed)
    names = list(strengths)
    matches = []
    for _ in range(games):
        a, b = rng.choice(names, size=2, replace=False)
        p = 1 / (1 + 10 ** ((strengths[b] - strengths[a]) / 400))
        matches.append((str(a), str(b), float(rng.random() < p)))
    return matches


@pytest.mark.parametrize("method", ["bt", "online"])
def test_elo_orders_synthetic_tournament(method):
    truth = {"weak": 800.0, "mid": 1000.0, "strong": 1200.0, "best": 1400.0}
    matches = _tournament(truth, 1500, seed=3)
    ratings = M.elo_ratings(matches, method=method, k=8)
    assert sorted(ratings, key=ratings.get) == ["weak", "mid", "strong", "best"]
    assert np.mean(list(ratings.values())) == pytest.approx(1000.0, abs=1e-6)
    if method == "bt":  # MLE recovers the true spread
        assert ratings["best"] - ratings["weak"] == pytest.approx(600, abs=90)


def test_elo_is_order_independent_and_finite_for_unbeaten():
    matches = [("a", "b", 1.0)] * 5 + [("b", "c", 0.75)] * 4
    r1 = M.elo_ratings(matches)
    r2 = M.elo_ratings(list(reversed(matches)))
    assert r1 == pytest.approx(r2)
    assert all(math.isfinite(v) for v in r1.values())
    assert r1["a"] > r1["b"] > r1["c"]
    with pytest.raises(ValueError):
        M.elo_ratings([("a", "a", 1.0)])
    with pytest.raises(ValueError):
        M.elo_ratings([("a", "b", 1.5)])


def test_elo_with_ci_brackets_point_and_separates_clear_gaps():
    truth = {"x": 900.0, "y": 1000.0, "z": 1300.0}
    ci = M.elo_with_ci(_tournament(truth, 600, seed=5), n_boot=100, seed=0)
    for elo, lo, hi in ci.values():
        assert lo <= elo <= hi
    assert ci["z"][1] > ci["y"][2]  # z's lower bound above y's upper bound
    assert M.elo_with_ci([]) == {}


# --------------------------------------------------------------------------- prompt-level statistics


def test_cluster_bootstrap_widens_when_prompts_are_duplicated_across_conditions():
    from cai_dpo.metrics import cluster_ratio_ci

    rng = np.random.default_rng(3)
    flags = list(rng.integers(0, 2, size=20).astype(float))
    # each prompt answered the same way under two conditions: 40 items but only 20 prompts
    doubled = [f for f in flags for _ in range(2)]
    item_ids = list(range(40))
    prompt_ids = [i for i in range(20) for _ in range(2)]
    _, lo_items, hi_items = cluster_ratio_ci(item_ids, doubled, n_boot=2000, seed=0)
    point, lo_prompts, hi_prompts = cluster_ratio_ci(prompt_ids, doubled, n_boot=2000, seed=0)
    _, lo_20, hi_20 = cluster_ratio_ci(list(range(20)), flags, n_boot=2000, seed=0)
    assert point == pytest.approx(sum(flags) / 20)
    assert hi_prompts - lo_prompts > 1.25 * (hi_items - lo_items)  # counting items as independent is too narrow
    assert hi_prompts - lo_prompts == pytest.approx(hi_20 - lo_20, abs=0.06)  # it is as wide as 20 items


def test_cluster_rate_summary_with_denominator_mask():
    from cai_dpo.metrics import cluster_rate_summary

    s = cluster_rate_summary(["a", "a", "b", "c"], [1, 0, 1, 0], [1, 1, 1, 0], n_boot=100)
    assert s["rate"] == pytest.approx(2 / 3) and s["n"] == 3 and s["k"] == 2 and s["n_clusters"] == 2
    assert cluster_rate_summary(["a"], [0], [0])["rate"] is None


def test_paired_difference_matches_hand_computation():
    from cai_dpo.metrics import paired_difference

    clusters = ["p1", "p1", "p2", "p2", "p3", "p3"]
    a = [1, 1, 1, 0, 1, 0]  # model: 4/6
    b = [0, 1, 0, 0, 0, 0]  # base: 1/6
    d = paired_difference(clusters, a, b, n_boot=2000, seed=0)
    assert (
        d["diff"] == pytest.approx(4 / 6 - 1 / 6) and d["a"] == pytest.approx(4 / 6) and d["b"] == pytest.approx(1 / 6)
    )
    assert d["n"] == 6 and d["n_clusters"] == 3
    # per-prompt differences are +1/2, +1/2, +1/2: every resample of prompts gives the same difference
    assert d["lo"] == pytest.approx(0.5) and d["hi"] == pytest.approx(0.5)
    # a ratio figure (denominators differ by model): bare refusals over declines
    r = paired_difference(["x", "y"], [1, 0], [1, 1], a_den=[1, 1], b_den=[1, 1], n_boot=10)
    assert r["diff"] == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="same length"):
        paired_difference(["x"], [1, 0], [1, 1])


def test_elo_bootstrap_over_prompts_is_wider():
    from cai_dpo.metrics import elo_with_ci

    rng = np.random.default_rng(0)
    base = [("m", "base", float(rng.random() < 0.6)) for _ in range(15)]
    matches = [m for m in base for _ in range(4)]  # every prompt judged under four conditions identically
    clusters = [i for i in range(15) for _ in range(4)]
    by_match = elo_with_ci(matches, n_boot=300, seed=0)
    by_prompt = elo_with_ci(matches, n_boot=300, seed=0, clusters=clusters)
    assert by_prompt["m"][0] == pytest.approx(by_match["m"][0])
    assert by_prompt["m"][2] - by_prompt["m"][1] > 1.4 * (by_match["m"][2] - by_match["m"][1])

"""The constitution judge: option scoring, position bias, calibration, CoT clamping, the gate, the stage."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cai_dpo.config import ModelSpec
from cai_dpo.constitution import ConstitutionCase, load_constitution
from cai_dpo.engine import Engine, naive_option_probs
from cai_dpo.judge import (
    OPTIONS,
    Comparison,
    Judge,
    KeyedComparison,
    format_case_table,
    load_checkset,
    parse_hhh,
    wilson_interval,
)
from cai_dpo.models import describe
from cai_dpo.store import RecordStore, RunStore, read_manifest, write_jsonl


@pytest.fixture(scope="module")
def constitution():
    return load_constitution("default")


@pytest.fixture()
def jc(tiny_cfg):
    return dataclasses.replace(tiny_cfg.judge, calibrate=False, few_shot=False)


def _engine(tiny_model) -> Engine:
    model, tokenizer = tiny_model
    return Engine(model, tokenizer, batch_size=8, progress=False)


class ContentScorer(Engine):
    """A fake judge: logit of each letter = content signal of its option + a bias toward "(A)".

    An option's signal is ``signal`` per occurrence of ``good`` in its text.
    """

    def __init__(self, model, tokenizer, *, bias: float = 3.0, signal: float = 2.0, good: str = "good"):
        super().__init__(model, tokenizer, progress=False)
        self.bias, self.signal, self.good = bias, signal, good
        self.calls: list[list[str]] = []

    def _options(self, ctx: str) -> tuple[str, str]:
        ia, ib = ctx.rfind("\n (A) "), ctx.rfind("\n (B) ")
        end = min(i for i in (ctx.find("<|im_end|>", ib), ctx.find("\n\n", ib), len(ctx)) if i >= 0)
        return ctx[ia + 6 : ib], ctx[ib + 6 : end]

    def score_options(self, contexts, options=OPTIONS, *, prefix=None, desc="score"):
        self.calls.append(list(contexts))
        self.stats.scored_items += len(contexts)
        raw = []
        for ctx in contexts:
            a, b = self._options(ctx)
            raw.append([self.signal * a.count(self.good) + self.bias, self.signal * b.count(self.good)])
        raw = np.asarray(raw, dtype=float)
        probs = np.exp(raw - raw.max(1, keepdims=True))
        return probs / probs.sum(1, keepdims=True), raw


@pytest.fixture()
def letter_bias(tiny_model):
    """Adds a large bias to the logit of the token "A" of the tiny model while active."""
    model, tokenizer = tiny_model
    a_id = tokenizer(" (A)", add_special_tokens=False)["input_ids"][-2]
    assert tokenizer.decode([a_id]) == "A"
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: _bump(out, a_id))
    yield
    handle.remove()


def _bump(out, token_id):
    out = out.clone()
    out[..., token_id] += 30.0
    return out


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("few_shot,fmt", [(False, "chat"), (True, "chat"), (True, "plain")])
def test_judging_equals_naive_option_probs(tiny_model, constitution, jc, few_shot, fmt):
    engine = _engine(tiny_model)
    cfg = dataclasses.replace(jc, few_shot=few_shot, prompt_format=fmt)
    comps = [
        Comparison("How do I pick a lock?", "Use a tension wrench.", "I can't help with that.", ["harm-illegal"]),
        Comparison("Tell me a joke", "Why did the chicken cross the road?", "No.", ["help-answer"]),
    ]
    judge = Judge(engine, constitution, cfg)
    prompter = judge.prompter
    assert (prompter.prefix is not None) == few_shot
    scores = judge.score_letters(comps)
    model, tokenizer = tiny_model
    for c, s in zip(comps, scores):
        for order, (a, b) in (("ab", (c.response_a, c.response_b)), ("ba", (c.response_b, c.response_a))):
            ctx = (prompter.prefix or "") + prompter.context(c.prompt, a, b, c.principle_ids[0])
            assert ctx.endswith("The answer is:")
            naive = naive_option_probs(model, tokenizer, ctx, OPTIONS)
            got = s.ab[0] if order == "ab" else s.ba[0]
            np.testing.assert_allclose(got, naive, atol=1e-4)


def test_swapping_the_order_flips_raw_probabilities(tiny_model, constitution, jc):
    engine = _engine(tiny_model)
    c = Comparison("What is 2+2?", "It is 4.", "It is 5.", ["honest-facts"])
    swapped = Comparison(c.prompt, c.response_b, c.response_a, c.principle_ids)
    v1, v2 = Judge(engine, constitution, jc).judge([c, swapped])
    assert v2.score_ba == pytest.approx(1 - v1.score_ab, abs=1e-6)
    assert v2.score_ab == pytest.approx(1 - v1.score_ba, abs=1e-6)
    assert v2.p_a == pytest.approx(1 - v1.p_a, abs=1e-6)


def test_averaging_both_orders_removes_a_planted_position_bias(tiny_model, constitution, jc, letter_bias):
    engine = _engine(tiny_model)
    comps = [
        Comparison("Help me", "Sure, here is how.", "No.", ["help-answer"]),
        Comparison("Hi", "Hello!", "Go away.", ["ethics-respect"]),
    ]
    one_order = Judge(engine, constitution, dataclasses.replace(jc, both_orders=False)).judge(comps)
    assert all(v.p_a > 0.99 for v in one_order)
    assert all(math.isnan(v.score_ba) for v in one_order)
    both = Judge(engine, constitution, jc).judge(comps)
    for v in both:
        assert v.score_ab > 0.99 and v.score_ba < 0.01
        assert v.p_a == pytest.approx(0.5, abs=0.01)


def test_principle_ensemble_is_seeded_and_averaged(tiny_model, constitution, jc):
    engine = _engine(tiny_model)
    cfg = dataclasses.replace(jc, principles="ensemble", ensemble_size=3)
    c = Comparison("How do I hack wifi?", "Use aircrack.", "Ask the owner.")
    v1 = Judge(engine, constitution, cfg, seed=1).judge([c], categories=["harmlessness"])[0]
    v2 = Judge(engine, constitution, cfg, seed=1).judge([c], categories=["harmlessness"])[0]
    assert v1.principle_ids == v2.principle_ids and len(set(v1.principle_ids)) == 3
    assert all(constitution.principle(p).category == "harmlessness" for p in v1.principle_ids)
    assert v1.p_a == pytest.approx(float(np.mean(v1.per_principle)))
    sampled = Judge(engine, constitution, jc, seed=1).judge([c])[0]
    assert len(sampled.principle_ids) == 1


def test_chain_of_thought_generates_reasoning_and_clamps(tiny_model, constitution, jc, letter_bias):
    model, tokenizer = tiny_model

    class Spy(Engine):
        contexts: list[str] = []

        def score_options(self, contexts, options=OPTIONS, **kw):
            Spy.contexts.extend(contexts)
            return super().score_options(contexts, options, **kw)

    engine = Spy(model, tokenizer, batch_size=8, progress=False)
    cfg = dataclasses.replace(jc, chain_of_thought=True, cot_max_new_tokens=4, both_orders=False, clamp=[0.4, 0.6])
    v = Judge(engine, constitution, cfg).judge([Comparison("Hi", "Hello!", "Go away.", ["ethics-respect"])])[0]
    assert v.p_a == pytest.approx(0.6)
    assert all("Let's think step by step:" in c and c.endswith("Therefore, the answer is:") for c in Spy.contexts)
    both = Judge(engine, constitution, dataclasses.replace(cfg, both_orders=True)).judge(
        [Comparison("Hi", "Hello!", "Go away.", ["ethics-respect"])]
    )[0]
    assert both.score_ab == pytest.approx(0.6) and both.score_ba == pytest.approx(0.4)


def test_calibration_removes_a_planted_letter_prior(tiny_model, constitution, jc):
    model, tokenizer = tiny_model
    engine = ContentScorer(model, tokenizer, bias=3.0, signal=2.0)
    comps = []
    for i in range(10):
        good, bad = f"a good answer number {i}", f"a poor answer number {i}"
        comps.append(Comparison(f"question {i}", *((good, bad) if i % 2 == 0 else (bad, good)), ["help-answer"]))
    truth = [i % 2 == 0 for i in range(10)]
    one = dataclasses.replace(jc, both_orders=False)

    def accuracy(verdicts):
        return np.mean([(v.p_a > 0.5) == t for v, t in zip(verdicts, truth)])

    raw = Judge(engine, constitution, one).judge(comps)
    assert accuracy(raw) == 0.5  # always "(A)"
    cal = Judge(engine, constitution, one).measure_calibration(["help-answer"])
    assert cal.prior["help-answer"][0] == pytest.approx(1 / (1 + math.exp(-3.0)), abs=1e-6)
    calibrated = Judge(engine, constitution, dataclasses.replace(one, calibrate=True)).judge(comps)
    assert accuracy(calibrated) == 1.0
    for v in calibrated:  # the corrected probability is the content signal alone
        assert max(v.p_a, 1 - v.p_a) == pytest.approx(1 / (1 + math.exp(-2.0)), abs=1e-6)


# --------------------------------------------------------------------------- resumable judging


def _keyed(n: int = 6) -> list[KeyedComparison]:
    """``n`` comparisons in two principle groups, the better answer alternately first."""
    out = []
    for i in range(n):
        good, bad = f"a good answer number {i}", f"a poor answer number {i}"
        a, b = (good, bad) if i % 2 == 0 else (bad, good)
        cats = ["helpfulness"] if i % 3 else ["harmlessness"]
        out.append(KeyedComparison(f"k{i}", Comparison(f"question {i}", a, b), cats, {"pair_id": f"p{i}"}))
    return out


def _judged_texts(engine: ContentScorer) -> str:
    return "\n".join(c for call in engine.calls for c in call)


def _without_seconds(records: dict) -> dict:
    return {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in records.items()}


class Interrupted(ContentScorer):
    """A judge that fails on its ``fail_on``-th scoring call, as a run killed midway."""

    def __init__(self, *args, fail_on: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_on = fail_on

    def score_options(self, contexts, options=OPTIONS, *, prefix=None, desc="score"):
        if len(self.calls) + 1 == self.fail_on:
            raise RuntimeError("interrupted")
        return super().score_options(contexts, options, prefix=prefix, desc=desc)


def test_judge_resumable_resumes_after_an_interruption(tiny_model, constitution, jc, tmp_path):
    model, tokenizer = tiny_model
    items = _keyed()
    straight = Judge(ContentScorer(model, tokenizer, bias=1.0), constitution, jc, seed=3)
    full = straight.judge_resumable(tmp_path / "full", items, chunk=2, progress=False)
    assert (full.new, full.resumed) == (6, 0) and list(full.records) == [it.key for it in items]
    for i, it in enumerate(items):
        r = full.records[it.key]
        assert r["pair_id"] == f"p{i}" and (r["verdict"]["p_a"] > 0.5) == (i % 2 == 0)
        assert r["letters"]["ab"] and r["tokens"] > 0 and r["seconds"] >= 0

    broken = Interrupted(model, tokenizer, bias=1.0, fail_on=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        Judge(broken, constitution, jc, seed=3).judge_resumable(str(tmp_path / "part"), items, chunk=2, progress=False)
    stored = RecordStore(tmp_path / "part").records()
    assert len(stored) == 2  # the first chunk was written before the failure
    done = {r["key"] for r in stored}

    engine = ContentScorer(model, tokenizer, bias=1.0)
    resumed = Judge(engine, constitution, jc, seed=3).judge_resumable(
        RecordStore(tmp_path / "part"), items, chunk=2, progress=False
    )
    assert (resumed.new, resumed.resumed) == (4, 2)
    texts = _judged_texts(engine)
    for it in items:  # the stored comparisons are not scored again, the others are
        assert (f"question {it.key[1:]}\n" in texts) == (it.key not in done)
    assert _without_seconds(resumed.records) == _without_seconds(full.records)

    again = ContentScorer(model, tokenizer, bias=1.0)
    rerun = Judge(again, constitution, jc, seed=3).judge_resumable(tmp_path / "part", items, progress=False)
    assert (rerun.new, rerun.resumed) == (0, 6) and again.calls == []
    assert _without_seconds(rerun.records) == _without_seconds(full.records)


def test_judge_resumable_equals_judge_and_takes_a_record_builder(tiny_model, constitution, jc, tmp_path):
    model, tokenizer = tiny_model
    items = _keyed(4)
    items.append(items[0])  # a repeated key is judged and returned once
    judge = Judge(ContentScorer(model, tokenizer, bias=1.0), constitution, jc)

    def flat(item, verdict, scores, cost):
        return {"key": item.key, "p_a": verdict.p_a, "passes": cost.scoring_passes}

    out = judge.judge_resumable(tmp_path / "flat", items, record=flat, progress=False)
    assert out.new == 4 and list(out.records) == ["k0", "k1", "k2", "k3"]
    for it in items[:4]:
        expected = judge.judge([it.comparison], categories=it.categories)[0]
        assert out.records[it.key]["p_a"] == pytest.approx(expected.p_a)
        assert out.records[it.key]["passes"] == 2  # one principle, both orders
    assert len(RecordStore(tmp_path / "flat").records()) == 4
    assert Judge.pending(RecordStore(tmp_path / "flat"), _keyed(5)) == [_keyed(5)[4]]


def test_judge_resumable_calibrates_only_when_something_is_left(tiny_model, constitution, jc, tmp_path):
    model, tokenizer = tiny_model
    cfg = dataclasses.replace(jc, calibrate=True)
    items = _keyed(2)
    first = Judge(ContentScorer(model, tokenizer, bias=3.0), constitution, cfg)
    first.judge_resumable(tmp_path / "cal", items, progress=False)
    assert first.calibration is not None and set(first.calibration.prior) == {p.id for p in constitution.principles}
    idle = Judge(ContentScorer(model, tokenizer, bias=3.0), constitution, cfg)
    idle.judge_resumable(tmp_path / "cal", items, progress=False)
    assert idle.calibration is None and idle.engine.calls == []


# --------------------------------------------------------------------------- gate


def test_wilson_interval():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _checkset(path: Path) -> Path:
    rows = [
        {"prompt": f"q{i}", "better": f"good reply {i}", "worse": f"bad reply {i}", "category": "helpfulness"}
        for i in range(12)
    ]  # 12 of 12 right: the interval's lower bound (0.76) clears 0.6
    write_jsonl(path, rows)
    return path


def test_gate_accuracy_on_check_pairs(tiny_model, constitution, jc, tmp_path):
    model, tokenizer = tiny_model
    rows = load_checkset(_checkset(tmp_path / "c.jsonl"))
    good = Judge(ContentScorer(model, tokenizer, bias=0.0), constitution, jc).gate(checkset=rows, hhh=[])
    assert good.accuracy == 1.0 and not good.tripped and good.n == 12
    bad = Judge(ContentScorer(model, tokenizer, bias=0.0, good="bad"), constitution, jc).gate(checkset=rows, hhh=[])
    assert bad.accuracy == 0.0 and bad.tripped and bad.hi < jc.gate_threshold
    few = rows[:4]  # 4 of 4 right: a perfect estimate, but too few items to show the judge clears 0.6
    unproven = Judge(ContentScorer(model, tokenizer, bias=0.0), constitution, jc).gate(checkset=few, hhh=[])
    assert unproven.accuracy == 1.0 and unproven.lo < jc.gate_threshold and unproven.tripped
    assert "lower bound" in unproven.summary() and "TRIPPED" in unproven.summary()
    estimate = dataclasses.replace(jc, gate_on="estimate")
    assert (
        not Judge(ContentScorer(model, tokenizer, bias=0.0), constitution, estimate).gate(checkset=few, hhh=[]).tripped
    )


def _write_pairs(run: RunStore) -> None:
    rows = []
    for i in range(4):
        rows.append(
            {
                "pair_id": f"rev{i}",
                "prompt_id": f"p{i}",
                "prompt": f"prompt {i}",
                "category": "violence",
                "prompt_source": "red_team",
                "response_a": f"revised good {i}",
                "response_b": f"original bad {i}",
                "source": "revision_vs_original",
                "label": "A",
                "selected": i < 3,
                "flags": [],
                "meta": {"principle_ids": ["harm-physical"]},
            }
        )
    for i in range(2):
        rows.append(
            {
                "pair_id": f"smp{i}",
                "prompt_id": f"s{i}",
                "prompt": f"sampled {i}",
                "category": "general",
                "prompt_source": "helpful",
                "response_a": f"bad sample {i}",
                "response_b": f"good sample {i}",
                "source": "judged_samples",
                "label": None,
                "selected": True,
                "flags": [],
                "meta": {},
            }
        )
    write_jsonl(run.root / "data" / "pairs" / "pairs.jsonl", rows)


def _judge_cfg(tiny_cfg, tmp_path, **judge):
    return dataclasses.replace(
        tiny_cfg,
        pairs=dataclasses.replace(tiny_cfg.pairs, source="mixed"),
        judge=dataclasses.replace(tiny_cfg.judge, checkset=str(_checkset(tmp_path / "check.jsonl")), **judge),
    )


def test_run_judge_with_a_good_judge(tiny_model, tiny_cfg, tmp_path):
    import datasets

    from cai_dpo.stages.judge import run_judge

    model, tokenizer = tiny_model
    cfg = _judge_cfg(tiny_cfg, tmp_path, score_revision_pairs=True)
    run = RunStore(cfg.run_dir)
    _write_pairs(run)
    engine = ContentScorer(model, tokenizer, bias=1.0)
    out = run_judge(cfg, run, engine=engine)
    ds = datasets.load_from_disk(str(out))
    rows = {r["pair_id"]: r for r in ds.to_list()}
    assert set(rows) == {"rev0", "rev1", "rev2", "smp0", "smp1"}  # the reserve rev3 stays out
    for i in range(2):
        r = rows[f"smp{i}"]
        assert r["chosen"][0]["content"] == f"good sample {i}" and r["p_chosen"] > 0.5
        assert r["margin"] == pytest.approx(2 * r["p_chosen"] - 1)
        assert r["score_ab"] > 0.5 and r["score_ba"] > 0.5  # oriented to the chosen response
        assert r["judge_model"] and r["principle_ids"]
        assert r["prompt"] == [{"role": "user", "content": f"sampled {i}"}]
    for i in range(3):
        r = rows[f"rev{i}"]
        assert r["p_chosen"] == 1.0 and r["chosen"][0]["content"] == f"revised good {i}"
        assert r["p_judge"] > 0.5 and r["edge_reasons"] == []
    m = read_manifest(out)
    assert m["metrics"]["gate_tripped"] is False and m["metrics"]["judge_gate"]["accuracy"] == 1.0
    assert m["metrics"]["position_consistency"] == 1.0
    assert m["metrics"]["cost"]["usd_per_1000_judgments"] > 0
    assert sum(m["metrics"]["confidence_histogram"].values()) == 2
    assert "calibration" in m["metrics"] and m["counts"]["judged"] == 5
    # resumable: a rerun scores nothing new beyond calibration and the gate
    n_calls = len(engine.calls)
    run_judge(cfg, run, engine=engine)
    rescored = [c for call in engine.calls[n_calls:] for c in call if "sample" in c or "revised" in c]
    assert rescored == []


def test_gate_trips_and_switches_to_revision_pairs(tiny_model, tiny_cfg, tmp_path, caplog):
    import datasets

    from cai_dpo.labels import gate_tripped
    from cai_dpo.stages.judge import run_judge

    model, tokenizer = tiny_model
    cfg = _judge_cfg(tiny_cfg, tmp_path, score_revision_pairs=True)
    run = RunStore(cfg.run_dir)
    _write_pairs(run)
    with caplog.at_level("WARNING"):
        out = run_judge(cfg, run, engine=ContentScorer(model, tokenizer, bias=0.0, good="bad"))
    assert any("gate" in r.message and r.levelname == "WARNING" for r in caplog.records)
    ds = datasets.load_from_disk(str(out))
    assert set(ds["source"]) == {"revision_vs_original"} and len(ds) == 4  # reserve included
    assert all("judge_prefers_original" in r for r in ds["edge_reasons"])
    m = read_manifest(out)
    gate = m["metrics"]["judge_gate"]
    assert (
        gate["tripped"] and gate["accuracy"] == 0.0 and gate["n"] == 12 and gate["lo"] <= gate["accuracy"] <= gate["hi"]
    )
    assert gate_tripped(m)
    assert any(
        n.startswith("pair source: revision_vs_original because judge accuracy 0.000 [") and "TRIPPED" in n
        for n in m["notes"]
    )


def test_run_judge_on_the_tiny_model(tiny_cfg, tmp_path):
    """The real path: loads the judge model, calibrates, gates, judges (tiny random model)."""
    import datasets

    from cai_dpo.stages.judge import run_judge

    cfg = _judge_cfg(tiny_cfg, tmp_path)
    cfg = dataclasses.replace(cfg, pairs=dataclasses.replace(cfg.pairs, source="judged_samples"))
    run = RunStore(cfg.run_dir)
    _write_pairs(run)
    out = run_judge(cfg, run)
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == 5
    smp = [r for r in ds.to_list() if r["source"] == "judged_samples"]
    assert all(0.5 <= r["p_chosen"] <= 1.0 and len(r["per_principle"]) == 1 for r in smp)
    m = read_manifest(out)
    assert m["models"]["judge"] == describe(ModelSpec(name="tiny")) and m["metrics"]["calibration"]["prior"]


# --------------------------------------------------------------------------- constitution tests, HHH


def test_constitution_test_reports_a_planted_failure(tiny_model, constitution, jc):
    model, tokenizer = tiny_model
    engine = ContentScorer(model, tokenizer, bias=0.0)
    cases = [
        ConstitutionCase("passes", "Q?", "a good answer", "a poor answer", "A", "help-answer"),
        ConstitutionCase("planted-failure", "Q?", "a good answer", "a poor answer", "B", "help-answer"),
        ConstitutionCase(
            "multi-turn",
            "",
            "poor",
            "good",
            "B",
            None,
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "help?"},
            ],
        ),
    ]
    results = Judge(engine, constitution, jc).run_cases(cases)
    assert [r.passed for r in results] == [True, False, True]
    assert results[1].p_expected < 0.5
    assert "Human: hi\n\nAssistant: hello\n\nHuman: help?" in engine.calls[0][4]
    table = format_case_table(results)
    assert "planted-failure" in table and "FAIL" in table and "2/3 passed" in table


def test_constitution_test_cli(tmp_path, tiny_path, capsys):
    from cai_dpo.cli import main

    code = main(
        [
            "constitution",
            "test",
            "default",
            "default_cases.yaml",
            "--profile",
            "tiny",
            "--model",
            "tiny",
            "-o",
            f"runs_dir={tmp_path}",
            "-o",
            "judge.calibrate=false",
        ]
    )
    out = capsys.readouterr().out
    assert "weapon-refusal" in out and "passed" in out
    n_fail = out.count(" FAIL")
    assert code == (1 if n_fail else 0)


def test_parse_hhh(shared_anchors):
    rows = [
        json.loads(line) for line in (shared_anchors / "evals" / "438HHHEvaluations.jsonl").read_text().splitlines()
    ]
    parsed = [parse_hhh(r) for r in rows]
    assert len(parsed) == 438
    for row, p in zip(rows, parsed):
        letter = p["correct_letter"]
        assert letter in ("A", "B")
        shown = row["prompt"].split(f" ({letter}) [[[", 1)[1].split("]]]\n", 1)[0]
        assert shown.strip() == p["correct"]
        assert p["prompt"] and p["incorrect"] and p["correct"] != p["incorrect"]


def _write_curated_pairs(run: RunStore) -> None:
    rows = []
    for i in range(3):
        rows.append(
            {
                "pair_id": f"cur{i}",
                "prompt_id": f"cur-h-{i}",
                "prompt": f"curated prompt {i}",
                "category": "weapons",
                "prompt_source": "red_team",
                "response_a": f"curated good {i}",
                "response_b": f"policy bad {i}",
                "source": "curated",
                "label": "A",
                "selected": True,
                "flags": [],
                "weight": 0.5 if i == 0 else None,
                "meta": {"principle_ids": ["harm-physical", "help-not-evasive"], "kind": "harmful"},
            }
        )
    rows.append(
        {
            "pair_id": "smp0",
            "prompt_id": "s0",
            "prompt": "sampled 0",
            "category": "general",
            "prompt_source": "helpful",
            "response_a": "bad sample 0",
            "response_b": "good sample 0",
            "source": "judged_samples",
            "label": None,
            "selected": True,
            "flags": [],
            "meta": {},
        }
    )
    write_jsonl(run.root / "data" / "pairs" / "pairs.jsonl", rows)


def test_curated_pairs_pass_through_with_configured_confidence(tiny_model, tiny_cfg, tmp_path):
    import datasets

    from cai_dpo.stages.judge import run_judge

    model, tokenizer = tiny_model
    cfg = _judge_cfg(tiny_cfg, tmp_path, curated_p_chosen=0.8)
    run = RunStore(cfg.run_dir)
    _write_curated_pairs(run)
    engine = ContentScorer(model, tokenizer, bias=1.0)
    out = run_judge(cfg, run, engine=engine)
    rows = {r["pair_id"]: r for r in datasets.load_from_disk(str(out)).to_list()}
    judged_texts = [c for call in engine.calls for c in call]
    assert not any("curated good" in c for c in judged_texts)  # curated pairs are not judged by default
    for i in range(3):
        r = rows[f"cur{i}"]
        assert r["source"] == "curated" and r["p_chosen"] == pytest.approx(0.8)
        assert r["chosen"][0]["content"] == f"curated good {i}" and r["rejected"][0]["content"] == f"policy bad {i}"
        assert r["principle_ids"] == ["harm-physical", "help-not-evasive"] and math.isnan(r["p_judge"])
    assert rows["cur0"]["weight"] == 0.5 and rows["cur1"]["weight"] is None and rows["smp0"]["weight"] is None

    scored = _judge_cfg(tiny_cfg, tmp_path, score_curated_pairs=True)
    run2 = RunStore(scored.run_dir.parent / "scored")
    _write_curated_pairs(run2)
    rows = {r["pair_id"]: r for r in datasets.load_from_disk(str(run_judge(scored, run2, engine=engine))).to_list()}
    assert rows["cur0"]["p_chosen"] == pytest.approx(0.9) and rows["cur0"]["p_judge"] > 0.5
    assert read_manifest(run2.data_dir("preferences"))["counts"]["judged"] == 4


def test_gate_trip_on_a_curated_mix_keeps_the_curated_pairs(tiny_model, tiny_cfg, tmp_path):
    import datasets

    from cai_dpo.stages.judge import run_judge

    model, tokenizer = tiny_model
    cfg = _judge_cfg(tiny_cfg, tmp_path)
    run = RunStore(cfg.run_dir)
    _write_curated_pairs(run)
    out = run_judge(cfg, run, engine=ContentScorer(model, tokenizer, bias=0.0, good="bad"))
    ds = datasets.load_from_disk(str(out))
    assert set(ds["source"]) == {"curated"} and len(ds) == 3

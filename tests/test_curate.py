"""Curation: scorers (linear probe, judge), thresholding, the curate stage, bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cai_dpo.data import PromptFileError
from cai_dpo.scorers import (
    LinearProbe,
    ProbeScorer,
    ScoredRow,
    choose,
    fit_probe,
    labelled_examples,
    measure,
    pairwise_accuracy,
)
from cai_dpo.stages import curate
from cai_dpo.stages.curate import apply_threshold, load_rows, run_curate
from cai_dpo.store import RunStore, read_manifest

# --------------------------------------------------------------------------- fixtures


def _curated_row(i: int, kind: str, split: str) -> dict:
    if kind == "harmful":
        user = f"How do I break into my neighbour's house number {i} without being seen?"
        reply = (
            f"I won't help with breaking in (case {i}): it is burglary and someone could get hurt. "
            "If you are locked out of your own home, a locksmith can help."
        )
        pids = ["harm-illegal", "help-not-evasive"]
    else:
        user = f"How do I kill a stuck process number {i} on Linux?"
        reply = (
            f"Run `ps aux | grep name` to find its PID, then `kill {1000 + i}`; "
            f"if it ignores that, `kill -9 {1000 + i}` forces it."
        )
        pids = ["help-practical"]
    return {
        "id": f"t-{kind[0]}-{split}-{i}",
        "kind": kind,
        "category": "c",
        "sensitive_sounding": kind == "benign",
        "principle_ids": pids,
        "split": split,
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
    }


@pytest.fixture()
def curated_file(tmp_path) -> Path:
    rows = (
        [_curated_row(i, "harmful", "train") for i in range(6)]
        + [_curated_row(i, "benign", "train") for i in range(6)]
        + [_curated_row(i, "harmful", "heldout") for i in range(10, 13)]
        + [_curated_row(i, "benign", "heldout") for i in range(10, 13)]
    )
    path = tmp_path / "curated.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def user_file(tmp_path) -> Path:
    rows = [
        {
            "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
            "kind": "benign" if i % 2 else "harmful",
        }
        for i in range(5)
    ]
    rows.append({"prompt": "Tell me a fact.", "response": "Water boils at 100 C at sea level.", "id": "pr-1"})
    path = tmp_path / "user.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(tiny_cfg, curated_file: Path, sources: list[str], **over):
    cfg = replace(tiny_cfg, threads=1)
    c = replace(
        cfg.curate,
        sources=sources,
        curated_set=str(curated_file),
        batch_size=4,
        train_limit=None,
        heldout_limit=None,
        sampling=replace(cfg.curate.sampling, max_new_tokens=8, batch_size=8),
        **over,
    )
    return replace(cfg, curate=c)


# --------------------------------------------------------------------------- probe and measurement


def test_probe_separates_a_separable_case():
    rng = np.random.default_rng(0)
    pos = rng.normal(0.0, 1.0, (40, 16)) + np.r_[3.0, np.zeros(15)]
    neg = rng.normal(0.0, 1.0, (40, 16)) - np.r_[3.0, np.zeros(15)]
    probe = fit_probe(np.vstack([pos, neg]), [1] * 40 + [0] * 40)
    assert (probe.predict(pos) > 0.5).all() and (probe.predict(neg) < 0.5).all()
    # labels unrelated to the features: the probe cannot separate fresh data
    noise = rng.normal(0.0, 1.0, (200, 16))
    chance = fit_probe(noise[:100], rng.integers(0, 2, 100).tolist(), l2=10.0)
    acc = np.mean((chance.predict(noise[100:]) > 0.5) == rng.integers(0, 2, 100).astype(bool))
    assert 0.3 < acc < 0.7
    with pytest.raises(ValueError, match="both classes"):
        fit_probe(pos, [1] * 40)


def test_pairwise_and_classification_measure():
    from cai_dpo.scorers import Labelled

    ex = [
        Labelled(ScoredRow("p", "good", "harmful"), 1, "a"),
        Labelled(ScoredRow("p", "bad", "harmful"), 0, "a"),
        Labelled(ScoredRow("q", "good", "benign"), 1, "b"),
        Labelled(ScoredRow("q", "bad", "benign"), 0, "b"),
    ]
    m = measure([0.9, 0.2, 0.4, 0.6], ex, threshold=0.5)
    assert m["pairwise"]["accuracy"] == 0.5 and m["pairwise"]["n"] == 2
    assert m["classification"]["accuracy"] == 0.5 and m["by_kind"]["harmful"]["pairwise"]["accuracy"] == 1.0
    assert 0.0 <= m["pairwise"]["lo"] <= 0.5 <= m["pairwise"]["hi"] <= 1.0
    assert pairwise_accuracy([0.5], [0.5])["accuracy"] == 0.5  # a tie counts half
    pick = choose({"probe": {"pairwise": {"accuracy": 0.8}}, "judge": {"pairwise": {"accuracy": 0.55}}})
    assert pick.name == "probe" and "0.800" in pick.reason


def test_labelled_examples_pairs_curated_with_negatives(curated_file):
    from cai_dpo.curated import load_curated

    train = load_curated(curated_file, split="train")
    answers = {e.id: "Sure, here is how: step one ..." for e in train if e.kind == "harmful"}
    ex = labelled_examples(train, answers)
    assert len(ex) == 2 * len(train)
    for e in ex:
        if e.label == 0 and e.row.kind == "harmful":
            assert e.row.response.startswith("Sure")
        if e.label == 0 and e.row.kind == "benign":
            assert e.row.response != next(t.response for t in train if t.id == e.group)


def test_probe_scorer_round_trip(tmp_path, tiny_model):
    model, tok = tiny_model
    rng = np.random.default_rng(1)
    d = model.config.hidden_size
    probes = {k: LinearProbe(np.zeros(d), np.ones(d), rng.normal(size=d), 0.1) for k in ("harmful", "benign")}
    scorer = ProbeScorer(
        model, tok, probes, LinearProbe(np.zeros(d), np.ones(d), rng.normal(size=d), 0.0), model_id="tiny"
    )
    rows = [ScoredRow("hello", "hi there"), ScoredRow("Human: a\n\nAssistant: b\n\nHuman: c", "d", "harmful")]
    first = scorer.score(rows)
    loaded = ProbeScorer.load(scorer.save(tmp_path / "probe"), model, tok)
    np.testing.assert_allclose(loaded.score(rows), first)
    assert loaded.model_id == "tiny"
    with pytest.raises(FileNotFoundError, match="no saved probe"):
        ProbeScorer.load(tmp_path / "nothing", model, tok)


# --------------------------------------------------------------------------- thresholding


def test_apply_threshold_actions():
    scores = [0.1, 0.4, 0.5, 0.9]
    w, keep = apply_threshold(scores, 0.5, "drop")
    assert keep.tolist() == [False, False, True, True] and w.tolist() == [1, 1, 1, 1]
    w, keep = apply_threshold(scores, 0.5, "weight")
    assert keep.all() and np.allclose(w, [0.2, 0.8, 1.0, 1.0])
    w, keep = apply_threshold(scores, 0.5, "keep")
    assert keep.all() and (w == 1).all()
    with pytest.raises(ValueError, match="curate.action"):
        apply_threshold(scores, 0.5, "shred")


# --------------------------------------------------------------------------- the stage


def test_stage_trains_probe_thresholds_and_writes_dataset(tiny_cfg, curated_file, user_file, monkeypatch):
    import datasets

    cfg = _cfg(tiny_cfg, curated_file, [str(user_file)], scorer="probe", action="keep", threshold=0.5)
    out = run_curate(cfg)
    run = RunStore(cfg.run_dir)
    ds = datasets.load_from_disk(str(out))
    assert {"weight", "curate_score", "messages", "kind"} <= set(ds.column_names)
    m = read_manifest(out)
    scores = np.asarray(ds["curate_score"])
    assert m["counts"]["rows_in"] == len(ds) == 6 and m["counts"]["dropped"] == 0
    assert m["counts"]["below_threshold"] == int(np.sum(scores < 0.5))
    assert m["metrics"]["scorer"] == "probe"
    acc = m["metrics"]["accuracy"]["pairwise"]
    answered = sum(bool(r["text"].strip()) for r in run.records("curate-negatives").records() if "-heldout-" in r["id"])
    assert acc["n"] == 3 + answered  # benign pairs always; harmful ones where the policy answered at all
    assert m["metrics"]["accuracy"]["by_kind"]["benign"]["pairwise"]["n"] == 3
    assert 0.0 <= acc["lo"] <= acc["accuracy"] <= acc["hi"] <= 1.0
    probe_manifest = read_manifest(run.model_dir("curate_probe"))
    assert probe_manifest["counts"]["benign_positives"] == 6 and probe_manifest["counts"]["benign_negatives"] == 6
    assert probe_manifest["counts"]["harmful_positives"] == probe_manifest["counts"]["harmful_negatives"] >= 1
    assert (run.model_dir("curate_probe") / "probe.safetensors").exists()

    # drop with a threshold between the scores: kept = rows at or above it; probe and answers reused
    calls = []
    original = curate.train_probe
    monkeypatch.setattr(curate, "train_probe", lambda *a, **k: calls.append(1) or original(*a, **k))
    mid = float(np.sort(scores)[3])
    out2 = run_curate(replace(cfg, curate=replace(cfg.curate, action="drop", threshold=mid)))
    m2 = read_manifest(out2)
    assert calls == [] and any("probe reused" in n for n in m2["notes"])
    assert m2["counts"]["kept"] == int(np.sum(scores >= mid)) == len(datasets.load_from_disk(str(out2)))
    assert m2["counts"]["dropped"] == 6 - m2["counts"]["kept"] > 0

    out3 = run_curate(replace(cfg, curate=replace(cfg.curate, action="weight", threshold=mid)))
    ds3 = datasets.load_from_disk(str(out3))
    m3 = read_manifest(out3)
    assert len(ds3) == 6 and m3["counts"]["downweighted"] == int(np.sum(scores < mid))
    np.testing.assert_allclose(ds3["weight"], np.minimum(1.0, np.asarray(ds3["curate_score"]) / mid))


def test_stage_auto_measures_both_and_scores_sl_rows(tiny_cfg, curated_file, tmp_path):
    import datasets

    cfg = _cfg(tiny_cfg, curated_file, ["sl", str(curated_file)], scorer="auto")
    run = RunStore(cfg.run_dir)
    sl_rows = [
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "source": "helpful",
            "prompt_id": "h1",
        },
        {
            "messages": [{"role": "user", "content": "how to hurt"}, {"role": "assistant", "content": "no"}],
            "source": "red_team",
            "prompt_id": "r1",
        },
    ]
    datasets.Dataset.from_list(sl_rows).save_to_disk(str(run.data_dir("sl")))
    out = run_curate(cfg)
    m = read_manifest(out)
    assert set(m["metrics"]["candidates"]) == {"probe", "judge"}
    assert m["metrics"]["scorer"] in ("probe", "judge") and "held-out" in m["metrics"]["scorer_reason"]
    assert m["counts"]["rows_in"] == 2 + 12  # data/sl plus the curated set's train rows
    ds = datasets.load_from_disk(str(out))
    kinds = dict(zip(ds["prompt_id"], ds["kind"]))
    assert kinds["h1"] == "benign" and kinds["r1"] == "harmful"
    assert m["models"]["judge"] and m["models"]["policy"]


def test_stage_judge_without_curated_set_is_unmeasured(tiny_cfg, user_file, tmp_path):
    cfg = _cfg(tiny_cfg, tmp_path / "absent.jsonl", [str(user_file)], scorer="judge")
    m = read_manifest(run_curate(cfg))
    assert m["metrics"]["scorer"] == "judge" and m["metrics"]["accuracy"] is None
    assert any("no curated set" in n for n in m["notes"])
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        run_curate(replace(cfg, curate=replace(cfg.curate, scorer="probe")))


# --------------------------------------------------------------------------- bad input


def test_bad_rows_name_file_line_and_field(tmp_path, tiny_cfg):
    run = RunStore(tiny_cfg.run_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
        + "\n"
        + json.dumps({"prompt": "q", "response": ""})
        + "\n"
    )
    with pytest.raises(PromptFileError, match=r"bad.jsonl: line 2: field 'response'"):
        load_rows(str(bad), run)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(PromptFileError, match=r"bad.jsonl: line 1: field 'messages'"):
        load_rows(str(bad), run)
    bad.write_text(json.dumps({"prompt": "q", "response": "a", "kind": "spicy"}) + "\n")
    with pytest.raises(PromptFileError, match=r"line 1: field 'kind'"):
        load_rows(str(bad), run)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows("nope.jsonl", run)
    with pytest.raises(FileNotFoundError, match="run the sl stage"):
        load_rows("sl", run)


def test_cli_curate_bad_source_exits_cleanly(tmp_path, capsys, user_file):
    from cai_dpo.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    code = main(["curate", "--profile", "tiny", "-o", f"runs_dir={tmp_path / 'runs'}", "--source", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl" in err and "line 1" in err and "Traceback" not in err
    code = main(["curate", "--profile", "tiny", "-o", f"runs_dir={tmp_path / 'runs'}", "-o", "curate.action=shred"])
    assert code == 2 and "curate.action" in capsys.readouterr().err

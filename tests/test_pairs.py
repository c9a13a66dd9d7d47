"""Response pairs: sampling with cycled temperatures, dedupe, revision pairs, the mixed ratio."""

from __future__ import annotations

import dataclasses

import pytest

from cai_dpo.config import ModelSpec
from cai_dpo.engine import Generation
from cai_dpo.models import describe
from cai_dpo.pairs_io import load_pairs
from cai_dpo.stages.pairs import (
    dedupe_samples,
    mixed_counts,
    run_pairs,
    temperature_plan,
)
from cai_dpo.store import RunStore, read_manifest


class ScriptedPolicy:
    """A fake policy: the answer depends on the prompt; some prompts give duplicates or nothing."""

    def __init__(self, duplicate_ids: set[str] = frozenset(), empty_ids: set[str] = frozenset()):
        self.duplicate_ids, self.empty_ids = duplicate_ids, empty_ids
        self.calls: list[tuple[int, float, int]] = []

    def generate(self, conversations, sampling, n=1, *, prefix=None, desc=""):
        self.calls.append((len(conversations), sampling.temperature, n))
        out = []
        for conv in conversations:
            text = conv[-1]["content"]
            row = []
            for j in range(n):
                if any(text == t for t in self.duplicate_ids):
                    answer = "The same answer."
                elif any(text == t for t in self.empty_ids):
                    answer = "" if sampling.temperature < 1 else "  only one real answer "
                else:
                    answer = f"answer to {text[:20]} at T={sampling.temperature} #{j}"
                row.append(Generation(answer, len(answer.split()), True, 10))
            out.append(row)
        return out


class Exploding:
    def generate(self, *a, **k):
        raise AssertionError("a resumed run must not sample again")


def _cfg(tiny_cfg, **pairs):
    return dataclasses.replace(tiny_cfg, pairs=dataclasses.replace(tiny_cfg.pairs, **pairs))


def _sl_records(run: RunStore, n: int = 6) -> None:
    recs = []
    for i in range(n):
        recs.append(
            {
                "key": f"sl{i}",
                "prompt_id": f"rt-{i}",
                "prompt": f"red team prompt {i}",
                "category": "violence",
                "initial": f"harmful answer {i}",
                "final": f"revised safe answer {i}",
                "rounds": [
                    {
                        "round": 1,
                        "principle_id": "harm-physical",
                        "critique": "c",
                        "revision": "r",
                        "flags": [],
                        "tokens": {},
                    }
                ],
                "flags": [],
            }
        )
    recs.append(
        {
            "key": "same",
            "prompt_id": "rt-same",
            "prompt": "unchanged",
            "category": "x",
            "initial": "Same text.",
            "final": "same   text.",
            "rounds": [],
            "flags": ["identical"],
        }
    )
    recs.append(
        {
            "key": "empty",
            "prompt_id": "rt-empty",
            "prompt": "empty",
            "category": "x",
            "initial": "something",
            "final": "",
            "rounds": [],
            "flags": ["empty"],
        }
    )
    run.records("sl").append(recs)


def test_temperature_plan_cycles():
    assert temperature_plan(5, [0.7, 1.0]) == [0.7, 1.0, 0.7, 1.0, 0.7]
    with pytest.raises(ValueError, match="temperatures"):
        temperature_plan(2, [])


def test_dedupe_drops_identical_and_empty():
    samples = [{"text": "Hello there."}, {"text": "hello   THERE."}, {"text": "  "}, {"text": "Other."}]
    distinct, flags = dedupe_samples(samples)
    assert [s["text"] for s in distinct] == ["Hello there.", "Other."]
    assert flags == {"duplicate": 1, "empty": 1}


def test_mixed_counts():
    assert mixed_counts(6, 10, 0.75) == (6, 2)
    assert mixed_counts(10, 2, 0.5) == (2, 2)
    assert mixed_counts(4, 4, 1.0) == (4, 0)
    assert mixed_counts(4, 4, 0.0) == (0, 4)


def test_sampling_on_the_tiny_model_and_resume(tiny_cfg):
    cfg = _cfg(tiny_cfg, samples_per_prompt=3, temperatures=[0.7, 1.0], helpful_share=0.25)
    run = RunStore(cfg.run_dir)
    out = run_pairs(cfg, run)
    records = run.records("pairs").records()
    assert len(records) == 5  # 4 red-team train prompts + round(0.25/0.75*4) helpful
    assert sorted(r["prompt_source"] for r in records).count("helpful") == 1
    for r in records:
        assert [s["temperature"] for s in r["samples"]] == [0.7, 1.0, 0.7]
    pairs = load_pairs(run)
    assert pairs and all(p["source"] == "judged_samples" and p["selected"] for p in pairs)
    for p in pairs:
        assert p["response_a"].strip() and p["response_b"].strip()
        assert " ".join(p["response_a"].lower().split()) != " ".join(p["response_b"].lower().split())
        assert p["meta"]["temperatures"][0] != p["meta"]["temperatures"][1]  # mixed-temperature pairs first
    m = read_manifest(out)
    assert m["counts"]["samples"] == 15 and m["models"]["policy"] == describe(ModelSpec(name="tiny"))
    shards = sorted((run.root / "records" / "pairs").glob("shard-*.jsonl"))
    run_pairs(cfg, run, engine=Exploding())
    assert sorted((run.root / "records" / "pairs").glob("shard-*.jsonl")) == shards
    assert load_pairs(run) == pairs


def test_identical_and_empty_samples_are_flagged(tiny_cfg):
    from cai_dpo.stages.pairs import stage_prompts

    cfg = _cfg(tiny_cfg, samples_per_prompt=2, helpful_share=0.0)
    texts = [p.text for p, _ in stage_prompts(cfg)]
    policy = ScriptedPolicy(duplicate_ids={texts[0]}, empty_ids={texts[1]})
    run = RunStore(cfg.run_dir)
    out = run_pairs(cfg, run, engine=policy)
    assert {(n, t) for _, t, n in policy.calls} == {(1, 0.7), (1, 1.0)}  # one call per temperature
    recs = {r["prompt"]: r for r in run.records("pairs").records()}
    assert recs[texts[0]]["flags"] == {"duplicate": 1, "no_distinct_pair": 1}
    assert recs[texts[1]]["flags"] == {"empty": 1, "no_distinct_pair": 1}
    pairs = load_pairs(run)
    assert {p["prompt"] for p in pairs} == set(texts[2:])
    m = read_manifest(out)
    assert m["counts"]["sample_flags"] == {"duplicate": 1, "empty": 1, "no_distinct_pair": 2}


def test_max_pairs_per_prompt(tiny_cfg):
    cfg = _cfg(tiny_cfg, samples_per_prompt=4, temperatures=[0.5, 1.0], max_pairs_per_prompt=3, helpful_share=0.0)
    run = RunStore(cfg.run_dir)
    run_pairs(cfg, run, engine=ScriptedPolicy())
    pairs = load_pairs(run)
    assert len(pairs) == 4 * 3 and len({p["pair_id"] for p in pairs}) == 12


def test_revision_vs_original_pairs_from_sl_records(tiny_cfg):
    cfg = _cfg(tiny_cfg, source="revision_vs_original")
    run = RunStore(cfg.run_dir)
    _sl_records(run)
    out = run_pairs(cfg, run, engine=Exploding())
    pairs = load_pairs(run)
    assert len(pairs) == 6
    for p in pairs:
        i = p["prompt_id"].split("-")[1]
        assert p["source"] == "revision_vs_original" and p["label"] == "A"
        assert p["response_a"] == f"revised safe answer {i}" and p["response_b"] == f"harmful answer {i}"
        assert p["meta"]["principle_ids"] == ["harm-physical"] and p["category"] == "violence"
    assert read_manifest(out)["counts"]["revision_skipped"] == {"unchanged": 1, "empty": 1}


def test_revision_pairs_need_sl_records(tiny_cfg):
    cfg = _cfg(tiny_cfg, source="revision_vs_original")
    with pytest.raises(ValueError, match=r"records/sl.*cai-dpo sl"):
        run_pairs(cfg, RunStore(cfg.run_dir))


def test_mixed_source_respects_its_ratio(tiny_cfg):
    cfg = _cfg(tiny_cfg, source="mixed", mixed_ratio=0.75, helpful_share=0.0)
    run = RunStore(cfg.run_dir)
    _sl_records(run)
    out = run_pairs(cfg, run, engine=ScriptedPolicy())
    pairs = load_pairs(run)
    selected = [p for p in pairs if p["selected"]]
    by = {s: sum(p["source"] == s for p in selected) for s in ("revision_vs_original", "judged_samples")}
    assert by == {"revision_vs_original": 6, "judged_samples": 2}
    reserve = [p for p in pairs if not p["selected"]]
    assert reserve and all(p["source"] == "judged_samples" for p in reserve)
    m = read_manifest(out)
    assert m["counts"]["revision_share_selected"] == pytest.approx(0.75)
    assert m["counts"]["prompts"] == 3  # 2 needed + 1 spare; not every prompt is sampled
    half = _cfg(tiny_cfg, source="mixed", mixed_ratio=0.5, helpful_share=0.0)
    run2 = RunStore(half.run_dir.parent / "half")
    _sl_records(run2)
    run_pairs(half, run2, engine=ScriptedPolicy())
    sel = [p for p in load_pairs(run2) if p["selected"]]
    assert (
        sum(p["source"] == "revision_vs_original" for p in sel)
        == sum(p["source"] == "judged_samples" for p in sel)
        == 4
    )


# --------------------------------------------------------------------------- curated pairs and multi-source mixes


def _write_curated(folder, n: int = 4) -> str:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        for kind in ("harmful", "benign"):
            for split in ("train", "heldout"):
                rows.append(
                    {
                        "id": f"cur-{kind}-{split}-{i}",
                        "kind": kind,
                        "category": "test",
                        "split": split,
                        "principle_ids": ["harm-physical"] if kind == "harmful" else ["help-answer"],
                        "messages": [
                            {"role": "user", "content": f"{kind} {split} prompt {i}"},
                            {"role": "assistant", "content": f"curated {kind} answer {i}"},
                        ],
                    }
                )
    (folder / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


class EchoCurated(ScriptedPolicy):
    """Answers one curated prompt with its curated response (an identical pair, to be skipped)."""

    def __init__(self, copy_prompt: str):
        super().__init__()
        self.copy_prompt = copy_prompt

    def generate(self, conversations, sampling, n=1, *, prefix=None, desc=""):
        out = super().generate(conversations, sampling, n, prefix=prefix, desc=desc)
        for conv, row in zip(conversations, out):
            if conv[-1]["content"] == self.copy_prompt:
                row[0] = Generation("Curated  HARMFUL answer 0", 4, True, 10)
        return out


def test_curated_pairs_chosen_is_curated_rejected_is_policy(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, source="curated", curated=_write_curated(tmp_path / "cur"))
    run = RunStore(cfg.run_dir)
    policy = EchoCurated("harmful train prompt 0")
    out = run_pairs(cfg, run, engine=policy)
    assert {t for _, t, _ in policy.calls} == {0.0}  # greedy by default
    pairs = load_pairs(run)
    assert len(pairs) == 7  # 8 train prompts, one policy answer identical to the curated response
    for p in pairs:
        assert p["source"] == "curated" and p["label"] == "A" and p["selected"] and "weight" in p
        assert "heldout" not in p["prompt"]
        kind, _, _, i = p["prompt"].split()
        assert p["response_a"] == f"curated {kind} answer {i}" and p["response_b"].startswith("answer to")
        assert p["meta"]["principle_ids"] == (["harm-physical"] if kind == "harmful" else ["help-answer"])
        assert p["prompt_source"] == ("red_team" if kind == "harmful" else "helpful")
    m = read_manifest(out)
    assert m["counts"]["curated_skipped"] == {"identical": 1}
    assert m["counts"]["curated_prompts"] == 8
    # resumable: a rerun generates nothing
    run_pairs(cfg, run, engine=Exploding())
    assert load_pairs(run) == pairs
    # per-kind limit and kinds
    one = _cfg(tiny_cfg, source="curated", curated=cfg.pairs.curated, curated_kinds=["harmful"], curated_limit=2)
    run2 = RunStore(one.run_dir.parent / "one")
    run_pairs(one, run2, engine=ScriptedPolicy())
    assert len(load_pairs(run2)) == 2 and all(p["meta"]["kind"] == "harmful" for p in load_pairs(run2))


def test_mix_of_curated_and_revision_pairs(tiny_cfg, tmp_path):
    cfg = _cfg(
        tiny_cfg,
        source="mixed",
        mix={"curated": 0.6, "revision_vs_original": 0.4},
        curated=_write_curated(tmp_path / "cur", n=6),
    )
    run = RunStore(cfg.run_dir)
    _sl_records(run)  # 6 usable revision pairs
    out = run_pairs(cfg, run, engine=ScriptedPolicy())
    sel = [p for p in load_pairs(run) if p["selected"]]
    by = {s: sum(p["source"] == s for p in sel) for s in ("curated", "revision_vs_original", "judged_samples")}
    assert by == {"curated": 9, "revision_vs_original": 6, "judged_samples": 0}  # 12 curated, 6 revision available
    m = read_manifest(out)
    assert m["counts"]["share_selected"] == {"curated": pytest.approx(0.6), "revision_vs_original": pytest.approx(0.4)}
    assert "prompts" not in m["counts"]  # nothing sampled for judged pairs


def test_mix_with_judged_samples_samples_only_what_it_needs(tiny_cfg, tmp_path):
    cfg = _cfg(
        tiny_cfg,
        source="mixed",
        mix={"curated": 2, "judged_samples": 1},
        helpful_share=0.0,
        curated=_write_curated(tmp_path / "cur", n=2),
    )
    run = RunStore(cfg.run_dir)
    out = run_pairs(cfg, run, engine=ScriptedPolicy())
    sel = [p for p in load_pairs(run) if p["selected"]]
    assert sum(p["source"] == "curated" for p in sel) == 4 and sum(p["source"] == "judged_samples" for p in sel) == 2
    assert read_manifest(out)["counts"]["prompts"] == 3  # 2 needed + 1 spare


def test_mix_config_errors(tiny_cfg):
    from cai_dpo.stages.pairs import mix_counts, mix_ratios

    with pytest.raises(ValueError, match=r"pairs.mix' .*unknown source 'human'"):
        mix_ratios(_cfg(tiny_cfg, source="mixed", mix={"human": 1.0}))
    with pytest.raises(ValueError, match=r"pairs.mix.curated"):
        mix_ratios(_cfg(tiny_cfg, source="mixed", mix={"curated": -1.0}))
    assert mix_ratios(_cfg(tiny_cfg, source="mixed", mixed_ratio=0.25)) == {
        "revision_vs_original": 0.25,
        "judged_samples": 0.75,
    }
    assert mix_counts({"a": 10, "b": 3, "c": 100}, {"a": 0.5, "b": 0.25, "c": 0.25}) == {"a": 6, "b": 3, "c": 3}


def test_curated_benign_rejected_decline_generates_nothing_for_benign(tiny_cfg, tmp_path):
    from cai_dpo.curated import DECLINE_TEMPLATES

    cfg = _cfg(tiny_cfg, source="curated", curated=_write_curated(tmp_path / "cur"), curated_benign_rejected="decline")
    run = RunStore(cfg.run_dir)
    policy = ScriptedPolicy()
    run_pairs(cfg, run, engine=policy)
    pairs = load_pairs(run)
    harmful = [p for p in pairs if p["meta"]["kind"] == "harmful"]
    benign = [p for p in pairs if p["meta"]["kind"] == "benign"]
    assert len(harmful) == 4 and len(benign) == 4
    assert all(p["response_b"].startswith("answer to") for p in harmful)  # the policy's answer
    harmful_declines = {f"curated harmful answer {i}" for i in range(4)}
    for p in benign:  # a decline: borrowed from the harmful set or a template, never the policy's answer
        assert p["response_a"].startswith("curated benign answer")
        assert p["response_b"] in harmful_declines or p["response_b"] in DECLINE_TEMPLATES
        assert p["meta"]["model"] == "decline"
    assert {p["response_b"] in DECLINE_TEMPLATES for p in benign} == {True, False}  # both kinds of decline
    assert sum(n for n, _, _ in policy.calls) == 4  # only the harmful prompts were answered


def test_curated_rejected_model_base_answers_without_the_sft_adapter(tiny_cfg, tmp_path, monkeypatch):
    """pairs.curated_rejected_model: base: the rejected answers come from the policy without models/sft."""
    import cai_dpo.stages.pairs as pairs_stage

    curated = _write_curated(tmp_path / "cur")
    asked = []

    def engine_for(cfg, run, *, base=False):
        asked.append(base)
        return ScriptedPolicy()

    monkeypatch.setattr(pairs_stage, "policy_engine", engine_for)
    ids = {}
    for who in ("base", "sl-cai"):
        cfg = _cfg(tiny_cfg, source="curated", curated=curated, curated_rejected_model=who)
        run = RunStore(cfg.run_dir.parent / who)
        run.sft_adapter.mkdir(parents=True)
        (run.sft_adapter / "adapter_config.json").write_text("{}")
        run_pairs(cfg, run, engine=Exploding() if who == "base" else ScriptedPolicy())
        pairs = load_pairs(run)
        assert len(pairs) == 8 and all(p["response_b"].startswith("answer to") for p in pairs)
        ids[who] = {p["meta"]["model"] for p in pairs}
    assert asked == [True]  # base: its own engine, without the adapter; sl-cai: the stage's shared engine
    (base_id,), (sl_cai_id,) = ids["base"], ids["sl-cai"]
    assert "sft@" not in base_id and "sft@" in sl_cai_id

"""SL-CAI stage: cleaning, prompt building, prefix split, end-to-end records, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from cai_dpo.config import ModelSpec
from cai_dpo.models import describe
from cai_dpo.stages import sl
from cai_dpo.stages.sl import clean_output, demo_turns, helpful_count, revision_turns, split_prefix
from cai_dpo.store import RunStore, read_jsonl

# --------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('Assistant: Revision: "I can\'t help with that."', "I can't help with that."),
        ("Revision: Ask your neighbour for the password.", "Ask your neighbour for the password."),
        ("**Critique:** The answer helps with a crime.", "The answer helps with a crime."),
        ("Here's a revised answer: Call a friend.\nUser: and then?", "Call a friend."),
        ("Sure! Here is the rewritten response:\nStay safe.", "Stay safe."),
        ("Stay calm.\n\nHuman: what else?\n\nAssistant: more", "Stay calm."),
        ("Be kind.<|im_end|>\n<|im_start|>user\nmore", "Be kind."),
        ("“Be kind to others.”", "Be kind to others."),
    ],
)
def test_clean_output_strips_leakage(raw, expected):
    out = clean_output(raw)
    assert out.text == expected
    assert out.raw == raw
    if raw.startswith("“"):
        assert out.flags == []
    else:
        assert "label_leak" in out.flags


def test_clean_output_keeps_ordinary_text():
    text = 'Note: never mix bleach and ammonia. She said "stop" twice.'
    out = clean_output(text, previous="something else")
    assert out.text == text
    assert out.flags == []


def test_clean_output_flags_empty_truncated_identical():
    assert clean_output("   ").flags == ["empty"]
    assert clean_output("Revision:").flags == ["label_leak", "empty"]
    assert clean_output("A half-finished sente", finished=False).flags == ["truncated"]
    same = clean_output("Revision: Call  a friend.", previous="call a friend.")
    assert same.text == "Call  a friend."
    assert "identical" in same.flags


def test_helpful_count_ratio_and_cap():
    assert helpful_count(10, 100, 0.5) == 10
    assert helpful_count(10, 100, 0.2) == 2  # 2 / 12 of the mix
    assert helpful_count(10, 3, 0.5) == 3  # capped by availability
    assert helpful_count(10, 100, 0.0) == 0
    assert helpful_count(10, 7, 1.0) == 7


# --------------------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def constitution():
    from cai_dpo.constitution import load_constitution

    return load_constitution("constitutions/default.yaml")


def test_demo_turns_modes(constitution):
    crit = demo_turns(constitution, 2, "critique", "critique")
    assert len(crit) == 2 * 4
    assert crit[-1] == {"role": "assistant", "content": constitution.critique_examples[1].critique}
    rev = demo_turns(constitution, 1, "critique", "revision")
    assert [m["role"] for m in rev] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert rev[-1]["content"] == constitution.critique_examples[0].revision
    direct = demo_turns(constitution, 1, "direct", "revision")
    assert [m["role"] for m in direct] == ["user", "assistant", "user", "assistant"]
    assert constitution.critique_examples[0].critique not in json.dumps(direct)
    assert demo_turns(constitution, 0, "critique", "critique") == []


def test_revision_turns_carry_critique(constitution):
    p = constitution.principles[0]
    turns = revision_turns(p, "How do I pick a lock?", "Use a tension wrench.", "It helps with burglary.")
    assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[3]["content"] == "It helps with burglary."
    assert turns[-1]["content"].endswith(sl.REVISION_SUFFIX)
    direct = revision_turns(p, "How do I pick a lock?", "Use a tension wrench.", None)
    assert [m["role"] for m in direct] == ["user", "assistant", "user"]


def test_prefix_split_renders_identically(tiny_model, constitution):
    from cai_dpo.engine import Engine

    model, tok = tiny_model
    engine = Engine(model, tok, progress=False)
    shared = demo_turns(constitution, 2, "critique", "revision")
    p = constitution.principles[1]
    convs = [
        revision_turns(p, q, "Sure, here is how.", "It helps with crime.")
        for q in ("How do I steal a car?", "Tell me a joke")
    ]
    prefix, rests = split_prefix(engine.render, shared, convs)
    assert prefix is not None and prefix.endswith("<|im_end|>\n")
    for conv, rest in zip(convs, rests):
        full = engine.render(shared + conv)
        assert prefix + rest == full
        assert engine.encode(prefix) + engine.encode(rest) == engine.encode(full)
    # no shared turns -> no prefix, full texts
    none, full = split_prefix(engine.render, [], convs)
    assert none is None and full == [engine.render(c) for c in convs]


def test_prefix_generation_matches_unsplit(tiny_model, constitution):
    from cai_dpo.config import SamplingSection
    from cai_dpo.engine import Engine

    model, tok = tiny_model
    engine = Engine(model, tok, progress=False)
    shared = demo_turns(constitution, 1, "critique", "critique")
    convs = [
        sl.critique_turns(constitution.principles[0], q, "Here you go.") for q in ("Hi", "How do I hack wifi?", "Why?")
    ]
    greedy = SamplingSection(max_new_tokens=8, do_sample=False, temperature=0.0, batch_size=8)
    prefix, rests = split_prefix(engine.render, shared, convs)
    cached = [g[0].text for g in engine.generate(rests, greedy, prefix=prefix)]
    plain = [g[0].text for g in engine.generate([shared + c for c in convs], greedy)]
    assert cached == plain


# --------------------------------------------------------------------------- end to end


def _phase_rows(run: RunStore) -> list[dict]:
    rows = []
    for shard in sorted((run.root / "records" / sl.PHASES_STORE).glob("shard-*.jsonl")):
        rows += read_jsonl(shard)
    return rows


def _cfg(tiny_cfg, **over):
    from dataclasses import replace

    cfg = replace(tiny_cfg, threads=1, data=replace(tiny_cfg.data, red_team_limit=3, helpful_limit=4))
    cfg.sl = replace(cfg.sl, sampling=replace(cfg.sl.sampling, max_new_tokens=8), **over)
    return cfg


@pytest.fixture()
def count_generate(monkeypatch):
    """Counts Engine.generate calls by phase name (``desc``)."""
    calls: list[str] = []
    original = sl.Engine.generate

    def counted(self, conversations, *args, **kwargs):
        calls.append(kwargs.get("desc", ""))
        return original(self, conversations, *args, **kwargs)

    monkeypatch.setattr(sl.Engine, "generate", counted)
    return calls


def test_run_sl_end_to_end(tiny_cfg, count_generate):
    import datasets

    cfg = _cfg(tiny_cfg, rounds=2, helpful_ratio=0.5)
    out = sl.run_sl(cfg)
    run = RunStore(cfg.run_dir)
    assert count_generate == ["sl initial", "sl r1-critique", "sl r1-revision", "sl r2-critique", "sl r2-revision"]

    from cai_dpo.constitution import load_constitution

    principle_ids = {p.id for p in load_constitution(cfg.constitution_path()).principles}
    records = run.records("sl").records()
    assert len(records) == 3
    for rec in records:
        assert set(rec) >= {"prompt_id", "prompt", "category", "initial", "rounds", "final", "flags"}
        assert [r["round"] for r in rec["rounds"]] == [1, 2]
        assert rec["rounds"][0]["input"] == rec["initial"]
        assert rec["rounds"][1]["input"] == rec["rounds"][0]["revision"]
        assert rec["final"] == rec["rounds"][-1]["revision"]
        for r in rec["rounds"]:
            assert r["critique"] is not None
            assert r["principle_id"] in principle_ids
            assert r["tokens"]["revision"] > 0 and r["tokens"]["critique_prompt"] > 0

    ds = datasets.load_from_disk(str(out))
    assert set(ds.column_names) == {"messages", "source", "prompt_id"}
    assert Counter(ds["source"]) == {"red_team": 3, "helpful": 3}
    finals = {r["prompt_id"]: r["final"] for r in records}
    for row in ds:
        assert row["messages"][0]["role"] == "user" and row["messages"][-1]["role"] == "assistant"
        if row["source"] == "red_team":
            assert row["messages"][-1]["content"] == finals[row["prompt_id"]]

    manifest = json.loads((out / "manifest.json").read_text())
    quality = manifest["metrics"]
    assert len(quality["rounds"]) == 2 and len(quality["mean_length_per_round"]) == 3
    for key in ("distinct_1", "distinct_2", "repetition"):
        assert 0.0 <= quality["final"][key] <= 1.0
    assert 0.0 <= quality["identical_fraction"] <= 1.0
    assert manifest["counts"]["generated_this_run"]["r2-revision"] == 3
    assert manifest["counts"]["generated_tokens"] > 0

    # a second run reuses everything and generates nothing
    count_generate.clear()
    sl.run_sl(cfg)
    assert count_generate == []
    rows = _phase_rows(run)
    assert len(rows) == len({r["key"] for r in rows}) == 6 + 3 * 4  # 3 red + 3 helpful initial, 2 rounds x 2 phases


def test_direct_mode_skips_critiques(tiny_cfg, count_generate):
    from cai_dpo.constitution import load_constitution

    cfg = _cfg(tiny_cfg, mode="direct", rounds=1, helpful_ratio=0.0, categories=["honesty"])
    sl.run_sl(cfg)
    assert count_generate == ["sl initial", "sl r1-revision"]
    run = RunStore(cfg.run_dir)
    honesty = {p.id for p in load_constitution(cfg.constitution_path()).by_category("honesty")}
    for rec in run.records("sl").records():
        assert rec["rounds"][0]["critique"] is None
        assert rec["rounds"][0]["tokens"]["critique"] == 0
        assert rec["rounds"][0]["principle_id"] in honesty  # sl.categories restricts the draw
    assert {r["phase"] for r in _phase_rows(run)} == {"initial", "revision"}


def test_resume_after_failure_loses_nothing(tiny_cfg, monkeypatch):
    cfg = _cfg(tiny_cfg, rounds=1, helpful_ratio=0.5)
    original = sl.Engine.generate
    calls: list[str] = []

    def failing(self, conversations, *args, **kwargs):
        calls.append(kwargs.get("desc", ""))
        if len(calls) > 1:
            raise RuntimeError("killed")
        return original(self, conversations, *args, **kwargs)

    monkeypatch.setattr(sl.Engine, "generate", failing)
    with pytest.raises(RuntimeError, match="killed"):
        sl.run_sl(cfg)
    run = RunStore(cfg.run_dir)
    first = {r["key"]: r for r in _phase_rows(run)}
    assert len(first) == 6 and {r["phase"] for r in first.values()} == {"initial"}
    assert not (run.root / "data" / "sl").exists()

    monkeypatch.setattr(sl.Engine, "generate", original)
    calls.clear()

    def counting(self, conversations, *args, **kwargs):
        calls.append(kwargs.get("desc", ""))
        return original(self, conversations, *args, **kwargs)

    monkeypatch.setattr(sl.Engine, "generate", counting)
    sl.run_sl(cfg)
    assert calls == ["sl r1-critique", "sl r1-revision"]
    rows = _phase_rows(run)
    assert len(rows) == len({r["key"] for r in rows}) == 6 + 3 * 2
    after = {r["key"]: r for r in rows}
    for key, rec in first.items():
        assert after[key] == rec  # the initial answers were kept, not regenerated
    initial_by_id = {r["prompt_id"]: r["text"] for r in first.values() if r["kind"] == "red_team"}
    for rec in run.records("sl").records():
        assert rec["initial"] == initial_by_id[rec["prompt_id"]]


def test_resume_after_sigkill(tiny_cfg, tmp_path):
    """A real SIGKILL right after the first phase is stored; the rerun completes without duplicates."""
    cfg = _cfg(tiny_cfg, rounds=1, helpful_ratio=0.0, mode="direct")
    from cai_dpo.config import save_config

    cfg_path = save_config(cfg, tmp_path / "cfg.yaml")
    script = textwrap.dedent(
        f"""
        import os, signal
        from cai_dpo.config import load_config
        from cai_dpo.stages import sl
        from cai_dpo.store import RecordStore
        real_append = RecordStore.append
        def append_then_die(self, records):
            n = real_append(self, records)
            os.kill(os.getpid(), signal.SIGKILL)
            return n
        RecordStore.append = append_then_die
        sl.run_sl(load_config({str(cfg_path)!r}))
        """
    )
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = RunStore(cfg.run_dir)
    first = _phase_rows(run)
    assert len(first) == 3 and {r["phase"] for r in first} == {"initial"}

    sl.run_sl(cfg)
    rows = _phase_rows(run)
    assert len(rows) == len({r["key"] for r in rows}) == 3 + 3
    assert len(run.records("sl").records()) == 3


# --------------------------------------------------------------------------- teacher (distillation)


@pytest.fixture(scope="module")
def second_tiny(tiny_path, tmp_path_factory) -> Path:
    """A second tiny random model (other seed and shape, same tokenizer): the teacher."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("teacher")
    tok = AutoTokenizer.from_pretrained(tiny_path)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(7)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_teacher_writes_critiques_and_revisions(tiny_cfg, second_tiny, monkeypatch):

    cfg = _cfg(tiny_cfg, rounds=1, helpful_ratio=0.5, teacher=ModelSpec(name=str(second_tiny)))
    calls: list[tuple[int, str]] = []  # (hidden size of the engine's model, phase)
    original = sl.Engine.generate

    def spy(self, conversations, *args, **kwargs):
        calls.append((self.model.config.hidden_size, kwargs.get("desc", "")))
        return original(self, conversations, *args, **kwargs)

    monkeypatch.setattr(sl.Engine, "generate", spy)
    out = sl.run_sl(cfg)
    policy_h, teacher_h = 64, 32
    assert calls == [(policy_h, "sl initial"), (teacher_h, "sl r1-critique"), (teacher_h, "sl r1-revision")]

    run = RunStore(cfg.run_dir)
    records = run.records("sl").records()
    teacher_id = describe(ModelSpec(name=str(second_tiny)))  # with " bf16-autocast" where the CPU has bf16
    assert records and all(r["teacher"] == teacher_id and r["model"] != r["teacher"] for r in records)
    phases = _phase_rows(run)
    assert all(r["teacher"] == teacher_id for r in phases if r["phase"] != "initial")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["teacher"] == teacher_id
    assert manifest["models"]["policy"] != manifest["models"]["teacher"]


def test_teacher_change_regenerates_revisions_not_initial_answers(tiny_cfg, second_tiny, count_generate):
    from dataclasses import replace

    cfg = _cfg(tiny_cfg, rounds=1, helpful_ratio=0.0, mode="direct")
    sl.run_sl(cfg)
    default_records = RunStore(cfg.run_dir).records("sl").records()
    assert all(r["teacher"] == r["model"] for r in default_records)
    count_generate.clear()
    sl.run_sl(replace(cfg, sl=replace(cfg.sl, teacher=ModelSpec(name=str(second_tiny)))))
    assert count_generate == ["sl r1-revision"]  # the policy's initial answers are reused

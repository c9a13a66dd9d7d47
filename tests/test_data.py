"""Prompt loaders (every format and its errors), bundled prompt sets and the judge check set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cai_dpo.data import (
    Prompt,
    PromptFileError,
    assign_splits,
    load_checkset,
    load_prompts,
    parse_transcript,
    split_prompts,
)

HH = (
    "\n\nHuman: My tap keeps dripping.\n\nAssistant: Is it a single-handle tap?"
    "\n\nHuman: Yes.\n\nAssistant: Then the cartridge probably needs replacing."
)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- formats


def test_jsonl(tmp_path):
    path = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "a", "text": "How do I boil an egg?", "category": "cooking", "split": "test"},
            {"prompt": "What is a list?", "extra": 3},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Hi there"}]},
            {"chosen": HH, "rejected": HH},
        ],
    )
    ps = load_prompts(path)
    assert [p.text for p in ps] == ["How do I boil an egg?", "What is a list?", "Hi there", "Yes."]
    assert ps[0].id == "a" and ps[0].category == "cooking" and ps[0].split == "heldout"
    assert ps[1].category == "general" and ps[1].split is None and ps[1].meta == {"extra": 3}
    assert ps[1].id == load_prompts(path)[1].id  # stable hash ids
    assert all(p.source == "p" for p in ps)
    assert ps[3].transcript[-1] == {"role": "user", "content": "Yes."}  # the prompt ends with the last human turn
    assert ps[3].meta["reference_reply"] == "Then the cartridge probably needs replacing."
    assert load_prompts(path, source="helpful", limit=2)[1].source == "helpful"
    assert len(load_prompts(path, limit=2)) == 2


def test_json_array(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"text": "One?"}, {"prompt": "Two?"}]))
    assert [p.text for p in load_prompts(path)] == ["One?", "Two?"]
    path.write_text(json.dumps([{"text": "One?"}, {"txt": "Two?"}]))
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    assert (info.value.line, info.value.field) == (2, "text") and "item 2" in str(info.value)


def test_csv(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,prompt,category\nx1,"Hello, how are you?",chat\nx2,Name a colour.,\n,,\n')
    ps = load_prompts(path)
    assert [(p.id, p.text, p.category) for p in ps] == [
        ("x1", "Hello, how are you?", "chat"),
        ("x2", "Name a colour.", "general"),
    ]


def test_text(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\nFirst prompt?\n\n  Second prompt.  \n")
    ps = load_prompts(path)
    assert [p.text for p in ps] == ["First prompt?", "Second prompt."]
    assert ps[0].conversation() == [{"role": "user", "content": "First prompt?"}]
    assert ps[0].transcript is None


def test_transcripts(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(HH.strip() + "\n---\nHuman: What is 2+2?\n\nAssistant:\n")
    ps = load_prompts(path)
    assert [p.text for p in ps] == ["Yes.", "What is 2+2?"]
    assert [m["role"] for m in ps[0].transcript] == ["user", "assistant", "user"]
    assert ps[0].conversation(full=True, system="sys")[0] == {"role": "system", "content": "sys"}
    assert ps[0].conversation() == [{"role": "user", "content": "Yes."}]
    assert ps[1].transcript == [{"role": "user", "content": "What is 2+2?"}]
    other = tmp_path / "t.transcripts"
    other.write_text(path.read_text())
    assert [p.text for p in load_prompts(other)] == [p.text for p in ps]


def test_parse_transcript():
    msgs = parse_transcript(HH)
    assert msgs[0] == {"role": "user", "content": "My tap keeps dripping."}
    assert len(msgs) == 4
    with pytest.raises(ValueError, match="Human"):
        parse_transcript("Assistant: hello")
    with pytest.raises(ValueError, match="empty"):
        parse_transcript("Human:\n\nAssistant: hi")


def test_dataset_dir(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"prompt": ["One?", "Two?"], "category": ["a", "b"]}).save_to_disk(tmp_path / "ds")
    ps = load_prompts(tmp_path / "ds")
    assert [(p.text, p.category, p.source) for p in ps] == [("One?", "a", "ds"), ("Two?", "b", "ds")]
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["T?"]}), "test": datasets.Dataset.from_dict({"text": ["H?"]})}
    )
    dd.save_to_disk(tmp_path / "dd")
    assert {(p.text, p.split) for p in load_prompts(tmp_path / "dd")} == {("T?", "train"), ("H?", "heldout")}
    datasets.Dataset.from_dict({"question": ["Q?"]}).save_to_disk(tmp_path / "bad")
    with pytest.raises(PromptFileError) as info:
        load_prompts(tmp_path / "bad")
    assert info.value.field == "text" and info.value.line == 1 and "question" in str(info.value)


# --------------------------------------------------------------------------- bad input


def test_empty_file(tmp_path):
    for name in ("e.jsonl", "e.csv", "e.txt"):
        path = tmp_path / name
        path.write_text("\n  \n")
        with pytest.raises(PromptFileError, match="empty") as info:
            load_prompts(path)
        assert info.value.file == str(path)
    (tmp_path / "c.txt").write_text("# only a comment\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(tmp_path / "c.txt")


def test_csv_missing_text_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,question\n1,Hi?\n")
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), 1, "text")
    assert "question" in str(err) and "row 1" in str(err)


def test_csv_row_errors(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("text,split\nok,train\n,train\n")
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    assert (info.value.line, info.value.field) == (3, "text") and "empty" in str(info.value)
    path.write_text("text,split\nok,later\n")
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    assert (info.value.line, info.value.field) == (2, "split")


@pytest.mark.parametrize(
    "line,field,needle",
    [
        ('{"txt": "typo"}', "text", "missing"),
        ('{"text": ""}', "text", "empty"),
        ('{"text": 5}', "text", "must be text"),
        ('{"text": "x"', None, "not valid JSON"),
        ('["a list"]', None, "JSON object"),
        ('{"text": "Human:\\n\\nAssistant: hi"}', "text", "transcript"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', "messages", "user turn"),
    ],
)
def test_jsonl_errors_name_line_and_field(tmp_path, line, field, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    err = info.value
    assert err.file == str(path) and err.line == 3 and err.field == field
    assert needle in str(err) and f"{path}: line 3" in str(err)


def test_duplicate_ids(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}])
    with pytest.raises(PromptFileError, match="duplicate id"):
        load_prompts(path)
    path = _jsonl(tmp_path / "same.jsonl", [{"text": "a"}, {"text": "a"}])
    assert len(load_prompts(path)) == 1


def test_missing_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="bundled:red_team"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="no such prompt set"):
        load_prompts("bundled:nonexistent")


# --------------------------------------------------------------------------- splits


def test_assign_and_split(tmp_path):
    ps = [Prompt(id=f"{c}{i}", text=f"t{c}{i}", category=c) for c in "ab" for i in range(8)]
    ps.append(Prompt(id="fixed", text="f", category="a", split="heldout"))
    train, held = split_prompts(ps, "train"), split_prompts(ps, "heldout")
    assert {p.id for p in train}.isdisjoint({p.id for p in held})
    assert len(train) + len(held) == len(ps)
    assert "fixed" in {p.id for p in held}
    assert Counter(p.category for p in held) == {"a": 3, "b": 2}  # 2 of 8 per category, plus the fixed one
    assert [p.id for p in split_prompts(ps, "heldout")] == [p.id for p in held]
    assert all(p.split is None for p in ps if p.id != "fixed")  # inputs untouched
    assert all(p.split for p in assign_splits(ps))
    with pytest.raises(ValueError, match="split"):
        split_prompts(ps, "test")


# --------------------------------------------------------------------------- bundled sets


@pytest.mark.parametrize("name", ["red_team", "helpful"])
def test_bundled_sets(name):
    ps = load_prompts(f"bundled:{name}")
    assert len(ps) >= 80
    assert all(p.source == name for p in ps)
    cats = Counter(p.category for p in ps)
    assert len(cats) >= 8
    assert len({p.id for p in ps}) == len(ps) and len({p.text for p in ps}) == len(ps)
    assert all(p.split in ("train", "heldout") for p in ps)
    assert all(len(p.text.split()) <= 25 for p in ps)
    train, held = split_prompts(ps, "train"), split_prompts(ps, "heldout")
    assert {p.id for p in train}.isdisjoint({p.id for p in held})
    assert {p.text for p in train}.isdisjoint({p.text for p in held})
    assert 0.18 <= len(held) / len(ps) <= 0.32
    for cat in cats:  # stratified: every category has both splits
        assert {p.split for p in ps if p.category == cat} == {"train", "heldout"}


def test_bundled_sets_do_not_overlap():
    red = {p.text for p in load_prompts("bundled:red_team")}
    helpful = {p.text for p in load_prompts("bundled:helpful")}
    assert not red & helpful


def test_judge_checkset():
    from cai_dpo.constitution import load_constitution

    pairs = load_checkset()
    assert 20 <= len(pairs) <= 30
    assert set(Counter(p.category for p in pairs)) == {"harmlessness", "helpfulness", "honesty", "ethics"}
    assert min(Counter(p.category for p in pairs).values()) >= 5
    assert len({p.id for p in pairs}) == len(pairs)
    ids = {p.id for p in load_constitution("default").principles}
    assert all(p.principle_id in ids for p in pairs)
    assert all(p.better != p.worse for p in pairs)


def test_checkset_errors(tmp_path):
    path = _jsonl(
        tmp_path / "c.jsonl",
        [
            {"prompt": "p", "better": "b", "worse": "w", "category": "ethics"},
            {"prompt": "p", "better": "b", "category": "ethics"},
        ],
    )
    with pytest.raises(PromptFileError) as info:
        load_checkset(path)
    assert (info.value.line, info.value.field) == (2, "worse")

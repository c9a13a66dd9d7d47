"""The curated-set loader: format, validation with file/line/field, filters."""

import json

import pytest

from cai_dpo.curated import as_prompts, load_curated, summary
from cai_dpo.data import PromptFileError


def _row(i, kind="harmful", split="train", **kw):
    row = {
        "id": f"x-{i}",
        "kind": kind,
        "category": "cat",
        "split": split,
        "principle_ids": ["harm-physical"],
        "sensitive_sounding": False,
        "messages": [{"role": "user", "content": f"prompt {i}"}, {"role": "assistant", "content": f"answer {i}"}],
    }
    row.update(kw)
    return row


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_loads_and_filters(tmp_path):
    f = _write(
        tmp_path / "a.jsonl", [_row(1), _row(2, split="heldout"), _row(3, kind="benign", sensitive_sounding=True)]
    )
    all_ = load_curated(f)
    assert [e.id for e in all_] == ["x-1", "x-2", "x-3"]
    assert [e.id for e in load_curated(f, split="heldout")] == ["x-2"]
    assert [e.id for e in load_curated(f, kind="benign", sensitive_only=True)] == ["x-3"]
    assert all_[0].messages()[-1] == {"role": "assistant", "content": "answer 1"}
    p = as_prompts(all_[:1])[0]
    assert p.text == "prompt 1" and p.meta["kind"] == "harmful" and p.split == "train"
    assert summary(all_) == {"harmful/train": 1, "harmful/heldout": 1, "benign/train": 1, "benign_sensitive/train": 1}


@pytest.mark.parametrize(
    "change,field",
    [
        ({"kind": "maybe"}, "kind"),
        ({"split": "later"}, "split"),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
            "messages[1].content",
        ),
        ({"principle_ids": "harm-physical"}, "principle_ids"),
        ({"sensitive_sounding": "yes"}, "sensitive_sounding"),
        ({"category": ""}, "category"),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, change, field):
    f = _write(tmp_path / "bad.jsonl", [_row(1), _row(2, **change)])
    with pytest.raises(PromptFileError) as info:
        load_curated(f)
    msg = str(info.value)
    assert "bad.jsonl" in msg and "line 2" in msg and f"field '{field}'" in msg


def test_duplicate_id_is_an_error(tmp_path):
    f = _write(tmp_path / "dup.jsonl", [_row(1), _row(1)])
    with pytest.raises(PromptFileError, match="duplicate id"):
        load_curated(f)


def test_bundled_set_when_present():
    from cai_dpo.curated import CURATED_DIR

    if not list(CURATED_DIR.glob("*.jsonl")):
        pytest.skip("bundled curated set not written yet")
    ex = load_curated()
    ids = [e.id for e in ex]
    assert len(ids) == len(set(ids))
    held = [e for e in ex if e.split == "heldout"]
    assert len(held) >= 0.25 * len(ex)


def _jaccard(a: str, b: str) -> float:
    wa, wb = set(a.lower().split()), set(b.lower().split())
    return len(wa & wb) / max(1, len(wa | wb))


def test_bundled_set_does_not_overlap_other_sets_or_itself():
    from cai_dpo.curated import CURATED_DIR
    from cai_dpo.data import load_prompts

    if not list(CURATED_DIR.glob("*.jsonl")):
        pytest.skip("bundled curated set not written yet")
    ex = load_curated()
    others = [p.text for p in load_prompts("bundled:red_team") + load_prompts("bundled:helpful")]
    train = [e.prompt for e in ex if e.split == "train"]
    for e in ex:
        assert max(_jaccard(e.prompt, o) for o in others) < 0.6, e.id
        if e.split == "heldout":
            assert max(_jaccard(e.prompt, t) for t in train) < 0.6, e.id

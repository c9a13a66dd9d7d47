"""Constitution schema, validation errors, sampling, importer, round trip and case files."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import yaml

from cai_dpo.constitution import (
    CATEGORIES,
    ConstitutionError,
    bundled_constitutions,
    constitution_from_dict,
    format_table,
    import_anthropic,
    infer_category,
    load_cases,
    load_constitution,
    save_constitution,
)

FIXTURE = Path(__file__).parent / "fixtures" / "anthropic_format"


def _principle(pid: str, category: str = "harmlessness", **over) -> dict:
    d = {
        "id": pid,
        "category": category,
        "critique": f"Critique for {pid}.",
        "revision": f"Revise for {pid}.",
        "comparison": f"Which response is better for {pid}?",
    }
    d.update(over)
    return d


def _valid() -> dict:
    return {
        "name": "t",
        "version": "1",
        "description": "test constitution",
        "principles": [
            _principle("h1"),
            _principle("h2"),
            _principle("help1", "helpfulness"),
            _principle("hon1", "honesty"),
            _principle("eth1", "ethics"),
        ],
        "critique_examples": [{"principle_id": "h1", "prompt": "p", "response": "r", "critique": "c", "revision": "v"}],
        "comparison_examples": [
            {"principle_id": "hon1", "prompt": "p", "response_a": "a", "response_b": "b", "answer": "B"}
        ],
    }


def _write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _load_error(tmp_path: Path, data: dict) -> ConstitutionError:
    path = _write(tmp_path, data)
    with pytest.raises(ConstitutionError) as info:
        load_constitution(path)
    assert info.value.file == str(path)
    assert str(path) in str(info.value)
    return info.value


# --------------------------------------------------------------------------- validation


def test_valid_loads(tmp_path):
    c = load_constitution(_write(tmp_path, _valid()))
    assert [p.id for p in c.principles] == ["h1", "h2", "help1", "hon1", "eth1"]
    assert c.categories() == list(CATEGORIES)
    assert c.principle("hon1").category == "honesty"
    assert c.comparison_examples[0].answer == "B"
    assert c.critique_examples[0].principle_id == "h1"
    with pytest.raises(KeyError, match="nope"):
        c.principle("nope")


def test_missing_field_names_principle_and_field(tmp_path):
    data = _valid()
    del data["principles"][1]["revision"]
    err = _load_error(tmp_path, data)
    assert err.principle == "h2"
    assert err.field == "revision"
    assert "missing" in str(err)


def test_duplicate_id(tmp_path):
    data = _valid()
    data["principles"].append(_principle("h1", "ethics"))
    err = _load_error(tmp_path, data)
    assert err.principle == "h1" and err.field == "id"
    assert "duplicate" in str(err)


def test_empty_text(tmp_path):
    data = _valid()
    data["principles"][2]["comparison"] = "   "
    err = _load_error(tmp_path, data)
    assert (err.principle, err.field) == ("help1", "comparison")
    assert "empty" in str(err)


def test_unknown_category(tmp_path):
    data = _valid()
    data["principles"][0]["category"] = "safety"
    err = _load_error(tmp_path, data)
    assert (err.principle, err.field) == ("h1", "category")
    assert "safety" in str(err) and "harmlessness" in str(err)


def test_undefined_placeholder(tmp_path):
    data = _valid()
    data["principles"][3]["critique"] = "Look at {response} and {answer}."
    err = _load_error(tmp_path, data)
    assert (err.principle, err.field) == ("hon1", "critique")
    assert "{answer}" in str(err)


def test_placeholders_allowed_per_field(tmp_path):
    data = _valid()
    data["principles"][0]["critique"] = "Given {prompt}, criticise {response}. Literal {{braces}}."
    data["principles"][0]["revision"] = "Use {critique} to fix {response}."
    c = load_constitution(_write(tmp_path, data))
    p = c.principle("h1")
    assert p.render_critique(prompt="Q", response="R") == "Given Q, criticise R. Literal {braces}."
    assert p.render_revision(response="R", critique="C") == "Use C to fix R."
    # {critique} is not defined for the comparison question
    data["principles"][0]["comparison"] = "Given {critique}, which is better?"
    err = _load_error(tmp_path, data)
    assert (err.principle, err.field) == ("h1", "comparison")


def test_all_errors_collected_and_top_level(tmp_path):
    data = _valid()
    del data["name"]
    data["principles"][0]["category"] = "x"
    data["principles"][4]["critique"] = ""
    err = _load_error(tmp_path, data)
    assert err.field == "name" and err.item is None
    assert len(err.errors) == 3
    assert "eth1" in str(err)


def test_unknown_field_and_bad_example_reference(tmp_path):
    data = _valid()
    data["principles"][0]["critque"] = "typo"
    err = _load_error(tmp_path, data)
    assert (err.principle, err.field) == ("h1", "critque")
    data = _valid()
    data["comparison_examples"][0]["principle_id"] = "ghost"
    data["comparison_examples"][0]["answer"] = "C"
    err = _load_error(tmp_path, data)
    assert err.item == "comparison_examples[0]"
    assert {e[1] for e in err.errors} == {"answer", "principle_id"}


def test_empty_and_malformed_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConstitutionError, match="empty"):
        load_constitution(empty)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConstitutionError, match="YAML"):
        load_constitution(bad)
    with pytest.raises(FileNotFoundError, match="default"):
        load_constitution(tmp_path / "missing.yaml")


def test_validate_command_reports_each_file_and_exits_one(tmp_path, capsys):
    """``constitution validate`` checks every file it is given: a folder or a missing file is one more
    invalid argument (exit 1, like a malformed file), not a different exit code that stops at it."""
    from cai_dpo.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert main(["constitution", "validate", "default"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    assert main(["constitution", "validate", str(tmp_path), "default", str(tmp_path / "gone.yaml"), str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out.count("ok: ") == 1 and err.count("invalid: ") == 3 and "Traceback" not in err
    assert str(tmp_path) in err and "gone.yaml" in err and "bad.yaml" in err


# --------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def default():
    return load_constitution("default")


def test_sampling_reproducible(default):
    a = [p.id for p in default.sample_principles(4, seed=7)]
    b = [p.id for p in default.sample_principles(4, seed=7)]
    assert a == b
    assert len(set(a)) == 4  # without replacement while the pool lasts
    draws = {tuple(p.id for p in default.sample_principles(4, seed=s)) for s in range(20)}
    assert len(draws) > 10
    assert [p.id for p in default.sample_principles(3, seed="prompt-abc")] == [
        p.id for p in default.sample_principles(3, seed="prompt-abc")
    ]


def test_sampling_more_than_pool(default):
    picks = default.sample_principles(10, seed=1, categories=["honesty"])
    assert len(picks) == 10
    assert {p.category for p in picks} == {"honesty"}
    assert len({p.id for p in picks[:4]}) == 4  # the whole pool before any repeat


def test_sampling_category_restriction(default):
    for seed in range(10):
        picks = default.sample_principles(3, seed=seed, categories=["ethics", "honesty"])
        assert {p.category for p in picks} <= {"ethics", "honesty"}
    with pytest.raises(ConstitutionError, match="unknown categories"):
        default.sample_principles(1, seed=0, categories=["safety"])


def test_sampling_weights(default):
    counts = Counter(
        p.category for s in range(400) for p in default.sample_principles(1, seed=s, weights={"honesty": 20.0})
    )
    assert counts["honesty"] > 0.6 * 400
    only = {
        p.id
        for s in range(50)
        for p in default.sample_principles(
            1, seed=s, weights={"ethics": 0, "harmlessness": 0, "helpfulness": 0, "honesty": 1, "honest-facts": 0}
        )
    }
    assert only == {"honest-limits", "honest-nonmanipulative", "honest-expert"}
    seq = [0.0] * len(default.principles)
    seq[3] = 1.0
    assert {p.id for p in default.sample_principles(2, seed=0, weights=seq)} == {default.principles[3].id}
    with pytest.raises(ConstitutionError, match="unknown"):
        default.sample_principles(1, seed=0, weights={"no-such-principle": 2})


# --------------------------------------------------------------------------- bundled


@pytest.mark.parametrize("name", ["default", "socratic"])
def test_bundled_constitutions_valid(name):
    c = load_constitution(name)
    assert len(c.principles) >= 16
    assert c.categories() == list(CATEGORIES)
    assert 2 <= len(c.critique_examples) <= 3
    assert 2 <= len(c.comparison_examples) <= 3
    assert {e.answer for e in c.comparison_examples} == {"A", "B"}
    for e in c.critique_examples:
        assert len(" ".join([e.prompt, e.response, e.critique, e.revision]).split()) < 120
    for e in c.comparison_examples:
        assert len(" ".join([e.prompt, e.response_a, e.response_b]).split()) < 120
    assert all(p.comparison.startswith("Which response") for p in c.principles)
    assert c.system_prompt


def test_bundled_list_and_voices_differ():
    names = [p.stem for p in bundled_constitutions()]
    assert {"default", "socratic"} <= set(names) and "default_cases" not in names
    d, s = load_constitution("default"), load_constitution("socratic")
    assert not {p.critique for p in d.principles} & {p.critique for p in s.principles}
    assert d.fingerprint() != s.fingerprint()


def test_format_table(default):
    table = format_table(default)
    for p in default.principles:
        assert p.id in table
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("id ") and "comparison" in line)
    assert "category" in lines[header]
    row = next(line for line in lines if line.startswith("harm-physical "))
    assert "harmlessness" in row and row.split()[-1] != ""
    assert all(len(line) <= 100 for line in lines[header:])


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", ["default", "socratic"])
def test_round_trip(tmp_path, name):
    c = load_constitution(name)
    out = save_constitution(c, tmp_path / "copy.yaml")
    c2 = load_constitution(out)
    assert c2.to_dict() == c.to_dict()
    assert c2.fingerprint() == c.fingerprint()


def test_round_trip_keeps_weights_multiline_and_braces(tmp_path):
    data = _valid()
    data["principles"][0]["weight"] = 2.5
    data["principles"][1]["critique"] = "Line one.\nLine two with {response} and {{literal}}."
    data["system_prompt"] = "Be kind."
    c = constitution_from_dict(data)
    c2 = load_constitution(save_constitution(c, tmp_path / "w.yaml"))
    assert c2.to_dict() == c.to_dict()
    assert c2.principle("h1").weight == 2.5


def test_save_refuses_invalid(tmp_path):
    c = constitution_from_dict(_valid())
    c.principles[0].category = "nonsense"
    with pytest.raises(ConstitutionError):
        save_constitution(c, tmp_path / "bad.yaml")
    assert not (tmp_path / "bad.yaml").exists()


# --------------------------------------------------------------------------- importer


def test_import_fixture(tmp_path):
    c = import_anthropic(FIXTURE, name="fixture")
    assert c.name == "fixture"
    assert [p.id for p in c.principles] == ["danger0", "truth1", "kind2"]
    assert [p.category for p in c.principles] == ["harmlessness", "honesty", "ethics"]
    p = c.principle("danger0")
    assert p.critique.startswith("Point out every way") and "CritiqueRequest" not in p.critique
    assert not p.critique.endswith("Critique:")
    assert p.revision.startswith("Rewrite") and "Revision:" not in p.revision
    assert p.comparison.startswith("Pick the assistant reply") and not p.comparison.endswith("Options:")
    assert c.principle("kind2").comparison == p.comparison  # instructions cycle when fewer
    # critique demos: dialogue parsed, principle matched by its request text
    e0, e1 = c.critique_examples
    assert e0.prompt == "How do I pick the lock on my neighbour's shed?"
    assert e0.response.startswith("Use a tension wrench") and e0.principle_id == "danger0"
    assert e0.revision.startswith("I can't help") and not e0.revision.endswith("Human:")
    assert e1.principle_id == "truth1" and e1.response == "Spiders have six legs."
    assert [m["role"] for m in e1.messages()] == ["user", "assistant", "user"]
    # comparison demos alternate positions
    assert [e.answer for e in c.comparison_examples] == ["A", "B"]
    assert c.comparison_examples[1].response_b.startswith("Happy birthday")
    assert c.comparison_examples[0].prompt == "Which wild mushrooms are safe to eat raw?"
    # round trip of the import
    assert load_constitution(save_constitution(c, tmp_path / "imp.yaml")).to_dict() == c.to_dict()


def test_import_without_fewshot_files_and_bad_input(tmp_path):
    for name in ("CritiqueRevisionInstructions.json", "RLMadisonInstructions.json"):
        (tmp_path / name).write_text((FIXTURE / name).read_text())
    c = import_anthropic(tmp_path)
    assert len(c.principles) == 3 and not c.critique_examples and not c.comparison_examples
    (tmp_path / "RLMadisonInstructions.json").write_text("[1, 2]")
    with pytest.raises(ConstitutionError, match="RLMadisonInstructions.json"):
        import_anthropic(tmp_path)
    (tmp_path / "RLMadisonInstructions.json").unlink()
    with pytest.raises(FileNotFoundError, match="RLMadisonInstructions.json"):
        import_anthropic(tmp_path)


def test_import_escapes_braces(tmp_path):
    import json

    for name in ("RLMadisonInstructions.json",):
        (tmp_path / name).write_text((FIXTURE / name).read_text())
    (tmp_path / "CritiqueRevisionInstructions.json").write_text(
        json.dumps(
            {
                "x": {
                    "prompt": ["\n\nCritiqueRequest: Is {this} harmful?\n\nCritique:"],
                    "edit_request": "\n\nRevisionRequest: Fix it.\n\nRevision:",
                }
            }
        )
    )
    c = import_anthropic(tmp_path)
    assert c.principle("x").render_critique() == "Is {this} harmful?"


def test_infer_category():
    assert infer_category("Is this dangerous or illegal?") == "harmlessness"
    assert infer_category("Is this accurate and truthful?") == "honesty"
    assert infer_category("Is it moral?") == "ethics"
    assert infer_category("Is it helpful and informative?") == "helpfulness"
    assert infer_category("Anything else?") == "harmlessness"


def test_import_paper_files(shared_anchors, tmp_path):
    c = import_anthropic(shared_anchors / "prompts")
    assert len(c.principles) == 16
    assert all(p.critique and p.revision and p.comparison for p in c.principles)
    assert not any("Options:" in p.comparison for p in c.principles)
    assert len(c.critique_examples) == 5 and len(c.comparison_examples) == 5
    assert c.critique_examples[0].principle_id == "harmful3"
    assert load_constitution(save_constitution(c, tmp_path / "paper.yaml")).to_dict() == c.to_dict()


# --------------------------------------------------------------------------- cases


def test_default_cases():
    c = load_constitution("default")
    cases = load_cases("default_cases.yaml", c)
    assert len(cases) >= 10
    assert len({x.id for x in cases}) == len(cases)
    assert Counter(x.expected for x in cases).keys() == {"A", "B"}
    assert all(x.principle is None or c.principle(x.principle) for x in cases)
    multi = [x for x in cases if x.conversation]
    assert multi and multi[0].messages()[-1]["role"] == "user"
    assert cases[0].messages() == [{"role": "user", "content": cases[0].prompt}]


def _case(**over) -> dict:
    d = {"id": "c1", "prompt": "p", "response_a": "a", "response_b": "b", "expected": "A"}
    d.update(over)
    return d


@pytest.mark.parametrize(
    "case,field,needle",
    [
        (_case(expected="maybe"), "expected", "A or B"),
        ({k: v for k, v in _case().items() if k != "response_b"}, "response_b", "missing"),
        (_case(prompt="  "), "prompt", "empty"),
        (_case(principle="ghost"), "principle", "ghost"),
        (_case(conversation=[{"role": "assistant", "content": "hi"}]), "conversation", "user"),
    ],
)
def test_case_errors(tmp_path, case, field, needle):
    path = _write(tmp_path, {"cases": [_case(id="ok"), case]}, "cases.yaml")
    with pytest.raises(ConstitutionError) as info:
        load_cases(path, load_constitution("default"))
    err = info.value
    assert err.file == str(path) and err.field == field and err.item == "case 'c1'"
    assert needle in str(err)


def test_case_duplicate_and_empty(tmp_path):
    path = _write(tmp_path, {"cases": [_case(), copy.deepcopy(_case())]}, "dup.yaml")
    with pytest.raises(ConstitutionError, match="duplicate"):
        load_cases(path)
    path = _write(tmp_path, {"cases": []}, "none.yaml")
    with pytest.raises(ConstitutionError, match="non-empty"):
        load_cases(path)

"""Bad input gets a clear error naming the file (or argument) and the field, and damages nothing.

The first part is a table of bad inputs across configs, overrides, saved run configs,
constitutions, jailbreak files, prompt files, preference datasets, label imports, command-line
arguments and run ids. Each must raise one of the project's own error types (or, through the
CLI, exit non-zero with a one-line message and no traceback), name the file or argument and
the field, and leave every file of an existing run folder byte-identical.

The second part checks the right value for each case that used to go wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cai_dpo.config import ConfigError, config_from_yaml_text, load_config, parse_override, save_config
from cai_dpo.errors import CaiDpoInputError
from cai_dpo.labels import LabelQueue
from cai_dpo.store import RecordStore, read_jsonl, write_jsonl

LS, PS, NEL = "\u2028", "\u2029", "\u0085"
ODD = f"one{LS}two{PS}three{NEL}four\u000bfive\u001cend"


# --------------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path (the run folder's whole state; the run
    lock file, which a command taking the lock leaves, is not state)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def pair(pair_id: str, **kw: Any) -> dict[str, Any]:
    return {
        "pair_id": pair_id,
        "prompt": f"prompt {pair_id}",
        "response_a": "a",
        "response_b": "b",
        "p_chosen": 0.55,
        "principle_ids": ["harm"],
        "reasons": ["low_confidence"],
        **kw,
    }


def label(pair_id: str, **kw: Any) -> dict[str, Any]:
    return {
        "kind": "label",
        "label_id": f"l-{pair_id}",
        "pair_id": pair_id,
        "choice": "A",
        "shown_order": "AB",
        "labeler": "ann",
        "comment": "",
        "created_at": "2026-01-31T12:00:00+00:00",
        **kw,
    }


class Ctx:
    """A temp folder with an existing run (``runs/r1``: config, label queue, record shard, pairs)."""

    def __init__(self, root: Path):
        self.root = root
        self.runs = root / "runs"
        cfg = load_config("tiny", {"runs_dir": str(self.runs), "run_id": "r1"})
        self.run_dir = cfg.run_dir
        save_config(cfg, self.run_dir / "config.yaml")
        self.db = self.run_dir / "labels.sqlite"
        with LabelQueue(self.db) as q:
            q.enqueue([pair("p1"), pair("p2")])
            q.record_label("p1", "B", "BA", "ann", "fine")
        RecordStore(self.run_dir / "records" / "sl").append([{"key": "k1", "text": "x"}])
        write_jsonl(self.run_dir / "data" / "pairs" / "pairs.jsonl", [{"pair_id": "p1", "chosen": "a"}])

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.root / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path

    def config(self, body: str, name: str = "cfg.yaml") -> Path:
        """A user config over the tiny profile, writing under this temp folder (run id r1 unless ``body`` sets one)."""
        run_id = "" if body.startswith("run_id:") or "\nrun_id:" in body else "run_id: r1\n"
        return self.write(name, f"base: tiny\nruns_dir: {self.runs}\n{run_id}{body}")

    def export(self, rows: list[dict[str, Any]], name: str = "labels.jsonl") -> Path:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in [{"kind": "meta", "schema_version": 1}] + rows))


@pytest.fixture()
def ctx(tmp_path, monkeypatch) -> Ctx:
    monkeypatch.chdir(tmp_path)
    return Ctx(tmp_path)


# --------------------------------------------------------------------------- library-level bad inputs

#: name -> builder(ctx) returning (the call that must fail, strings its message must contain)
Builder = Callable[[Ctx], tuple[Callable[[], Any], list[str]]]
CASES: dict[str, Builder] = {}


def case(fn: Builder) -> Builder:
    CASES[fn.__name__] = fn
    return fn


def _config_case(name: str, body: str, *needles: str) -> None:
    def build(ctx: Ctx) -> tuple[Callable[[], Any], list[str]]:
        path = ctx.config(body)
        return (lambda: load_config(str(path))), [str(path), *needles]

    build.__name__ = name
    case(build)


_config_case("config_malformed_yaml", "sl: {rounds: 2\n", "not valid YAML")
_config_case("config_unknown_key", "sl: {roundz: 2}\n", "sl.roundz")
_config_case("config_wrong_type", "sl: {rounds: two}\n", "sl.rounds")
_config_case("config_ppo_minibatch_zero", "ppo: {minibatch: 0}\n", "ppo.minibatch")
_config_case("config_ppo_minibatch_over_rollout", "ppo: {rollout_batch: 4, minibatch: 8}\n", "ppo.minibatch")
_config_case("config_judge_clamp_reversed", "judge: {clamp: [0.6, 0.4]}\n", "judge.clamp")
_config_case("config_judge_clamp_one_value", "judge: {clamp: [0.4]}\n", "judge.clamp")
_config_case("config_eval_bootstrap_zero", "eval: {bootstrap: 0}\n", "eval.bootstrap")
_config_case(
    "config_label_smoothing_with_soft_labels",
    "dpo: {label_mode: soft, label_smoothing: 0.2}\n",
    "dpo.label_smoothing",
    "label_mode",
)
_config_case("config_run_id_parent_dir", "run_id: ..\n", "run_id")
_config_case("config_run_id_absolute", "run_id: /tmp/elsewhere\n", "run_id")
_config_case("config_run_id_nested", "run_id: a/../../b\n", "run_id")
_config_case("config_run_id_too_long", f"run_id: {'a' * 300}\n", "run_id", "at most 200")
_config_case("config_top_p_out_of_range", "pairs: {sampling: {top_p: 1.5}}\n", "pairs.sampling.top_p")
_config_case("config_lora_dropout_one", "sft: {lora: {dropout: 1.0}}\n", "sft.lora.dropout")
_config_case("config_samples_per_prompt_one", "pairs: {samples_per_prompt: 1}\n", "pairs.samples_per_prompt")
_config_case("config_confidence_band_wide", "labels: {confidence_band: 0.7}\n", "labels.confidence_band")
_config_case("config_gamma_above_one", "ppo: {gamma: 1.5}\n", "ppo.gamma")
_config_case("config_helpful_mix_one", "rm: {helpful_mix: 1.0}\n", "rm.helpful_mix")
_config_case("config_prompt_longer_than_max_length", "dpo: {max_prompt_length: 500}\n", "dpo.max_prompt_length")
_config_case("config_gate_threshold_two", "judge: {gate_threshold: 2}\n", "judge.gate_threshold")
_config_case("config_quantization_choice", "policy: {quantization: 3bit}\n", "policy.quantization")
_config_case("config_sft_learning_rate_zero", "sft: {learning_rate: 0}\n", "sft.learning_rate")
_config_case("config_threads_zero", "threads: 0\n", "threads")
_config_case("config_top_level_list", "- a\n- b\n", "mapping")
_config_case("config_section_twice", "dpo: {beta: 0.2}\nsl: {rounds: 1}\ndpo: {beta: 0.3}\n", "'dpo' given twice")
# inf passed every "> 0" check (NaN fails them); served-model fields and the device had no range check
_config_case("config_beta_infinite", "dpo: {beta: .inf}\n", "dpo.beta", "finite")
_config_case("config_policy_device_unknown", "policy: {device: banana}\n", "policy.device", "a torch device")
_config_case("config_served_concurrency_zero", "policy: {concurrency: 0}\n", "policy.concurrency", ">= 1")
_config_case("config_served_timeout_negative", "judge: {model: {name: embedded, timeout: -5}}\n", "judge.model.timeout")
_config_case("config_served_retries_negative", "policy: {max_retries: -1}\n", "policy.max_retries")
_config_case("config_served_top_logprobs_zero", "policy: {top_logprobs: 0}\n", "policy.top_logprobs")


def test_an_override_fault_names_the_override_and_a_file_fault_the_file(ctx):
    """Faults an ``-o`` or ``--run-id`` brought in were blamed on the profile file alone."""
    with pytest.raises(ConfigError, match=r"tiny\.yaml with -o dpo\.beta, nosuch\.key: unknown key 'nosuch'"):
        load_config("tiny", ["dpo.beta=0.2", "nosuch.key=1"])
    path = ctx.config("sl: {roundz: 2}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), ["dpo.beta=0.2"])
    assert str(exc.value).startswith(f"{path}: ") and "sl.roundz" in str(exc.value)
    fixed = ctx.config("dpo: {beta: .inf}\nrun_id: CHANGE ME\n", name="template.yaml")
    cfg = load_config(str(fixed), {"dpo.beta": 0.1, "run_id": "mine"})  # the overrides mend the file
    assert (cfg.dpo.beta, cfg.run_id) == (0.1, "mine")


@case
def override_learning_rate_overflows_to_inf(ctx):
    return (lambda: load_config("tiny", ["sft.learning_rate=1e999"])), ["sft.learning_rate", "finite"]


_config_case(
    "config_lone_surrogate", 'sl: {few_shot: 1}\nconstitution: "x\\ud800"\n', "column 15", "lone UTF-16 surrogate"
)


def test_yaml_joins_a_surrogate_pair_escape():
    from cai_dpo.yamlio import load_yaml

    assert load_yaml('a: "\\ud83d\\ude00 \\U0001F600"') == {"a": "\U0001f600 \U0001f600"}


@case
def config_base_unknown_profile(ctx):
    path = ctx.write("based.yaml", "base: nosuchprofile\n")
    return (lambda: load_config(str(path))), ["nosuchprofile", "unknown profile"]


@case
def override_unclosed_list(ctx):
    return (lambda: load_config("tiny", ["k=["])), ["k=[", "not valid YAML"]


@case
def override_not_a_number(ctx):
    return (lambda: load_config("tiny", ["dpo.beta=abc"])), ["dpo.beta", "number"]


@case
def override_unknown_section(ctx):
    return (lambda: load_config("tiny", ["nosuch.key=1"])), ["nosuch"]


@case
def override_without_equals(ctx):
    return (lambda: load_config("tiny", ["sl.rounds"])), ["sl.rounds", "key.sub=value"]


@case
def override_run_id_with_hash(ctx):
    return (lambda: load_config("tiny", ["run_id=ablation #2"])), ["run_id", "ablation #2"]


@case
def curated_lone_surrogate(ctx):
    from cai_dpo.curated import load_curated

    row = {"id": "h1", "kind": "harmful", "messages": [{"role": "user", "content": "a\udc00"}]}
    path = ctx.write("cur.jsonl", json.dumps(row) + "\n")
    return (lambda: load_curated(str(path))), [str(path), "line 1", "lone UTF-16 surrogate"]


@case
def curated_content_not_text(ctx):  # it said "empty content"
    from cai_dpo.curated import load_curated

    row = {
        "id": "h1",
        "kind": "harmful",
        "split": "train",
        "messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}],
    }
    path = ctx.write("cur.jsonl", json.dumps(row) + "\n")
    return (lambda: load_curated(str(path))), [str(path), "messages[0].content", "must be text, got 5"]


@case
def model_path_is_a_file(ctx):  # it said "folder has no config.json"
    from cai_dpo.models import resolve_model_path

    path = ctx.write("prompts.jsonl", "{}\n")
    return (lambda: resolve_model_path(str(path))), [str(path), "a file, not a model folder"]


@case
def jsonl_record_lone_surrogate(ctx):
    from cai_dpo.store import read_jsonl

    path = ctx.write("rows.jsonl", '{"ok": "\\ud83d\\ude00"}\n{"bad": "x\\ud800y"}\n')
    return (lambda: read_jsonl(path)), [str(path), "line 2", "lone UTF-16 surrogate", "column 11"]


# json.loads keeps the last of a key given twice, so a second "text" or "response" silently replaced the first;
# every JSON reader (store.read_jsonl, prompt and curated files, label imports, constitution import) refuses it
@case
def jsonl_record_duplicate_key(ctx):
    path = ctx.write("rows.jsonl", '{"ok": 1}\n{"x": {"b": 1}, "y": {"b": 1, "b" : 2}}\n')
    return (lambda: read_jsonl(path)), [str(path), "line 2", "key 'b' given twice", "column 31"]


@case
def jsonl_record_duplicate_escaped_key(ctx):  # the position is where the object repeats the key, however written
    path = ctx.write("rows.jsonl", r'{"\u00e9": 1, "é": 2}' + "\n")
    return (lambda: read_jsonl(path)), [str(path), "line 1", "key 'é' given twice", "column 15"]


@case
def prompt_json_not_utf8(ctx):  # the .json sniff read the file before the reader that names it
    from cai_dpo.data import load_prompts

    path = ctx.write("p.json", b'[{"text": "caf\xe9"}]')
    return (lambda: load_prompts(path)), [str(path), "not UTF-8"]


@case
def constitution_import_not_utf8(ctx):  # it was a UnicodeDecodeError traceback
    from cai_dpo.constitution import import_anthropic

    ctx.write("latin/CritiqueRevisionInstructions.json", b'{"h0": {"prompt": ["caf\xe9"], "edit_request": "e"}}')
    ctx.write("latin/RLMadisonInstructions.json", '["Which is better?"]')
    return (lambda: import_anthropic(ctx.root / "inputs" / "latin")), ["CritiqueRevisionInstructions.json", "UTF-8"]


@case
def prompt_file_duplicate_key(ctx):
    from cai_dpo.data import load_prompts

    path = ctx.write("p.jsonl", '{"id": "a", "text": "first", "text": "second"}\n')
    return (lambda: load_prompts(path)), [str(path), "line 1", "key 'text' given twice"]


@case
def curated_duplicate_key(ctx):
    from cai_dpo.curated import load_curated

    path = ctx.write("cur.jsonl", '{"id": "h1", "kind": "harmful", "kind": "benign", "messages": []}\n')
    return (lambda: load_curated(str(path))), [str(path), "line 1", "key 'kind' given twice"]


@case
def constitution_import_duplicate_key(ctx):
    from cai_dpo.constitution import import_anthropic

    ctx.write(
        "paper/CritiqueRevisionInstructions.json", '{"h0": {"prompt": ["a"], "prompt": ["b"], "edit_request": "e"}}'
    )
    ctx.write("paper/RLMadisonInstructions.json", '["Which is better?"]')
    return (lambda: import_anthropic(ctx.root / "inputs" / "paper")), [
        "CritiqueRevisionInstructions.json",
        "key 'prompt' given twice",
    ]


@case
def config_file_empty(ctx):  # it loaded as every default under run id "demo"
    path = ctx.write("empty.yaml", "# nothing yet\n")
    return (lambda: load_config(str(path))), [str(path), "no settings"]


@case
def saved_run_config_malformed(ctx):
    path = ctx.write("saved/config.yaml", "run_id: r1\nsl: [unclosed\n")
    from cai_dpo.pipeline import open_run

    return (lambda: open_run(config_path=str(path))), [str(path), "not valid YAML"]


@case
def saved_run_config_bad_value(ctx):
    return (lambda: config_from_yaml_text("run_id: r1\nppo: {minibatch: 0}\n", source="saved.yaml")), [
        "saved.yaml",
        "ppo.minibatch",
    ]


@case
def constitution_malformed_yaml(ctx):
    from cai_dpo.constitution import load_constitution

    path = ctx.write("c.yaml", "name: x\nprinciples: [\n")
    return (lambda: load_constitution(path)), [str(path), "not valid YAML"]


@case
def constitution_without_principles(ctx):
    from cai_dpo.constitution import load_constitution

    path = ctx.write("c2.yaml", "name: x\nversion: 1\n")
    return (lambda: load_constitution(path)), [str(path), "principles"]


@case
def jailbreaks_malformed_yaml(ctx):
    from cai_dpo.stages.eval import load_jailbreaks

    path = ctx.write("jb.yaml", "safety_system_prompt: [x\n")
    return (lambda: load_jailbreaks(path)), [str(path), "not valid YAML"]


@case
def jailbreaks_template_without_slot(ctx):
    from cai_dpo.stages.eval import load_jailbreaks

    path = ctx.write("jb2.yaml", "safety_system_prompt: be safe\ntemplates:\n  - {id: t, text: no slot}\n")
    return (lambda: load_jailbreaks(path)), [str(path), "templates[0].text"]


def _prompt_case(name: str, file: str, text: str | bytes, *needles: str) -> None:
    def build(ctx: Ctx) -> tuple[Callable[[], Any], list[str]]:
        from cai_dpo.data import load_prompts

        path = ctx.write(file, text)
        return (lambda: load_prompts(path)), [str(path), *needles]

    build.__name__ = name
    case(build)


_prompt_case("prompts_jsonl_invalid_json", "p.jsonl", '{"text": "ok"}\n{"text": "x"\n', "line 2", "not valid JSON")
_prompt_case("prompts_jsonl_missing_text", "p2.jsonl", '{"txt": "typo"}\n', "line 1", "'text'")
_prompt_case("prompts_jsonl_text_not_string", "p3.jsonl", '{"text": 5}\n', "line 1", "'text'")
_prompt_case("prompts_csv_no_text_column", "p.csv", "question,category\nhi,x\n", "row 1", "'text'")
_prompt_case("prompts_tsv_extra_cells", "p.tsv", "id\ttext\na\thello\textra\n", "row 2", "more cells")
_prompt_case("prompts_empty_file", "empty.jsonl", "\n\n", "empty")
_prompt_case("prompts_not_utf8", "latin.txt", "caf\xe9\n".encode("latin-1"), "not UTF-8")
_prompt_case(
    "prompts_transcript_starts_with_assistant",
    "t.jsonl",
    '{"text": "Human:\\n\\nAssistant: hi"}\n',
    "line 1",
    "'text'",
    "transcript",
)
_prompt_case("prompts_split_unknown", "s.jsonl", '{"text": "a", "split": "later"}\n', "line 1", "'split'")


def _preference_case(name: str, rows: list[dict[str, Any]], *needles: str) -> None:
    def build(ctx: Ctx) -> tuple[Callable[[], Any], list[str]]:
        from cai_dpo.stages.dpo import training_rows

        return (lambda: training_rows(rows, "soft", source="prefs-src")), ["prefs-src", *needles]

    build.__name__ = name
    case(build)


_GOOD = {"pair_id": "g", "prompt": "q", "chosen": "yes", "rejected": "no", "p_chosen": 0.8}
_preference_case(
    "preferences_without_prompt", [_GOOD, {k: v for k, v in _GOOD.items() if k != "prompt"}], "row 1", "'prompt'"
)
_preference_case(
    "preferences_without_p_chosen", [{k: v for k, v in _GOOD.items() if k != "p_chosen"}], "row 0", "'p_chosen'"
)
_preference_case("preferences_p_chosen_out_of_range", [{**_GOOD, "p_chosen": 1.5}], "row 0", "'p_chosen'")
_preference_case("preferences_p_chosen_text", [{**_GOOD, "p_chosen": "high"}], "row 0", "'p_chosen'")
_preference_case("preferences_only_identical_pairs", [{**_GOOD, "rejected": "yes"}], "identical")


def _import_case(name: str, rows: list[dict[str, Any]], *needles: str) -> None:
    def build(ctx: Ctx) -> tuple[Callable[[], Any], list[str]]:
        path = ctx.export(rows)

        def call() -> None:
            with LabelQueue(ctx.db) as q:
                q.import_jsonl(path)

        return call, [str(path), *needles]

    build.__name__ = name
    case(build)


_import_case(
    "labels_orphan_label",
    [{"kind": "pair", **pair("new1")}, label("new1"), label("ghost")],
    "line 4",
    "'pair_id'",
    "ghost",
)
_import_case("labels_created_at_not_iso", [label("p2", created_at="9999")], "line 2", "'created_at'")
_import_case("labels_created_at_no_zone", [label("p2", created_at="2026-01-31T12:00:00")], "'created_at'")
_import_case(
    "labels_principle_ids_string", [{"kind": "pair", **pair("new2", principle_ids="harm")}], "line 2", "'principle_ids'"
)
_import_case("labels_bad_choice", [label("p2", choice="C")], "line 2", "'choice'")
_import_case("labels_unknown_kind", [{"kind": "nope"}], "line 2", "'kind'")
_import_case("labels_newer_schema", [{"kind": "meta", "schema_version": 99}], "line 2", "schema_version")
_import_case("labels_p_chosen_out_of_range", [{"kind": "pair", **pair("new3", p_chosen=7)}], "line 2", "'p_chosen'")


@case
def labels_import_invalid_json(ctx):
    path = ctx.write("broken.jsonl", '{"kind": "meta", "schema_version": 1}\n{"kind": "pair", \n')

    def call() -> None:
        with LabelQueue(ctx.db) as q:
            q.import_jsonl(path)

    return call, [str(path), "line 2", "not valid JSON"]


@case
def labels_status_missing_database(ctx):
    missing = ctx.run_dir / "typo.sqlite"
    return (lambda: LabelQueue(missing, read_only=True)), [str(missing), "not found"]


def test_at_least_forty_bad_inputs():
    assert len(CASES) + len(CLI_CASES) >= 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_names_file_and_field_and_damages_nothing(name, ctx):
    call, needles = CASES[name](ctx)
    before = snapshot(ctx.run_dir)
    with pytest.raises(CaiDpoInputError) as info:
        call()
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{name}: {needle!r} not in {message!r}"
    assert snapshot(ctx.run_dir) == before
    assert not (ctx.run_dir / "typo.sqlite").exists()


# --------------------------------------------------------------------------- command line


def _import_rows(c: Ctx, rows: list[dict[str, Any]], db: Path | None = None) -> list[str]:
    """``labels import`` of an export holding ``rows`` into ``db`` (default: the run's queue)."""
    return ["labels", "import", "--profile", "tiny", "--db", str(db or c.db), str(c.export(rows))]


def _import_pair(c: Ctx, db: Path | None = None, **fields: Any) -> list[str]:
    """``labels import`` of one pair (``fields`` over a valid one) into ``db`` (default: the run's queue)."""
    return _import_rows(c, [pair("p8", kind="pair", **fields)], db)


def _import_text(c: Ctx, line: str) -> list[str]:
    """``labels import`` of a file whose second line (after the meta line) is ``line``, verbatim."""
    path = c.write("labels.jsonl", '{"kind": "meta", "schema_version": 1}\n' + line + "\n")
    return ["labels", "import", "--profile", "tiny", "--db", str(c.db), str(path)]


def _generate(c: Ctx, prompts: str, output: str, *more: str) -> list[str]:
    """``generate`` of a prompt file with body ``prompts``."""
    return ["generate", "--profile", "tiny", str(c.write("p.jsonl", prompts)), output, *more]


def _setup_r1(c: Ctx, override: str) -> list[str]:
    """``setup`` of the existing run r1 with one ``-o`` override."""
    return ["setup", "--profile", "tiny", "--run-id", "r1", "-o", f"runs_dir={c.runs}", "-o", override]


#: name -> (argv builder, strings stderr must contain)
CLI_CASES: dict[str, tuple[Callable[[Ctx], list[str]], list[str]]] = {
    "run_id_with_hash": (
        lambda c: ["sl", "--profile", "tiny", "-o", f"runs_dir={c.runs}", "--run-id", "ablation #2"],
        ["run_id", "ablation #2"],
    ),
    "run_id_parent": (
        lambda c: ["pairs", "--profile", "tiny", "-o", f"runs_dir={c.runs}", "--run-id", ".."],
        ["run_id", "'..'"],
    ),
    "run_id_absolute": (
        lambda c: ["judge", "--profile", "tiny", "-o", f"runs_dir={c.runs}", "--run-id", "/etc"],
        ["run_id", "/etc"],
    ),
    "override_unclosed": (lambda c: ["dpo", "--profile", "tiny", "-o", "k=["], ["k=[", "not valid YAML"]),
    "override_minibatch": (lambda c: ["ppo", "--profile", "tiny", "-o", "ppo.minibatch=0"], ["ppo.minibatch"]),
    "malformed_profile": (
        lambda c: ["sl", "--profile", str(c.write("broken.yaml", "sl: {rounds: 2\n"))],
        ["broken.yaml", "not valid YAML"],
    ),
    "labels_status_typo_db": (
        lambda c: ["labels", "status", "--profile", "tiny", "--db", str(c.run_dir / "typo.sqlite")],
        ["typo.sqlite", "not found"],
    ),
    "labels_export_typo_db": (
        lambda c: [
            "labels",
            "export",
            "--profile",
            "tiny",
            "--db",
            str(c.run_dir / "typo.sqlite"),
            str(c.root / "out.jsonl"),
        ],
        ["typo.sqlite", "not found"],
    ),
    "labels_import_orphan": (
        lambda c: ["labels", "import", "--profile", "tiny", "--db", str(c.db), str(c.export([label("ghost")]))],
        ["labels.jsonl", "'pair_id'", "ghost"],
    ),
    "labels_import_missing_file": (
        lambda c: ["labels", "import", "--profile", "tiny", "--db", str(c.db), str(c.root / "nope.jsonl")],
        ["nope.jsonl", "not found"],
    ),
    "constitution_show_malformed": (
        lambda c: ["constitution", "show", str(c.write("c.yaml", "principles: [\n"))],
        ["c.yaml", "not valid YAML"],
    ),
    # a lone UTF-16 surrogate escape ("\ud800") is valid JSON but no text: tokenizers, SQLite and hashing failed on
    # it with a traceback; every JSON reader (data.py, store.read_jsonl, labels, constitution import) now refuses it
    "generate_lone_surrogate": (
        lambda c: _generate(c, json.dumps({"id": "a", "text": "hi\ud800"}) + "\n", str(c.root / "out.jsonl")),
        ["p.jsonl", "line 1", "lone UTF-16 surrogate"],
    ),
    "labels_import_lone_surrogate": (
        lambda c: _import_pair(c, prompt="hi\ud800"),
        ["labels.jsonl", "line 2", "lone UTF-16 surrogate"],
    ),
    "labels_import_duplicate_key": (
        lambda c: _import_text(c, '{"kind": "pair", "pair_id": "p8", "response_a": "a", "response_a": "b"}'),
        ["labels.jsonl", "line 2", "key 'response_a' given twice"],
    ),
    # it blamed the first JSON file for the empty name
    "constitution_import_empty_name": (
        lambda c: [
            "constitution",
            "import",
            str(c.write("paper/RLMadisonInstructions.json", "[]").parent),
            str(c.root / "out.yaml"),
            "--name",
            " ",
        ],
        ["constitution's name is empty", "--name"],
    ),
    # two pairs with one pair_id: the first was kept silently
    "labels_import_pair_id_repeats_with_other_content": (
        lambda c: _import_rows(c, [pair("p8", kind="pair"), pair("p8", kind="pair", prompt="another prompt")]),
        ["labels.jsonl", "line 3", "'pair_id' 'p8' is already on line 2", "nothing was imported"],
    ),
    # a pair queued with other responses: the file's labels were applied to the queued answers
    "labels_import_pair_queued_with_other_responses": (
        lambda c: _import_rows(c, [pair("p1", kind="pair", response_b="x")]),
        ["labels.jsonl", "line 2", "'pair_id' 'p1' is queued in", "another prompt or responses"],
    ),
    "labels_import_label_id_repeats_with_other_content": (
        lambda c: _import_rows(c, [label("p2"), label("p2", choice="B")]),
        ["labels.jsonl", "line 3", "'label_id' 'l-p2' is already on line 2"],
    ),
    # an output path that is a folder: the error named the writer's temp file, and came after generating
    "generate_output_is_a_folder": (
        lambda c: _generate(c, '{"id": "a", "text": "hi"}\n', str(c.run_dir)),
        ["a folder is there", "name the output .jsonl file"],
    ),
    "generate_empty_model": (  # it silently used the profile's policy
        lambda c: _generate(c, '{"id": "a", "text": "hi"}\n', "o.jsonl", "--model", " "),
        ["--model is empty"],
    ),
    # label-import values the field checks missed: SQLite, datetime or the OS raised a traceback
    "labels_import_source_list": (
        lambda c: _import_pair(c, source=["x"]),
        ["labels.jsonl", "line 2", "'source'", "string or null"],
    ),
    "labels_import_category_object": (
        lambda c: _import_pair(c, category={"a": 1}),
        ["labels.jsonl", "line 2", "'category'"],
    ),
    "labels_import_huge_int_source": (
        lambda c: _import_pair(c, source=2**63),
        ["labels.jsonl", "line 2", "'source'"],
    ),
    "labels_import_date_past_9999": (
        lambda c: _import_pair(c, enqueued_at="9999-12-31T23:59:59-14:00"),
        ["labels.jsonl", "line 2", "'enqueued_at'", "9999"],
    ),
    "labels_import_db_is_a_folder": (
        lambda c: _import_pair(c, db=c.run_dir),
        ["a folder, not a label database"],
    ),
    "constitution_import_lone_surrogate": (
        lambda c: [
            "constitution",
            "import",
            str(c.write("paper/CritiqueRevisionInstructions.json", '{"a": {"prompt": ["x\\udc00"]}}').parent),
            str(c.root / "out.yaml"),
        ],
        ["CritiqueRevisionInstructions.json", "lone UTF-16 surrogate"],
    ),
    # a failed setup replaced the run's config.yaml with the bad value (snapshot: the run is unchanged)
    "setup_missing_constitution": (
        lambda c: _setup_r1(c, "constitution=/no.yaml"),
        ["/no.yaml", "not found"],
    ),
    "setup_missing_policy_folder": (
        lambda c: _setup_r1(c, "policy.name=/no/dir"),
        ["'policy.name'", "/no/dir", "no such folder"],
    ),
    "generate_bad_tsv": (
        lambda c: [
            "generate",
            "--profile",
            "tiny",
            str(c.write("p.tsv", "id\tquestion\na\thi\n")),
            str(c.root / "out.jsonl"),
        ],
        ["p.tsv", "'text'"],
    ),
}


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli_bad_input_exits_without_traceback(name, ctx, capsys):
    from cai_dpo.cli import main

    build, needles = CLI_CASES[name]
    argv = build(ctx)
    before = snapshot(ctx.run_dir)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1
    for needle in needles:
        assert needle in err, f"{name}: {needle!r} not in {err!r}"
    assert snapshot(ctx.run_dir) == before
    assert not (ctx.run_dir / "typo.sqlite").exists() and not (ctx.root / "out.jsonl").exists()
    assert not (ctx.runs / "ablation").exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["labels", "status", "--profile", "tiny", "--db", "typo.sqlite"], "typo.sqlite"),
        (["sl", "--profile", "tiny", "--run-id", "ablation #2"], "run_id"),
        (["dpo", "--profile", "tiny", "-o", "dpo.label_smoothing=0.2"], "dpo.label_smoothing"),
    ],
)
def test_cli_subprocess_bad_input_exits_cleanly(tmp_path, argv, needle):
    out = subprocess.run(
        [sys.executable, "-m", "cai_dpo.cli", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and needle in out.stderr
    assert not (tmp_path / "typo.sqlite").exists() and not (tmp_path / "artifacts").exists()


def test_cli_lets_real_bugs_show(monkeypatch):
    """Only the project's input errors become 'error:' lines; a plain ValueError is a bug and propagates."""
    from cai_dpo import cli

    def buggy(args: Any) -> int:
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(cli, "_cmd_doctor", buggy)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["doctor"])


def test_cli_database_locked_is_a_message(monkeypatch, capsys):
    from cai_dpo import cli

    def locked(args: Any) -> int:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(cli, "_cmd_doctor", locked)
    assert cli.main(["doctor"]) == 3
    err = capsys.readouterr().err
    assert "locked" in err and "Traceback" not in err


def test_cli_label_queue_error_is_a_message(tmp_path, capsys):
    from cai_dpo.cli import main

    db = tmp_path / "not-a-db.sqlite"
    db.write_bytes(b"this is not sqlite" * 100)
    before = db.read_bytes()
    assert main(["labels", "import", "--profile", "tiny", "--db", str(db), str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "not-a-db.sqlite" in err and "Traceback" not in err
    assert db.read_bytes() == before


# --------------------------------------------------------------------------- 1: line separators in JSON lines


def test_line_separators_round_trip_write_read_jsonl(tmp_path):
    rows = [{"text": ODD, "n": 1}, {"text": "plain", "n": 2}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    raw = path.read_bytes().decode("utf-8")
    assert LS not in raw and PS not in raw and NEL not in raw  # escaped on disk
    assert raw.count("\n") == 2 and raw.splitlines() == raw.split("\n")[:-1]  # any line splitter agrees
    assert read_jsonl(path) == rows
    # a file written raw by another tool (valid JSON) still reads as one record a line
    other = tmp_path / "raw.jsonl"
    other.write_text(json.dumps({"text": ODD}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_jsonl(other) == [{"text": ODD}]


def test_line_separators_round_trip_record_store(tmp_path):
    store = RecordStore(tmp_path / "records")
    store.append([{"key": "a", "text": ODD}])
    again = RecordStore(tmp_path / "records")  # a rerun reads the shards back
    assert again.get("a")["text"] == ODD and len(again) == 1
    assert again.append([{"key": "a", "text": ODD}]) == 0


def test_line_separators_in_prompt_files(tmp_path):
    from cai_dpo.data import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "x", "text": ODD}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [(p.id, p.text) for p in load_prompts(path)] == [("x", ODD)]
    txt = tmp_path / "p.txt"
    txt.write_text(f"first{LS}still first\nsecond\n", encoding="utf-8")
    assert [p.text for p in load_prompts(txt)] == [f"first{LS}still first", "second"]


def test_line_separators_round_trip_labels_export_import(tmp_path):
    src = LabelQueue(tmp_path / "a.sqlite")
    src.enqueue([pair("p1", prompt=f"ask{LS}me", response_a=f"a{NEL}b", response_b=f"c{PS}d")])
    src.record_label("p1", "B", "AB", "ann", comment=f"why{LS}not")
    out = src.export_jsonl(tmp_path / "x.jsonl")
    dst = LabelQueue(tmp_path / "b.sqlite")
    assert dst.import_jsonl(out) == {"pairs": 1, "labels": 1, "revisions": 0}
    assert dst.pairs() == src.pairs() and dst.labels() == src.labels()
    assert dst.pair("p1")["response_a"] == f"a{NEL}b" and dst.labels()[0]["comment"] == f"why{LS}not"


def test_no_reader_splits_json_lines_with_splitlines():
    root = Path(__file__).resolve().parent.parent / "cai_dpo"
    call = re.compile(r"[\w)\]]\.splitlines\(\)")
    offenders = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        if "json.loads(line" in p.read_text()
        for i, ln in enumerate(p.read_text().split("\n"), 1)
        if call.search(ln) and "``" not in ln and not ln.lstrip().startswith("#")
    ]
    assert offenders == [], f"JSON-lines readers must split on '\\n' only: {offenders}"


# --------------------------------------------------------------------------- 2: TSV


def test_tsv_splits_on_tabs(tmp_path):
    from cai_dpo.data import load_prompts

    path = tmp_path / "p.tsv"
    path.write_text("id\ttext\tcategory\nx1\tHello, how are you?\tchat\nx2\tName a colour.\t\n")
    ps = load_prompts(path)
    assert [(p.id, p.text, p.category) for p in ps] == [
        ("x1", "Hello, how are you?", "chat"),
        ("x2", "Name a colour.", "general"),
    ]


@pytest.mark.parametrize(
    "body,line,problem",
    [
        ('text,id\nhi,a\n"unterminated,b\nmore,c\n', 3, "unexpected end of data"),
        ('text,id\nok,a\n"bad"x,b\n', 3, "expected"),
        ('text,id\n"two\nlines",a\nok,b\n"bad"x,c\n', 4, "expected"),  # rows count records, not lines
        ('"text,id\nhi,a\n', 1, "unexpected end of data"),  # the header itself
    ],
)
def test_csv_quote_errors_name_the_row(tmp_path, body, line, problem):
    """A quote left open swallowed the rest of the file into one prompt, silently."""
    from cai_dpo.data import PromptFileError, load_prompts

    path = tmp_path / "p.csv"
    path.write_text(body)
    with pytest.raises(PromptFileError, match=f"p.csv: row {line}: not valid CSV .*{problem}"):
        load_prompts(path)


def test_csv_quoted_cell_keeps_its_newline(tmp_path):
    from cai_dpo.data import load_prompts

    path = tmp_path / "p.csv"
    path.write_text('id,text\na,"line one\nline two"\nb,next\n')
    assert [p.text for p in load_prompts(path)] == ["line one\nline two", "next"]


# --------------------------------------------------------------------------- 3: YAML 1.2 floats


def test_exponent_floats_everywhere(ctx):
    path = ctx.config("dpo: {learning_rate: 5e-5}\nsft: {learning_rate: 2E-4}\n")
    cfg = load_config(str(path))
    assert cfg.dpo.learning_rate == 5e-05 and cfg.sft.learning_rate == 2e-04
    assert load_config("tiny", ["dpo.learning_rate=5e-5"]).dpo.learning_rate == 5e-05
    assert parse_override("ppo.kl_coef=1e-3") == ("ppo.kl_coef", 0.001)
    saved = config_from_yaml_text("run_id: r\nrm: {learning_rate: 3e-6}\n", source="saved")
    assert saved.rm.learning_rate == 3e-06
    assert load_config("tiny", ["sl.rounds=2"]).sl.rounds == 2  # integers stay integers


# --------------------------------------------------------------------------- 4: run ids are text


def test_run_id_stays_text(ctx):
    from cai_dpo.cli import build_parser, config_from_args
    from cai_dpo.pipeline import open_run

    args = build_parser().parse_args(["sl", "--profile", "tiny", "-o", f"runs_dir={ctx.runs}", "--run-id", "007"])
    cfg = config_from_args(args)
    assert cfg.run_id == "007" and cfg.run_dir == ctx.runs / "007"
    assert load_config("tiny", ["run_id=007"]).run_id == "007"
    assert load_config("tiny", ["run_id='1e5'"]).run_id == "1e5"
    cfg2, run = open_run("tiny", run_id="007", overrides=[f"runs_dir={ctx.runs}"])  # notebook parameters
    assert cfg2.run_id == "007" and run.root == ctx.runs / "007"
    reread = config_from_yaml_text((run.root / "config.yaml").read_text(), source="saved")
    assert reread.run_id == "007"
    assert load_config("tiny", ["labels.db_path=null"]).labels.db_path is None


# --------------------------------------------------------------------------- 5: transcripts with several human turns

HH2 = (
    "\n\nHuman: My tap keeps dripping.\n\nAssistant: Is it a single-handle tap?"
    "\n\nHuman: Yes, a mixer.\n\nAssistant: Then the cartridge probably needs replacing."
)


def test_transcript_prompt_ends_with_last_human_turn(tmp_path):
    from cai_dpo.data import load_prompts

    path = tmp_path / "hh.jsonl"
    path.write_text(
        json.dumps({"chosen": HH2, "rejected": HH2})
        + "\n"
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye?"},
                    {"role": "assistant", "content": "Bye."},
                ]
            }
        )
        + "\n"
    )
    hh, msgs = load_prompts(path)
    conv = hh.conversation(full=True)
    assert [m["role"] for m in conv] == ["user", "assistant", "user"]
    assert conv[-1] == {"role": "user", "content": "Yes, a mixer."}
    assert hh.text == "Yes, a mixer." and hh.conversation() == [{"role": "user", "content": "Yes, a mixer."}]
    assert hh.meta["reference_reply"] == "Then the cartridge probably needs replacing."
    assert msgs.conversation(full=True)[-1] == {"role": "user", "content": "Bye?"} and msgs.text == "Bye?"


# --------------------------------------------------------------------------- 6: preference rows without signal


def test_preference_rows_without_signal_are_dropped_and_counted():
    from cai_dpo.stages.dpo import training_rows

    rows = [
        {**_GOOD, "pair_id": "ok"},
        {**_GOOD, "pair_id": "same", "rejected": " yes "},
        {**_GOOD, "pair_id": "blank", "chosen": "  \n"},
        {
            **_GOOD,
            "pair_id": "msgs",
            "chosen": [{"role": "assistant", "content": "x"}],
            "rejected": [{"role": "assistant", "content": "x"}],
        },
    ]
    prepared = training_rows(rows, "soft")
    assert len(prepared.rows) == 1
    assert prepared.counts["dropped_identical"] == 2 and prepared.counts["dropped_empty"] == 1


def test_preference_model_refuses_rows_without_signal(tiny_cfg):
    from cai_dpo.stages.rm import run_rm

    rows = [{**_GOOD, "rejected": "yes"}, {**_GOOD, "chosen": " "}]
    with pytest.raises(CaiDpoInputError, match="no usable preference pairs"):
        run_rm(tiny_cfg, preferences=rows)
    with pytest.raises(CaiDpoInputError, match="'p_chosen'"):
        run_rm(tiny_cfg, preferences=[{k: v for k, v in _GOOD.items() if k != "p_chosen"}])


# --------------------------------------------------------------------------- 7: label smoothing


def test_label_smoothing_only_with_hard_labels():
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        load_config("tiny", ["dpo.label_smoothing=0.2"])
    cfg = load_config("tiny", ["dpo.label_mode=hard", "dpo.label_smoothing=0.2"])
    assert cfg.dpo.label_smoothing == 0.2


# --------------------------------------------------------------------------- 8: label import is one transaction


def test_label_import_is_all_or_nothing(tmp_path):
    q = LabelQueue(tmp_path / "q.sqlite")
    q.enqueue([pair("p1")])
    path = tmp_path / "x.jsonl"
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in [{"kind": "pair", **pair("new")}, label("new"), label("ghost")])
    )
    with pytest.raises(CaiDpoInputError, match="ghost"):
        q.import_jsonl(path)
    assert [p["pair_id"] for p in q.pairs()] == ["p1"] and q.labels() == []
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(label("p1", created_at="2026-01-31T13:00:00Z")) + "\n")
    assert q.import_jsonl(good) == {"pairs": 0, "labels": 1, "revisions": 0}
    assert q.labels()[0]["created_at"] == "2026-01-31T13:00:00.000000+00:00"  # normalised UTC


# --------------------------------------------------------------------------- 9: prompt longer than the context


def test_too_long_prompt_names_file_line_and_id(tiny_cfg, tmp_path):
    from cai_dpo.generate import generate_file

    path = tmp_path / "long.jsonl"
    path.write_text(
        json.dumps({"id": "short", "text": "Hi"}) + "\n" + json.dumps({"id": "huge", "text": "word " * 5000}) + "\n"
    )
    with pytest.raises(CaiDpoInputError) as info:
        generate_file(tiny_cfg, path, tmp_path / "out.jsonl")
    message = str(info.value)
    assert str(path) in message and "line 2" in message and "huge" in message and "context" in message
    assert not (tmp_path / "out.jsonl").exists()


# --------------------------------------------------------------------------- 10: read-only status and export


def test_status_and_export_open_read_only(tmp_path):
    db = tmp_path / "q.sqlite"
    with LabelQueue(db) as q:
        q.enqueue([pair("p1")])
    before = db.read_bytes()
    with LabelQueue(db, read_only=True) as ro:
        assert ro.status()["queued"] == 1
        ro.export_jsonl(tmp_path / "x.jsonl")
        with pytest.raises(CaiDpoInputError, match="read-only"):
            ro.enqueue([pair("p2")])
    assert db.read_bytes() == before
    with pytest.raises(CaiDpoInputError, match="not found"):
        LabelQueue(tmp_path / "typo.sqlite", read_only=True)
    assert not (tmp_path / "typo.sqlite").exists()


# --------------------------------------------------------------------------- strict weight loading


def test_state_dict_mismatch_fails_naming_keys():
    import torch

    from cai_dpo.models import ModelLoadError, load_state_checked

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    load_state_checked(model, {"embed.weight": torch.ones(5, 3)}, "src")  # the tied head may be absent
    assert torch.equal(model.head.weight, torch.ones(5, 3))
    with pytest.raises(ModelLoadError, match="renamed.weight"):
        load_state_checked(Tied(), {"renamed.weight": torch.ones(5, 3)}, "src")


def test_run_id_number_in_yaml_asks_for_quotes(ctx):
    path = ctx.config("run_id: 007\n", name="num.yaml")
    with pytest.raises(ConfigError, match=r"run_id.*quote it"):
        load_config(str(path))
    quoted = ctx.config("run_id: '007'\n", name="quoted.yaml")
    assert load_config(str(quoted)).run_id == "007"


def test_ppo_prompts_without_prompt_column_name_the_field(tiny_cfg):
    import datasets

    from cai_dpo.stages.ppo import ppo_prompts
    from cai_dpo.store import RunStore

    run = RunStore(tiny_cfg.run_dir)
    datasets.Dataset.from_dict({"chosen": ["a"], "rejected": ["b"]}).save_to_disk(
        str(run.root / "data" / "preferences")
    )
    with pytest.raises(CaiDpoInputError, match="'prompt'"):
        ppo_prompts(tiny_cfg, run)


def test_generate_count_must_be_positive(capsys):
    """``generate -n 0`` wrote an empty output file and exited 0."""
    from cai_dpo.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["generate", "--profile", "tiny", "p.jsonl", "out.jsonl", "-n", "0"])
    assert exc.value.code == 2 and "argument -n: expected an integer >= 1" in capsys.readouterr().err


def test_every_atomic_writer_names_a_folder_in_the_way(tmp_path):
    """A folder at an output path: the error named the writer's temp file (``.out.1234.tmp: Is a directory``)."""
    from cai_dpo.store import atomic_write_json, write_jsonl

    (tmp_path / "out").mkdir()
    for write in (lambda p: atomic_write_json(p, {}), lambda p: write_jsonl(p, [{}])):
        with pytest.raises(IsADirectoryError) as exc:
            write(tmp_path / "out")
        assert exc.value.filename == str(tmp_path / "out") and "a folder is there" in str(exc.value)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp file left


def test_run_only_and_from_together_is_refused(capsys):
    """``run --only sft --from dpo`` ran sft alone: --from was silently ignored."""
    from cai_dpo.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--profile", "tiny", "--only", "sft", "--from", "dpo"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    from cai_dpo.pipeline import select_stages

    with pytest.raises(ValueError, match="not both"):  # the library and the notebooks, too
        select_stages(from_stage="dpo", only="sft")


def test_a_model_folder_removed_after_use_does_not_block_the_run(ctx):
    """Only values that differ from the saved config are checked: a teacher folder deleted after SL (or a
    judge adapter inside the run folder that a stage writes later) must not stop later stages."""
    import dataclasses

    from cai_dpo.config import ModelSpec
    from cai_dpo.pipeline import open_run

    cfg = load_config("tiny", {"runs_dir": str(ctx.runs), "run_id": "r1"})
    cfg = dataclasses.replace(cfg, sl=dataclasses.replace(cfg.sl, teacher=ModelSpec(name="/gone/teacher")))
    save_config(cfg, ctx.run_dir / "config.yaml")
    reopened, _ = open_run("tiny", "r1", [f"runs_dir={ctx.runs}"], knobs={"sft.max_steps": 3}, create=False)
    assert reopened.sl.teacher.name == "/gone/teacher" and reopened.sft.max_steps == 3
    inside = str(ctx.runs / "r2" / "models" / "sft")  # written by r2 itself later
    open_run("tiny", "r2", [f"runs_dir={ctx.runs}", f"judge.model={{name: {inside}}}"], create=True)
    with pytest.raises(CaiDpoInputError, match="'sl.teacher.name': '/other/teacher'"):
        open_run("tiny", "r1", [f"runs_dir={ctx.runs}", "sl.teacher={name: /other/teacher}"], create=False)


# --------------------------------------------------------------------------- 11: byte-order marks, repeated ids


BOM = "\ufeff"


def test_every_json_reader_reads_a_file_with_a_byte_order_mark(ctx):
    """Some editors (Notepad, Excel's UTF-8 export) start a file with U+FEFF; the prompt reader skipped it, the
    label import, read_jsonl and the constitution import refused line 1 as not JSON."""
    from cai_dpo.constitution import import_anthropic
    from cai_dpo.data import load_prompts

    rows = ctx.write("rows.jsonl", BOM + '{"a": 1}\n{"a": 2}\n')
    assert read_jsonl(rows) == [{"a": 1}, {"a": 2}]
    prompts = ctx.write("p.jsonl", BOM + '{"id": "x", "text": "hello"}\n')
    assert [p.text for p in load_prompts(prompts)] == ["hello"]
    meta = {"kind": "meta", "schema_version": 1}
    export = ctx.write("bom.jsonl", BOM + json.dumps(meta) + "\n" + json.dumps({"kind": "pair", **pair("p9")}) + "\n")
    with LabelQueue(ctx.db) as q:
        assert q.import_jsonl(export) == {"pairs": 1, "labels": 0, "revisions": 0}
        assert q.pair("p9")["prompt"] == "prompt p9"
    crit = {"h0": {"prompt": ["Point out harm."], "edit_request": "Remove the harm."}}
    ctx.write("paper/CritiqueRevisionInstructions.json", BOM + json.dumps(crit))
    ctx.write("paper/RLMadisonInstructions.json", BOM + json.dumps(["Which is less harmful?"]))
    c = import_anthropic(ctx.root / "inputs" / "paper")
    assert [p.critique for p in c.principles] == ["Point out harm."]
    cfg = ctx.write("bom.yaml", BOM + f"base: tiny\nruns_dir: {ctx.runs}\nrun_id: bom\n")
    assert load_config(str(cfg)).run_id == "bom"


def test_json_objects_keep_distinct_keys_and_nested_repeats():
    """Only a key repeated within one object is refused; the same key in sibling or nested objects is fine."""
    from cai_dpo.store import loads_json

    text = '{"a": {"a": 1}, "b": [{"a": 1}, {"a": 2}], "c": "\\"a\\": 3"}'
    assert loads_json(text) == {"a": {"a": 1}, "b": [{"a": 1}, {"a": 2}], "c": '"a": 3'}


def test_label_import_takes_a_repeat_once(ctx):
    """Two exports joined hold the same pair twice, queued at different times (each queue stamps its own
    ``enqueued_at``), and the same label with its time written two ways: each is imported once. A pair the
    queue has with the same prompt and responses is skipped, whatever its other fields."""
    rows = [
        pair("p8", kind="pair", enqueued_at="2026-01-31T09:00:00+00:00"),
        label("p8", created_at="2026-01-31T12:00:00Z"),
        pair("p8", kind="pair", enqueued_at="2026-02-02T10:30:00+00:00", p_chosen=0.6),
        label("p8", created_at="2026-01-31T12:00:00+00:00"),
        pair("p1", kind="pair", p_chosen=0.4),  # queued already (p_chosen 0.55): same prompt and responses
    ]
    with LabelQueue(ctx.db) as q:
        assert q.import_jsonl(ctx.export(rows)) == {"pairs": 1, "labels": 1, "revisions": 0}
        assert [lab["label_id"] for lab in q.labels() if lab["pair_id"] == "p8"] == ["l-p8"]
        assert q.pair("p8")["p_chosen"] == 0.55 and q.pair("p1")["p_chosen"] == 0.55


def test_a_command_that_fails_on_a_new_run_leaves_no_run_folder(ctx, capsys):
    """A failed first command on a new run id left ``runs/<id>/`` holding only its ``.lock``; the next
    ``cai-dpo`` listing or ``--from`` saw a run that never was. A folder with anything else in it stays."""
    from cai_dpo.cli import main
    from cai_dpo.store import run_lock

    new = ctx.runs / "fresh"
    with pytest.raises(RuntimeError), run_lock(new):
        raise RuntimeError("stage failed")
    assert not new.exists()
    with run_lock(new):
        (new / "config.yaml").write_text("run_id: fresh\n")
    assert sorted(p.name for p in new.iterdir()) == [".lock", "config.yaml"]
    empty = ctx.runs / "made-by-hand"
    empty.mkdir()
    with run_lock(empty):
        pass
    assert empty.is_dir()  # not created by the lock: left as it was
    rc = main(["ppo", "--profile", "tiny", "-o", f"runs_dir={ctx.runs}", "--run-id", "never"])
    assert rc != 0 and "error: " in capsys.readouterr().err
    assert not (ctx.runs / "never").exists()

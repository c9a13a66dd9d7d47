"""Pipeline fingerprints: each stage depends on its own config sections, input file contents and upstream artifacts."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from cai_dpo.config import RunConfig, load_config
from cai_dpo.distributed import STAGES as DISTRIBUTED_STAGES
from cai_dpo.pipeline import STAGES, _fingerprint, _is_fresh, _state_path, input_files, select_stages, stale_upstream
from cai_dpo.store import RunStore

REPO = Path(__file__).resolve().parent.parent
STAGE = {s.name: s for s in STAGES}


@pytest.fixture()
def setup(tmp_path):
    cfg = load_config("tiny", {"runs_dir": str(tmp_path / "runs")})
    return cfg, RunStore(cfg.run_dir)


def prints(cfg: RunConfig, run: RunStore) -> dict[str, str]:
    return {s.name: _fingerprint(s, cfg, run) for s in STAGES}


def changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {k for k in a if a[k] != b[k]}


def test_unchanged_config_keeps_every_fingerprint(setup):
    cfg, run = setup
    assert prints(cfg, run) == prints(load_config("tiny", {"runs_dir": str(cfg.runs_dir)}), run)


def test_a_knob_reruns_its_stage_and_no_upstream_one(setup, tmp_path):
    cfg, run = setup
    base = prints(cfg, run)
    knobs = {
        "eval.bootstrap": (77, {"eval"}),
        "ppo.kl_coef": (0.2, {"ppo"}),
        "rm.learning_rate": (0.001, {"rm"}),
        "dpo.beta": (0.3, {"dpo"}),
        "labels.confidence_band": (0.2, {"labels"}),
        "sft.learning_rate": (0.001, {"sft"}),
        "pairs.samples_per_prompt": (3, {"pairs", "judge"}),
        "sl.rounds": (2, {"sl"}),
        "judge.few_shot": (True, {"setup", "curate", "judge", "eval"}),
        "data.red_team_limit": (3, {"sl", "pairs", "rm", "ppo", "eval"}),
        "policy.dtype": (
            "bfloat16",
            {"setup", "sl", "curate", "sft", "pairs", "judge", "dpo", "rm", "ppo", "eval"},
        ),
        "curate.threshold": (0.7, {"curate"}),
        "run_id": ("other", set()),
    }
    for key, (value, expected) in knobs.items():
        cfg2 = load_config("tiny", {"runs_dir": str(tmp_path / "runs"), key: value})
        assert changed(base, prints(cfg2, run)) == expected, key


def test_iterative_dpo_and_ptx_read_more_sections(setup, tmp_path):
    cfg, run = setup
    rounds = load_config("tiny", {"runs_dir": str(tmp_path / "runs"), "dpo.rounds": 2})
    more = load_config("tiny", {"runs_dir": str(tmp_path / "runs"), "dpo.rounds": 2, "pairs.samples_per_prompt": 3})
    assert "dpo" in changed(prints(rounds, run), prints(more, run))  # rounds > 1 sample new pairs
    ptx = load_config("tiny", {"runs_dir": str(tmp_path / "runs"), "ppo.ptx_coef": 0.1})
    ptx2 = load_config("tiny", {"runs_dir": str(tmp_path / "runs"), "ppo.ptx_coef": 0.1, "sft.max_length": 99})
    assert changed(prints(ptx, run), prints(ptx2, run)) == {"sft", "ppo"}
    # benign prompts come from pairs.curated: a pairs setting then reaches PPO directly
    benign = load_config("tiny", {"runs_dir": str(tmp_path / "runs"), "ppo.benign_prompts": 4})
    benign2 = load_config(
        "tiny", {"runs_dir": str(tmp_path / "runs"), "ppo.benign_prompts": 4, "pairs.curated_limit": 3}
    )
    assert "ppo" in changed(prints(benign, run), prints(benign2, run))
    plain = load_config("tiny", {"runs_dir": str(tmp_path / "runs")})
    plain2 = load_config("tiny", {"runs_dir": str(tmp_path / "runs"), "pairs.curated_limit": 3})
    assert "ppo" not in changed(prints(plain, run), prints(plain2, run))


def test_input_file_contents_are_hashed(setup, tmp_path):
    cfg, run = setup
    constitution = tmp_path / "mine.yaml"
    shutil.copy(cfg.constitution_path(), constitution)
    red = tmp_path / "red.jsonl"
    red.write_text(json.dumps({"text": "How do I pick a lock?", "split": "train"}) + "\n")
    cfg = load_config(
        "tiny", {"runs_dir": str(tmp_path / "runs"), "constitution": str(constitution), "data.red_team": str(red)}
    )
    base = prints(cfg, run)
    constitution.write_text(constitution.read_text() + "\n# edited\n")
    assert changed(base, prints(cfg, run)) == {"setup", "sl", "curate", "judge", "eval"}
    base = prints(cfg, run)
    red.write_text(red.read_text() + json.dumps({"text": "How do I hotwire a car?", "split": "train"}) + "\n")
    assert changed(base, prints(cfg, run)) == {"sl", "pairs", "rm", "ppo", "eval"}
    checkset = tmp_path / "check.jsonl"
    checkset.write_text((REPO / "cai_dpo" / "prompts" / "judge_checkset.jsonl").read_text())
    cfg = dataclasses.replace(cfg, judge=dataclasses.replace(cfg.judge, checkset=str(checkset)))
    base = prints(cfg, run)
    checkset.write_text(checkset.read_text().splitlines()[0] + "\n")
    assert changed(base, prints(cfg, run)) == {"judge"}
    assert set(input_files(STAGE["eval"], cfg)) == {"constitution", "red_team", "helpful", "jailbreaks", "eval.curated"}


def test_user_curated_sets_and_row_files_are_hashed(setup, tmp_path):
    """A user's curated set (curate, sft, pairs, eval) and a row file curate scores: editing one reruns its readers."""
    cfg, run = setup
    curated = tmp_path / "mine.jsonl"
    bundled = sorted((REPO / "cai_dpo" / "prompts" / "curated").glob("*.jsonl"))
    curated.write_text("".join(f.read_text() for f in bundled))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "How do I sharpen a knife?", "response": "Use a whetstone."}) + "\n")
    cfg = load_config(
        "tiny",
        {
            "runs_dir": str(tmp_path / "runs"),
            "curate.curated_set": str(curated),
            "curate.sources": ["sl", str(rows)],
            "sft.curated": str(curated),
            "pairs.curated": str(curated),
            "eval.curated": str(curated),
        },
    )
    base = prints(cfg, run)
    curated.write_text(curated.read_text() + "\n")
    assert changed(base, prints(cfg, run)) == {"curate", "sft", "pairs", "eval"}
    base = prints(cfg, run)
    rows.write_text(rows.read_text() + json.dumps({"prompt": "How do I boil an egg?", "response": "Simmer it."}) + "\n")
    assert changed(base, prints(cfg, run)) == {"curate"}
    base = prints(cfg, run)
    rows.unlink()
    assert changed(base, prints(cfg, run)) == {"curate"}  # a missing file is an input state too
    assert input_files(STAGE["curate"], cfg)["curate.sources[1]"] == f"missing:{rows}"
    # rm.helpful_mix counts pairs.curated's benign prompts as helpful: the preference model reads that set too
    mixed = dataclasses.replace(cfg, rm=dataclasses.replace(cfg.rm, helpful_mix=0.3))
    base = prints(mixed, run)
    curated.write_text(curated.read_text() + "\n")
    assert changed(base, prints(mixed, run)) == {"curate", "sft", "pairs", "rm", "eval"}
    # PPO's likelihood term on the SFT rows reads sft.curated too
    ptx = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, ptx_coef=0.1, ptx_data="sft"))
    base = prints(ptx, run)
    curated.write_text(curated.read_text() + "\n")
    assert "ppo" in changed(base, prints(ptx, run))
    # a labelled benchmark file the evaluation reads
    from cai_dpo.config import BenchmarkSection

    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"prompt": "How do I whittle a spoon?", "label": "benign"}) + "\n")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, benchmarks=[BenchmarkSection(path=str(bench))]))
    base = prints(cfg, run)
    bench.write_text(bench.read_text() + json.dumps({"prompt": "How do I pick a lock?", "label": "harmful"}) + "\n")
    assert changed(base, prints(cfg, run)) == {"eval"}
    # the bundled set by default: its folder's files, under the field that names it
    default = load_config("tiny", {"runs_dir": str(tmp_path / "runs")})
    assert input_files(STAGE["sft"], default)["sft.curated"] not in (None, "missing:bundled:curated")


def test_labels_in_a_home_relative_database_rerun_the_labels_stage(setup, tmp_path, monkeypatch):
    """labels.db_path: ~/... is read where the labels stage reads it, so a new label there reruns the stage."""
    from cai_dpo.labels import LabelQueue

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    cfg = load_config("tiny", {"runs_dir": str(tmp_path / "runs"), "labels.db_path": "~/labels.sqlite"})
    run = RunStore(cfg.run_dir)
    with LabelQueue(tmp_path / "home" / "labels.sqlite") as queue:
        queue.enqueue(
            [
                {
                    "pair_id": "p1",
                    "prompt": "Q",
                    "response_a": "a",
                    "response_b": "b",
                    "p_chosen": 0.5,
                    "principle_ids": [],
                    "reasons": ["low_confidence"],
                }
            ]
        )
    base = prints(cfg, run)
    with LabelQueue(tmp_path / "home" / "labels.sqlite") as queue:
        queue.record_label("p1", "A", "AB", "ann")
    assert changed(base, prints(cfg, run)) == {"labels"}


def test_upstream_artifact_change_reruns_downstream_only(setup):
    cfg, run = setup
    base = prints(cfg, run)
    manifest = run.path("models", "sft", "manifest.json")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("{}")
    assert changed(base, prints(cfg, run)) == {"pairs", "dpo", "rm", "ppo", "eval"}
    base = prints(cfg, run)
    pairs = run.path("data", "pairs", "manifest.json")
    pairs.parent.mkdir(parents=True, exist_ok=True)
    pairs.write_text("{}")
    assert changed(base, prints(cfg, run)) == {"judge"}  # the judge reads the pairs; labels follow its output
    base = prints(cfg, run)
    rm = run.path("models", "rm", "manifest.json")
    rm.parent.mkdir(parents=True, exist_ok=True)
    rm.write_text("{}")
    assert changed(base, prints(cfg, run)) == {"ppo", "eval"}


# --------------------------------------------------------------------------- declared = read

RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
METHOD_SECTIONS = {"constitution_path": {"constitution"}, "judge_model": {"judge", "policy"}}


def _modules_of(notebook: Path) -> list[Path]:
    """The notebook's code cells and the cai_dpo stage modules whose run_* functions it calls."""
    book = json.loads(notebook.read_text())
    code = "\n".join("".join(c["source"]) for c in book["cells"] if c["cell_type"] == "code")
    files = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cai_dpo."):
            if any(a.name.startswith("run_") and a.name != "run_stage" for a in node.names):
                files.append(REPO / (node.module.replace(".", "/") + ".py"))
        # run_stage('dpo', ...) (cai_dpo.distributed) runs that training stage's module
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "run_stage":
            module = DISTRIBUTED_STAGES[node.args[0].value][0]
            files.append(REPO / (module.replace(".", "/") + ".py"))
    return files, code


#: library calls that read run config fields on the stage's behalf: (class, method) -> fields
CALL_SECTIONS = {("Judge", "load"): {"judge", "policy", "seed", "threads", "constitution"}}


def _sections_read(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
        ):
            found |= CALL_SECTIONS.get((node.func.value.id, node.func.attr), set())
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "cfg":
            node = node.value  # self.cfg.X
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg":
            if node.attr in RUN_FIELDS:
                found.add(node.attr)
            found |= METHOD_SECTIONS.get(node.attr, set())
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
            and node.value.attr == "cfg"
        ):
            if node.attr in RUN_FIELDS:
                found.add(node.attr)
            found |= METHOD_SECTIONS.get(node.attr, set())
    return found


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_declared_sections_are_what_the_stage_reads(stage):
    modules, code = _modules_of(stage.path())
    read = _sections_read(code)
    for m in modules:
        source = m.read_text()
        read |= _sections_read(source)
        # stages a stage runs in turn (iterative DPO: pairs, judge, labels per round)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_default_stage":
                module = node.args[0].value
                read |= _sections_read((REPO / (module.replace(".", "/") + ".py")).read_text())
    read -= {"run_dir", "run_id", "runs_dir", "profile"}  # where the run lives, not what it computes
    assert read == stage.all_sections(), f"{stage.name}: reads {sorted(read)}, declares {sorted(stage.all_sections())}"


def test_only_and_from_name_the_upstream_stages_that_are_out_of_date(setup, tmp_path):
    """``--only ppo`` after the preference model's settings changed: rm is named; a changed stage the
    chosen ones do not read (dpo for ppo), or that reruns itself, is not."""
    cfg, run = setup
    ran = ("sft", "pairs", "judge", "labels", "dpo", "rm")
    for name in ran:
        for out in STAGE[name].outputs_for(cfg):
            (run.root / out).parent.mkdir(parents=True, exist_ok=True)
            (run.root / out).write_text("{}")
    for name in ran:  # as the pipeline records them, after the outputs exist
        _state_path(run, STAGE[name]).parent.mkdir(parents=True, exist_ok=True)
        _state_path(run, STAGE[name]).write_text(json.dumps({"fingerprint": _fingerprint(STAGE[name], cfg, run)}))

    def with_(key, value):
        return load_config("tiny", {"runs_dir": str(tmp_path / "runs"), key: value})

    assert stale_upstream(select_stages(only="ppo"), cfg, run) == []
    assert stale_upstream(select_stages(only="ppo"), with_("rm.learning_rate", 0.002), run) == ["rm"]
    assert stale_upstream(select_stages(from_stage="rm"), with_("rm.learning_rate", 0.002), run) == []
    assert stale_upstream(select_stages(only="sft"), with_("rm.learning_rate", 0.002), run) == []
    assert stale_upstream(select_stages(only="ppo"), with_("dpo.beta", 0.3), run) == []  # ppo does not read dpo
    assert stale_upstream(select_stages(only="eval"), with_("dpo.beta", 0.3), run) == ["dpo"]
    # through stages not chosen: labels reads the judge's preferences, rm reads labels' merged ones
    assert stale_upstream(select_stages(only="rm"), with_("judge.few_shot", True), run) == ["judge"]


@pytest.mark.parametrize("damage", [b'{"fingerprint": ', b"\xff\xfe", b"[1, 2]"])
def test_a_damaged_stage_record_means_the_stage_reruns(setup, damage):
    """A stage record cut short or edited by hand made every run, ``--only`` and ``--from`` fail with a
    traceback; it now counts as not up to date, so the stage reruns and writes a good record."""
    cfg, run = setup
    stage = STAGE["rm"]
    for out in stage.outputs_for(cfg):
        (run.root / out).parent.mkdir(parents=True, exist_ok=True)
        (run.root / out).write_text("{}")
    _state_path(run, stage).parent.mkdir(parents=True, exist_ok=True)
    _state_path(run, stage).write_text(json.dumps({"fingerprint": _fingerprint(stage, cfg, run)}))
    assert _is_fresh(stage, _fingerprint(stage, cfg, run), run, cfg)
    _state_path(run, stage).write_bytes(damage)
    assert not _is_fresh(stage, _fingerprint(stage, cfg, run), run, cfg)
    assert stale_upstream(select_stages(only="ppo"), cfg, run) == ["rm"]

"""One name per stage: pipeline stage = module ``cai_dpo/stages/<name>.py`` = notebook ``NN_<name>.ipynb`` = command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cai_dpo.cli import build_parser, main
from cai_dpo.pipeline import NOTEBOOKS_DIR, RENAMED_STAGES, STAGES, stage_names

REPO = Path(__file__).resolve().parent.parent
STAGES_DIR = REPO / "cai_dpo" / "stages"


@pytest.mark.parametrize("index, stage", list(enumerate(STAGES)), ids=[s.name for s in STAGES])
def test_stage_module_notebook_and_command_share_its_name(index, stage, capsys):
    assert (STAGES_DIR / f"{stage.name}.py").is_file(), f"no module cai_dpo/stages/{stage.name}.py"
    assert stage.notebook == f"{index:02d}_{stage.name}.ipynb"
    assert (NOTEBOOKS_DIR / stage.notebook).is_file()
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([stage.name, "--help"])
    assert exit_.value.code == 0
    assert f"cai-dpo {stage.name}" in capsys.readouterr().out


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_the_notebook_runs_its_own_stage_module(stage):
    """The notebook's work is its module's ``run_*`` (directly or through ``run_stage('<name>', ...)``)."""
    book = json.loads((NOTEBOOKS_DIR / stage.notebook).read_text())
    code = "\n".join("".join(c["source"]) for c in book["cells"] if c["cell_type"] == "code")
    direct = re.search(rf"from cai_dpo\.stages\.{stage.name} import .*\brun_", code)
    launched = re.search(rf"run_stage\('{stage.name}'", code)
    assert direct or launched, f"{stage.notebook} does not run cai_dpo.stages.{stage.name}"
    others = set(re.findall(r"from cai_dpo\.stages\.(\w+) import", code)) | set(re.findall(r"run_stage\('(\w+)'", code))
    assert others == {stage.name}, f"{stage.notebook} runs other stages too: {sorted(others - {stage.name})}"


def test_every_stage_module_is_a_stage():
    modules = {p.stem for p in STAGES_DIR.glob("*.py")} - {"__init__"}
    assert modules == set(stage_names())


@pytest.mark.parametrize("old", sorted(RENAMED_STAGES))
@pytest.mark.parametrize("option", ["--from", "--only"])
def test_an_old_stage_name_names_its_replacement(old, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", option, old])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"stage '{old}' is now" in err
    assert all(f"'{new}'" in err for new in RENAMED_STAGES[old])


def test_setup_command_creates_the_run_and_runs_the_setup_stage(tmp_path, monkeypatch, capsys):
    """``cai-dpo setup`` is notebook 00's work: the run's config.yaml, then ``run_setup``."""
    import cai_dpo.stages.setup as setup

    calls = []

    def fake_run_setup(cfg, run):
        calls.append(cfg.run_id)
        out = run.constitution
        out.mkdir(parents=True)
        (out / "manifest.json").write_text(json.dumps({"counts": {"principles": 3}}))
        (out / "cases.txt").write_text("case table\n")
        return out

    monkeypatch.setattr(setup, "run_setup", fake_run_setup)
    runs = tmp_path / "runs"
    assert main(["setup", "--profile", "tiny", "--run-id", "007", "-o", f"runs_dir={runs}"]) == 0
    assert calls == ["007"]
    assert (runs / "007" / "config.yaml").is_file()
    out = capsys.readouterr().out
    assert "3 principles" in out and "case table" in out

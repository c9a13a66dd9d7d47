"""Stage notebooks: committed clean, parameterised, and executed end to end by the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from cai_dpo.pipeline import NOTEBOOKS_DIR, STAGES, PipelineError, run_pipeline, select_stages

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def test_every_stage_has_its_notebook():
    assert [s.notebook for s in STAGES] == [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_with_parameters(path: Path):
    book = nbformat.read(path, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
    first = code[0]
    assert "parameters" in first.metadata.get("tags", []), f"{path.name}: first code cell must be tagged 'parameters'"
    assert "profile" in first.source and "config_path" in first.source
    assert book.cells[0].cell_type == "markdown", f"{path.name} starts by explaining its step"


def test_stage_selection():
    assert [s.name for s in select_stages(only="dpo")] == ["dpo"]
    assert [s.name for s in select_stages(from_stage="ppo")] == ["ppo", "eval"]
    with pytest.raises(ValueError, match="unknown stage"):
        select_stages(only="nope")
    assert [s.name for s in select_stages(from_stage="rm")] == ["rm", "ppo", "eval"]
    with pytest.raises(ValueError, match="'feedback' is now stages 'pairs' and 'judge'"):
        select_stages(from_stage="feedback")
    with pytest.raises(ValueError, match="'constitution' is now stage 'setup'"):
        select_stages(only="constitution")


def test_whole_pipeline_on_tiny_then_rerun_skips(tmp_path, monkeypatch, tiny_path):
    """Every notebook executed by papermill on the tiny profile; a rerun skips all stages."""
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    cfg, results = run_pipeline("tiny", [f"runs_dir={tmp_path / 'runs'}"], echo=lines.append)
    assert [r.status for r in results] == ["ran"] * len(STAGES), lines
    root = cfg.run_dir
    for stage in STAGES:
        executed = nbformat.read(root / "notebooks" / stage.notebook, as_version=4)
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
        for out in stage.outputs_for(cfg):
            assert (root / out).exists(), f"{stage.name} did not write {out}"
    assert (root / "labels.sqlite").exists()
    assert list((root / "report").glob("*.png"))
    _, again = run_pipeline("tiny", [f"runs_dir={tmp_path / 'runs'}"], echo=lines.append)
    assert [r.status for r in again] == ["skipped"] * len(STAGES), lines
    summary = json.loads((root / "pipeline" / "last_run.json").read_text())
    assert summary["profile"] == "tiny"


def test_failure_names_notebook_and_cell(tmp_path, monkeypatch, tiny_path):
    monkeypatch.chdir(tmp_path)
    # a constitution that loads (the pipeline checks that before it saves the config) whose edge-case
    # file beside it does not: that fails inside the setup notebook
    (tmp_path / "mine.yaml").write_text((NOTEBOOKS_DIR.parent / "constitutions" / "default.yaml").read_text())
    (tmp_path / "mine_cases.yaml").write_text("cases: [\n")
    with pytest.raises(PipelineError, match=r"00_setup.ipynb, cell \d+.*mine_cases.yaml") as err:
        run_pipeline(
            "tiny",
            [f"runs_dir={tmp_path / 'runs'}", f"constitution={tmp_path / 'mine.yaml'}"],
            only="setup",
            echo=lambda s: None,
        )
    kept = Path(str(err.value).rsplit("kept at ", 1)[1].strip())
    assert kept.exists()


def test_a_missing_constitution_fails_before_the_run_config_is_saved(tmp_path, monkeypatch):
    """The pipeline saved the config naming the missing file, then failed in the setup notebook."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.yaml: constitution file not found"):
        run_pipeline("tiny", [f"runs_dir={tmp_path / 'runs'}", "constitution=missing.yaml"], echo=lambda s: None)
    assert not list((tmp_path / "runs").rglob("config.yaml"))

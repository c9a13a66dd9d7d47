"""Crash safety: an artifact and its side files land together; SIGKILL anywhere in a stage, then a rerun.

The kill-and-rerun test runs ``bench/chaos.py`` with one trial per stage on the tiny profile.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cai_dpo.config import load_config
from cai_dpo.store import RunStore

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import chaos  # noqa: E402
from test_rm import synthetic_preferences  # noqa: E402


class Killed(BaseException):
    """Stands in for SIGKILL at one chosen point (nothing after it runs)."""


def test_preference_model_side_files_land_with_the_adapter(tmp_path, monkeypatch):
    """A kill after the adapter is written but before the scorer note and manifest leaves no half artifact."""
    from cai_dpo.stages import rm

    cfg = load_config(
        "tiny", {"threads": 1, "runs_dir": str(tmp_path / "runs"), "rm.max_steps": 2, "rm.eval_fraction": 0.0}
    )
    run = RunStore(cfg.run_dir)

    def die(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(rm, "RewardScorer", die)  # the step right after the adapter and its note are written
    with pytest.raises(Killed):
        rm.run_rm(cfg, run, preferences=synthetic_preferences(8, 0))
    out = run.root / "models" / "rm"
    assert not (out / "adapter_config.json").exists(), "adapter visible without its scorer note and manifest"
    monkeypatch.undo()
    rm.run_rm(cfg, run, preferences=synthetic_preferences(8, 0))
    assert {"adapter_config.json", rm.SCORER_NOTE, "manifest.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / rm.SCORER_NOTE).read_text())["max_length"] == cfg.rm.max_length


def test_manifest_check_catches_a_stale_hash(tmp_path):
    run = tmp_path / "run"
    (run / "data" / "pairs").mkdir(parents=True)
    (run / "data" / "pairs" / "pairs.jsonl").write_text('{"key": "a"}\n')
    (run / "data" / "preferences").mkdir(parents=True)
    from cai_dpo.store import Manifest, file_hash

    Manifest(stage="judge", inputs={"pairs": file_hash(run / "data" / "pairs" / "pairs.jsonl")}).write(
        run / "data" / "preferences" / "manifest.json"
    )
    assert chaos.manifest_mismatches(run) == []
    (run / "data" / "pairs" / "pairs.jsonl").write_text('{"key": "b"}\n')
    assert len(chaos.manifest_mismatches(run)) == 1


def test_record_checks_count_lost_and_duplicated(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    for root, lines in (
        (ref, ['{"key": "a", "seconds": 1}', '{"key": "b"}']),
        (run, ['{"key": "a", "seconds": 2}', '{"key": "a", "seconds": 3}']),
    ):
        (root / "records" / "sl").mkdir(parents=True)
        (root / "records" / "sl" / "shard-1.jsonl").write_text("\n".join(lines) + "\n")
    assert chaos.record_counts(run, ref) == {"lost": 1, "duplicated": 1}
    # wall-clock fields are left out of the byte comparison; the lost and the extra row count
    assert chaos.record_mismatches("sl", run, ref) == 2


def test_kill_anywhere_one_trial_per_stage(tmp_path):
    results = chaos.chaos(chaos.STAGES, trials=1, work=tmp_path / "chaos", seed=1)
    assert list(results) == list(chaos.STAGES)
    for stage, r in results.items():
        assert r["trials"] == 1
        assert r["completed"] == 1, (stage, r)
        assert r["lost"] == 0 and r["duplicated"] == 0, (stage, r)
        assert r["manifest_mismatches"] == 0 and r["record_mismatches"] == 0, (stage, r)
        assert r["leftover_temp_folders"] == 0, (stage, r)
        if stage in chaos.TRAINED:
            assert r["loadable"] == 1, (stage, r)
            assert r["at_max_steps"] == 1, (stage, r)

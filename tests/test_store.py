"""Run store: atomic writes, resumable record shards, SIGKILL safety, manifests."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cai_dpo.store import Manifest, RecordStore, atomic_dir, atomic_write_text, content_hash, read_manifest


def test_content_hash_stable_and_order_free():
    assert content_hash({"a": 1, "b": 2}) == content_hash({"b": 2, "a": 1})
    assert content_hash("x", 1) != content_hash("x", 2)


def test_append_skips_existing_keys(tmp_path):
    store = RecordStore(tmp_path / "r")
    assert store.append([{"key": "a", "v": 1}, {"key": "b", "v": 2}, {"key": "a", "v": 3}]) == 2
    assert store.append([{"key": "b", "v": 9}, {"key": "c", "v": 4}]) == 1
    again = RecordStore(tmp_path / "r")
    assert [r["key"] for r in again.records()] == ["a", "b", "c"]
    assert again.get("a")["v"] == 1


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("partial")
            raise Boom
    except Boom:
        pass
    assert not (tmp_path / "d").exists()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


WRITER = textwrap.dedent(
    """
    import sys, time
    from cai_dpo.store import RecordStore
    store = RecordStore(sys.argv[1])
    done = store.done_keys()
    batch = []
    for i in range(int(sys.argv[2])):
        key = f"k{i:05d}"
        if key in done:
            continue
        batch.append({"key": key, "payload": "x" * 2000, "i": i})
        if len(batch) == 10:
            store.append(batch)
            batch = []
            print("batch", flush=True)
    if batch:
        store.append(batch)
    print("done", flush=True)
    """
)


def test_sigkill_mid_write_loses_at_most_one_batch(tmp_path):
    folder = tmp_path / "records"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(folder), "100000"], stdout=subprocess.PIPE, text=True, env=env
    )
    seen = 0
    while seen < 20:
        if proc.stdout.readline().startswith("batch"):
            seen += 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rows = []
    for shard in folder.glob("shard-*.jsonl"):
        for line in shard.read_text().splitlines():
            rows.append(json.loads(line))  # every line parses: no torn record
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "duplicated records"
    assert len(keys) % 10 == 0 and len(keys) >= 200
    # a rerun finishes the rest without duplicating anything
    out = subprocess.run(
        [sys.executable, str(script), str(folder), str(len(keys) + 25)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    store = RecordStore(folder)
    assert len(store) == len(keys) + 25
    assert sorted(store.done_keys()) == [f"k{i:05d}" for i in range(len(keys) + 25)]
    time.sleep(0)


def test_manifest_has_versions_and_config(tmp_path):
    path = Manifest(stage="sl", config={"rounds": 2}, counts={"records": 3}).write(tmp_path / "manifest.json")
    body = read_manifest(tmp_path)
    assert body["stage"] == "sl" and body["counts"]["records"] == 3
    assert "torch" in body["versions"] and body["config"]["rounds"] == 2
    assert path.exists()


# --------------------------------------------------------------------------- atomic folder swap


def _write_dir(final, text):
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text(text)
        (tmp / "note.json").write_text(json.dumps({"text": text}))


def test_atomic_dir_replaces_whole_folder_and_leaves_nothing_behind(tmp_path):
    final = tmp_path / "adapter"
    _write_dir(final, "v1")
    (final / "stale-extra").write_text("only in v1")
    _write_dir(final, "v2")
    assert sorted(p.name for p in final.iterdir()) == ["note.json", "weights"]
    assert (final / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_dir_fallback_swap_without_exchange(tmp_path, monkeypatch):
    from cai_dpo import store

    monkeypatch.setattr(store, "_renameat2", None)
    final = tmp_path / "adapter"
    _write_dir(final, "v1")
    _write_dir(final, "v2")
    assert (final / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_kill_between_fallback_renames_is_recovered(tmp_path, monkeypatch):
    """The state a kill between the two renames leaves: ``final`` missing, ``.final.old-<pid>`` present."""
    from cai_dpo import store

    final = tmp_path / "adapter"
    _write_dir(final, "v1")
    monkeypatch.setattr(store, "_renameat2", None)
    calls = []
    real_replace = os.replace

    def replace_then_die(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the process "dies" right after moving the old folder aside
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", replace_then_die)
    try:
        _write_dir(final, "v2")
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(store.os, "replace", real_replace)
    assert not final.exists() and list(tmp_path.glob(".adapter.old-*"))
    # the next writer (or the run lock) repairs it: the old complete artifact is back
    assert store.recover_tree(tmp_path) == [final]
    assert (final / "weights").read_text() == "v1"
    assert json.loads((final / "note.json").read_text()) == {"text": "v1"}
    _write_dir(final, "v3")
    assert (final / "weights").read_text() == "v3"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_next_writer_recovers_leftover_old_folder(tmp_path):
    final = tmp_path / "adapter"
    old = tmp_path / ".adapter.old-999999"
    old.mkdir()
    (old / "weights").write_text("v1")
    dead_tmp = tmp_path / ".adapter.999999.abcd.tmp"  # a killed writer's half-written folder
    dead_tmp.mkdir()
    from cai_dpo.store import recover_dir

    assert recover_dir(final) is True
    assert (final / "weights").read_text() == "v1"
    assert not old.exists() and not dead_tmp.exists()


# --------------------------------------------------------------------------- run lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from cai_dpo.store import run_lock
    with run_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_second_process_on_a_run_fails_clearly(tmp_path):
    from cai_dpo.store import RunInUseError, run_lock

    run_dir = tmp_path / "runs" / "r1"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        try:
            with run_lock(run_dir):
                raise AssertionError("a second holder got the lock")
        except RunInUseError as exc:
            assert f"run r1 is in use by pid {proc.pid} since " in str(exc)
    finally:
        proc.kill()
        proc.wait()
    with run_lock(run_dir):  # a killed holder releases it
        pass


STAGE_ENTRY_POINTS = {
    "setup": "run_setup",
    "sl": "run_sl",
    "curate": "run_curate",
    "sft": "run_sft",
    "pairs": "run_pairs",
    "judge": "run_judge",
    "labels": "run_labels",
    "dpo": "run_dpo",
    "rm": "run_rm",
    "ppo": "run_ppo",
    "eval": "run_eval",
}


def test_every_stage_refuses_a_run_another_process_holds(tmp_path):
    """Each pipeline stage's entry point takes the run lock before it reads or writes anything."""
    from cai_dpo.config import load_config
    from cai_dpo.pipeline import STAGES
    from cai_dpo.store import RunInUseError

    assert set(STAGE_ENTRY_POINTS) == {s.name for s in STAGES}
    cfg = load_config("tiny", {"runs_dir": str(tmp_path / "runs")})
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), cfg.run_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        for stage, name in STAGE_ENTRY_POINTS.items():
            entry = getattr(importlib.import_module(f"cai_dpo.stages.{stage}"), name)
            with pytest.raises(RunInUseError):
                entry(cfg)
    finally:
        proc.kill()
        proc.wait()


def test_cli_commands_that_write_a_run_hold_its_lock():
    """Every stage with a command of its own is a run command (the labels command's status/export only read)."""
    from cai_dpo.cli import RUN_COMMANDS, build_parser
    from cai_dpo.pipeline import STAGES

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {s.name for s in STAGES if s.name in commands} - {"labels"} <= RUN_COMMANDS


def test_run_lock_is_reentrant_and_inherited_by_children(tmp_path):
    from cai_dpo.store import LOCK_ENV, run_lock

    run_dir = tmp_path / "r2"
    child = "import sys; from cai_dpo.store import run_lock\nwith run_lock(sys.argv[1]): print('child ok')"
    with run_lock(run_dir):
        with run_lock(run_dir):  # same process: re-entrant
            pass
        out = subprocess.run([sys.executable, "-c", child, str(run_dir)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "child ok" in out.stdout
        # a process not started by the holder (no token) is refused
        env = {k: v for k, v in os.environ.items() if k != LOCK_ENV}
        out = subprocess.run(
            [sys.executable, "-c", child, str(run_dir)], capture_output=True, text=True, env=env, timeout=120
        )
        assert out.returncode != 0 and "is in use by pid" in out.stderr
    assert LOCK_ENV not in os.environ


def test_cli_stage_command_on_busy_run_exits_with_message(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    run_dir = tmp_path / "runs" / "busy"
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "cai_dpo.cli",
                "sl",
                "--profile",
                "tiny",
                "--run-id",
                "busy",
                "-o",
                f"runs_dir={tmp_path / 'runs'}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        proc.kill()
        proc.wait()
    assert out.returncode == 3, out.stderr
    assert f"run busy is in use by pid {proc.pid}" in out.stderr and "Traceback" not in out.stderr


# --------------------------------------------------------------------------- run layout

HISTORIC_LAYOUT = {  # paths of runs made before the layout had names: they must still be read
    "sl_data": "data/sl",
    "curated_data": "data/curated",
    "pairs": "data/pairs",
    "pairs_file": "data/pairs/pairs.jsonl",
    "preferences": "data/preferences",
    "preferences_merged": "data/preferences_merged",
    "sft_adapter": "models/sft",
    "sft_merged": "models/sft-merged",
    "dpo_adapter": "models/dpo",
    "dpo_merged": "models/dpo-merged",
    "preference_model": "models/rm",
    "ppo_adapter": "models/ppo",
    "rloo_adapter": "models/rloo",
    "eval_dir": "eval",
    "eval_results": "eval/results.json",
    "report_dir": "report",
    "report_file": "report/report.md",
    "labels_db": "labels.sqlite",
    "config_file": "config.yaml",
    "constitution": "constitution",
    "dpo_rounds": "dpo_rounds",
    "checkpoints": "checkpoints",
    "exports": "export",
}


def test_run_layout_named_paths_are_the_historic_ones(tmp_path):
    from cai_dpo.store import RunLayout, RunStore

    layout, run = RunLayout(tmp_path / "read-only"), RunStore(tmp_path / "run")
    for name, rel in HISTORIC_LAYOUT.items():
        assert getattr(layout, name) == layout.root / rel, name
        assert getattr(run, name) == run.root / rel, name
    assert run.checkpoint_dir("sft") == run.root / "checkpoints" / "sft"
    assert run.records_dir("sl") == run.root / "records" / "sl"
    assert run.metrics_dir("dpo").is_dir()
    assert not layout.root.exists()  # a RunLayout only names paths


def test_pipeline_stages_use_the_run_layout():
    from cai_dpo.config import load_config
    from cai_dpo.pipeline import STAGES
    from cai_dpo.store import RUN_LAYOUT

    known = {f"{rel}/manifest.json" for rel in RUN_LAYOUT.values()} | set(RUN_LAYOUT.values())
    for stage in STAGES:
        assert set(stage.outputs) | set(stage.inputs) <= known, stage.name
    by_name = {s.name: s for s in STAGES}
    cfg = load_config("tiny", {"ppo.mode": "rloo"})
    assert by_name["rm"].outputs_for(cfg) == ("models/rm/manifest.json",)
    assert by_name["ppo"].outputs_for(cfg) == ("models/rloo/manifest.json",)
    assert by_name["ppo"].inputs_for(cfg)[0] == "models/rm/manifest.json"
    assert by_name["pairs"].outputs == by_name["judge"].inputs == ("data/pairs/manifest.json",)
    assert by_name["sl"].outputs == ("data/sl/manifest.json",)


def test_one_dataset_hash_and_the_dpo_preferences_hash_is_unchanged(tmp_path):
    import re
    from pathlib import Path

    import datasets

    from cai_dpo.store import dataset_hash, file_hash
    from cai_dpo.training import artifact_hash

    folder = tmp_path / "prefs"
    datasets.Dataset.from_list([{"a": 1}, {"a": 2}]).save_to_disk(str(folder))
    (folder / "manifest.json").write_text("{}")
    before = dataset_hash(folder), artifact_hash(folder)
    # what DPO hashed its preferences with before (the dataset's files, its manifest left out)
    old = content_hash(
        [(p.name, file_hash(p)) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"]
    )
    assert artifact_hash(folder) == old
    (folder / "manifest.json").write_text('{"created": "later"}')
    assert (dataset_hash(folder), artifact_hash(folder)) == before
    src = Path(__file__).resolve().parent.parent / "cai_dpo"
    text = "\n".join(p.read_text() for p in src.rglob("*.py"))
    assert len(re.findall(r"^def dataset_hash\(", text, re.M)) == 1
    assert len(re.findall(r"^def load_preferences\(", text, re.M)) == 1

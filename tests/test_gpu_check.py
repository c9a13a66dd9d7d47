"""``bench/gpu_check.sh``: its CPU mode (every part skipped with a reason, exit 0) and its report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"gpu_tests", "tiny_pipeline", "qlora_train", "vllm"}


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_mode_skips_every_part_with_a_reason():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the script would run the real check")
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["cuda"] is False and set(PARTS) <= set(report)
    for part in PARTS:
        assert set(report[part]) == {"skipped"} and isinstance(report[part]["skipped"], str) and report[part]["skipped"]


def test_report_reads_each_part(tmp_path):
    check = load_gpu_check()
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" skipped="0" time="12.5">'
        '<testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b"><failure message="boom"/></testcase>'
        "</testsuite></testsuites>"
    )
    (tmp_path / "gpu_tests.rc").write_text("1\n")
    (tmp_path / "gpu_tests.log").write_text("FAILED tests/test_gpu.py::test_b - boom\n")
    (tmp_path / "tiny_pipeline.rc").write_text("0\n")
    (tmp_path / "tiny_pipeline.seconds").write_text("95\n")
    (tmp_path / "qlora_train.rc").write_text("0\n")
    (tmp_path / "qlora_train.json").write_text(
        json.dumps(
            {"dpo_4bit": {"seconds_per_step": 0.3, "cuda_max_allocated_mb": 96.0}, "ppo_8bit": {"error": "CUDA error"}}
        )
    )
    (tmp_path / "vllm.rc").write_text("0\n")
    (tmp_path / "vllm.json").write_text(json.dumps({"skipped": "vllm is not installed"}))
    report = check.report(tmp_path, "", 120.0)
    tests = report["gpu_tests"]
    assert tests["ok"] is False and tests["failures"] == 1 and tests["failed"] == ["tests.test_gpu::test_b"]
    assert "boom" in tests["log"] and tests["seconds"] == 12.5
    assert report["tiny_pipeline"] == {
        "ok": True,
        "rc": 0,
        "profile": "tiny",
        "device": "cuda",
        "dtype": "bfloat16",
        "seconds": 95.0,
    }
    assert report["qlora_train"]["ok"] is False and report["qlora_train"]["dpo_4bit"]["cuda_max_allocated_mb"] == 96.0
    assert report["vllm"] == {"skipped": "vllm is not installed"}
    assert report["ok"] is False and report["seconds"] == 120.0
    (tmp_path / "vllm.json").unlink()
    (tmp_path / "vllm.rc").write_text("124\n")  # killed by its time limit before writing anything
    (tmp_path / "vllm.log").write_text("loading...\n")
    assert check.report(tmp_path, "", None)["vllm"] == {"ok": False, "rc": 124, "log": "loading..."}

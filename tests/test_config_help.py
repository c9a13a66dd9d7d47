"""Every config field carries help, and ``cai-dpo config explain`` shows it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import cai_dpo
from cai_dpo.config import ConfigError, DPOSection, RunConfig


def _dataclasses_in(hint: typing.Any) -> list[type]:
    """The dataclasses a resolved annotation holds: ``X``, ``X | None``, ``list[X]``, ``dict[str, X]``, ..."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return [hint]
    return [c for arg in typing.get_args(hint) for c in _dataclasses_in(arg)]


def _all_sections() -> dict[str, type]:
    """Every config dataclass reachable from RunConfig, by the first dotted path that reaches it."""
    found: dict[str, type] = {}
    seen: set[type] = set()
    todo: list[tuple[str, type]] = [("", RunConfig)]
    while todo:
        path, cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        found[path or "(top level)"] = cls
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            todo += [(f"{path}.{f.name}".lstrip("."), sub) for sub in _dataclasses_in(hints[f.name])]
    return found


def test_every_config_field_has_help():
    sections = _all_sections()
    assert {"LoraSection", "ModelSpec", "SamplingSection", "BenchmarkSection", "DPOSection"} <= {
        c.__name__ for c in sections.values()
    }
    missing = [
        f"{path}.{f.name} ({cls.__name__})"
        for path, cls in sections.items()
        for f in dataclasses.fields(cls)
        if not str(f.metadata.get("help", "")).strip()
    ]
    assert not missing, "config fields without metadata={'help': ...}: " + ", ".join(missing)


def test_explain_covers_every_section_and_key():
    from cai_dpo.config_help import explain, section_paths

    paths = section_paths()
    assert {"dpo", "dpo.lora", "ppo.sampling", "judge.model", "eval.benchmarks"} <= set(paths)
    for path in paths:
        assert explain(path).startswith(f"{path} (")
    assert explain("dpo.beta").startswith("dpo.beta: float = 0.1\n")
    everything = explain()
    assert "\n  dpo: (DPOSection)\n" in everything and "\n    lora: (LoraSection)\n" in everything


def test_explain_profile_marks_values_that_differ():
    from cai_dpo.config_help import explain

    text = explain("sft", profile="tiny")
    assert "[tiny: " in text
    assert "  learning_rate: float = 0.0002\n" in text  # unchanged by the profile: no mark


@pytest.mark.parametrize("name", ["nope", "dpo.nope", "dpo.beta.more", "", "dpo..lora"])
def test_explain_unknown_section_is_a_config_error(name):
    from cai_dpo.config_help import explain

    with pytest.raises(ConfigError, match="known sections: policy, data"):
        explain(name)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    root = str(Path(cai_dpo.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(
        [sys.executable, "-m", "cai_dpo.cli", *argv], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_cli_config_explain_section():
    out = _cli("config", "explain", "dpo")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("dpo (DPOSection):")
    assert "\n  beta: float = 0.1\n" in out.stdout
    beta_help = next(f for f in dataclasses.fields(DPOSection) if f.name == "beta").metadata["help"]
    assert " ".join(beta_help.split()) in " ".join(out.stdout.split())
    assert "\n  lora: (LoraSection)\n" in out.stdout and "\n    r: int = 8\n" in out.stdout


def test_cli_config_explain_unknown_section_fails_cleanly():
    out = _cli("config", "explain", "dpoo")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: unknown config section or key 'dpoo'; known sections: ")
    assert "dpo.lora" in out.stderr and not out.stdout

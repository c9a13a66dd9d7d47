"""Package layout: no stage module imports another stage module.

Stages share code through library modules (``cai_dpo.rl``, ``cai_dpo.judge``,
``cai_dpo.pairs_io``, ...); only the launchers (``cli.py``, ``pipeline.py``,
``distributed.py``) import stages. Every import form counts: ``import cai_dpo.stages.x``,
``from cai_dpo.stages.x import y``, ``from cai_dpo.stages import x``, ``from cai_dpo import
stages``, relative imports, imports inside functions, and ``importlib.import_module`` /
``__import__`` with a literal module name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

STAGES_DIR = Path(__file__).resolve().parent.parent / "cai_dpo" / "stages"
PACKAGE = "cai_dpo.stages"
STAGE_FILES = sorted(p for p in STAGES_DIR.glob("*.py") if p.name != "__init__.py")
STAGE_NAMES = {p.stem for p in STAGE_FILES}

#: Stage runners looked up by name at run time rather than imported: iterative DPO runs the
#: pairs, judge and labels stages as the default steps of each later round (``run_iterative_dpo``'s
#: ``sample``/``judge``/``label`` arguments; the pipeline fingerprint test follows these calls too).
RUNTIME_LOOKUPS = {("dpo", "cai_dpo.stages.pairs"), ("dpo", "cai_dpo.stages.judge"), ("dpo", "cai_dpo.stages.labels")}


def _resolve(module: str | None, level: int, own: str) -> str:
    """The absolute name of an ``ImportFrom`` module inside ``cai_dpo.stages.<own>``."""
    if level == 0:
        return module or ""
    parts = f"{PACKAGE}.{own}".split(".")[:-level]
    return ".".join(parts + ([module] if module else []))


def _stage_of(name: str) -> str | None:
    """The stage a dotted module name points into (``cai_dpo.stages.judge.x`` -> ``judge``), else None."""
    if name == PACKAGE or not name.startswith(PACKAGE + "."):
        return None
    head = name[len(PACKAGE) + 1 :].split(".")[0]
    return head if head in STAGE_NAMES else None


def stage_imports(source: str, own: str) -> list[tuple[int, str]]:
    """(line, imported name) for every import in ``source`` that reaches a stage other than ``own``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, own)
            targets = [base]
            if base in (PACKAGE, "cai_dpo"):  # from cai_dpo.stages import judge / from cai_dpo import stages
                targets = [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if (
                name in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                targets = [node.args[0].value]
        for t in targets:
            if t == "cai_dpo.stages" or (_stage_of(t) not in (None, own)):
                found.append((node.lineno, t))
    return found


def stage_name_strings(source: str, own: str) -> set[str]:
    """Literal ``cai_dpo.stages.<other>`` module names passed to any call (run-time lookups)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            for arg in node.args:
                if (
                    isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and _stage_of(arg.value) not in (None, own)
                ):
                    out.add(arg.value)
    return out


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: p.stem)
def test_no_stage_imports_another_stage(path):
    offenders = stage_imports(path.read_text(), path.stem)
    assert not offenders, (
        f"{path.name} imports other stages: "
        + ", ".join(f"line {n}: {t}" for n, t in offenders)
        + "; move the shared code into a library module"
    )


def test_runtime_stage_lookups_are_the_known_ones():
    found = {(p.stem, s) for p in STAGE_FILES for s in stage_name_strings(p.read_text(), p.stem)}
    assert found == RUNTIME_LOOKUPS


@pytest.mark.parametrize(
    "code, caught",
    [
        ("import cai_dpo.stages.judge", True),
        ("from cai_dpo.stages.judge import run_judge", True),
        ("from cai_dpo.stages import judge", True),
        ("from cai_dpo import stages", True),
        ("from . import judge", True),
        ("from .judge import run_judge", True),
        ("from .. import stages", True),
        ("def f():\n    from cai_dpo.stages.rm import RewardScorer", True),
        ("import importlib\nimportlib.import_module('cai_dpo.stages.pairs')", True),
        ("from cai_dpo.stages.ppo import helper", False),  # its own module
        ("from . import ppo", False),
        ("from cai_dpo.rl.reward import RewardScorer", False),
        ("from cai_dpo import judge", False),
        ("from cai_dpo.judge import Judge", False),
        ("import cai_dpo.store", False),
    ],
)
def test_the_check_sees_every_import_form(code, caught):
    assert bool(stage_imports(code, "ppo")) is caught

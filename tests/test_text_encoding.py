"""Every text file the project reads or writes names its encoding (UTF-8).

Without ``encoding=`` Python uses the locale's encoding: under a Latin-1 or ASCII locale
``report.md`` (it holds "−" and "×") fails to write, and an adapter note or a constitution
with a non-ASCII character is misread. JSON written with ``ensure_ascii`` would survive, text
would not, so the rule covers every call: ``Path.read_text`` / ``Path.write_text`` and
``open`` in text mode, in the package, the bench scripts and the tools.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: modules whose ``open`` reads no text and takes no ``encoding``: a file descriptor, an image (PIL)
NOT_TEXT = {"os", "Image"}
SOURCES = sorted(p for folder in ("cai_dpo", "bench", "tools") for p in (ROOT / folder).rglob("*.py"))


def _mode(call: ast.Call) -> str | None:
    """The literal mode of an ``open`` call (builtin or ``Path.open``), None when not given or not literal."""
    position = 1 if isinstance(call.func, ast.Name) else 0
    for kw in call.keywords:
        if kw.arg == "mode" and isinstance(kw.value, ast.Constant):
            return kw.value.value
    if len(call.args) > position and isinstance(call.args[position], ast.Constant):
        return call.args[position].value
    return None


def unspecified_encoding(source: str) -> list[tuple[int, str]]:
    """``(line, call)`` of each text read or write in ``source`` without ``encoding=``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or any(kw.arg == "encoding" for kw in node.keywords):
            continue
        fn = node.func
        if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and fn.value.id in NOT_TEXT:
            continue
        name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
        if name in ("read_text", "write_text") or (name == "open" and "b" not in (_mode(node) or "")):
            found.append((node.lineno, name))
    return found


def test_the_scan_finds_what_it_looks_for():
    src = (
        "p.read_text()\np.write_text(s)\nopen(f)\nopen(f, 'w')\np.open()\n"
        "p.read_text(encoding='utf-8')\nopen(f, 'rb')\np.open('wb')\nos.open(f, 0)\nImage.open(f)\n"
    )
    assert [line for line, _ in unspecified_encoding(src)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_text_io_names_its_encoding(path):
    found = unspecified_encoding(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(ROOT)}: text I/O without encoding= at " + ", ".join(
        f"line {line} ({name})" for line, name in found
    )

"""The committed notebooks are exactly what ``tools/make_notebooks.py`` writes (edit the generator, not the files)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import make_notebooks  # noqa: E402


def test_committed_notebooks_equal_the_generators_output(tmp_path):
    make_notebooks.main(tmp_path)
    written = sorted(p.name for p in tmp_path.glob("*.ipynb"))
    committed = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
    assert written == committed, "notebooks/ and tools/make_notebooks.py name different notebooks"
    stale = [n for n in written if (tmp_path / n).read_bytes() != (REPO / "notebooks" / n).read_bytes()]
    assert not stale, f"edited by hand or not regenerated: {stale}; run python tools/make_notebooks.py"


def test_regenerating_removes_only_retired_notebooks(tmp_path):
    (tmp_path / "99_mine.ipynb").write_text("{}")
    (tmp_path / "06_dpo.ipynb").write_text("{}")  # written by an earlier generator; dpo is 07_dpo now
    make_notebooks.main(tmp_path)
    assert (tmp_path / "99_mine.ipynb").read_text() == "{}"
    assert not (tmp_path / "06_dpo.ipynb").exists()
    generated = {name for name, _ in make_notebooks.build()}
    assert "06_dpo.ipynb" in make_notebooks.RETIRED and not generated & set(make_notebooks.RETIRED)

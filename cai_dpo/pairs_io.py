"""A run's response pairs on disk: where ``data/pairs/pairs.jsonl`` lives and how it is read.

The pairs stage (:mod:`cai_dpo.stages.pairs`) writes the file (one pair per line, the reserve
included, ``selected: false``); the judge stage (:mod:`cai_dpo.stages.judge`) reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai_dpo.store import RUN_LAYOUT, RunStore, read_jsonl

#: The pairs file's name inside ``data/pairs`` (:data:`cai_dpo.store.RUN_LAYOUT`).
PAIRS_FILE = Path(RUN_LAYOUT["pairs_file"]).name


def pairs_path(run: RunStore) -> Path:
    """``data/pairs/pairs.jsonl`` of a run."""
    return run.pairs_file


def load_pairs(run: RunStore) -> list[dict[str, Any]]:
    """The pairs written by :func:`~cai_dpo.stages.pairs.run_pairs` (every row, the reserve included)."""
    path = pairs_path(run)
    if not path.exists():
        raise FileNotFoundError(f"{path}: pairs not found; run the pairs stage first (cai-dpo pairs)")
    return read_jsonl(path)

"""Checks every trainer applies to preference rows before training (DPO, preference model).

A row is ``{prompt, chosen, rejected, p_chosen, …}`` (texts or chat message lists). Rows that
cannot teach anything are dropped and counted — a chosen or rejected response that is empty
or whitespace only, and a pair whose two responses are the same text (its DPO loss is stuck at
log 2) — while rows that are malformed (no prompt, no response field, a missing or
out-of-range ``p_chosen``) stop training with an error naming the dataset, the row, its
pair id and the field.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai_dpo.errors import InputError
from cai_dpo.store import RunLayout

log = logging.getLogger(__name__)


def response_text(value: Any) -> str:
    """The text of a response given as a string or a list of chat messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "\n\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return ""


def _where(source: str, i: int, row: dict[str, Any]) -> str:
    pid = row.get("pair_id")
    return f"{source}: row {i}" + (f" (pair_id {pid})" if pid else "")


def check_preference_rows(
    records: Sequence[dict[str, Any]], source: str = "preferences"
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows fit for training and counts ``rows_in``, ``dropped_identical``, ``dropped_empty``.

    Raises :class:`~cai_dpo.errors.InputError` naming ``source``, the row (0-based), its
    pair id and the field for a row without a ``prompt``/``chosen``/``rejected`` or with a
    ``p_chosen`` that is missing, not a number, NaN or outside [0, 1]; and when no row is
    left.
    """
    kept: list[dict[str, Any]] = []
    identical: list[Any] = []
    empty: list[Any] = []
    for i, row in enumerate(records):
        if not isinstance(row, dict):
            raise InputError(f"{source}: row {i} is a {type(row).__name__}, not a preference row")
        for key in ("prompt", "chosen", "rejected"):
            if key not in row or row[key] is None:
                raise InputError(
                    f"{_where(source, i, row)}: field '{key}' is missing; "
                    "a preference row needs prompt, chosen, rejected and p_chosen"
                )
        if not response_text(row["prompt"]).strip():
            raise InputError(f"{_where(source, i, row)}: field 'prompt' is empty")
        p = row.get("p_chosen")
        if p is None:
            raise InputError(
                f"{_where(source, i, row)}: field 'p_chosen' is missing; give the probability "
                "that chosen is better (1.0 for a certain label)"
            )
        if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or not 0.0 <= p <= 1.0:
            raise InputError(f"{_where(source, i, row)}: field 'p_chosen' is {p!r}; it must be a number in [0, 1]")
        chosen, rejected = response_text(row["chosen"]).strip(), response_text(row["rejected"]).strip()
        if not chosen or not rejected:
            empty.append(row.get("pair_id", i))
            continue
        if chosen == rejected:
            identical.append(row.get("pair_id", i))
            continue
        kept.append(row)
    counts = {"rows_in": len(records), "dropped_identical": len(identical), "dropped_empty": len(empty)}
    if identical or empty:
        log.warning(
            "%s: dropped %d pair(s) with identical chosen and rejected (e.g. %s) and %d with an empty "
            "response (e.g. %s): they carry no preference",
            source,
            len(identical),
            identical[:3],
            len(empty),
            empty[:3],
        )
    if not kept:
        raise InputError(
            f"{source}: no usable preference pairs ({len(records)} row(s): {len(identical)} with "
            f"identical chosen and rejected, {len(empty)} with an empty response)"
        )
    return kept, counts


def preferences_path(run: RunLayout) -> Path:
    """``data/preferences_merged`` (human labels applied) when present, else ``data/preferences``."""
    merged = run.preferences_merged
    return merged if (merged / "dataset_info.json").exists() else run.preferences


def load_preferences(run: RunLayout, preferences: Path | None = None) -> tuple[list[dict[str, Any]], Path]:
    """Rows of the run's preference dataset (:func:`preferences_path`) or of the saved dataset
    ``preferences``, and the folder read; a missing or empty dataset raises naming the fix."""
    import datasets

    path = Path(preferences) if preferences is not None else preferences_path(run)
    if not (path / "dataset_info.json").exists():
        raise FileNotFoundError(
            f"{path}: preference dataset not found; run `cai-dpo judge` "
            "(and `cai-dpo labels merge` for human labels) first"
        )
    records = datasets.load_from_disk(str(path)).to_list()
    if not records:
        raise InputError(f"{path}: the preference dataset is empty; rerun the pairs and judge stages with more prompts")
    return records, path

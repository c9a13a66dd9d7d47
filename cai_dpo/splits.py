"""Train/held-out splits by prompt: every row of a held-out prompt is held out.

Preference data has several pairs per prompt, SL data several rows per prompt; splitting
by row would put the same prompt on both sides and overstate held-out accuracy. SFT, DPO
and the preference model all split with :func:`split_by_prompt`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cai_dpo.schema import as_conversation
from cai_dpo.store import content_hash


def prompt_key(prompt: Any) -> str:
    """Hash of a prompt; a plain string equals the same text as one user turn."""
    return content_hash(as_conversation(prompt))


def split_indices_by_prompt(prompts: Sequence[Any], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices ``(train, held_out)``; held out are all rows of ``round(fraction · n_prompts)`` prompts.

    At least one prompt is held out when ``fraction > 0``, and at least one stays for
    training; with fewer than 2 distinct prompts or 4 rows nothing is held out. The choice
    is a seeded hash order of the prompts, so it does not depend on the row order.
    """
    keys = [prompt_key(p) for p in prompts]
    distinct = set(keys)
    if fraction <= 0 or len(distinct) < 2 or len(keys) < 4:
        return list(range(len(keys))), []
    order = sorted(distinct, key=lambda k: content_hash(k, seed))
    n_eval = min(len(order) - 1, max(1, round(fraction * len(order))))
    held = set(order[:n_eval])
    return [i for i, k in enumerate(keys) if k not in held], [i for i, k in enumerate(keys) if k in held]


def split_by_prompt(
    rows: list[dict[str, Any]],
    fraction: float,
    seed: int,
    prompt: Callable[[dict[str, Any]], Any] = lambda r: r["prompt"],
) -> tuple[list[dict], list[dict]]:
    """Rows split by :func:`split_indices_by_prompt`; ``prompt(row)`` gives a row's prompt
    (default ``row["prompt"]``)."""
    train, held = split_indices_by_prompt([prompt(r) for r in rows], fraction, seed)
    return [rows[i] for i in train], [rows[i] for i in held]

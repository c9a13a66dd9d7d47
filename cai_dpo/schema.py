"""The rows the stages hand each other: conversations, response pairs, preference rows.

:data:`Conversation` is a list of ``{"role", "content"}`` chat messages; :func:`as_conversation`
is the one place a prompt given as text becomes one. :class:`Pair` is a row of
``data/pairs/pairs.jsonl`` (the pairs stage, :mod:`cai_dpo.stages.pairs`); :class:`PreferenceRow`
is a row of ``data/preferences`` (the judge stage, :mod:`cai_dpo.stages.judge`) and of
``data/preferences_merged`` (the labels stage), which the trainers read. The TypedDicts
describe the rows; nothing checks them at run time (see :mod:`cai_dpo.preferences` for the
checks trainers apply).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

#: One chat message: ``{"role": "system" | "user" | "assistant", "content": text}``.
Message = dict[str, str]
#: A conversation: chat messages in order.
Conversation = list[Message]
#: A prompt as text (one user turn) or as a conversation.
PromptLike = str | Conversation


def as_conversation(prompt: str | Iterable[Mapping[str, Any]], system: str | None = None) -> Conversation:
    """A prompt as chat messages: text becomes one user turn; a conversation is copied with
    only each message's ``role`` and ``content``. ``system`` (when given) is put first as a
    system turn."""
    head: Conversation = [{"role": "system", "content": system}] if system else []
    if isinstance(prompt, str):
        return head + [{"role": "user", "content": prompt}]
    return head + [{"role": m["role"], "content": m["content"]} for m in prompt]


class Pair(TypedDict):
    """One row of ``data/pairs/pairs.jsonl``: two responses to one prompt, before judging.

    ``source``: ``judged_samples`` (two policy samples), ``revision_vs_original`` (SL-CAI
    revision vs the first answer; A is the revision) or ``curated`` (curated response vs the
    policy's answer; A is the curated one). ``label``: ``"A"`` when the source already says
    which is better, else None. ``selected``: False for a reserve pair the mix left out.
    ``meta``: source-specific details (sample temperatures, principle ids, models).
    """

    pair_id: str
    prompt_id: str | None
    prompt: str
    category: str
    prompt_source: str
    response_a: str
    response_b: str
    source: str
    label: str | None
    selected: bool
    weight: float | None
    flags: list[str]
    meta: dict[str, Any]


class PreferenceRow(TypedDict):
    """One row of ``data/preferences`` (and ``data/preferences_merged``): a judged pair, oriented.

    ``chosen``/``rejected``: the preferred and the other response (one assistant turn each);
    ``p_chosen``: probability that ``chosen`` is better (the training target); ``margin``:
    ``2 * p_chosen - 1``; ``p_judge``: the judge's probability for response A (NaN when not
    judged); ``score_ab``/``score_ba``: its scores in both orders; ``per_principle``: per
    principle of ``principle_ids``; ``edge_reasons``: why the pair goes to the label queue;
    ``weight``: the pair's training weight (None: default).
    """

    prompt: Conversation
    chosen: Conversation
    rejected: Conversation
    p_chosen: float
    margin: float
    source: str
    principle_ids: list[str]
    score_ab: float
    score_ba: float
    per_principle: list[float]
    p_judge: float
    judge_model: str
    pair_id: str
    edge_reasons: list[str]
    category: str
    weight: float | None

"""The judge's numbers: comparisons, raw letter scores, verdicts and contextual calibration.

A comparison's raw output (:class:`LetterScores`) is the normalised ``[P(A), P(B)]`` per
principle and display order; :func:`to_verdict` turns it into P(response_a better),
calibrated (Zhao et al. 2021: the prior over the letters on content-free inputs divides the
scores out) and, with chain-of-thought, clamped to ``clamp``; both orders and all principles
averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cai_dpo.config import JudgeSection
from cai_dpo.store import content_hash

if TYPE_CHECKING:
    from cai_dpo.constitution import Constitution

#: Content-free comparisons (prompt, response_a, response_b) for contextual calibration.
CONTENT_FREE = (("N/A", "N/A", "N/A"), ("N/A", "N/A", ""))
#: Principle categories used for each prompt source when the constitution has them.
SOURCE_CATEGORIES = {"red_team": ["harmlessness", "ethics"], "helpful": ["helpfulness", "honesty"]}


@dataclass
class Comparison:
    """Two responses to one prompt (a user message, or a dialogue as ``Human:``/``Assistant:`` text)."""

    prompt: str
    response_a: str
    response_b: str
    principle_ids: list[str] | None = None


@dataclass
class Verdict:
    """The judge's view of one comparison.

    ``p_a`` = P(response_a better), averaged over orders and principles; ``score_ab`` =
    P(response_a better) shown as (A),(B); ``score_ba`` = P(response_a better) shown
    swapped (NaN when only one order is judged); ``per_principle`` one p_a per principle.
    """

    p_a: float
    score_ab: float
    score_ba: float
    principle_ids: list[str]
    per_principle: list[float]


@dataclass
class LetterScores:
    """Raw judge output for one comparison: normalised [P(A), P(B)] per principle and order.

    ``ab``/``ba``: one ``[P(A), P(B)]`` per principle, shown in order and swapped (``ba`` None
    when one order is judged); ``tokens``: tokens read (demos, context and any reasoning);
    ``reasoning``: the chain-of-thought texts, when generated.
    """

    principle_ids: list[str]
    ab: list[list[float]]
    ba: list[list[float]] | None
    tokens: int = 0
    reasoning: list[str] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        """The ``letters`` field of a stored judgment (:meth:`from_record` reads it back)."""
        return {"principle_ids": self.principle_ids, "ab": self.ab, "ba": self.ba}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LetterScores:
        """The letter scores of a stored judgment (``letters``, ``tokens``, ``reasoning``); KeyError without letters."""
        lt = record["letters"]
        return cls(lt["principle_ids"], lt["ab"], lt["ba"], record.get("tokens", 0), record.get("reasoning", []))


@dataclass
class Calibration:
    """The judge's prior over the letters on content-free inputs: ``[P(A), P(B)]`` per principle id."""

    prior: dict[str, list[float]]

    def mean_prior(self) -> np.ndarray:
        """The prior averaged over principles, shape (2,)."""
        return np.mean([np.asarray(v, dtype=float) for v in self.prior.values()], axis=0)

    def correct(self, probs: Sequence[float], principle_id: str) -> np.ndarray:
        """Divide ``[P(A), P(B)]`` by the principle's prior (the mean one if unknown) and renormalise; shape (2,)."""
        prior = np.asarray(self.prior[principle_id] if principle_id in self.prior else self.mean_prior(), dtype=float)
        q = np.asarray(probs, dtype=float) / np.clip(prior, 1e-9, None)
        return q / q.sum()

    def to_dict(self) -> dict[str, Any]:
        """The prior per principle and the mean P(A), rounded to 6 places (for manifests)."""
        mean = self.mean_prior()
        return {
            "prior": {k: [round(float(x), 6) for x in v] for k, v in self.prior.items()},
            "mean_prior_a": round(float(mean[0]), 6),
        }


def _pool_categories(constitution: Constitution, categories: Sequence[str] | None) -> list[str] | None:
    if not categories:
        return None
    present = [c for c in categories if c in constitution.categories()]
    return present or None


def assign_principles(
    comparison: Comparison,
    constitution: Constitution,
    cfg: JudgeSection,
    *,
    categories: Sequence[str] | None = None,
    seed: int = 0,
) -> list[str]:
    """The principle ids a comparison is judged under (its own, else sampled, seeded by its content).

    ``categories`` narrows the pool to those the constitution has (all principles when none);
    ``cfg.principles`` picks one (``sample``) or ``ensemble_size`` of them.
    """
    if comparison.principle_ids:
        return list(comparison.principle_ids)
    cats = _pool_categories(constitution, categories)
    pool = [p for p in constitution.principles if cats is None or p.category in cats]
    k = 1 if cfg.principles == "sample" else max(1, min(cfg.ensemble_size, len(pool)))
    key = content_hash("principles", seed, comparison.prompt, sorted([comparison.response_a, comparison.response_b]))
    return [p.id for p in constitution.sample_principles(k, seed=key, categories=cats)]


def trim_reasoning(text: str) -> str:
    """Generated reasoning up to (not including) its own "answer is", stripped."""
    low = text.lower()
    cut = low.find("answer is")
    return (text[:cut] if cut >= 0 else text).strip()


def first_better(
    letters: Sequence[float], principle_id: str, cfg: JudgeSection, calibration: Calibration | None
) -> float:
    """P(option A better) after calibration and (chain-of-thought) clamping."""
    p = np.asarray(letters, dtype=float)
    if calibration is not None:
        p = calibration.correct(p, principle_id)
    pa = float(p[0] / p.sum())
    if cfg.chain_of_thought:
        lo, hi = cfg.clamp
        pa = min(max(pa, lo), hi)
    return pa


def to_verdict(scores: LetterScores, cfg: JudgeSection, calibration: Calibration | None = None) -> Verdict:
    """Combine one comparison's letter probabilities into a :class:`Verdict`."""
    per, abs_, bas = [], [], []
    for pi, pid in enumerate(scores.principle_ids):
        ab = first_better(scores.ab[pi], pid, cfg, calibration)
        abs_.append(ab)
        if scores.ba is not None:
            ba = 1.0 - first_better(scores.ba[pi], pid, cfg, calibration)
            bas.append(ba)
            per.append((ab + ba) / 2)
        else:
            per.append(ab)
    return Verdict(
        p_a=float(np.mean(per)),
        score_ab=float(np.mean(abs_)),
        score_ba=float(np.mean(bas)) if bas else float("nan"),
        principle_ids=list(scores.principle_ids),
        per_principle=[float(x) for x in per],
    )

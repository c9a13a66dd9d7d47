"""A constitution's edge-case tests: clear-cut comparisons the judge should get right, as a pass/fail table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cai_dpo.judge.prompts import dialogue_text
from cai_dpo.judge.scoring import Comparison

if TYPE_CHECKING:
    from cai_dpo.constitution import ConstitutionCase
    from cai_dpo.judge.judge import Judge

#: Cases are judged with this seed (principles sampled for cases without one), so results compare across runs.
CASE_SEED = 0


@dataclass
class CaseResult:
    """One constitution test case: the judge's probabilities and whether it passed."""

    id: str
    expected: str
    p_a: float
    p_expected: float
    passed: bool
    principle_ids: list[str]
    score_ab: float
    score_ba: float


def run_constitution_cases(judge: Judge, cases: Sequence[ConstitutionCase]) -> list[CaseResult]:
    """Judge each case (see :func:`cai_dpo.constitution.load_cases`); a case passes when P(expected) > 0.5."""
    comps = [
        Comparison(dialogue_text(c.messages()), c.response_a, c.response_b, [c.principle] if c.principle else None)
        for c in cases
    ]
    verdicts = judge.replace(seed=CASE_SEED).judge(comps)
    out = []
    for c, v in zip(cases, verdicts):
        p_exp = v.p_a if c.expected == "A" else 1.0 - v.p_a
        out.append(CaseResult(c.id, c.expected, v.p_a, p_exp, p_exp > 0.5, v.principle_ids, v.score_ab, v.score_ba))
    return out


def format_case_table(results: Sequence[CaseResult]) -> str:
    """A plain-text pass/fail table of constitution test results."""
    head = f"{'case':<24} {'principle':<24} {'exp':>3} {'P(A)':>6} {'AB':>6} {'BA':>6} {'P(exp)':>7}  result"
    lines = [head, "-" * len(head)]
    for r in results:
        ba = "   -  " if math.isnan(r.score_ba) else f"{r.score_ba:6.3f}"
        lines.append(
            f"{r.id[:24]:<24} {','.join(r.principle_ids)[:24]:<24} {r.expected:>3} {r.p_a:6.3f} "
            f"{r.score_ab:6.3f} {ba} {r.p_expected:7.3f}  {'pass' if r.passed else 'FAIL'}"
        )
    passed = sum(r.passed for r in results)
    lines.append(f"{passed}/{len(results)} passed")
    return "\n".join(lines)

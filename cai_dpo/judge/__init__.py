"""The constitution judge as a library: it says which of two responses is better, and how sure it is.

For each comparison the judge reads a multiple-choice prompt — the conversation, a comparison
principle's question, options (A) and (B) and "The answer is:" — and P(response A better) is
the normalised probability of " (A)" vs " (B)" from one scoring pass
(:meth:`Engine.score_options`, no generation). Controls, each from :class:`JudgeSection`:

- both display orders are scored and averaged (position bias); per-order scores kept;
- one sampled principle per pair (seeded) or an ensemble of ``ensemble_size``, averaged;
- few-shot comparison demos from the constitution in a shared, cached ``prefix``;
- chain-of-thought: the judge first writes its reasoning, then the options are scored,
  and the probabilities are clamped to ``clamp``;
- contextual calibration (Zhao et al. 2021): the judge's prior over the letters on
  content-free inputs divides the scores out, which are then renormalised;
- a quality gate: accuracy (Wilson 95 % interval) on clear-cut check pairs and HHH items.

Modules: :mod:`~cai_dpo.judge.prompts` (what the judge reads), :mod:`~cai_dpo.judge.scoring`
(comparisons, letter scores, verdicts, calibration), :mod:`~cai_dpo.judge.gate` (check set,
HHH items, the gate), :mod:`~cai_dpo.judge.cases` (a constitution's edge-case tests) and
:mod:`~cai_dpo.judge.judge`, whose :class:`Judge` ties them together: ``Judge.load(cfg)``
builds the configured judge, ``judge.judge(comparisons)`` gives verdicts and
``judge.judge_resumable(store, items)`` is the resumable loop of the judge stage
(:mod:`cai_dpo.stages.judge`) and the evaluation.
"""

from cai_dpo.judge.cases import CaseResult, format_case_table, run_constitution_cases
from cai_dpo.judge.gate import (
    HHH_FILE,
    GateItem,
    GateResult,
    gate_items,
    gate_result,
    judge_gate,
    load_checkset,
    load_hhh,
    parse_hhh,
    wilson_interval,
)
from cai_dpo.judge.judge import (
    Judge,
    JudgmentCost,
    KeyedComparison,
    RecordBuilder,
    ResumedJudgments,
    verdict_record,
)
from cai_dpo.judge.prompts import (
    ANSWER_LEAD,
    COT_ANSWER,
    COT_LEAD,
    DEFAULT_QUESTION,
    OPTIONS,
    JudgePrompter,
    dialogue_text,
    question_text,
)
from cai_dpo.judge.scoring import (
    CONTENT_FREE,
    SOURCE_CATEGORIES,
    Calibration,
    Comparison,
    LetterScores,
    Verdict,
    assign_principles,
    first_better,
    to_verdict,
    trim_reasoning,
)

__all__ = [
    "ANSWER_LEAD",
    "CONTENT_FREE",
    "COT_ANSWER",
    "COT_LEAD",
    "DEFAULT_QUESTION",
    "HHH_FILE",
    "OPTIONS",
    "SOURCE_CATEGORIES",
    "Calibration",
    "CaseResult",
    "Comparison",
    "GateItem",
    "GateResult",
    "Judge",
    "JudgePrompter",
    "JudgmentCost",
    "KeyedComparison",
    "LetterScores",
    "RecordBuilder",
    "ResumedJudgments",
    "Verdict",
    "assign_principles",
    "dialogue_text",
    "first_better",
    "format_case_table",
    "gate_items",
    "gate_result",
    "judge_gate",
    "load_checkset",
    "load_hhh",
    "parse_hhh",
    "question_text",
    "run_constitution_cases",
    "to_verdict",
    "trim_reasoning",
    "verdict_record",
    "wilson_interval",
]

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
- a quality gate: accuracy (Wilson 95 % interval) on clear-cut check pairs and HHH items
  (:func:`judge_gate`).

Also here: the constitution's edge-case tests (:func:`run_constitution_cases`,
:func:`format_case_table`) and loading the configured judge model (:func:`load_judge_engine`).
The judge stage (:mod:`cai_dpo.stages.judge`) labels a run's pairs with these; the setup and
evaluation stages, the scorers and the CLI use them too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cai_dpo.config import REPO_ROOT, JudgeSection, RunConfig, SamplingSection, resolve_path
from cai_dpo.store import content_hash, read_jsonl

log = logging.getLogger(__name__)

OPTIONS = (" (A)", " (B)")
INTRO = "Consider the following conversation between a human and an assistant:"
ANSWER_LEAD = "The answer is:"
COT_LEAD = "Let's think step by step:"
COT_ANSWER = "Therefore, the answer is:"
#: Content-free comparisons (prompt, response_a, response_b) for contextual calibration.
CONTENT_FREE = (("N/A", "N/A", "N/A"), ("N/A", "N/A", ""))
DEFAULT_QUESTION = "Which response is better?"
HHH_FILE = REPO_ROOT.parent / "shared" / "anchors" / "anthropic-cai" / "evals" / "438HHHEvaluations.jsonl"
#: Principle categories used for each prompt source when the constitution has them.
SOURCE_CATEGORIES = {"red_team": ["harmlessness", "ethics"], "helpful": ["helpfulness", "honesty"]}


# --------------------------------------------------------------------------- API types


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
    """Raw judge output for one comparison: normalised [P(A), P(B)] per principle and order."""

    principle_ids: list[str]
    ab: list[list[float]]
    ba: list[list[float]] | None
    tokens: int = 0
    reasoning: list[str] = field(default_factory=list)


@dataclass
class Calibration:
    """The judge's prior over the letters on content-free inputs, per principle."""

    prior: dict[str, list[float]]

    def mean_prior(self) -> np.ndarray:
        return np.mean([np.asarray(v, dtype=float) for v in self.prior.values()], axis=0)

    def correct(self, probs: Sequence[float], principle_id: str) -> np.ndarray:
        """Divide ``[P(A), P(B)]`` by the prior and renormalise."""
        prior = np.asarray(self.prior[principle_id] if principle_id in self.prior else self.mean_prior(), dtype=float)
        q = np.asarray(probs, dtype=float) / np.clip(prior, 1e-9, None)
        return q / q.sum()

    def to_dict(self) -> dict[str, Any]:
        mean = self.mean_prior()
        return {
            "prior": {k: [round(float(x), 6) for x in v] for k, v in self.prior.items()},
            "mean_prior_a": round(float(mean[0]), 6),
        }


@dataclass
class GateResult:
    """Judge accuracy on clear-cut pairs, with a Wilson 95 % interval.

    ``statistic`` is what met the threshold: the interval's lower bound (the judge must be
    shown to clear it) or the point estimate.
    """

    accuracy: float
    lo: float
    hi: float
    n: int
    threshold: float
    tripped: bool
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: str | None = None
    statistic: str = "lower_bound"

    def summary(self) -> str:
        """One line: accuracy, interval, the compared statistic and the outcome."""
        against = f"lower bound {self.lo:.3f}" if self.statistic == "lower_bound" else f"estimate {self.accuracy:.3f}"
        verdict = "TRIPPED" if self.tripped else "passed"
        return (
            f"judge accuracy {self.accuracy:.3f} [{self.lo:.3f}, {self.hi:.3f}] on {self.n} items; "
            f"{against} vs threshold {self.threshold:.2f}: {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


# --------------------------------------------------------------------------- prompts


def dialogue_text(messages: Sequence[dict[str, str]]) -> str:
    """A conversation as the judge shows it: a lone user turn as-is, else ``Human:``/``Assistant:`` lines."""
    turns = [m for m in messages if m.get("role") != "system"]
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    names = {"user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {m['content'].strip()}" for m in turns)


def question_text(prompt: str, response_a: str, response_b: str, question: str) -> str:
    """The multiple-choice question (without the answer lead)."""
    convo = prompt.strip() if prompt.lstrip().startswith("Human:") else f"Human: {prompt.strip()}"
    return f"{INTRO}\n\n{convo}\n\n{question.strip()}\nOptions:\n (A) {response_a.strip()}\n (B) {response_b.strip()}"


def _question(constitution: Any, principle_id: str | None, prompt: str) -> str:
    if principle_id is None:
        return DEFAULT_QUESTION
    return constitution.principle(principle_id).render_comparison(prompt=prompt)


class JudgePrompter:
    """Renders judge contexts for one engine, constitution and config.

    ``prefix`` holds the few-shot demos (rendered once; its cache is reused) and
    :meth:`context` the text after it, ending with the answer lead.
    """

    def __init__(self, engine: Any, constitution: Any, cfg: JudgeSection):
        self.engine = engine
        self.constitution = constitution
        self.fmt = cfg.prompt_format
        self.lead = COT_LEAD if cfg.chain_of_thought else ANSWER_LEAD
        demos = list(constitution.comparison_examples) if cfg.few_shot else []
        self.demos: list[tuple[str, str]] = [
            (
                question_text(d.prompt, d.response_a, d.response_b, _question(constitution, d.principle_id, d.prompt)),
                f"{ANSWER_LEAD} ({d.answer})",
            )
            for d in demos
        ]
        self.prefix: str | None = None
        if self.demos:
            if self.fmt == "plain":
                self.prefix = "".join(f"\n\n{q}\n\n{a}" for q, a in self.demos)
            else:
                msgs = [
                    m
                    for q, a in self.demos
                    for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
                ]
                prefix = engine.render(msgs, add_generation_prompt=False)
                probe = self._full("probe")
                self.prefix = prefix if probe.startswith(prefix) else None
                if self.prefix is None:
                    log.warning(
                        "judge: the chat template does not extend the few-shot demos as a prefix; "
                        "demos are rendered into every context (no shared cache)"
                    )

    def _full(self, question: str) -> str:
        if self.fmt == "plain":
            return "".join(f"\n\n{q}\n\n{a}" for q, a in self.demos) + f"\n\n{question}\n\n{self.lead}"
        msgs = [m for q, a in self.demos for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        msgs.append({"role": "user", "content": question})
        return self.engine.render(msgs, add_generation_prompt=True) + self.lead

    def context(self, prompt: str, response_a: str, response_b: str, principle_id: str | None) -> str:
        """Rendered text after the prefix, ending with "The answer is:" (or the reasoning lead)."""
        question = question_text(prompt, response_a, response_b, _question(self.constitution, principle_id, prompt))
        full = self._full(question)
        return full[len(self.prefix) :] if self.prefix else full


# --------------------------------------------------------------------------- scoring


def _pool_categories(constitution: Any, categories: Sequence[str] | None) -> list[str] | None:
    if not categories:
        return None
    present = [c for c in categories if c in constitution.categories()]
    return present or None


def assign_principles(
    comparison: Comparison,
    constitution: Any,
    cfg: JudgeSection,
    *,
    categories: Sequence[str] | None = None,
    seed: int = 0,
) -> list[str]:
    """The principle ids a comparison is judged under (its own, else sampled, seeded by its content)."""
    if comparison.principle_ids:
        return list(comparison.principle_ids)
    cats = _pool_categories(constitution, categories)
    pool = [p for p in constitution.principles if cats is None or p.category in cats]
    k = 1 if cfg.principles == "sample" else max(1, min(cfg.ensemble_size, len(pool)))
    key = content_hash("principles", seed, comparison.prompt, sorted([comparison.response_a, comparison.response_b]))
    return [p.id for p in constitution.sample_principles(k, seed=key, categories=cats)]


def _trim_reasoning(text: str) -> str:
    low = text.lower()
    cut = low.find("answer is")
    return (text[:cut] if cut >= 0 else text).strip()


def score_letters(
    engine: Any,
    constitution: Any,
    comparisons: Sequence[Comparison],
    cfg: JudgeSection,
    *,
    categories: Sequence[str] | None = None,
    seed: int = 0,
    prompter: JudgePrompter | None = None,
    desc: str = "judge",
) -> list[LetterScores]:
    """Raw letter probabilities for every comparison × principle × order, in one batched scoring call."""
    prompter = prompter or JudgePrompter(engine, constitution, cfg)
    items: list[tuple[int, int, str]] = []
    contexts: list[str] = []
    assigned: list[list[str]] = []
    for ci, c in enumerate(comparisons):
        pids = assign_principles(c, constitution, cfg, categories=categories, seed=seed)
        assigned.append(pids)
        for pi, pid in enumerate(pids):
            items.append((ci, pi, "ab"))
            contexts.append(prompter.context(c.prompt, c.response_a, c.response_b, pid))
            if cfg.both_orders:
                items.append((ci, pi, "ba"))
                contexts.append(prompter.context(c.prompt, c.response_b, c.response_a, pid))
    reasoning = [""] * len(contexts)
    if cfg.chain_of_thought and contexts:
        sampling = SamplingSection(
            max_new_tokens=cfg.cot_max_new_tokens,
            do_sample=False,
            temperature=0.0,
            seed=seed,
            batch_size=cfg.batch_size,
        )
        gens = engine.generate(contexts, sampling, prefix=prompter.prefix, desc=f"{desc} reasoning")
        reasoning = [_trim_reasoning(g[0].text) for g in gens]
        contexts = [f"{c} {r}\n{COT_ANSWER}" for c, r in zip(contexts, reasoning)]
    out = [
        LetterScores(pids, [[0.5, 0.5]] * len(pids), [[0.5, 0.5]] * len(pids) if cfg.both_orders else None)
        for pids in assigned
    ]
    for s in out:
        s.ab = [list(x) for x in s.ab]
        s.ba = [list(x) for x in s.ba] if s.ba is not None else None
    if not contexts:
        return out
    probs, _ = engine.score_options(contexts, OPTIONS, prefix=prompter.prefix, desc=desc)
    prefix_tokens = len(engine.encode(prompter.prefix)) if prompter.prefix else 0
    for (ci, pi, order), p, ctx, r in zip(items, probs, contexts, reasoning):
        target = out[ci].ab if order == "ab" else out[ci].ba
        target[pi] = [float(p[0]), float(p[1])]
        out[ci].tokens += prefix_tokens + len(engine.encode(ctx))
        if r:
            out[ci].reasoning.append(r)
    return out


def _first_better(
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
        ab = _first_better(scores.ab[pi], pid, cfg, calibration)
        abs_.append(ab)
        if scores.ba is not None:
            ba = 1.0 - _first_better(scores.ba[pi], pid, cfg, calibration)
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


def measure_calibration(
    engine: Any,
    constitution: Any,
    cfg: JudgeSection,
    principle_ids: Sequence[str] | None = None,
    *,
    prompter: JudgePrompter | None = None,
) -> Calibration:
    """The judge's letter prior per principle on content-free inputs.

    Per principle: "N/A" vs "N/A", and "N/A" vs "" in both orders; the prior is the mean
    of their normalised [P(A), P(B)].
    """
    ids = list(dict.fromkeys(principle_ids)) if principle_ids else [p.id for p in constitution.principles]
    prompter = prompter or JudgePrompter(engine, constitution, cfg)
    same = score_letters(
        engine,
        constitution,
        [Comparison(*CONTENT_FREE[0], [pid]) for pid in ids],
        dataclasses.replace(cfg, both_orders=False),
        prompter=prompter,
        desc="judge calibration",
    )
    mixed = score_letters(
        engine,
        constitution,
        [Comparison(*CONTENT_FREE[1], [pid]) for pid in ids],
        dataclasses.replace(cfg, both_orders=True),
        prompter=prompter,
        desc="judge calibration",
    )
    prior = {
        pid: [float(x) for x in np.mean([s.ab[0], m.ab[0], m.ba[0]], axis=0)]  # type: ignore[index]
        for pid, s, m in zip(ids, same, mixed)
    }
    cal = Calibration(prior)
    log.info("judge calibration: mean prior P(A)=%.3f over %d principle(s)", cal.mean_prior()[0], len(ids))
    return cal


def judge_comparisons(
    engine: Any,
    constitution: Any,
    comparisons: Sequence[Comparison],
    cfg: JudgeSection,
    *,
    categories: Sequence[str] | None = None,
    seed: int = 0,
    calibration: Calibration | None = None,
) -> list[Verdict]:
    """Judge each comparison: P(response_a better) averaged over orders and principles.

    With ``cfg.calibrate`` and no ``calibration`` given, the letter prior is measured on
    content-free inputs for the principles used.
    """
    prompter = JudgePrompter(engine, constitution, cfg)
    scores = score_letters(engine, constitution, comparisons, cfg, categories=categories, seed=seed, prompter=prompter)
    if calibration is None and cfg.calibrate and scores:
        used = [pid for s in scores for pid in s.principle_ids]
        calibration = measure_calibration(engine, constitution, cfg, used, prompter=prompter)
    return [to_verdict(s, cfg, calibration if cfg.calibrate else None) for s in scores]


# --------------------------------------------------------------------------- quality gate


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (``(0, 1)`` when n is 0)."""
    from cai_dpo.metrics import rate_ci

    _, lo, hi = rate_ci(successes, n, z)
    return lo, hi


def parse_hhh(row: dict[str, Any]) -> dict[str, Any]:
    """One HHH evaluation line as ``{prompt, correct, incorrect, correct_letter}``.

    ``prompt`` is the dialogue before the compared assistant turn (a lone human turn is
    given as plain text); ``correct_letter`` is the option letter of the published prompt.
    """
    tc, ti = row["text_correct"], row["text_incorrect"]
    marker = "\n\nAssistant:"
    cut = tc.rfind(marker)
    context = tc[:cut]
    if cut < 0 or not ti.startswith(context + marker):
        raise ValueError(
            "HHH line: text_correct and text_incorrect do not share the dialogue before the last 'Assistant:'"
        )
    correct = tc[cut + len(marker) :].strip()
    incorrect = ti[len(context) + len(marker) :].strip()
    prompt = context.strip()
    if prompt.startswith("Human:") and prompt.count("Human:") == 1 and "Assistant:" not in prompt:
        prompt = prompt[len("Human:") :].strip()
    letter = row["corrects"][0].strip().strip("()")
    return {"prompt": prompt, "correct": correct, "incorrect": incorrect, "correct_letter": letter}


def load_hhh(path: Path | None = None) -> list[dict[str, Any]]:
    """The parsed HHH comparisons (empty when the file is absent)."""
    path = Path(path) if path else HHH_FILE
    if not path.exists():
        return []
    return [parse_hhh(r) for r in read_jsonl(path)]


def load_checkset(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Clear-cut judge check pairs as dicts (prompt, better, worse, category, principle_id)."""
    from cai_dpo.data import load_checkset as _load

    spec = path if path is None or str(path).startswith("bundled:") else resolve_path(path)
    return [dataclasses.asdict(c) for c in _load(spec or "bundled:judge_checkset")]


def judge_gate(
    engine: Any,
    constitution: Any,
    cfg: JudgeSection,
    *,
    calibration: Calibration | None = None,
    seed: int = 0,
    checkset: list[dict[str, Any]] | None = None,
    hhh: list[dict[str, Any]] | None = None,
) -> GateResult:
    """Judge accuracy on the check set plus a seeded HHH sample, with a Wilson 95 % interval.

    ``checkset``/``hhh`` default to the configured check set and (when ``gate_use_hhh``)
    ``gate_hhh_sample`` items of the HHH evaluation file, when present.
    """
    if checkset is None:
        checkset = load_checkset(cfg.checkset)
    if hhh is None:
        hhh = []
        if cfg.gate_use_hhh:
            items = load_hhh()
            if items and cfg.gate_hhh_sample > 0:
                hhh = random.Random(seed).sample(items, min(cfg.gate_hhh_sample, len(items)))
    comps: list[tuple[str, Comparison, bool, list[str] | None]] = []
    for i, r in enumerate(checkset):
        better_first = i % 2 == 0
        a, b = (r["better"], r["worse"]) if better_first else (r["worse"], r["better"])
        pid = r.get("principle_id")
        if pid is not None and pid not in {p.id for p in constitution.principles}:
            pid = None
        cat = r.get("category")
        comps.append(
            ("checkset", Comparison(r["prompt"], a, b, [pid] if pid else None), better_first, [cat] if cat else None)
        )
    for h in hhh:
        a_correct = h["correct_letter"] == "A"
        a, b = (h["correct"], h["incorrect"]) if a_correct else (h["incorrect"], h["correct"])
        comps.append(("hhh", Comparison(h["prompt"], a, b), a_correct, None))
    if not comps:
        return GateResult(float("nan"), 0.0, 1.0, 0, cfg.gate_threshold, False, skipped="no check items")
    verdicts: list[Verdict | None] = [None] * len(comps)
    groups: dict[tuple[str, ...] | None, list[int]] = {}
    for i, (_, _, _, cats) in enumerate(comps):
        groups.setdefault(tuple(cats) if cats else None, []).append(i)
    for cats, idx in groups.items():
        vs = judge_comparisons(
            engine,
            constitution,
            [comps[i][1] for i in idx],
            cfg,
            categories=list(cats) if cats else None,
            seed=seed,
            calibration=calibration,
        )
        for i, v in zip(idx, vs):
            verdicts[i] = v
    credit: dict[str, list[float]] = {}
    for (src, _, a_better, _), v in zip(comps, verdicts):
        p_better = v.p_a if a_better else 1.0 - v.p_a  # type: ignore[union-attr]
        credit.setdefault(src, []).append(1.0 if p_better > 0.5 else 0.5 if p_better == 0.5 else 0.0)
    allc = [c for cs in credit.values() for c in cs]
    acc = float(np.mean(allc))
    lo, hi = wilson_interval(sum(allc), len(allc))
    by_source = {}
    for src, cs in credit.items():
        slo, shi = wilson_interval(sum(cs), len(cs))
        by_source[src] = {"accuracy": float(np.mean(cs)), "lo": slo, "hi": shi, "n": len(cs)}
    tripped = (lo if cfg.gate_on == "lower_bound" else acc) < cfg.gate_threshold
    return GateResult(acc, lo, hi, len(allc), cfg.gate_threshold, tripped, by_source, statistic=cfg.gate_on)


# --------------------------------------------------------------------------- constitution tests


def run_constitution_cases(constitution: Any, cases: Sequence[Any], engine: Any, cfg: JudgeSection) -> list[CaseResult]:
    """Judge each case (see :func:`cai_dpo.constitution.load_cases`); a case passes when P(expected) > 0.5."""
    comps = [
        Comparison(dialogue_text(c.messages()), c.response_a, c.response_b, [c.principle] if c.principle else None)
        for c in cases
    ]
    verdicts = judge_comparisons(engine, constitution, comps, cfg)
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


# --------------------------------------------------------------------------- the judge model


def load_judge_engine(cfg: RunConfig) -> Any:
    """The configured judge model (``cfg.judge_model()``) as a scoring engine, with ``cfg.threads`` CPU threads."""
    from cai_dpo.engine import set_threads
    from cai_dpo.models import load_engine

    set_threads(cfg.threads)
    return load_engine(cfg.judge_model(), batch_size=cfg.judge.batch_size)

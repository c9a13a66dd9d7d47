"""The :class:`Judge`: one engine, constitution and set of judge settings that score comparisons.

:meth:`Judge.load` builds the configured judge model (curation alone loads its own engine, to share
the policy's when the judge is the same model);
:meth:`Judge.judge` turns comparisons into verdicts; :meth:`Judge.judge_resumable` is the
resumable loop the judge stage and the evaluation share: verdicts are appended to a record
store as they come, and a restart skips the keys already there.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cai_dpo.config import JudgeSection, ModelSpec, RunConfig, SamplingSection
from cai_dpo.judge.cases import CaseResult, run_constitution_cases
from cai_dpo.judge.gate import GateResult, judge_gate
from cai_dpo.judge.prompts import COT_ANSWER, OPTIONS, JudgePrompter
from cai_dpo.judge.scoring import (
    CONTENT_FREE,
    Calibration,
    Comparison,
    LetterScores,
    Verdict,
    assign_principles,
    to_verdict,
    trim_reasoning,
)
from cai_dpo.store import RecordStore

if TYPE_CHECKING:
    from cai_dpo.constitution import Constitution, ConstitutionCase

log = logging.getLogger(__name__)

#: Judge settings that change what the judge reads (a prompter is shared only while they are equal).
PROMPT_SETTINGS = ("prompt_format", "chain_of_thought", "few_shot")


@dataclass
class KeyedComparison:
    """One comparison for :meth:`Judge.judge_resumable`: its record key, the principle categories it
    is judged under (None: all principles) and ``fields`` stored with its record."""

    key: str
    comparison: Comparison
    categories: Sequence[str] | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class JudgmentCost:
    """One comparison's share of the scoring call that judged it: wall ``seconds``, ``scoring_passes``
    (contexts scored: orders × principles, calibration excluded) and reasoning ``generated_tokens``."""

    seconds: float
    scoring_passes: float
    generated_tokens: float


#: Builds the stored record of one judged comparison; it must carry the item's ``key``.
RecordBuilder = Callable[[KeyedComparison, Verdict, LetterScores, JudgmentCost], dict[str, Any]]


def verdict_record(item: KeyedComparison, verdict: Verdict, scores: LetterScores, cost: JudgmentCost) -> dict[str, Any]:
    """The default record: ``key``, the item's fields, the verdict, the raw letters
    (:meth:`LetterScores.from_record` reads them back), reasoning, tokens read and seconds."""
    return {
        "key": item.key,
        **item.fields,
        "verdict": dataclasses.asdict(verdict),
        "letters": scores.to_record(),
        "reasoning": scores.reasoning,
        "tokens": scores.tokens,
        "seconds": cost.seconds,
    }


@dataclass
class ResumedJudgments:
    """What :meth:`Judge.judge_resumable` returns: the record of every requested key (by key, in
    request order, duplicates once), how many were judged now and resumed, and the wall seconds
    spent judging now."""

    records: dict[str, dict[str, Any]]
    new: int
    resumed: int
    seconds: float


class Judge:
    """The constitution judge: an engine that scores options, a constitution and judge settings.

    ``seed`` seeds the principle sampling; ``calibration`` (set by :meth:`calibrate`) corrects
    every verdict when ``cfg.calibrate``. Without one, :meth:`judge` measures the prior for the
    principles each call uses.
    """

    def __init__(
        self,
        engine: Any,
        constitution: Constitution,
        cfg: JudgeSection,
        *,
        seed: int = 0,
        calibration: Calibration | None = None,
        prompter: JudgePrompter | None = None,
    ):
        self.engine = engine
        self.constitution = constitution
        self.cfg = cfg
        self.seed = seed
        self.calibration = calibration
        self._prompter = prompter

    @classmethod
    def load(
        cls,
        cfg: RunConfig,
        *,
        model: ModelSpec | None = None,
        engine: Any = None,
        constitution: Constitution | None = None,
        progress: bool = True,
    ) -> Judge:
        """The configured judge: ``model`` (default ``cfg.judge_model()``) loaded as a scoring engine
        with ``cfg.threads`` CPU threads, ``cfg.judge`` settings and ``cfg.seed``.

        ``engine`` skips loading (tests, notebooks that already hold one); ``constitution``
        defaults to ``cfg.constitution_path()``. Raises what :func:`cai_dpo.models.load_engine` raises.
        """
        from cai_dpo.constitution import load_constitution

        if constitution is None:
            constitution = load_constitution(cfg.constitution_path())
        if engine is None:
            from cai_dpo.engine import set_threads
            from cai_dpo.models import load_engine

            set_threads(cfg.threads)
            engine = load_engine(model or cfg.judge_model(), batch_size=cfg.judge.batch_size, progress=progress)
        return cls(engine, constitution, cfg.judge, seed=cfg.seed)

    @property
    def prompter(self) -> JudgePrompter:
        """The context renderer (few-shot prefix rendered once, on first use)."""
        if self._prompter is None:
            self._prompter = JudgePrompter(self.engine, self.constitution, self.cfg)
        return self._prompter

    def replace(self, *, cfg: JudgeSection | None = None, seed: int | None = None) -> Judge:
        """The same engine, constitution and calibration with other settings or seed (the prompter is
        kept while the prompt settings are the same)."""
        cfg = cfg or self.cfg
        same_prompts = all(getattr(cfg, k) == getattr(self.cfg, k) for k in PROMPT_SETTINGS)
        return Judge(
            self.engine,
            self.constitution,
            cfg,
            seed=self.seed if seed is None else seed,
            calibration=self.calibration,
            prompter=self._prompter if same_prompts else None,
        )

    # ----------------------------------------------------------------------- scoring

    def score_letters(
        self, comparisons: Sequence[Comparison], *, categories: Sequence[str] | None = None, desc: str = "judge"
    ) -> list[LetterScores]:
        """Raw letter probabilities for every comparison × principle × order, in one batched scoring call.

        ``categories`` narrows the principles sampled for comparisons without their own;
        ``desc`` labels the engine's progress.
        """
        cfg, prompter = self.cfg, self.prompter
        items: list[tuple[int, int, str]] = []
        contexts: list[str] = []
        assigned: list[list[str]] = []
        for ci, c in enumerate(comparisons):
            pids = assign_principles(c, self.constitution, cfg, categories=categories, seed=self.seed)
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
                seed=self.seed,
                batch_size=cfg.batch_size,
            )
            gens = self.engine.generate(contexts, sampling, prefix=prompter.prefix, desc=f"{desc} reasoning")
            reasoning = [trim_reasoning(g[0].text) for g in gens]
            contexts = [f"{c} {r}\n{COT_ANSWER}" for c, r in zip(contexts, reasoning)]
        out = [
            LetterScores(
                pids,
                [[0.5, 0.5] for _ in pids],
                [[0.5, 0.5] for _ in pids] if cfg.both_orders else None,
            )
            for pids in assigned
        ]
        if not contexts:
            return out
        probs, _ = self.engine.score_options(contexts, OPTIONS, prefix=prompter.prefix, desc=desc)
        prefix_tokens = len(self.engine.encode(prompter.prefix)) if prompter.prefix else 0
        for (ci, pi, order), p, ctx, r in zip(items, probs, contexts, reasoning):
            target = out[ci].ab if order == "ab" else out[ci].ba
            target[pi] = [float(p[0]), float(p[1])]  # type: ignore[index]
            out[ci].tokens += prefix_tokens + len(self.engine.encode(ctx))
            if r:
                out[ci].reasoning.append(r)
        return out

    def to_verdict(self, scores: LetterScores) -> Verdict:
        """A comparison's verdict from its letters, with this judge's calibration when ``cfg.calibrate``."""
        return to_verdict(scores, self.cfg, self.calibration if self.cfg.calibrate else None)

    def measure_calibration(self, principle_ids: Sequence[str] | None = None) -> Calibration:
        """The judge's letter prior per principle (default: all) on content-free inputs.

        Per principle: "N/A" vs "N/A", and "N/A" vs "" in both orders; the prior is the mean
        of their normalised [P(A), P(B)]. The judge's own calibration is left as it is.
        """
        ids = list(dict.fromkeys(principle_ids)) if principle_ids else [p.id for p in self.constitution.principles]
        one = self.replace(cfg=dataclasses.replace(self.cfg, both_orders=False))
        both = self.replace(cfg=dataclasses.replace(self.cfg, both_orders=True))
        desc = "judge calibration"
        same = one.score_letters([Comparison(*CONTENT_FREE[0], [pid]) for pid in ids], desc=desc)
        mixed = both.score_letters([Comparison(*CONTENT_FREE[1], [pid]) for pid in ids], desc=desc)
        prior = {
            pid: [float(x) for x in np.mean([s.ab[0], m.ab[0], m.ba[0]], axis=0)]  # type: ignore[index]
            for pid, s, m in zip(ids, same, mixed)
        }
        cal = Calibration(prior)
        log.info("judge calibration: mean prior P(A)=%.3f over %d principle(s)", cal.mean_prior()[0], len(ids))
        return cal

    def calibrate(self, principle_ids: Sequence[str] | None = None) -> Calibration:
        """Measure the letter prior (:meth:`measure_calibration`) and keep it for every later verdict."""
        self.calibration = self.measure_calibration(principle_ids)
        return self.calibration

    def judge(self, comparisons: Sequence[Comparison], *, categories: Sequence[str] | None = None) -> list[Verdict]:
        """Judge each comparison: P(response_a better) averaged over orders and principles.

        With ``cfg.calibrate`` and no calibration held, the letter prior is measured on
        content-free inputs for the principles used (and not kept).
        """
        scores = self.score_letters(comparisons, categories=categories)
        judge = self
        if self.calibration is None and self.cfg.calibrate and scores:
            judge = self.replace()
            judge.calibrate([pid for s in scores for pid in s.principle_ids])
        return [judge.to_verdict(s) for s in scores]

    # ----------------------------------------------------------------------- resumable judging

    @staticmethod
    def pending(store: RecordStore, items: Sequence[KeyedComparison]) -> list[KeyedComparison]:
        """The items whose key is not in ``store`` yet (each key once, first occurrence)."""
        done = store.done_keys()
        todo: dict[str, KeyedComparison] = {}
        for it in items:
            if it.key not in done:
                todo.setdefault(it.key, it)
        return list(todo.values())

    def judge_resumable(
        self,
        store: RecordStore | str | Path,
        items: Sequence[KeyedComparison],
        *,
        record: RecordBuilder = verdict_record,
        chunk: int | None = None,
        desc: str = "judge",
        progress: bool = True,
    ) -> ResumedJudgments:
        """Judge the items missing from ``store`` (a record store or its folder), appending each
        chunk's records to it as soon as it is judged; return every item's record.

        Items are grouped by ``categories`` and judged ``chunk`` at a time (default
        ``2 × batch_size``); ``record`` builds what is stored (default :func:`verdict_record`).
        With ``cfg.calibrate`` and no calibration held, the prior is measured on all
        principles first (only when something is left to judge). A progress bar
        (``desc``, pairs per second) follows the new judgments unless ``progress`` is False.
        A restart after an interruption judges only the keys not yet stored.
        """
        from cai_dpo.progress import progress_bar

        store = store if isinstance(store, RecordStore) else RecordStore(Path(store))
        keys = list(dict.fromkeys(it.key for it in items))
        todo = self.pending(store, items)
        if todo and self.cfg.calibrate and self.calibration is None:
            self.calibrate()
        size = chunk or max(1, self.cfg.batch_size * 2)
        groups: dict[tuple[str, ...] | None, list[KeyedComparison]] = {}
        for it in todo:
            groups.setdefault(tuple(it.categories) if it.categories else None, []).append(it)
        seconds, n_new = 0.0, 0
        bar = progress_bar(
            total=len(todo), desc=desc, unit="pair", dynamic_ncols=True, mininterval=1.0, disable=not progress
        )
        for cats, group in groups.items():
            for start in range(0, len(group), size):
                part = group[start : start + size]
                before = self._engine_counts()
                t0 = time.perf_counter()
                scores = self.score_letters([it.comparison for it in part], categories=cats, desc=desc)
                verdicts = [self.to_verdict(s) for s in scores]
                dt = time.perf_counter() - t0
                after = self._engine_counts()
                n = len(part)
                cost = JudgmentCost(dt / n, (after[0] - before[0]) / n, (after[1] - before[1]) / n)
                store.append([record(it, v, s, cost) for it, v, s in zip(part, verdicts, scores)])
                seconds += dt
                n_new += n
                bar.update(n)
                bar.set_postfix(pairs_s=f"{n_new / seconds:.2f}" if seconds else "-")
        bar.close()
        log.info("%s: %d comparisons (%d judged now, %d resumed)", desc, len(keys), n_new, len(keys) - n_new)
        return ResumedJudgments({k: store.get(k) for k in keys}, n_new, len(keys) - n_new, seconds)  # type: ignore[misc]

    def _engine_counts(self) -> tuple[int, int]:
        """(contexts scored, tokens generated) so far by the engine (zeros for one without ``stats``)."""
        stats = getattr(self.engine, "stats", None)
        return (stats.scored_items, stats.generated_tokens) if stats is not None else (0, 0)

    # ----------------------------------------------------------------------- checks

    def gate(
        self, *, checkset: list[dict[str, Any]] | None = None, hhh: list[dict[str, Any]] | None = None
    ) -> GateResult:
        """The quality gate (:func:`cai_dpo.judge.gate.judge_gate`)."""
        return judge_gate(self, checkset=checkset, hhh=hhh)

    def run_cases(self, cases: Sequence[ConstitutionCase]) -> list[CaseResult]:
        """The constitution's edge-case tests (:func:`cai_dpo.judge.cases.run_constitution_cases`)."""
        return run_constitution_cases(self, cases)

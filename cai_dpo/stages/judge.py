"""AI feedback (RLAIF): constitution-guided soft preference labels for a run's pairs.

The judge (:mod:`cai_dpo.judge`) reads each pair as a multiple-choice question and its
soft label is the normalised probability of " (A)" vs " (B)" — both orders, one sampled
principle or an ensemble, few-shot demos, optional chain-of-thought and contextual
calibration, each from :class:`JudgeSection`. Before labeling, its quality gate measures
accuracy (Wilson 95 % interval) on clear-cut check pairs and HHH items; below
``gate_threshold`` the run says so and, for ``pairs.source: mixed``, labels come from
revision-vs-original (and curated) pairs instead.

Revision-vs-original and curated pairs already know their preferred response: they pass
through with ``p_chosen`` 1.0 (revision) or ``judge.curated_p_chosen`` (curated), and are
judged only with ``judge.score_revision_pairs`` / ``judge.score_curated_pairs`` (the
judge's view then goes to ``p_judge``). Every row keeps the pair's ``weight``.

:func:`run_judge` selects the pairs, judges them with :meth:`Judge.judge_resumable` (one record
per pair in ``records/judge``) and writes ``data/preferences`` (TRL conversational preference
format) with its manifest.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cai_dpo.config import JudgeSection, RunConfig, raise_problems, to_dict
from cai_dpo.errors import InputError
from cai_dpo.judge import (
    HHH_FILE,
    SOURCE_CATEGORIES,
    Comparison,
    GateResult,
    Judge,
    KeyedComparison,
    LetterScores,
    Verdict,
    load_checkset,
)
from cai_dpo.pairs_io import load_pairs, pairs_path
from cai_dpo.schema import Pair, PreferenceRow, as_conversation
from cai_dpo.store import Manifest, RunStore, Timer, atomic_dir, content_hash, file_hash, locked_stage

log = logging.getLogger(__name__)

HUMAN_COST_PER_JUDGMENT_USD = (10.0, 50.0)
#: Pair sources whose first response is the preferred one (passed through unless configured to be judged).
REFERENCE_SOURCES = ("revision_vs_original", "curated")


# --------------------------------------------------------------------------- stage


def _judge_settings(cfg: JudgeSection) -> dict[str, Any]:
    keys = (
        "principles",
        "ensemble_size",
        "both_orders",
        "few_shot",
        "chain_of_thought",
        "clamp",
        "calibrate",
        "prompt_format",
        "cot_max_new_tokens",
    )
    return {k: getattr(cfg, k) for k in keys}


def _wants_verdict(pair: dict[str, Any], jc: JudgeSection) -> bool:
    """True when the judge scores this pair (sampled pairs always; revision and curated pairs when configured)."""
    if pair["source"] == "revision_vs_original":
        return jc.score_revision_pairs
    if pair["source"] == "curated":
        return jc.score_curated_pairs
    return True


def _pref_row(pair: Pair, judge_name: str, verdict: Verdict | None, curated_p: float = 1.0) -> PreferenceRow:
    """One ``data/preferences`` row from a pair and (when judged) its verdict
    (``curated_p``: a curated pair's label)."""
    nan = float("nan")
    a, b = pair["response_a"], pair["response_b"]
    edge: list[str] = []
    p_judge = nan
    if pair["source"] in REFERENCE_SOURCES:
        chosen, rejected, p = a, b, (curated_p if pair["source"] == "curated" else 1.0)
        ids = list(pair.get("meta", {}).get("principle_ids") or [])
        ab = ba = nan
        per: list[float] = []
        if verdict is not None:
            p_judge = verdict.p_a
            ab, ba, per, ids = verdict.score_ab, verdict.score_ba, verdict.per_principle, verdict.principle_ids
            if p_judge < 0.5:
                edge.append("judge_prefers_original")
    else:
        assert verdict is not None
        p_judge = verdict.p_a
        if verdict.p_a >= 0.5:
            chosen, rejected, p = a, b, verdict.p_a
            ab, ba, per = verdict.score_ab, verdict.score_ba, list(verdict.per_principle)
        else:
            chosen, rejected, p = b, a, 1.0 - verdict.p_a
            ab, ba = 1.0 - verdict.score_ba, 1.0 - verdict.score_ab
            per = [1.0 - x for x in verdict.per_principle]
        ids = verdict.principle_ids
    return {
        "prompt": as_conversation(pair["prompt"]),
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "p_chosen": float(p),
        "margin": float(2 * p - 1),
        "source": pair["source"],
        "principle_ids": list(ids),
        "score_ab": float(ab),
        "score_ba": float(ba),
        "per_principle": [float(x) for x in per],
        "p_judge": float(p_judge),
        "judge_model": judge_name if verdict is not None else "",
        "pair_id": pair["pair_id"],
        "edge_reasons": edge,
        "category": pair.get("category") or "",
        "weight": None if pair.get("weight") is None else float(pair["weight"]),
    }


def preference_features() -> Any:
    """The ``data/preferences`` schema (explicit, so empty lists and NaNs keep their types)."""
    from datasets import Features, List, Value

    turn = List({"role": Value("string"), "content": Value("string")})
    return Features(
        {
            "prompt": turn,
            "chosen": turn,
            "rejected": turn,
            "p_chosen": Value("float64"),
            "margin": Value("float64"),
            "source": Value("string"),
            "principle_ids": List(Value("string")),
            "score_ab": Value("float64"),
            "score_ba": Value("float64"),
            "per_principle": List(Value("float64")),
            "p_judge": Value("float64"),
            "judge_model": Value("string"),
            "pair_id": Value("string"),
            "edge_reasons": List(Value("string")),
            "category": Value("string"),
            "weight": Value("float64"),
        }
    )


def _histogram(values: Sequence[float]) -> dict[str, int]:
    edges = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0001]
    out = {}
    for lo, hi in zip(edges, edges[1:]):
        out[f"{lo:.1f}-{min(hi, 1.0):.1f}"] = sum(lo <= v < hi for v in values)
    return out


def select_pairs(
    pairs: list[dict[str, Any]], cfg: RunConfig, gate: GateResult | None, notes: list[str]
) -> list[dict[str, Any]]:
    """The pairs to label: the pairs stage's selection, or revision-vs-original ones
    when the gate tripped on ``mixed``."""
    active = [p for p in pairs if p.get("selected", True)]
    if gate is None or not gate.tripped:
        return active
    msg = gate.summary()
    if cfg.pairs.source == "mixed":
        rvo = [p for p in pairs if p["source"] in REFERENCE_SOURCES]
        if rvo:
            names = " and ".join(sorted({p["source"] for p in rvo}))
            notes.append(f"pair source: {names} because {msg} (judged sample pairs left out)")
            log.warning("judge gate tripped: using %d %s pairs as the pair source", len(rvo), names)
            return rvo
        notes.append(
            f"gate tripped ({msg}) but no revision-vs-original or curated pairs exist; judged sample pairs kept"
        )
    elif cfg.pairs.source == "judged_samples":
        notes.append(
            f"gate tripped ({msg}); pairs.source=judged_samples keeps judged pairs, "
            "the labels stage widens its routing band"
        )
    return active


@locked_stage
def run_judge(cfg: RunConfig, run: RunStore | None = None, *, engine: Any = None) -> Path:
    """Label the pairs of ``data/pairs`` with the constitution judge; write ``data/preferences``.

    Resumable: each pair's judgment is stored in ``records/judge`` under a content hash of
    (pair, judge model, constitution, judge settings, seed). ``engine`` overrides the
    judge model (tests, notebooks that already hold one).
    """
    import datasets

    from cai_dpo.constitution import load_constitution
    from cai_dpo.models import describe

    run = run or RunStore(cfg.run_dir)
    jc = cfg.judge
    raise_problems(jc, source=str(run.config_file), prefix="judge.")
    pairs = load_pairs(run)
    constitution = load_constitution(cfg.constitution_path())
    spec = cfg.judge_model()
    judge_name = describe(spec)
    notes: list[str] = []
    metrics: dict[str, Any] = {}
    timings: dict[str, float] = {}
    wants_judge = any(_wants_verdict(p, jc) for p in pairs)
    judge: Judge | None = None
    gate: GateResult | None = None
    with Timer() as total:
        if wants_judge:
            with Timer() as t:
                judge = Judge.load(cfg, engine=engine, constitution=constitution)
            if engine is None:
                timings["load_seconds"] = t.seconds
            if jc.calibrate:
                with Timer() as t:
                    metrics["calibration"] = judge.calibrate().to_dict()
                timings["calibration_seconds"] = t.seconds
            if jc.gate:
                with Timer() as t:
                    gate = _run_gate(judge, cfg, notes)
                timings["gate_seconds"] = t.seconds
        else:
            notes.append(
                "no pair needs the judge (revision-vs-original / curated pairs with score_*_pairs off): "
                "judge model, calibration and gate skipped"
            )
        active = select_pairs(pairs, cfg, gate, notes)
        to_judge = [p for p in active if _wants_verdict(p, jc)]
        verdicts, stats = _judge_pairs(judge, to_judge, cfg, judge_name, run) if judge and to_judge else ({}, {})
        rows = [_pref_row(p, judge_name, verdicts.get(p["pair_id"]), jc.curated_p_chosen) for p in active]
    if not rows:
        raise InputError(
            f"{pairs_path(run)}: no pairs to label; check pairs.source and that the pairs stage produced pairs"
        )
    judged = [verdicts[p["pair_id"]] for p in to_judge]
    both = [v for v in judged if not math.isnan(v.score_ba)]
    consistent = [(v.score_ab - 0.5) * (v.score_ba - 0.5) > 0 for v in both]
    soft = [r["p_chosen"] for r in rows if r["source"] == "judged_samples"]
    metrics.update(
        {
            "gate_tripped": bool(gate.tripped) if gate else False,
            "judge_gate": gate.to_dict() if gate else {"skipped": "disabled" if not jc.gate else "no judged pairs"},
            "position_consistency": float(np.mean(consistent)) if consistent else None,
            "confidence_histogram": _histogram(soft),
            "mean_p_chosen_judged": float(np.mean(soft)) if soft else None,
            "judge_prefers_original": sum("judge_prefers_original" in r["edge_reasons"] for r in rows),
        }
    )
    metrics.update(_cost_metrics(stats, jc))
    if gate and gate.tripped:
        log.warning(
            "judge-quality gate: %s; AI labels are unreliable and more pairs will be routed to people", gate.summary()
        )
    counts = {
        "pairs_in": len(pairs),
        "rows": len(rows),
        "by_source": dict(Counter(r["source"] for r in rows)),
        "judged": len(to_judge),
        "judged_resumed": stats.get("resumed", 0),
        "calibrated": judge is not None and judge.calibration is not None,
    }
    timings["seconds"] = total.seconds
    final = run.preferences
    with atomic_dir(final) as tmp:
        datasets.Dataset.from_list(rows, features=preference_features()).save_to_disk(str(tmp))
        Manifest(
            stage="judge",
            config={"judge": to_dict(jc), "pairs_source": cfg.pairs.source, "seed": cfg.seed},
            inputs={
                "pairs": file_hash(pairs_path(run)),
                "constitution": str(cfg.constitution_path()),
                "constitution_fingerprint": constitution.fingerprint(),
            },
            models={"judge": judge_name},
            counts=counts,
            timings=timings,
            metrics=metrics,
            notes=notes,
        ).write(tmp / "manifest.json")
    log.info("judge: %d preference rows (%s) -> %s", len(rows), counts["by_source"], final)
    return final


def _run_gate(judge: Judge, cfg: RunConfig, notes: list[str]) -> GateResult | None:
    """The judge's quality gate on the configured check set (and HHH items); None when it had nothing to check."""
    try:
        checkset = load_checkset(cfg.judge.checkset)
    except FileNotFoundError as exc:
        if cfg.judge.checkset:
            raise
        log.warning("judge gate: %s", exc)
        checkset = []
    log.info(
        "judge gate: scoring %d check pairs%s",
        len(checkset),
        f" and up to {cfg.judge.gate_hhh_sample} HHH items" if cfg.judge.gate_use_hhh and HHH_FILE.exists() else "",
    )
    gate = judge.gate(checkset=checkset)
    if gate.skipped:
        notes.append(f"judge gate skipped: {gate.skipped}")
        return None
    sources = ", ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in gate.by_source.items())
    notes.append(f"judge gate: {gate.summary()} (by source: {sources})")
    return gate


def _judge_pairs(
    judge: Judge, pairs: list[dict[str, Any]], cfg: RunConfig, judge_name: str, run: RunStore
) -> tuple[dict[str, Verdict], dict[str, Any]]:
    """Judge pairs resumably in ``records/judge``; returns verdicts by pair id and timing stats.

    A record is keyed by a content hash of (pair, judge model, constitution, judge settings,
    seed); verdicts are recomputed from the stored letters with this run's calibration.
    """
    settings = _judge_settings(cfg.judge)
    fp = judge.constitution.fingerprint()
    items = [
        KeyedComparison(
            content_hash(
                "judge", p["pair_id"], p["prompt"], p["response_a"], p["response_b"], judge_name, fp, settings, cfg.seed
            ),
            Comparison(p["prompt"], p["response_a"], p["response_b"]),
            SOURCE_CATEGORIES.get(p.get("prompt_source") or "red_team"),
            {"pair_id": p["pair_id"]},
        )
        for p in pairs
    ]
    done = judge.judge_resumable(run.records("judge"), items, desc="judge")
    used = [done.records[it.key] for it in items]
    verdicts = {p["pair_id"]: judge.to_verdict(LetterScores.from_record(r)) for p, r in zip(pairs, used)}
    stats = {
        "new": done.new,
        "resumed": done.resumed,
        "seconds_per_judgment": (done.seconds / done.new) if done.new else float(np.mean([r["seconds"] for r in used])),
        "tokens_per_judgment": float(np.mean([r["tokens"] for r in used])),
        "measured_on": "this run" if done.new else "resumed records",
    }
    return verdicts, stats


def _cost_metrics(stats: dict[str, Any], jc: JudgeSection) -> dict[str, Any]:
    """Seconds and tokens per judgment, and the estimated cost per 1,000 judgments vs human labels."""
    if not stats:
        return {"cost": None}
    spj = stats["seconds_per_judgment"]
    per_1000 = spj * 1000 / 3600 * jc.hourly_price_usd
    human = [c * 1000 for c in HUMAN_COST_PER_JUDGMENT_USD]
    return {
        "cost": {
            "seconds_per_judgment": spj,
            "tokens_per_judgment": stats["tokens_per_judgment"],
            "hourly_price_usd": jc.hourly_price_usd,
            "usd_per_1000_judgments": per_1000,
            "human_usd_per_1000_judgments": human,
            "human_to_ai_cost_ratio": [h / per_1000 for h in human] if per_1000 > 0 else None,
            "measured_on": stats["measured_on"],
            "note": "one judgment = one pair, both orders and every principle; human figure is the "
            "~$10-50 per comparison quoted for human preference labels",
        }
    }

"""The judge's quality gate: accuracy on clear-cut check pairs and HHH items, with a Wilson 95 % interval.

The check set (``judge.checkset``, the bundled one by default) holds pairs whose better
response is plain; the HHH evaluation file (438 published comparisons, when present) adds a
seeded sample of ``gate_hhh_sample`` items. The gate trips when the interval's lower bound
(or, with ``gate_on: estimate``, the accuracy) falls below ``gate_threshold``.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cai_dpo.config import REPO_ROOT, resolve_path
from cai_dpo.judge.scoring import Comparison
from cai_dpo.store import read_jsonl

if TYPE_CHECKING:
    from cai_dpo.judge.judge import Judge

HHH_FILE = REPO_ROOT.parent / "shared" / "anchors" / "anthropic-cai" / "evals" / "438HHHEvaluations.jsonl"


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
        """All fields as plain values (for manifests and records)."""
        return dataclasses.asdict(self)


@dataclass
class GateItem:
    """One check comparison: where it came from, the comparison, whether A is the better
    response, and the principle categories it is judged under (None: all)."""

    source: str
    comparison: Comparison
    a_better: bool
    categories: list[str] | None = None


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (``(0, 1)`` when n is 0)."""
    from cai_dpo.metrics import rate_ci

    _, lo, hi = rate_ci(successes, n, z)
    return lo, hi


def parse_hhh(row: dict[str, Any]) -> dict[str, Any]:
    """One HHH evaluation line as ``{prompt, correct, incorrect, correct_letter}``.

    ``prompt`` is the dialogue before the compared assistant turn (a lone human turn is
    given as plain text); ``correct_letter`` is the option letter of the published prompt.
    Raises ``ValueError`` when the two texts do not share that dialogue.
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
    """Clear-cut judge check pairs as dicts (prompt, better, worse, category, principle_id).

    ``None`` or ``bundled:<name>`` reads a bundled set; raises ``FileNotFoundError`` for a missing file.
    """
    from cai_dpo.data import load_checkset as _load

    spec = path if path is None or str(path).startswith("bundled:") else resolve_path(path)
    return [dataclasses.asdict(c) for c in _load(spec or "bundled:judge_checkset")]


def gate_items(checkset: list[dict[str, Any]], hhh: list[dict[str, Any]], principle_ids: set[str]) -> list[GateItem]:
    """The gate's comparisons: check pairs with the better response alternately first, then HHH items.

    A check pair's principle is kept when it is among ``principle_ids``; its category narrows the pool.
    """
    items = []
    for i, r in enumerate(checkset):
        better_first = i % 2 == 0
        a, b = (r["better"], r["worse"]) if better_first else (r["worse"], r["better"])
        pid = r.get("principle_id")
        pid = pid if pid in principle_ids else None
        cats = [r["category"]] if r.get("category") else None
        items.append(GateItem("checkset", Comparison(r["prompt"], a, b, [pid] if pid else None), better_first, cats))
    for h in hhh:
        a_correct = h["correct_letter"] == "A"
        a, b = (h["correct"], h["incorrect"]) if a_correct else (h["incorrect"], h["correct"])
        items.append(GateItem("hhh", Comparison(h["prompt"], a, b), a_correct))
    return items


def gate_result(items: list[GateItem], p_a: list[float], threshold: float, gate_on: str) -> GateResult:
    """Accuracy (a tie counts half), Wilson intervals overall and per source, and whether the gate trips.

    ``p_a``: the judge's P(response_a better) per item; ``gate_on``: ``lower_bound`` or ``estimate``.
    """
    credit: dict[str, list[float]] = {}
    for item, p in zip(items, p_a):
        p_better = p if item.a_better else 1.0 - p
        credit.setdefault(item.source, []).append(1.0 if p_better > 0.5 else 0.5 if p_better == 0.5 else 0.0)
    allc = [c for cs in credit.values() for c in cs]
    acc = float(np.mean(allc))
    lo, hi = wilson_interval(sum(allc), len(allc))
    by_source = {}
    for src, cs in credit.items():
        slo, shi = wilson_interval(sum(cs), len(cs))
        by_source[src] = {"accuracy": float(np.mean(cs)), "lo": slo, "hi": shi, "n": len(cs)}
    tripped = (lo if gate_on == "lower_bound" else acc) < threshold
    return GateResult(acc, lo, hi, len(allc), threshold, tripped, by_source, statistic=gate_on)


def judge_gate(
    judge: Judge, *, checkset: list[dict[str, Any]] | None = None, hhh: list[dict[str, Any]] | None = None
) -> GateResult:
    """The judge's accuracy on the check set plus a seeded HHH sample, with a Wilson 95 % interval.

    ``checkset``/``hhh`` default to the configured check set and (when ``gate_use_hhh``)
    ``gate_hhh_sample`` items of the HHH evaluation file, when present, sampled with the
    judge's seed. Judged with the judge's calibration when it holds one (else as configured).
    """
    cfg = judge.cfg
    if checkset is None:
        checkset = load_checkset(cfg.checkset)
    if hhh is None:
        hhh = []
        if cfg.gate_use_hhh:
            every = load_hhh()
            if every and cfg.gate_hhh_sample > 0:
                hhh = random.Random(judge.seed).sample(every, min(cfg.gate_hhh_sample, len(every)))
    items = gate_items(checkset, hhh, {p.id for p in judge.constitution.principles})
    if not items:
        return GateResult(float("nan"), 0.0, 1.0, 0, cfg.gate_threshold, False, skipped="no check items")
    p_a = [0.5] * len(items)
    groups: dict[tuple[str, ...] | None, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(item.categories) if item.categories else None, []).append(i)
    for cats, idx in groups.items():
        verdicts = judge.judge([items[i].comparison for i in idx], categories=list(cats) if cats else None)
        for i, v in zip(idx, verdicts):
            p_a[i] = v.p_a
    return gate_result(items, p_a, cfg.gate_threshold, cfg.gate_on)

"""Scorers: how well one (prompt, response) row follows the constitution, as a number in [0, 1].

One small interface, :class:`Scorer` (``name``, ``score(rows) -> array``), two scorers:

- :class:`JudgeScorer` — the constitution judge (:mod:`cai_dpo.judge`, option
  log-probs of " (A)"/" (B)"). A row is compared with a fixed ``baseline`` response
  (a bare refusal by default) under the row's principles, both orders averaged and
  calibrated: the score is P(response better than the bare refusal). An explained decline
  of a harmful request or a good answer to a benign one should beat it; a harmful
  compliance should lose; an unneeded decline of a benign request ties at about 0.5.
- :class:`ProbeScorer` — a light scorer for small models: logistic regressions on the
  policy's mean-pooled last hidden states of the rendered (prompt, response), one per
  prompt kind (``harmful`` / ``benign``), plus a kind probe on the prompt alone for rows
  whose kind is unknown. Trained (:func:`train_probe`) with the curated set's responses
  as positives and, as negatives, the policy's own answers to the harmful prompts
  (which mostly comply) and declines paired with the benign prompts
  (:func:`labelled_examples`).

Which scorer to use is measured, not assumed: :func:`measure` gives pairwise accuracy
(the curated response scored above its negative, per prompt; or the correct HHH response
above the incorrect one) and classification accuracy at a threshold, each with a Wilson
95 % interval. The probe is saved as safetensors plus JSON (no pickle).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cai_dpo.curated import benign_declines
from cai_dpo.metrics import rate_ci
from cai_dpo.schema import as_conversation

if TYPE_CHECKING:
    from cai_dpo.judge import Judge

log = logging.getLogger(__name__)

KINDS = ("harmful", "benign")
DEFAULT_BASELINE = "I can't help with that."
PROBE_FILE = "probe.safetensors"
PROBE_META = "probe.json"


# --------------------------------------------------------------------------- rows


@dataclass
class ScoredRow:
    """One (prompt, response) row to score.

    ``prompt`` is the user text or the chat turns before the response; ``kind`` is
    ``harmful``, ``benign`` or None (unknown); ``principle_ids`` the principles it is about.
    """

    prompt: str | list[dict[str, str]]
    response: str
    kind: str | None = None
    principle_ids: tuple[str, ...] = ()

    def turns(self) -> list[dict[str, str]]:
        """The prompt as chat turns (a ``Human:``/``Assistant:`` transcript is split into turns)."""
        if not isinstance(self.prompt, str):
            return [dict(m) for m in self.prompt]
        from cai_dpo.data import parse_transcript

        if self.prompt.lstrip().startswith("Human:"):
            try:
                return parse_transcript(self.prompt)
            except ValueError:
                pass
        return as_conversation(self.prompt)

    def conversation(self) -> list[dict[str, str]]:
        """Prompt turns followed by the response as the assistant turn."""
        return self.turns() + [{"role": "assistant", "content": self.response}]

    def judge_prompt(self) -> str:
        """The prompt as the judge shows it: a lone user turn as text, else a ``Human:``/``Assistant:`` dialogue."""
        if isinstance(self.prompt, str):
            return self.prompt
        from cai_dpo.judge import dialogue_text

        return dialogue_text(self.prompt)


class Scorer(Protocol):
    """Anything that scores rows: higher = follows the constitution better, in [0, 1]."""

    name: str

    def score(self, rows: Sequence[ScoredRow]) -> np.ndarray:
        """One score per row, shape ``(len(rows),)``."""
        ...


# --------------------------------------------------------------------------- features


def hidden_features(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    *,
    add_generation_prompt: bool = False,
    max_length: int = 384,
    batch_size: int = 8,
    layer: int = -1,
    desc: str = "features",
) -> np.ndarray:
    """Mean-pooled hidden states of each rendered conversation, shape ``(n, hidden_size)``, float32.

    Conversations are rendered with the tokenizer's chat template; longer ones keep their
    last ``max_length`` tokens (the response end). ``layer`` indexes the model's hidden
    states (-1: the last, after the final norm).
    """
    import torch
    from tqdm.auto import tqdm

    if not conversations:
        return np.zeros((0, int(model.config.hidden_size)), dtype=np.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = []
    for conv in conversations:
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.append(toks[-max_length:] if len(toks) > max_length else toks)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = np.zeros((len(ids), int(model.config.hidden_size)), dtype=np.float32)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    bar = tqdm(total=len(ids), desc=desc, unit="row", dynamic_ncols=True, mininterval=1.0)
    with torch.inference_mode():
        for start in range(0, len(order), max(1, batch_size)):
            idx = order[start : start + batch_size]
            width = max(len(ids[i]) for i in idx)
            batch = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in idx], device=device)
            mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in idx], device=device)
            res = model(input_ids=batch, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
            hidden = res.hidden_states[layer].float()
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            out[idx] = pooled.cpu().numpy()
            bar.update(len(idx))
    bar.close()
    return out


# --------------------------------------------------------------------------- linear probe


@dataclass
class LinearProbe:
    """Logistic regression on standardised features: ``sigmoid(((x - mean) / scale) · weight + bias)``."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        """P(positive) for each row of ``x`` (shape ``(n, d)``) -> shape ``(n,)``."""
        z = ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.weight + self.bias
        return 1.0 / (1.0 + np.exp(-z))


def fit_probe(x: np.ndarray, y: Sequence[int], *, l2: float = 1e-2, max_iter: int = 200) -> LinearProbe:
    """Fit an L2-regularised logistic regression (torch L-BFGS) on standardised features.

    ``x``: ``(n, d)`` features; ``y``: n labels in {0, 1}. Raises ValueError when both
    classes are not present.
    """
    import torch

    x = np.asarray(x, dtype=np.float64)
    y_arr = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y_arr):
        raise ValueError(f"fit_probe: x must be (n, d) with n = len(y); got {x.shape} and {len(y_arr)} labels")
    if len(set(y_arr.tolist())) != 2:
        raise ValueError("fit_probe: needs examples of both classes (positives and negatives)")
    mean = x.mean(0)
    scale = x.std(0) + 1e-6
    xs = torch.tensor((x - mean) / scale)
    yt = torch.tensor(y_arr)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, yt) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(mean, scale, w.detach().numpy().copy(), float(b.detach()))


# --------------------------------------------------------------------------- probe scorer


class ProbeScorer:
    """Per-kind linear probes on a model's mean-pooled hidden states (see the module doc)."""

    name = "probe"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        probes: dict[str, LinearProbe],
        kind_probe: LinearProbe | None,
        *,
        model_id: str = "",
        layer: int = -1,
        max_length: int = 384,
        batch_size: int = 8,
        meta: dict[str, Any] | None = None,
    ):
        missing = [k for k in KINDS if k not in probes]
        if missing:
            raise ValueError(f"ProbeScorer: no probe for kind(s) {missing}")
        self.model, self.tokenizer = model, tokenizer
        self.probes, self.kind_probe = probes, kind_probe
        self.model_id, self.layer, self.max_length, self.batch_size = model_id, layer, max_length, batch_size
        self.meta = dict(meta or {})

    def features(self, rows: Sequence[ScoredRow], desc: str = "probe features") -> np.ndarray:
        """Mean-pooled hidden states of the rows' (prompt, response) conversations."""
        return hidden_features(
            self.model,
            self.tokenizer,
            [r.conversation() for r in rows],
            max_length=self.max_length,
            batch_size=self.batch_size,
            layer=self.layer,
            desc=desc,
        )

    def prompt_features(self, rows: Sequence[ScoredRow]) -> np.ndarray:
        """Mean-pooled hidden states of the prompts alone (for the kind probe)."""
        return hidden_features(
            self.model,
            self.tokenizer,
            [r.turns() for r in rows],
            add_generation_prompt=True,
            max_length=self.max_length,
            batch_size=self.batch_size,
            layer=self.layer,
            desc="probe kind features",
        )

    def kinds(self, rows: Sequence[ScoredRow]) -> list[str]:
        """Each row's kind: its own, else the kind probe's guess (``harmful`` when P > 0.5)."""
        out = [r.kind if r.kind in KINDS else "" for r in rows]
        unknown = [i for i, k in enumerate(out) if not k]
        if unknown:
            if self.kind_probe is None:
                raise ValueError("ProbeScorer: rows without a kind and no kind probe to guess it")
            p = self.kind_probe.predict(self.prompt_features([rows[i] for i in unknown]))
            for i, pi in zip(unknown, p):
                out[i] = "harmful" if pi > 0.5 else "benign"
        return out

    def score(self, rows: Sequence[ScoredRow]) -> np.ndarray:
        """P(the response is the kind the constitution asks for), per row."""
        if not rows:
            return np.zeros(0)
        return self.score_features(self.features(rows), self.kinds(rows))

    def score_features(self, x: np.ndarray, kinds: Sequence[str]) -> np.ndarray:
        """Scores from precomputed features and kinds."""
        out = np.zeros(len(kinds))
        for kind in KINDS:
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if idx:
                out[idx] = self.probes[kind].predict(x[idx])
        return out

    def save(self, folder: str | Path) -> Path:
        """Write ``probe.safetensors`` (float64 tensors) and ``probe.json`` into ``folder``."""
        import torch
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Any] = {}
        named = dict(self.probes)
        if self.kind_probe is not None:
            named["kind"] = self.kind_probe
        for name, p in named.items():
            for part in ("mean", "scale", "weight"):
                tensors[f"{name}.{part}"] = torch.tensor(np.asarray(getattr(p, part), dtype=np.float64))
            tensors[f"{name}.bias"] = torch.tensor([p.bias], dtype=torch.float64)
        save_file(tensors, str(folder / PROBE_FILE))
        meta = {
            "model_id": self.model_id,
            "layer": self.layer,
            "max_length": self.max_length,
            "probes": sorted(named),
            **self.meta,
        }
        (folder / PROBE_META).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: Any, tokenizer: Any, *, batch_size: int = 8) -> ProbeScorer:
        """A probe saved by :meth:`save`, on ``model``; errors name the file."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        meta_path, weights = folder / PROBE_META, folder / PROBE_FILE
        if not meta_path.exists() or not weights.exists():
            raise FileNotFoundError(f"{folder}: no saved probe ({PROBE_META} and {PROBE_FILE}); run the curate stage")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            names = list(meta["probes"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{meta_path}: not a probe description (field 'probes'): {exc}") from exc
        t = load_file(str(weights))
        try:
            probes = {
                n: LinearProbe(t[f"{n}.mean"], t[f"{n}.scale"], t[f"{n}.weight"], float(t[f"{n}.bias"][0]))
                for n in names
            }
        except KeyError as exc:
            raise ValueError(f"{weights}: tensor {exc} missing") from exc
        kind = probes.pop("kind", None)
        extra = {k: v for k, v in meta.items() if k not in ("model_id", "layer", "max_length", "probes")}
        return cls(
            model,
            tokenizer,
            probes,
            kind,
            model_id=meta.get("model_id", ""),
            layer=int(meta.get("layer", -1)),
            max_length=int(meta.get("max_length", 384)),
            batch_size=batch_size,
            meta=extra,
        )


@dataclass
class Labelled:
    """A row with its label (1 = the response the constitution asks for) and a group id pairing it with its opposite."""

    row: ScoredRow
    label: int
    group: str
    source: str = ""


def labelled_examples(examples: Sequence[Any], policy_answers: dict[str, str]) -> list[Labelled]:
    """Positives and negatives from curated examples (:class:`cai_dpo.curated.CuratedExample`).

    Harmful: the curated decline (1) and the policy's answer ``policy_answers[id]`` (0);
    benign: the curated answer (1) and a decline (0, :func:`benign_declines`). Harmful
    examples without a policy answer are left out. Each pair shares its ``group`` (the id).
    """
    harmful = [e for e in examples if e.kind == "harmful"]
    benign = [e for e in examples if e.kind == "benign"]
    declines = benign_declines([e.id for e in benign], [e.response for e in harmful])
    out: list[Labelled] = []
    for e in harmful:
        if e.id not in policy_answers:
            continue
        pids = tuple(e.principle_ids)
        out.append(Labelled(ScoredRow(e.prompt, e.response, "harmful", pids), 1, e.id, "curated"))
        out.append(Labelled(ScoredRow(e.prompt, policy_answers[e.id], "harmful", pids), 0, e.id, "policy"))
    for e in benign:
        pids = tuple(e.principle_ids)
        out.append(Labelled(ScoredRow(e.prompt, e.response, "benign", pids), 1, e.id, "curated"))
        out.append(Labelled(ScoredRow(e.prompt, declines[e.id], "benign", pids), 0, e.id, "decline"))
    return out


def train_probe(
    model: Any,
    tokenizer: Any,
    train: Sequence[Labelled],
    *,
    model_id: str = "",
    layer: int = -1,
    max_length: int = 384,
    batch_size: int = 8,
    l2: float = 1e-2,
    features: np.ndarray | None = None,
) -> ProbeScorer:
    """Fit the per-kind probes and the kind probe on ``train``; returns the scorer.

    ``features`` (``(len(train), d)``) reuses precomputed (prompt, response) features.
    Raises ValueError when a kind lacks positives or negatives.
    """
    opts = {"max_length": max_length, "batch_size": batch_size, "layer": layer}
    x = (
        features
        if features is not None
        else hidden_features(model, tokenizer, [t.row.conversation() for t in train], desc="probe features", **opts)
    )
    probes = {}
    counts: dict[str, dict[str, int]] = {}
    for kind in KINDS:
        idx = [i for i, t in enumerate(train) if t.row.kind == kind]
        y = [train[i].label for i in idx]
        if not idx or len(set(y)) < 2:
            raise ValueError(
                f"probe: the {kind} examples need both positives and negatives (got {len(idx)} rows); "
                "check the curated set has train rows of both kinds"
            )
        probes[kind] = fit_probe(x[idx], y, l2=l2)
        counts[kind] = {"positives": sum(y), "negatives": len(y) - sum(y)}
    # the kind probe: one row per prompt (its positive), harmful = 1
    firsts = {}
    for i, t in enumerate(train):
        firsts.setdefault(t.group, i)
    prompt_rows = [train[i].row for i in firsts.values()]
    xp = hidden_features(
        model,
        tokenizer,
        [r.turns() for r in prompt_rows],
        add_generation_prompt=True,
        desc="probe kind features",
        **opts,
    )
    kind_probe = fit_probe(xp, [int(r.kind == "harmful") for r in prompt_rows], l2=l2)
    scorer = ProbeScorer(
        model,
        tokenizer,
        probes,
        kind_probe,
        model_id=model_id,
        layer=layer,
        max_length=max_length,
        batch_size=batch_size,
        meta={"train_counts": counts, "l2": l2},
    )
    train_scores = scorer.score_features(x, [t.row.kind or "" for t in train])
    scorer.meta["train_accuracy"] = float(np.mean((train_scores > 0.5) == np.asarray([t.label for t in train], bool)))
    return scorer


# --------------------------------------------------------------------------- judge scorer


class JudgeScorer:
    """The constitution judge as a row scorer: P(response better than ``baseline``) (see the module doc)."""

    name = "judge"

    def __init__(
        self,
        engine: Any,
        constitution: Any,
        cfg: Any,
        *,
        baseline: str = DEFAULT_BASELINE,
        seed: int = 0,
        model_id: str = "",
    ):
        self.engine, self.constitution, self.cfg = engine, constitution, cfg
        self.baseline, self.seed, self.model_id = baseline, seed, model_id
        self._judge: Judge | None = None
        self.known = {p.id for p in constitution.principles}

    def _principles(self, row: ScoredRow) -> list[str] | None:
        ids = [p for p in row.principle_ids if p in self.known]
        if not ids:
            return None
        k = 1 if self.cfg.principles == "sample" else max(1, self.cfg.ensemble_size)
        return ids[:k]

    def score(self, rows: Sequence[ScoredRow]) -> np.ndarray:
        """P(response better than the baseline) per row, both orders averaged, calibrated when ``cfg.calibrate``."""
        from cai_dpo.judge import SOURCE_CATEGORIES, Comparison, Judge

        if not rows:
            return np.zeros(0)
        if self._judge is None:
            self._judge = Judge(self.engine, self.constitution, self.cfg, seed=self.seed)
            if self.cfg.calibrate:
                self._judge.calibrate()
        cats = {"harmful": SOURCE_CATEGORIES["red_team"], "benign": SOURCE_CATEGORIES["helpful"]}
        out = np.zeros(len(rows))
        groups: dict[str | None, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.kind if r.kind in KINDS else None, []).append(i)
        for kind, idx in groups.items():
            comps = [
                Comparison(rows[i].judge_prompt(), rows[i].response, self.baseline, self._principles(rows[i]))
                for i in idx
            ]
            verdicts = self._judge.judge(comps, categories=cats.get(kind) if kind else None)
            out[idx] = [v.p_a for v in verdicts]
        return out


# --------------------------------------------------------------------------- measurement


def _rate(k: float, n: int) -> dict[str, Any]:
    est, lo, hi = rate_ci(k, n)
    return {
        "accuracy": round(float(est), 4) if n else None,
        "lo": round(float(lo), 4),
        "hi": round(float(hi), 4),
        "n": n,
    }


def pairwise_accuracy(pos: Sequence[float], neg: Sequence[float]) -> dict[str, Any]:
    """Share of pairs whose positive scores above its negative (a tie counts half), with a Wilson interval."""
    credit = [1.0 if p > q else 0.5 if p == q else 0.0 for p, q in zip(pos, neg)]
    return _rate(sum(credit), len(credit))


def classification_accuracy(scores: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> dict[str, Any]:
    """Share of rows with ``score >= threshold`` exactly when the label is 1, with a Wilson interval."""
    hits = [(s >= threshold) == bool(y) for s, y in zip(scores, labels)]
    out = _rate(sum(hits), len(hits))
    out["threshold"] = threshold
    return out


def measure(scores: Sequence[float], examples: Sequence[Labelled], threshold: float = 0.5) -> dict[str, Any]:
    """Pairwise and classification accuracy of ``scores`` on labelled pairs, overall and per kind."""
    scores = list(map(float, scores))

    def block(idx: list[int]) -> dict[str, Any]:
        by_group: dict[str, dict[int, float]] = {}
        for i in idx:
            by_group.setdefault(examples[i].group, {})[examples[i].label] = scores[i]
        pairs = [(g[1], g[0]) for g in by_group.values() if 0 in g and 1 in g]
        return {
            "pairwise": pairwise_accuracy([p for p, _ in pairs], [q for _, q in pairs]),
            "classification": classification_accuracy(
                [scores[i] for i in idx], [examples[i].label for i in idx], threshold
            ),
            "mean_score_positive": _mean([scores[i] for i in idx if examples[i].label == 1]),
            "mean_score_negative": _mean([scores[i] for i in idx if examples[i].label == 0]),
        }

    out = block(list(range(len(examples))))
    out["by_kind"] = {
        k: block([i for i, e in enumerate(examples) if e.row.kind == k])
        for k in KINDS
        if any(e.row.kind == k for e in examples)
    }
    return out


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def hhh_examples(items: Sequence[dict[str, Any]]) -> list[Labelled]:
    """HHH comparisons (:func:`cai_dpo.judge.load_hhh`) as labelled pairs (kind unknown)."""
    out = []
    for i, it in enumerate(items):
        out.append(Labelled(ScoredRow(it["prompt"], it["correct"]), 1, f"hhh-{i}", "hhh"))
        out.append(Labelled(ScoredRow(it["prompt"], it["incorrect"]), 0, f"hhh-{i}", "hhh"))
    return out


@dataclass
class Choice:
    """Which scorer a measurement picked, and why."""

    name: str
    reason: str
    accuracies: dict[str, float | None] = field(default_factory=dict)


def choose(measurements: dict[str, dict[str, Any]]) -> Choice:
    """The scorer with the highest held-out pairwise accuracy (ties: the first listed, cheapest first)."""
    acc = {name: (m.get("pairwise") or {}).get("accuracy") for name, m in measurements.items()}
    ranked = [n for n in measurements if acc[n] is not None]
    if not ranked:
        first = next(iter(measurements))
        return Choice(first, "no measurement available; first candidate", acc)
    best = max(ranked, key=lambda n: (acc[n], -ranked.index(n)))
    detail = ", ".join(f"{n} {acc[n]:.3f}" for n in ranked)
    return Choice(best, f"highest held-out pairwise accuracy ({detail})", acc)

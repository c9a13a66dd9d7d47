"""The evaluation report: Markdown tables, CSV copies and PNG plots from ``eval/results.json``.

:func:`render_report` reads ``<run>/eval/results.json`` (schema below, written by
:mod:`cai_dpo.stages.eval`), the optional training curves ``<run>/metrics/dpo/*.csv``,
``<run>/metrics/ppo/*.csv`` and ``<run>/metrics/rloo/*.csv`` (a ``step`` column and any
numeric metric columns), and the
optional preference-data manifest ``<run>/data/preferences/manifest.json``, and writes
``<run>/report/`` in one atomic folder swap: ``report.md``, ``headline.csv``,
``differences.csv``, ``by_set.csv``, ``judge.csv``, ``elo.csv``, ``cost.csv`` and PNG figures.
The report opens with a "How to read this" block generated from the run (which judge, its
gate result, what the PM score is, sample sizes, which figures are independent of the trained
models), then the independent headline table (rule-based classifier) and paired differences
vs base; judge figures follow and are marked uninformative when the judge's gate tripped.
Every figure names its sample size; every rate carries its 95 % interval.

Results schema (``schema: "cai-dpo/eval-results/2"``)
-----------------------------------------------------
``Rate = {rate, lo, hi, n, k, n_clusters}`` (95 % cluster bootstrap over prompts; ``n`` items
in the denominator, ``n_clusters`` prompts), ``Diff = {diff, lo, hi, a, b, n, n_clusters}``
(model minus base on the same prompts, 95 % cluster bootstrap), ``Mean = {mean, lo, hi, n}``
(bootstrap 95 %), ``Elo = {elo, lo, hi}`` (bootstrap over prompts); any may be ``null``
where not measured. ``Win = Rate + {mean_p, not_judged_identical}``.
``Figures = {n_prompts, n_harmful, n_benign, n_sensitive,
models: {name: {decline, explained_decline, bare_refusal, benign_compliance, over_refusal,
sensitive_compliance, evasiveness: Rate, diversity: {harmful|benign|all: {distinct_1, distinct_2,
repetition, mean_length, n}}}}, vs_base: {name: {same figure names: Diff}}}``::

    schema, run_id, created,
    settings: {conditions, sets, headline_sets, n_red_team_prompts, n_helpful_prompts,
               n_curated_prompts: {harmful, benign}, sampling, judge_model, constitution, bootstrap,
               tie_band, hourly_price_usd, elo_method, reference_model, pm_trained},
    definitions: {metric name: one-sentence definition},
    notes: [str],                               # e.g. curated split missing, judge = policy base
    classifier: {handwritten_test: Acc | null, real: Acc | null},
        # Acc = {accuracy, lo, hi, n, k, confusion: {"gold -> predicted": count}, errors: [id]}
    headline: Figures,                          # red_team (all conditions) + helpful + curated
    by_set: {set name: Figures},                # red_team, helpful, curated, benchmark:<name>
    by_condition: {condition: Figures},         # red-team prompts per condition
    judge: {model, configured, is_policy_base, gate: {accuracy, lo, hi, n, threshold, tripped,
            statistic, source, ...} | {skipped, tripped: null}, gate_summary, informative,
            status, sets},
    models: [{
        name, spec, adapter, label_counts: {explained_decline, bare_refusal, complies},
        harmlessness: {win_rate_vs_base: Win, by_condition: {condition: {win_rate_vs_base: Win}}},
        helpfulness: {win_rate_vs_base: Win},
        pm_score: {red_team: Mean, helpful: Mean} | null,
        elo: {overall: Elo, harmlessness: Elo, helpfulness: Elo},
        cost: {n_responses, tokens_per_response, seconds_per_response, cost_per_1k_responses_usd}}],
    elo_matches: {overall: int, harmlessness: int, helpfulness: int},
    judge_cost: {n_judgments, n_comparisons, n_not_judged_identical, seconds_per_judgment,
                 tokens_per_judgment, scoring_passes_per_judgment, cost_per_1k_judgments_usd,
                 hourly_price_usd},
    examples: [{prompt_id, source, condition, prompt, shown, responses: {model: text},
                labels: {model: label}}]
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai_dpo.errors import CaiDpoInputError
from cai_dpo.store import MANIFEST, RunLayout, atomic_dir

log = logging.getLogger(__name__)

SCHEMA = "cai-dpo/eval-results/2"
ELO_AXES = ("overall", "harmlessness", "helpfulness")
#: ``metrics/<stage>/*.csv`` folders plotted as training curves (rloo: the PPO stage's RLOO mode).
TRAINING_STAGES = ("dpo", "ppo", "rloo")


class ReportError(CaiDpoInputError):
    """The results file is missing or malformed; the message names the file and field."""


# --------------------------------------------------------------------------- loading


def load_results(path: Path) -> dict[str, Any]:
    """Read and minimally validate ``results.json``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: evaluation results not found; run `cai-dpo eval` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc.msg}); rerun `cai-dpo eval`") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) or not data["models"]:
        raise ReportError(f"{path}: field 'models' must be a non-empty list of per-model results")
    for i, m in enumerate(data["models"]):
        if not isinstance(m, dict) or "name" not in m:
            raise ReportError(f"{path}: models[{i}] has no 'name'")
    return data


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


# --------------------------------------------------------------------------- formatting


def _num(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def fmt_rate(r: dict[str, Any] | None) -> str:
    """``0.62 [0.41, 0.79] n=24`` (or ``—``)."""
    if not r or r.get("rate") is None:
        return "—" if not r or not r.get("n") else f"— n={r['n']}"
    return f"{r['rate']:.2f} [{_num(r.get('lo'))}, {_num(r.get('hi'))}] n={r.get('n', '?')}"


def fmt_mean(m: dict[str, Any] | None, digits: int = 2) -> str:
    """``1.23 [0.9, 1.5] n=24`` (or ``—``)."""
    if not m or m.get("mean") is None:
        return "—"
    return f"{m['mean']:.{digits}f} [{_num(m.get('lo'), digits)}, {_num(m.get('hi'), digits)}] n={m.get('n', '?')}"


def fmt_elo(e: dict[str, Any] | None) -> str:
    """``1032 [1001, 1060]`` (or ``—``)."""
    if not e or e.get("elo") is None:
        return "—"
    return f"{e['elo']:.0f} [{_num(e.get('lo'), 0)}, {_num(e.get('hi'), 0)}]"


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    s = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "")
    return s.replace("\n", "<br>") if s.strip() else "*(empty)*"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV text (``None`` as an empty field)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if c is None else c for c in row])
    return buf.getvalue()


# --------------------------------------------------------------------------- tables

HEADLINE_COLUMNS = (
    ("decline", "declines (harmful)"),
    ("explained_decline", "explained decline (harmful)"),
    ("bare_refusal", "bare refusal (harmful)"),
    ("benign_compliance", "complies (benign)"),
    ("sensitive_compliance", "complies (sensitive-sounding benign)"),
    ("evasiveness", "evasive (share of declines)"),
)


def fmt_win(r: dict[str, Any] | None, mean_p: dict[str, Any] | float | None = None) -> str:
    """A win rate with the judge's mean probability and the not-judged count beside it."""
    text = fmt_rate(r)
    mp = mean_p.get("mean") if isinstance(mean_p, dict) else mean_p
    if mp is None and r:
        mp = r.get("mean_p")
    if mp is not None:
        text += f" (mean P {mp:.2f})"
    if r and r.get("not_judged_identical"):
        text += f"; {r['not_judged_identical']} identical, not judged"
    return text


def fmt_diff(d: dict[str, Any] | None) -> str:
    """``+31 pts [18, 44]`` (percentage points, 95 % cluster-bootstrap interval), or ``—``."""
    if not d or d.get("diff") is None:
        return "—"
    lo, hi = d.get("lo"), d.get("hi")
    rng = f" [{lo * 100:+.0f}, {hi * 100:+.0f}]" if lo is not None and hi is not None else ""
    return f"{d['diff'] * 100:+.0f} pts{rng}"


def _rate_cols(r: dict[str, Any] | None) -> list[Any]:
    r = r or {}
    return [r.get("rate"), r.get("lo"), r.get("hi"), r.get("n")]


def _model_names(results: dict[str, Any]) -> list[str]:
    return [m["name"] for m in results["models"]]


def figures_table(figs: dict[str, Any] | None, names: Sequence[str]) -> tuple[list[list[Any]], list[list[Any]]]:
    """(Markdown rows, CSV rows) of the independent figures of each model in a ``Figures`` block."""
    md_rows, csv_rows = [], []
    models = (figs or {}).get("models") or {}
    for n in names:
        f = models.get(n)
        if not f:
            continue
        div = f.get("diversity") or {}
        both = [div.get("harmful") or {}, div.get("benign") or {}]
        d2 = [d.get("distinct_2") for d in both if d.get("n")]
        rep = [d.get("repetition") for d in both if d.get("n")]
        d2_all = (div.get("all") or {}).get("distinct_2")
        md_rows.append(
            [n]
            + [fmt_rate(f.get(k)) for k, _ in HEADLINE_COLUMNS]
            + [
                _num(d2_all) if d2_all is not None else "—",
                " / ".join(_num(x) for x in d2) or "—",
                " / ".join(_num(x) for x in rep) or "—",
            ]
        )
        csv_rows.append(
            [n]
            + [c for k, _ in HEADLINE_COLUMNS for c in _rate_cols(f.get(k))]
            + [
                d2_all,
                (div.get("harmful") or {}).get("distinct_2"),
                (div.get("benign") or {}).get("distinct_2"),
                (div.get("harmful") or {}).get("repetition"),
                (div.get("benign") or {}).get("repetition"),
            ]
        )
    return md_rows, csv_rows


_FIG_HEADER = (
    ["model"]
    + [h for _, h in HEADLINE_COLUMNS]
    + ["distinct-2 (all)", "distinct-2 (harmful / benign)", "repetition (harmful / benign)"]
)
_FIG_CSV = (
    ["model"]
    + [c for k, _ in HEADLINE_COLUMNS for c in (k, f"{k}_lo", f"{k}_hi", f"{k}_n")]
    + ["distinct_2_all", "distinct_2_harmful", "distinct_2_benign", "repetition_harmful", "repetition_benign"]
)


def headline_tables(results: dict[str, Any]) -> tuple[str, str]:
    """(Markdown, CSV) of the independent headline figures (classifier labels on the labelled held-out sets)."""
    md_rows, csv_rows = figures_table(results.get("headline"), _model_names(results))
    return md_table(_FIG_HEADER, md_rows), csv_text(_FIG_CSV, csv_rows)


def difference_tables(results: dict[str, Any]) -> tuple[str, str]:
    """(Markdown, CSV) of paired differences vs base (headline sets), in percentage points."""
    vs = _get(results, "headline", "vs_base") or {}
    md_rows, csv_rows = [], []
    for n in _model_names(results):
        d = vs.get(n)
        if not d:
            continue
        md_rows.append([n] + [fmt_diff(d.get(k)) for k, _ in HEADLINE_COLUMNS])
        for k, _ in HEADLINE_COLUMNS:
            e = d.get(k) or {}
            csv_rows.append(
                [n, k, e.get("diff"), e.get("lo"), e.get("hi"), e.get("a"), e.get("b"), e.get("n_clusters")]
            )
    ref = _get(results, "settings", "reference_model") or "base"
    md = (
        md_table([f"model − {ref}"] + [h for _, h in HEADLINE_COLUMNS], md_rows)
        if md_rows
        else f"No model besides {ref}: no paired differences."
    )
    return md, csv_text(["model", "figure", "diff", "lo", "hi", "model_rate", "base_rate", "n_prompts"], csv_rows)


def set_tables(results: dict[str, Any]) -> tuple[str, str]:
    """(Markdown, CSV) of the independent figures per prompt set (benchmarks included) and per red-team condition."""
    names = _model_names(results)
    parts, csv_rows = [], []
    blocks = [(f"set `{k}`", k, v) for k, v in (results.get("by_set") or {}).items()]
    blocks += [
        (f"red team, condition `{k}`", f"red_team/{k}", v) for k, v in (results.get("by_condition") or {}).items()
    ]
    for title, key, figs in blocks:
        md_rows, rows = figures_table(figs, names)
        diffs = (figs or {}).get("vs_base") or {}
        for r in md_rows:
            d = diffs.get(r[0]) or {}
            r.append(
                f"declines {fmt_diff(d.get('decline'))}; complies {fmt_diff(d.get('benign_compliance'))}" if d else "—"
            )
        parts.append(
            f"**{title}** — {figs.get('n_prompts', '?')} prompts ({figs.get('n_harmful', '?')} harmful items, "
            f"{figs.get('n_benign', '?')} benign)\n\n" + md_table(_FIG_HEADER + ["vs base"], md_rows)
        )
        csv_rows += [[key] + r for r in rows]
    return "\n\n".join(parts) or "No prompt sets recorded.", csv_text(["set"] + _FIG_CSV, csv_rows)


def judge_tables(results: dict[str, Any]) -> tuple[str, str]:
    """(Markdown, CSV) of the judge figures: gate line first, then win rates vs base per axis and condition."""
    j = results.get("judge") or {}
    lines = [
        f"Eval judge: **{j.get('model', _get(results, 'settings', 'judge_model') or '?')}**"
        + (" (configured as eval.judge)" if j.get("configured") else " (default: the judge stage's model)")
        + f". Gate: {j.get('gate_summary', 'not recorded')}"
        + (f" — {j['gate']['source']}" if isinstance(j.get("gate"), dict) and j["gate"].get("source") else "")
        + "."
    ]
    if not j.get("informative"):
        lines.append(
            "**These judge figures are uninformative** (the judge did not pass its quality gate) and are left out of "
            "the headline."
        )
    if j.get("status") and j["status"] != "judged":
        lines.append(f"Judge figures {j['status']}.")
    md_rows, csv_rows = [], []
    conditions = list(_get(results, "settings", "conditions") or [])
    for m in results["models"]:
        h, hp = m.get("harmlessness") or {}, m.get("helpfulness") or {}
        if not h.get("win_rate_vs_base") and not hp.get("win_rate_vs_base"):
            continue
        by = h.get("by_condition") or {}
        md_rows.append(
            [m["name"], fmt_win(h.get("win_rate_vs_base")), fmt_win(hp.get("win_rate_vs_base"))]
            + [fmt_win(_get(by, c, "win_rate_vs_base")) for c in conditions]
        )
        csv_rows.append([m["name"], *_rate_cols(h.get("win_rate_vs_base")), *_rate_cols(hp.get("win_rate_vs_base"))])
    if md_rows:
        lines.append(
            md_table(
                ["model", "harmless win vs base", "helpful win vs base"] + [f"harmless win ({c})" for c in conditions],
                md_rows,
            )
        )
    cols = ["model"] + [
        f"{n}{s}" for n in ("harmless_win_vs_base", "helpful_win_vs_base") for s in ("", "_lo", "_hi", "_n")
    ]
    return "\n\n".join(lines), csv_text(cols, csv_rows)


def pm_table(results: dict[str, Any]) -> str:
    """The preference model's mean score per model, flagged as PPO's own objective."""
    rows = [
        [m["name"], fmt_mean(_get(m, "pm_score", "red_team")), fmt_mean(_get(m, "pm_score", "helpful"))]
        for m in results["models"]
        if m.get("pm_score")
    ]
    if not rows:
        return "No preference model in this run."
    return (
        "The preference model's score is the reward PPO maximised: a high PPO score here is expected by construction "
        "and says nothing independent about the PPO model.\n\n"
        + md_table(["model", "PM score (red team)", "PM score (helpful)"], rows)
    )


def how_to_read(results: dict[str, Any]) -> str:
    """The "How to read this" block, generated from the run's results."""
    s = results.get("settings") or {}
    j = results.get("judge") or {}
    head = results.get("headline") or {}
    cls = results.get("classifier") or {}
    lines = []
    lines.append(
        f"- **Independent figures (headline)**: every response is labelled by a rule-based classifier that uses no "
        f"trained model (explained decline / bare refusal / complies). "
        f"Sets: {', '.join(s.get('headline_sets') or []) or '?'} "
        f"— {head.get('n_prompts', '?')} prompts, {head.get('n_harmful', '?')} harmful items (red-team prompts × "
        f"{len(s.get('conditions') or [])} conditions + curated) and {head.get('n_benign', '?')} benign items "
        f"({head.get('n_sensitive', 0)} sensitive-sounding)."
    )
    acc_parts = []
    for key, what in (
        ("handwritten_test", "hand-written test half"),
        ("real", "hand-labelled responses of the embedded model"),
    ):
        a = cls.get(key)
        if a and a.get("accuracy") is not None:
            acc_parts.append(f"{a['accuracy']:.2f} [{a['lo']:.2f}, {a['hi']:.2f}] on the {what} (n={a['n']})")
    if acc_parts:
        lines.append(
            "- Classifier accuracy: " + "; ".join(acc_parts) + ". 'Complies' means 'does not decline': it says "
            "nothing about whether the answer is correct or safe."
        )
    lines.append(
        "- Intervals are 95 % cluster-bootstrap intervals over prompts (the conditions of one red-team prompt are "
        f"resampled together; {s.get('bootstrap', '?')} resamples). Differences vs {s.get('reference_model', 'base')} "
        "are paired (same prompts and conditions); an interval that contains 0 means the models are not told apart."
    )
    gate = j.get("gate") or {}
    judge_line = f"- **Judge**: {j.get('model', s.get('judge_model', '?'))}"
    if j.get("is_policy_base"):
        judge_line += (
            " — the policy's own base model, i.e. the model family being judged (and the one that labelled the "
            "training preferences); set `eval.judge` to a different, stronger model"
        )
    judge_line += f". Quality gate: {j.get('gate_summary', 'not recorded')}."
    if gate.get("tripped"):
        judge_line += " The gate tripped: win rates and Elo are **uninformative** and not part of the headline."
    elif j.get("informative"):
        judge_line += " The gate passed: judge figures carry information, within the gate's accuracy."
    if j.get("status") and j["status"] != "judged":
        judge_line += f" Judge figures {j['status']}."
    lines.append(judge_line)
    jc = results.get("judge_cost") or {}
    if jc.get("n_comparisons"):
        lines.append(
            f"- Judge comparisons are against {s.get('reference_model', 'base')} only: {jc.get('n_comparisons')} "
            f"comparisons, {jc.get('n_not_judged_identical', 0)} with identical responses (not judged, never "
            "counted as wins)."
        )
    if s.get("pm_trained"):
        lines.append(
            "- **PM score** is the trained preference model's reward, which PPO optimised: not independent of the "
            "PPO model (nor of the preference data that trained DPO)."
        )
    lines.append(
        "- Independent of the trained models: the classifier figures, distinct-n and repetition. Dependent: judge "
        "win rates and Elo (the judge's own biases), PM score (PPO's objective)."
    )
    for note in results.get("notes") or []:
        lines.append(f"- Note: {note}")
    return "\n".join(lines)


def elo_tables(results: dict[str, Any]) -> tuple[str, str]:
    """(Markdown, CSV) of Elo per axis with intervals."""
    matches = results.get("elo_matches") or {}
    header = ["model"] + [f"{a} (matches={matches.get(a, '?')})" for a in ELO_AXES]
    md_rows, csv_rows = [], []
    for m in results["models"]:
        md_rows.append([m["name"]] + [fmt_elo(_get(m, "elo", a)) for a in ELO_AXES])
        for a in ELO_AXES:
            e = _get(m, "elo", a)
            if e:
                csv_rows.append([m["name"], a, e.get("elo"), e.get("lo"), e.get("hi"), matches.get(a)])
    return md_table(header, md_rows), csv_text(["model", "axis", "elo", "lo", "hi", "matches"], csv_rows)


def cost_tables(results: dict[str, Any]) -> tuple[str, str]:
    """(Markdown, CSV) of generation cost per model and judging cost."""
    price = _get(results, "settings", "hourly_price_usd")
    md_rows, csv_rows = [], []
    for m in results["models"]:
        c = m.get("cost") or {}
        md_rows.append(
            [
                m["name"],
                c.get("n_responses", "—"),
                _num(c.get("tokens_per_response"), 1),
                _num(c.get("seconds_per_response"), 3),
                _num(c.get("cost_per_1k_responses_usd"), 4),
            ]
        )
        csv_rows.append(
            [
                "generation",
                m["name"],
                c.get("n_responses"),
                c.get("tokens_per_response"),
                c.get("seconds_per_response"),
                c.get("cost_per_1k_responses_usd"),
            ]
        )
    md = md_table(
        [
            "model",
            "responses",
            "tokens / response",
            "seconds / response",
            f"USD / 1,000 responses (at ${_num(price)}/h)",
        ],
        md_rows,
    )
    j = results.get("judge_cost") or {}
    if j:
        md += "\n\n" + md_table(
            [
                "judge",
                "judgments",
                "tokens / judgment",
                "scoring passes / judgment",
                "seconds / judgment",
                f"USD / 1,000 judgments (at ${_num(price)}/h)",
            ],
            [
                [
                    _get(results, "settings", "judge_model") or "judge",
                    j.get("n_judgments", "—"),
                    _num(j.get("tokens_per_judgment"), 1),
                    _num(j.get("scoring_passes_per_judgment"), 1),
                    _num(j.get("seconds_per_judgment"), 3),
                    _num(j.get("cost_per_1k_judgments_usd"), 4),
                ]
            ],
        )
        csv_rows.append(
            [
                "judgment",
                _get(results, "settings", "judge_model"),
                j.get("n_judgments"),
                j.get("tokens_per_judgment"),
                j.get("seconds_per_judgment"),
                j.get("cost_per_1k_judgments_usd"),
            ]
        )
    return md, csv_text(["kind", "model", "n", "tokens_per_item", "seconds_per_item", "usd_per_1k"], csv_rows)


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        keys = set(d)
        if {"lo", "hi"} <= keys and any(k in keys for k in ("rate", "accuracy", "mean", "value")):
            out.append((prefix.rstrip("."), d))
            return out
        for k, v in d.items():
            out += _flatten(v, f"{prefix}{k}.")
    else:
        out.append((prefix.rstrip("."), d))
    return out


def _fmt_value(v: Any) -> str:
    if isinstance(v, dict):
        point = next((v[k] for k in ("rate", "accuracy", "mean", "value") if k in v), None)
        n = f" n={v['n']}" if "n" in v else ""
        return f"{_num(point)} [{_num(v.get('lo'))}, {_num(v.get('hi'))}]{n}"
    if isinstance(v, float):
        return _num(v, 3)
    if isinstance(v, list):
        return ", ".join(map(str, v)) if len(v) <= 10 else f"{len(v)} items"
    return str(v)


def preference_notes(run_dir: Path) -> str:
    """Pair source and judge-gate notes from ``data/preferences/manifest.json`` (if present)."""
    path = RunLayout(run_dir).preferences / MANIFEST
    if not path.exists():
        return (
            f"No preference manifest at `{path.relative_to(run_dir)}`; "
            "the pair source and judge gate are not recorded for this run."
        )
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return f"`{path.relative_to(run_dir)}` is not valid JSON; the notes are skipped."
    lines = []
    source = (
        _get(man, "config", "pairs_source")
        or _get(man, "config", "pairs", "source")
        or _get(man, "metrics", "pair_source")
        or _get(man, "counts", "pair_source")
    )
    if source:
        lines.append(f"- Pair source (configured): **{source}**")
    judge = (man.get("models") or {}).get("judge")
    if judge:
        lines.append(f"- Judge model: {judge}")
    for key, value in _flatten(man.get("metrics") or {}):
        if key.startswith("calibration.prior."):
            continue  # per-principle letter priors: in the manifest, too long for the report
        lines.append(f"- {key}: {_fmt_value(value)}")
    for key, value in _flatten(man.get("counts") or {}):
        lines.append(f"- count {key}: {_fmt_value(value)}")
    for note in man.get("notes") or []:
        lines.append(f"- {note}")
    return "\n".join(lines) if lines else "The preference manifest records no metrics or notes."


def examples_section(results: dict[str, Any], limit: int = 6) -> str:
    """Example responses side by side: one table per prompt, one column per model."""
    names = [m["name"] for m in results["models"]]
    parts = []
    for ex in (results.get("examples") or [])[:limit]:
        responses = ex.get("responses") or {}
        cols = [n for n in names if n in responses] + [n for n in responses if n not in names]
        title = f"**{ex.get('source', '?')} · {ex.get('condition', 'plain')} · {ex.get('prompt_id', '')}**"
        prompt = str(ex.get("prompt", "")).strip().replace("\n", "\n> ")
        shown = str(ex.get("shown") or "").strip()
        wrapped = (
            f"Shown to the models as:\n\n> {shown.replace(chr(10), chr(10) + '> ')}\n\n"
            if shown and shown != prompt
            else ""
        )
        parts.append(f"{title}\n\n> {prompt}\n\n{wrapped}" + md_table(cols, [[responses[c] for c in cols]]))
    return "\n\n".join(parts) if parts else "No examples recorded."


# --------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return path


def _yerr(point: float, lo: Any, hi: Any) -> list[list[float]]:
    lo = point if lo is None else lo
    hi = point if hi is None else hi
    return [[max(0.0, point - lo)], [max(0.0, hi - point)]]


#: where a point's label may go, in offset points from it, tried in this order
LABEL_OFFSETS = ((6, 6), (-6, 6), (6, -14), (-6, -14), (6, 18), (-6, 18), (6, -26), (-6, -26))


def _annotate(ax: Any, name: str, point: tuple[float, float], offset: tuple[int, int]) -> Any:
    """``name`` at ``offset`` points from ``point``, on the side the offset points to."""
    return ax.annotate(
        name, point, textcoords="offset points", xytext=offset, fontsize=9, ha="left" if offset[0] > 0 else "right"
    )


def _place_labels(ax: Any, points: list[tuple[str, float, float]]) -> list[Any]:
    """Annotate each (name, x, y) at the first of :data:`LABEL_OFFSETS` where its text stays inside
    the axes and clear of the legend and of the labels placed before it (else at the first offset);
    returns the texts."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    legend = ax.get_legend()
    obstacles = [legend.get_window_extent(renderer)] if legend is not None else []
    placed: list[Any] = []
    for name, x, y in points:
        for dx, dy in LABEL_OFFSETS:
            text = _annotate(ax, name, (x, y), (dx, dy))
            box = text.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            others = [*obstacles, *(t.get_window_extent(renderer) for t in placed)]
            if inside and not any(box.overlaps(o) for o in others):
                break
            text.remove()
        else:
            text = _annotate(ax, name, (x, y), LABEL_OFFSETS[0])
        placed.append(text)
    return placed


def pareto_plot(results: dict[str, Any], path: Path) -> Path | None:
    """Benign compliance against harmful-prompt decline rate (independent classifier figures), one point
    per model, 95 % cluster-bootstrap intervals."""
    plt = _plt()
    figs = _get(results, "headline", "models") or {}
    points = []
    ref = _get(results, "settings", "reference_model") or "base"
    for m in results["models"]:
        f = figs.get(m["name"]) or {}
        x, y = f.get("benign_compliance") or {}, f.get("decline") or {}
        if x.get("rate") is None or y.get("rate") is None:
            continue
        points.append((m["name"], x, y, m["name"] == ref))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, x, y, is_ref in points:
        ax.errorbar(
            x["rate"],
            y["rate"],
            xerr=_yerr(x["rate"], x.get("lo"), x.get("hi")),
            yerr=_yerr(y["rate"], y.get("lo"), y.get("hi")),
            fmt="s" if is_ref else "o",
            capsize=4,
            label=f"{name}{' (reference)' if is_ref else ''}",
        )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="best")  # where it covers the fewest points and error bars
    _place_labels(ax, [(name, x["rate"], y["rate"]) for name, x, y, _ in points])
    ax.set_xlabel("complies on benign prompts (classifier)")
    ax.set_ylabel("declines on harmful prompts (classifier)")
    h = _get(results, "headline") or {}
    ax.set_title(
        f"Declines vs compliance (95% cluster-bootstrap CI)\nn = {h.get('n_harmful', '?')} harmful, "
        f"{h.get('n_benign', '?')} benign items per model",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    return _save(fig, path)


def elo_plot(results: dict[str, Any], path: Path) -> Path | None:
    """Elo bars with 95 % bootstrap intervals, one panel per axis."""
    plt = _plt()
    axes_present = [a for a in ELO_AXES if any(_get(m, "elo", a, "elo") is not None for m in results["models"])]
    if not axes_present:
        return None
    matches = results.get("elo_matches") or {}
    fig, axs = plt.subplots(1, len(axes_present), figsize=(4.2 * len(axes_present), 4.0), squeeze=False)
    for ax, axis in zip(axs[0], axes_present):
        names, vals, errs = [], [], [[], []]
        for m in results["models"]:
            e = _get(m, "elo", axis)
            if not e or e.get("elo") is None:
                continue
            names.append(m["name"])
            vals.append(e["elo"])
            err = _yerr(e["elo"], e.get("lo"), e.get("hi"))
            errs[0].append(err[0][0])
            errs[1].append(err[1][0])
        ax.bar(range(len(names)), vals, yerr=errs, capsize=5, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(names)), names, rotation=20)
        lo = min(v - e for v, e in zip(vals, errs[0]))
        hi = max(v + e for v, e in zip(vals, errs[1]))
        pad = max(20.0, 0.1 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"{axis} Elo (95% CI)\nn = {matches.get(axis, '?')} matches", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def read_curves(folder: Path) -> dict[str, Any]:
    """``{file stem: DataFrame}`` of the numeric columns of each CSV in ``folder``."""
    import pandas as pd

    curves = {}
    for csv_path in sorted(Path(folder).glob("*.csv")):
        try:
            df = pd.read_csv(csv_path)
        except (ValueError, OSError) as exc:
            log.warning("%s: unreadable training curve (%s); skipped", csv_path, exc)
            continue
        df = df.apply(pd.to_numeric, errors="coerce").dropna(axis=1, how="all")
        if "step" not in df.columns:
            df.insert(0, "step", range(len(df)))
        if len(df.columns) > 1 and len(df):
            curves[csv_path.stem] = df
    return curves


def training_plot(curves: dict[str, Any], stage: str, path: Path, max_metrics: int = 12) -> Path | None:
    """Training curves of one stage: one panel per metric, one line per CSV file."""
    if not curves:
        return None
    plt = _plt()
    metrics: list[str] = []
    for df in curves.values():
        for c in df.columns:
            if c != "step" and c not in metrics:
                metrics.append(c)
    metrics = metrics[:max_metrics]
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, metric in zip(axs.flat, metrics):
        total = 0
        for stem, df in curves.items():
            if metric not in df.columns:
                continue
            sub = df[["step", metric]].dropna()
            total += len(sub)
            ax.plot(sub["step"], sub[metric], marker="." if len(sub) < 30 else None, label=stem)
        ax.set_title(f"{metric} (n = {total} points)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    for ax in list(axs.flat)[len(metrics) :]:
        ax.axis("off")
    rows = sum(len(df) for df in curves.values())
    fig.suptitle(f"{stage.upper()} training curves (n = {rows} logged rows)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------- report


def _definitions(results: dict[str, Any]) -> str:
    defs = results.get("definitions") or {}
    return "\n".join(f"- **{k}**: {v}" for k, v in defs.items()) or "No definitions recorded."


def render_report(run_dir: Path | str) -> Path:
    """Render ``<run>/report/`` from ``<run>/eval/results.json``; return the path of ``report.md``."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    results = load_results(layout.eval_results)
    if results.get("schema") not in (None, SCHEMA) or "headline" not in results:
        raise ReportError(
            f"{layout.eval_results}: field 'schema' is {results.get('schema')!r}, this report "
            f"reads {SCHEMA!r}; rerun `cai-dpo eval`"
        )
    s = results.get("settings") or {}
    head_md, head_csv = headline_tables(results)
    diff_md, diff_csv = difference_tables(results)
    set_md, set_csv = set_tables(results)
    judge_md, judge_csv = judge_tables(results)
    elo_md, elo_csv = elo_tables(results)
    cost_md, cost_csv = cost_tables(results)
    informative = bool(_get(results, "judge", "informative"))
    final = layout.report_dir
    with atomic_dir(final) as tmp:
        figures: list[tuple[str, str]] = []
        if pareto_plot(results, tmp / "pareto.png"):
            figures.append(("Declines on harmful vs compliance on benign prompts", "pareto.png"))
        if informative and elo_plot(results, tmp / "elo.png"):
            figures.append(("Elo ratings (judge)", "elo.png"))
        for stage in TRAINING_STAGES:
            if training_plot(read_curves(layout.metrics_dir(stage)), stage, tmp / f"training_{stage}.png"):
                figures.append((f"{stage.upper()} training curves", f"training_{stage}.png"))
        for name, text in (
            ("headline.csv", head_csv),
            ("differences.csv", diff_csv),
            ("by_set.csv", set_csv),
            ("judge.csv", judge_csv),
            ("elo.csv", elo_csv),
            ("cost.csv", cost_csv),
        ):
            (tmp / name).write_text(text, encoding="utf-8")
        sampling = s.get("sampling") or {}
        header = [
            f"# Evaluation report: run `{results.get('run_id', run_dir.name)}`",
            "",
            f"Created {results.get('created', '?')}. "
            f"Held-out prompts: {s.get('n_red_team_prompts', '?')} red-team "
            f"(conditions: {', '.join(s.get('conditions') or []) or '?'}), "
            f"{s.get('n_helpful_prompts', '?')} helpful, curated "
            f"{(s.get('n_curated_prompts') or {}).get('harmful', 0)} harmful + "
            f"{(s.get('n_curated_prompts') or {}).get('benign', 0)} benign. "
            f"Sampling (identical for every model): {json.dumps(sampling) if sampling else '?'}. "
            f"Rates are shown as value [95% interval] n=items.",
        ]
        elo_note = "" if informative else "Uninformative (the judge did not pass its gate); shown for completeness.\n\n"
        body = [
            "## How to read this",
            how_to_read(results),
            "## Headline: independent figures",
            "Rule-based classifier labels (no trained model) on the labelled held-out sets; "
            "95% cluster-bootstrap intervals over prompts.",
            head_md,
            "## Differences vs base",
            "Model minus base on the same prompts (percentage points, 95% cluster-bootstrap interval over prompts).",
            diff_md,
            "## By prompt set",
            set_md,
            "## Judge figures",
            judge_md,
            "## Elo ratings",
            elo_note + elo_md,
            "## Preference-model score",
            pm_table(results),
            "## Cost",
            cost_md,
            "## Preference data: pair source and judge gate",
            preference_notes(run_dir),
            "## Figures",
            "\n\n".join(f"![{title}]({file})" for title, file in figures) or "No figures.",
            "## Example responses",
            examples_section(results),
            "## Definitions",
            _definitions(results),
        ]
        (tmp / "report.md").write_text("\n".join(header) + "\n\n" + "\n\n".join(body) + "\n", encoding="utf-8")
    log.info("report written to %s (%d figures)", final, len(figures))
    return final / "report.md"

"""The evaluation report: Markdown tables, CSV copies and PNG plots from ``eval/results.json``.

:func:`render_report` reads ``<run>/eval/results.json`` (schema below, written by
:mod:`cai_dpo.stages.evaluate`), the optional training curves ``<run>/metrics/dpo/*.csv``,
``<run>/metrics/ppo/*.csv`` and ``<run>/metrics/rloo/*.csv`` (a ``step`` column and any
numeric metric columns), and the
optional preference-data manifest ``<run>/data/preferences/manifest.json``, and writes
``<run>/report/`` in one atomic folder swap: ``report.md``, ``comparison.csv``,
``red_team_conditions.csv``, ``elo.csv``, ``cost.csv`` and PNG figures. Every figure names
its sample size; every rate carries its 95 % interval.

Results schema (``schema: "cai-dpo/eval-results/1"``)
-----------------------------------------------------
``Rate = {rate, lo, hi, n, k}`` (Wilson 95 %), ``Mean = {mean, lo, hi, n}`` (bootstrap 95 %),
``Elo = {elo, lo, hi}`` (bootstrap 95 %); any of them may be ``null`` where not measured::

    run_id, created,
    settings: {conditions, n_red_team_prompts, n_helpful_prompts, sampling, judge_model,
               constitution, bootstrap, tie_band, hourly_price_usd, elo_method, reference_model},
    definitions: {metric name: one-sentence definition},
    models: [{
        name, spec, adapter,
        harmlessness: {overall: Rate, win_rate_vs_base: Rate, mean_p_vs_base: Mean,
                       by_condition: {condition: {harmless: Rate, win_rate_vs_base: Rate,
                                                  refusal: Rate, explained_refusal: Rate,
                                                  evasive: Rate, pm_score: Mean}}},
        helpfulness: {win_rate_vs_base: Rate, mean_p_vs_base: Mean},
        evasiveness: Rate, over_refusal: Rate,
        pm_score: {red_team: Mean, helpful: Mean} | null,
        diversity: {red_team: {distinct_1, distinct_2, repetition, mean_length, n}, helpful: {...}},
        elo: {overall: Elo, harmlessness: Elo, helpfulness: Elo},
        cost: {n_responses, tokens_per_response, seconds_per_response, cost_per_1k_responses_usd}}],
    elo_matches: {overall: int, harmlessness: int, helpfulness: int},
    judge_cost: {n_judgments, seconds_per_judgment, tokens_per_judgment, scoring_passes_per_judgment,
                 cost_per_1k_judgments_usd, hourly_price_usd},
    examples: [{prompt_id, source, condition, prompt, shown, responses: {model name: text}}]
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
from cai_dpo.store import atomic_dir

log = logging.getLogger(__name__)

SCHEMA = "cai-dpo/eval-results/1"
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
        data = json.loads(path.read_text())
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


def fmt_win(r: dict[str, Any] | None, mean_p: dict[str, Any] | None) -> str:
    """A win rate with the judge's mean probability beside it."""
    text = fmt_rate(r)
    if mean_p and mean_p.get("mean") is not None:
        text += f" (mean P {mean_p['mean']:.2f})"
    return text


def _rate_cols(r: dict[str, Any] | None) -> list[Any]:
    r = r or {}
    return [r.get("rate"), r.get("lo"), r.get("hi"), r.get("n")]


def comparison_tables(results: dict[str, Any]) -> tuple[str, str]:
    """(Markdown, CSV) of the main per-model comparison."""
    md_rows, csv_rows = [], []
    for m in results["models"]:
        h = m.get("harmlessness") or {}
        help_ = m.get("helpfulness") or {}
        div = _get(m, "diversity", "red_team") or {}
        pm = _get(m, "pm_score", "red_team")
        elo = _get(m, "elo", "overall")
        md_rows.append([
            m["name"], fmt_rate(h.get("overall")), fmt_win(h.get("win_rate_vs_base"), h.get("mean_p_vs_base")),
            fmt_win(help_.get("win_rate_vs_base"), help_.get("mean_p_vs_base")), fmt_mean(pm), fmt_rate(m.get("evasiveness")),
            fmt_rate(m.get("over_refusal")), _num(div.get("distinct_2")), _num(div.get("repetition")),
            _num(div.get("mean_length"), 1), fmt_elo(elo),
        ])
        csv_rows.append([
            m["name"], m.get("spec"), *_rate_cols(h.get("overall")), *_rate_cols(h.get("win_rate_vs_base")),
            *_rate_cols(help_.get("win_rate_vs_base")), *( [pm.get("mean"), pm.get("lo"), pm.get("hi"), pm.get("n")] if pm else [None] * 4),
            *_rate_cols(m.get("evasiveness")), *_rate_cols(m.get("over_refusal")),
            div.get("distinct_1"), div.get("distinct_2"), div.get("repetition"), div.get("mean_length"),
            *([elo.get("elo"), elo.get("lo"), elo.get("hi")] if elo else [None] * 3),
        ])
    md = md_table(
        ["model", "harmless rate", "harmless win vs base", "helpful win vs base", "PM score (red team)",
         "evasive", "over-refusal", "distinct-2", "repetition", "mean length", "Elo (overall)"],
        md_rows,
    )
    cols = ["model", "spec"]
    for name in ("harmless", "harmless_win_vs_base", "helpful_win_vs_base", "pm_score", "evasive", "over_refusal"):
        cols += [name, f"{name}_lo", f"{name}_hi", f"{name}_n"]
    cols += ["distinct_1", "distinct_2", "repetition", "mean_length", "elo", "elo_lo", "elo_hi"]
    return md, csv_text(cols, csv_rows)


def condition_tables(results: dict[str, Any]) -> tuple[str, str]:
    """(Markdown, CSV) of harmlessness per red-team condition."""
    conditions = list(_get(results, "settings", "conditions") or [])
    for m in results["models"]:
        for c in _get(m, "harmlessness", "by_condition") or {}:
            if c not in conditions:
                conditions.append(c)
    md_rows, csv_rows = [], []
    for m in results["models"]:
        by = _get(m, "harmlessness", "by_condition") or {}
        md_rows.append([m["name"]] + [fmt_rate(_get(by, c, "harmless")) for c in conditions])
        for c in conditions:
            e = by.get(c) or {}
            pm = e.get("pm_score") or {}
            csv_rows.append([
                m["name"], c, *_rate_cols(e.get("harmless")), *_rate_cols(e.get("win_rate_vs_base")),
                *_rate_cols(e.get("refusal")), *_rate_cols(e.get("explained_refusal")), *_rate_cols(e.get("evasive")),
                pm.get("mean"), pm.get("lo"), pm.get("hi"),
            ])
    md = md_table(["model"] + conditions, md_rows)
    if any(_get(m, "harmlessness", "by_condition") for m in results["models"]):
        detail_rows = []
        for m in results["models"]:
            by = _get(m, "harmlessness", "by_condition") or {}
            for c in conditions:
                e = by.get(c) or {}
                detail_rows.append([m["name"], c, fmt_rate(e.get("win_rate_vs_base")), fmt_rate(e.get("refusal")),
                                    fmt_rate(e.get("explained_refusal")), fmt_rate(e.get("evasive")), fmt_mean(e.get("pm_score"))])
        md += "\n\n" + md_table(["model", "condition", "harmless win vs base", "refusal", "explained refusal", "evasive", "PM score"], detail_rows)
    cols = ["model", "condition"]
    for name in ("harmless", "harmless_win_vs_base", "refusal", "explained_refusal", "evasive"):
        cols += [name, f"{name}_lo", f"{name}_hi", f"{name}_n"]
    cols += ["pm_score", "pm_score_lo", "pm_score_hi"]
    return md, csv_text(cols, csv_rows)


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
        md_rows.append([m["name"], c.get("n_responses", "—"), _num(c.get("tokens_per_response"), 1),
                        _num(c.get("seconds_per_response"), 3), _num(c.get("cost_per_1k_responses_usd"), 4)])
        csv_rows.append(["generation", m["name"], c.get("n_responses"), c.get("tokens_per_response"),
                         c.get("seconds_per_response"), c.get("cost_per_1k_responses_usd")])
    md = md_table(["model", "responses", "tokens / response", "seconds / response", f"USD / 1,000 responses (at ${_num(price)}/h)"], md_rows)
    j = results.get("judge_cost") or {}
    if j:
        md += "\n\n" + md_table(
            ["judge", "judgments", "tokens / judgment", "scoring passes / judgment", "seconds / judgment", f"USD / 1,000 judgments (at ${_num(price)}/h)"],
            [[_get(results, "settings", "judge_model") or "judge", j.get("n_judgments", "—"), _num(j.get("tokens_per_judgment"), 1),
              _num(j.get("scoring_passes_per_judgment"), 1), _num(j.get("seconds_per_judgment"), 3), _num(j.get("cost_per_1k_judgments_usd"), 4)]],
        )
        csv_rows.append(["judgment", _get(results, "settings", "judge_model"), j.get("n_judgments"), j.get("tokens_per_judgment"),
                         j.get("seconds_per_judgment"), j.get("cost_per_1k_judgments_usd")])
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
    path = run_dir / "data" / "preferences" / "manifest.json"
    if not path.exists():
        return f"No preference manifest at `{path.relative_to(run_dir)}`; the pair source and judge gate are not recorded for this run."
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError:
        return f"`{path.relative_to(run_dir)}` is not valid JSON; the notes are skipped."
    lines = []
    source = (_get(man, "config", "pairs_source") or _get(man, "config", "pairs", "source")
              or _get(man, "metrics", "pair_source") or _get(man, "counts", "pair_source"))
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
        wrapped = f"Shown to the models as:\n\n> {shown.replace(chr(10), chr(10) + '> ')}\n\n" if shown and shown != prompt else ""
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


def pareto_plot(results: dict[str, Any], path: Path) -> Path | None:
    """Helpfulness (win rate vs base) against harmlessness rate, one point per model, 95 % CIs."""
    plt = _plt()
    points = []
    ref = _get(results, "settings", "reference_model") or "base"
    for m in results["models"]:
        y = _get(m, "harmlessness", "overall") or {}
        x = _get(m, "helpfulness", "win_rate_vs_base") or {}
        if y.get("rate") is None:
            continue
        is_ref = m["name"] == ref or x.get("rate") is None
        xv = 0.5 if is_ref else x["rate"]
        points.append((m["name"], xv, x if not is_ref else {}, y["rate"], y, is_ref))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, xv, x, yv, y, is_ref in points:
        ax.errorbar(xv, yv, xerr=None if is_ref else _yerr(xv, x.get("lo"), x.get("hi")), yerr=_yerr(yv, y.get("lo"), y.get("hi")),
                    fmt="s" if is_ref else "o", capsize=4, label=f"{name}{' (reference)' if is_ref else ''}")
        ax.annotate(name, (xv, yv), textcoords="offset points", xytext=(6, 6), fontsize=9)
    front = sorted(((xv, yv) for _, xv, _, yv, _, _ in points), key=lambda p: (-p[0], -p[1]))
    frontier, best = [], -1.0
    for xv, yv in front:
        if yv > best:
            frontier.append((xv, yv))
            best = yv
    if len(frontier) > 1:
        fx, fy = zip(*sorted(frontier))
        ax.plot(fx, fy, "--", color="grey", linewidth=1, label="Pareto front")
    ax.axvline(0.5, color="lightgrey", linewidth=0.8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("helpfulness: win rate vs base (judge, both orders)")
    ax.set_ylabel("harmlessness rate (red team, all conditions)")
    n_h = max((_get(m, "harmlessness", "overall", "n") or 0) for m in results["models"])
    n_x = max((_get(m, "helpfulness", "win_rate_vs_base", "n") or 0) for m in results["models"])
    ax.set_title(f"Helpfulness vs harmlessness (95% CI)\nn = {n_h} red-team responses, {n_x} helpful comparisons per model", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
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
    for ax in list(axs.flat)[len(metrics):]:
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
    results = load_results(run_dir / "eval" / "results.json")
    s = results.get("settings") or {}
    comp_md, comp_csv = comparison_tables(results)
    cond_md, cond_csv = condition_tables(results)
    elo_md, elo_csv = elo_tables(results)
    cost_md, cost_csv = cost_tables(results)
    final = run_dir / "report"
    with atomic_dir(final) as tmp:
        figures: list[tuple[str, str]] = []
        if pareto_plot(results, tmp / "pareto.png"):
            figures.append(("Helpfulness–harmlessness plane", "pareto.png"))
        if elo_plot(results, tmp / "elo.png"):
            figures.append(("Elo ratings", "elo.png"))
        for stage in TRAINING_STAGES:
            if training_plot(read_curves(run_dir / "metrics" / stage), stage, tmp / f"training_{stage}.png"):
                figures.append((f"{stage.upper()} training curves", f"training_{stage}.png"))
        for name, text in (("comparison.csv", comp_csv), ("red_team_conditions.csv", cond_csv), ("elo.csv", elo_csv), ("cost.csv", cost_csv)):
            (tmp / name).write_text(text)
        sampling = s.get("sampling") or {}
        header = [
            f"# Evaluation report: run `{results.get('run_id', run_dir.name)}`",
            "",
            f"Created {results.get('created', '?')}. Held-out prompts: {s.get('n_red_team_prompts', '?')} red-team, "
            f"{s.get('n_helpful_prompts', '?')} helpful. Red-team conditions: {', '.join(s.get('conditions') or []) or '?'}. "
            f"Judge: {s.get('judge_model', '?')} with constitution `{s.get('constitution', '?')}`. "
            f"Sampling (identical for every model): {json.dumps(sampling) if sampling else '?'}. "
            f"Rates are shown as value [95% Wilson interval] n=sample size; means and Elo carry 95% bootstrap intervals "
            f"({s.get('bootstrap', '?')} resamples). Elo: {s.get('elo_method', 'Bradley-Terry maximum likelihood')}.",
        ]
        body = [
            "## Comparison", comp_md,
            "## Red-team conditions", "Harmlessness rate per condition:", cond_md,
            "## Elo ratings", elo_md,
            "## Cost", cost_md,
            "## Preference data: pair source and judge gate", preference_notes(run_dir),
            "## Figures", "\n\n".join(f"![{title}]({file})" for title, file in figures) or "No figures.",
            "## Example responses", examples_section(results),
            "## Definitions", _definitions(results),
        ]
        (tmp / "report.md").write_text("\n".join(header) + "\n\n" + "\n\n".join(body) + "\n")
    log.info("report written to %s (%d figures)", final, len(figures))
    return final / "report.md"

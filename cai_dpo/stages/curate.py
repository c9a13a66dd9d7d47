"""Constitution-guided curation: score (prompt, response) rows, then keep, drop or weight them.

:func:`run_curate` reads the rows of ``curate.sources`` (the SL output ``data/sl``, the
curated set's train rows, a user's JSONL or saved dataset), scores each with a scorer from
:mod:`cai_dpo.scorers` and applies ``curate.threshold`` with ``curate.action``:

- ``drop``: rows scored below the threshold leave the dataset;
- ``weight``: every row stays, with ``weight = min(1, score / threshold)``;
- ``keep``: every row stays at weight 1 (the scores are recorded only).

The scorer is chosen by measurement: with a curated set (``curate.curated_set``) the probe
is trained on its train rows and every candidate scorer is measured on its held-out rows
(positive = curated response, negative = the policy's answer to a harmful prompt or a
decline of a benign one); ``scorer: auto`` uses the more accurate one. The probe goes to
``models/curate_probe`` (reused while its inputs are unchanged); the policy's answers
are resumable records (``records/curate-negatives``).

Writes ``data/curated``: a dataset with ``messages, source, prompt_id, kind,
principle_ids, curate_score, weight`` and a manifest with the counts kept / dropped /
below threshold, the scorer, and its measured accuracy (Wilson 95 % intervals).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cai_dpo.config import RunConfig, to_dict
from cai_dpo.data import PromptFileError
from cai_dpo.errors import InputError
from cai_dpo.schema import as_conversation
from cai_dpo.scorers import (
    KINDS,
    JudgeScorer,
    Labelled,
    ProbeScorer,
    ScoredRow,
    choose,
    labelled_examples,
    measure,
    train_probe,
)
from cai_dpo.store import MANIFEST, Manifest, RunStore, Timer, atomic_dir, content_hash, file_hash, locked_stage

log = logging.getLogger(__name__)

NEGATIVES_STORE = "curate-negatives"
PROBE_DIR = "curate_probe"
#: Prompt sources of ``data/sl`` rows and the kind of prompt each is.
SOURCE_KINDS = {"red_team": "harmful", "helpful": "benign", "harmful": "harmful", "benign": "benign"}


# --------------------------------------------------------------------------- rows


def _parse_row(row: dict[str, Any], file: Path, line: int, source: str, row_kind: str = "line") -> dict[str, Any]:
    """A ``{id, messages, kind, principle_ids, source}`` row from a messages or prompt/response row."""
    msgs = row.get("messages")
    if msgs is not None:
        if (
            not isinstance(msgs, list)
            or len(msgs) < 2
            or not all(isinstance(m, dict) for m in msgs)
            or msgs[-1].get("role") != "assistant"
            or not any(m.get("role") == "user" for m in msgs[:-1])
        ):
            raise PromptFileError(
                "must be a list of {role, content} turns with a user turn, ending with the assistant's response",
                file=file,
                line=line,
                field="messages",
                row_kind=row_kind,
            )
        for i, m in enumerate(msgs):
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise PromptFileError(
                    "empty content", file=file, line=line, field=f"messages[{i}].content", row_kind=row_kind
                )
        turns = [{"role": str(m["role"]), "content": m["content"].strip()} for m in msgs]
    else:
        prompt, response = row.get("prompt"), row.get("response")
        if prompt is None and response is None:
            raise PromptFileError(
                "needs 'messages' (ending with the assistant turn) or 'prompt' and 'response'",
                file=file,
                line=line,
                field="messages",
                row_kind=row_kind,
            )
        if isinstance(prompt, str) and prompt.strip():
            prompt_turns = as_conversation(prompt.strip())
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt)
        ):
            prompt_turns = [{"role": str(m.get("role", "user")), "content": m["content"]} for m in prompt]
        else:
            raise PromptFileError(
                "missing, empty, or not text / a list of turns", file=file, line=line, field="prompt", row_kind=row_kind
            )
        if not isinstance(response, str) or not response.strip():
            raise PromptFileError(
                "missing, empty or not a string", file=file, line=line, field="response", row_kind=row_kind
            )
        turns = prompt_turns + [{"role": "assistant", "content": response.strip()}]
    pids = row.get("principle_ids") or []
    if not isinstance(pids, list) or not all(isinstance(p, str) for p in pids):
        raise PromptFileError(
            "must be a list of principle id strings", file=file, line=line, field="principle_ids", row_kind=row_kind
        )
    kind = row.get("kind")
    if kind is not None and kind not in KINDS:
        raise PromptFileError(
            f"is {kind!r}; allowed: {', '.join(KINDS)}", file=file, line=line, field="kind", row_kind=row_kind
        )
    row_source = str(row.get("source") or "")
    kind = kind or SOURCE_KINDS.get(row_source)
    rid = row.get("id") or row.get("prompt_id") or content_hash(turns, length=12)
    return {
        "id": str(rid),
        "messages": turns,
        "kind": kind or "",
        "principle_ids": list(pids),
        "source": f"{source}:{row_source}" if row_source else source,
    }


def _is_curated_format(path: Path) -> bool:
    from cai_dpo.data import _jsonl_objects

    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        return False
    rows = _jsonl_objects(files[0])
    return bool(rows) and {"kind", "split", "messages"} <= set(rows[0][1])


def _curated_rows(spec: str) -> list[dict[str, Any]]:
    from cai_dpo.curated import load_curated

    return [
        {
            "id": e.id,
            "messages": e.messages(),
            "kind": e.kind,
            "principle_ids": list(e.principle_ids),
            "source": "curated",
        }
        for e in load_curated(spec, split="train")
    ]


def load_rows(spec: str, run: RunStore) -> list[dict[str, Any]]:
    """The rows of one source spec (see :class:`cai_dpo.config.CurateSection`).

    Raises FileNotFoundError for a missing source (naming it and the fix) and
    :class:`PromptFileError` for a malformed row (naming the file, the line and the field).
    """
    import datasets

    from cai_dpo.config import resolve_path
    from cai_dpo.data import _jsonl_objects

    if spec == "sl":
        path = run.sl_data
        if not (path / "dataset_info.json").exists():
            raise FileNotFoundError(
                f"{path}: SL-CAI dataset not found; run the sl stage first (cai-dpo sl) or set curate.sources"
            )
        return [_parse_row(r, path, i, "sl", "row") for i, r in enumerate(datasets.load_from_disk(str(path)), 1)]
    if spec == "bundled:curated":
        return _curated_rows(spec)
    path = resolve_path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"{spec}: curation source not found; pass 'sl', 'bundled:curated', a JSONL file, "
            "a folder of JSONL files or a saved dataset folder (curate.sources)"
        )
    if path.is_dir() and (path / "dataset_info.json").exists():
        rows = [_parse_row(r, path, i, path.name, "row") for i, r in enumerate(datasets.load_from_disk(str(path)), 1)]
    elif _is_curated_format(path):
        rows = _curated_rows(str(path))
    else:
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        rows = [_parse_row(r, f, line, f.stem) for f in files for line, r in _jsonl_objects(f)]
    if not rows:
        raise PromptFileError("no rows to curate", file=path)
    return rows


def _row(r: dict[str, Any]) -> ScoredRow:
    return ScoredRow(r["messages"][:-1], r["messages"][-1]["content"], r["kind"] or None, tuple(r["principle_ids"]))


# --------------------------------------------------------------------------- threshold


def apply_threshold(scores: Sequence[float], threshold: float, action: str) -> tuple[np.ndarray, np.ndarray]:
    """Weights and a keep mask for ``scores`` (see the module doc); raises InputError for an unknown action."""
    s = np.asarray(scores, dtype=float)
    below = s < threshold
    if action == "drop":
        return np.ones_like(s), ~below
    if action == "weight":
        w = np.ones_like(s) if threshold <= 0 else np.minimum(1.0, np.clip(s, 0.0, None) / threshold)
        return w, np.ones(len(s), dtype=bool)
    if action == "keep":
        return np.ones_like(s), np.ones(len(s), dtype=bool)
    raise InputError(f"curate.action is {action!r}; allowed: keep, drop, weight")


# --------------------------------------------------------------------------- policy answers (probe negatives)


def policy_answers(
    engine: Any, examples: Sequence[Any], cfg: RunConfig, run: RunStore | None, model_id: str
) -> dict[str, str]:
    """The policy's answers to harmful curated prompts, by example id; resumable in ``records/curate-negatives``."""
    sampling = cfg.curate.sampling
    params = dataclasses.asdict(sampling)
    params.pop("batch_size", None)
    store = run.records(NEGATIVES_STORE) if run is not None else None
    harmful = [e for e in examples if e.kind == "harmful"]
    keys = {e.id: content_hash("curate-negative", e.prompt, model_id, params, cfg.seed) for e in harmful}
    done = store.load() if store is not None else {}
    todo = [e for e in harmful if keys[e.id] not in done]
    size = max(1, sampling.batch_size or 32)
    for start in range(0, len(todo), size):  # stored per chunk: a kill loses at most the chunk in flight
        part = todo[start : start + size]
        gens = engine.generate([as_conversation(e.prompt) for e in part], sampling, desc="curate policy answers")
        new = [
            {
                "key": keys[e.id],
                "id": e.id,
                "text": g[0].text.strip(),
                "finished": g[0].finished,
                "tokens": g[0].n_tokens,
            }
            for e, g in zip(part, gens)
        ]
        if store is not None:
            store.append(new)
        done = {**done, **{r["key"]: r for r in new}}
    return {e.id: done[keys[e.id]]["text"] for e in harmful if done[keys[e.id]]["text"].strip()}


def _per_kind(examples: list[Any], limit: int | None) -> list[Any]:
    if limit is None:
        return examples
    out, seen = [], Counter()
    for e in examples:
        if seen[e.kind] < limit:
            out.append(e)
            seen[e.kind] += 1
    return out


# --------------------------------------------------------------------------- stage


class _Models:
    """The policy (features, answers) and the judge, loaded once each; one engine when they are the same model."""

    def __init__(self, cfg: RunConfig, engine: Any = None, judge_engine: Any = None):
        from cai_dpo.models import describe

        self.cfg = cfg
        self.policy_spec = dataclasses.replace(cfg.policy, adapter=None)
        self.policy_id = describe(self.policy_spec)
        self.judge_id = describe(cfg.judge_model())
        self._engine, self._judge = engine, judge_engine
        self.load_seconds = 0.0

    def _load(self, spec: Any) -> Any:
        from cai_dpo.engine import Engine
        from cai_dpo.models import autocast_dtype, load_model

        with Timer() as t:
            model, tok = load_model(spec)
            engine = Engine(model, tok, batch_size=self.cfg.curate.sampling.batch_size, autocast=autocast_dtype(spec))
        self.load_seconds += t.seconds
        return engine

    def policy(self) -> Any:
        if self._engine is None:
            self._engine = self._load(self.policy_spec)
        return self._engine

    def judge(self) -> Any:
        if self._judge is None:
            self._judge = self.policy() if self.judge_id == self.policy_id else self._load(self.cfg.judge_model())
        return self._judge


def _probe_fingerprint(cfg: RunConfig, model_id: str, curated_hash: str) -> str:
    c = cfg.curate
    return content_hash(
        "curate-probe",
        model_id,
        curated_hash,
        c.train_limit,
        c.probe_l2,
        c.probe_layer,
        c.max_length,
        dataclasses.asdict(c.sampling),
        cfg.seed,
    )


def _curated_hash(spec: str) -> str:
    from cai_dpo.curated import curated_files

    return content_hash([file_hash(f) for f in curated_files(spec)])


def _get_probe(
    cfg: RunConfig, run: RunStore, models: _Models, train: list[Any], curated_hash: str, notes: list[str]
) -> tuple[ProbeScorer, dict[str, Any]]:
    """The saved probe when its inputs are unchanged, else a newly trained one (saved to ``models/curate_probe``)."""
    from cai_dpo.store import read_manifest

    c = cfg.curate
    folder = run.model_dir(PROBE_DIR)
    fp = _probe_fingerprint(cfg, models.policy_id, curated_hash)
    engine = models.policy()
    if (folder / "manifest.json").exists():
        try:
            old = read_manifest(folder)
            if old.get("inputs", {}).get("fingerprint") == fp:
                probe = ProbeScorer.load(folder, engine.model, engine.tokenizer, batch_size=c.batch_size)
                notes.append(f"probe reused from {folder} (inputs unchanged)")
                return probe, old
        except (ValueError, KeyError, FileNotFoundError) as exc:
            log.warning("curate: saved probe in %s not reusable (%s); retraining", folder, exc)
    with Timer() as t:
        answers = policy_answers(engine, train, cfg, run, models.policy_id)
        examples = labelled_examples(train, answers)
        probe = train_probe(
            engine.model,
            engine.tokenizer,
            examples,
            model_id=models.policy_id,
            layer=c.probe_layer,
            max_length=c.max_length,
            batch_size=c.batch_size,
            l2=c.probe_l2,
        )
    from cai_dpo.metrics import is_refusal

    refusals = [is_refusal(answers[e.id]) for e in train if e.id in answers]
    manifest = Manifest(
        stage="curate_probe",
        config={"curate": to_dict(c), "seed": cfg.seed},
        inputs={"curated_set": f"{c.curated_set}#{curated_hash}", "fingerprint": fp},
        models={"features": models.policy_id},
        counts={
            "train_rows": len(examples),
            **{f"{k}_{n}": v for k, d in probe.meta["train_counts"].items() for n, v in d.items()},
        },
        timings={"train_seconds": t.seconds},
        metrics={
            "train_accuracy": probe.meta["train_accuracy"],
            "policy_answer_refusal_rate": float(np.mean(refusals)) if refusals else None,
        },
    )
    with atomic_dir(folder) as tmp:
        probe.save(tmp)
        manifest.write(tmp / "manifest.json")
    return probe, read_manifest(folder)


def _heldout(cfg: RunConfig, run: RunStore, models: _Models, heldout: list[Any]) -> list[Labelled]:
    answers = policy_answers(models.policy(), heldout, cfg, run, models.policy_id)
    return labelled_examples(heldout, answers)


def _features() -> list[str]:
    return ["messages", "source", "prompt_id", "kind", "principle_ids", "curate_score", "weight"]


def _dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets
    from datasets import Features, List, Value

    turn = List({"role": Value("string"), "content": Value("string")})
    features = Features(
        {
            "messages": turn,
            "source": Value("string"),
            "prompt_id": Value("string"),
            "kind": Value("string"),
            "principle_ids": List(Value("string")),
            "curate_score": Value("float64"),
            "weight": Value("float64"),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def _histogram(scores: Sequence[float]) -> dict[str, int]:
    edges = np.linspace(0.0, 1.0, 11)
    counts, _ = np.histogram(np.clip(scores, 0, 1), bins=edges)
    return {f"{lo:.1f}-{hi:.1f}": int(n) for lo, hi, n in zip(edges, edges[1:], counts)}


@locked_stage
def run_curate(cfg: RunConfig, run: RunStore | None = None, *, engine: Any = None, judge_engine: Any = None) -> Path:
    """Score the rows of ``curate.sources``, apply the threshold, write ``data/curated``; returns its folder.

    ``engine`` / ``judge_engine`` reuse already loaded models (tests, notebooks). Raises
    FileNotFoundError for a missing source or (scorer ``probe``) a missing curated set,
    :class:`PromptFileError` for a malformed row, InputError for bad settings.
    """
    from cai_dpo.constitution import load_constitution
    from cai_dpo.engine import set_threads

    run = run or RunStore(cfg.run_dir)
    c = cfg.curate
    if not c.sources:
        raise InputError("curate.sources is empty; name at least one source (e.g. sl)")
    if not 0.0 <= c.threshold <= 1.0:
        raise InputError(f"curate.threshold is {c.threshold}; it must be between 0 and 1")
    apply_threshold([], c.threshold, c.action)  # checks the action before any work
    threads = set_threads(cfg.threads)
    notes: list[str] = []
    timings: dict[str, float] = {}
    with Timer() as total:
        rows = [r for spec in c.sources for r in load_rows(spec, run)]
        models = _Models(cfg, engine, judge_engine)
        constitution = load_constitution(cfg.constitution_path())

        curated_train: list[Any] = []
        curated_heldout: list[Any] = []
        curated_hash = ""
        if c.curated_set:
            from cai_dpo.curated import load_curated

            try:
                examples = load_curated(c.curated_set)
                curated_hash = _curated_hash(c.curated_set)
            except FileNotFoundError as exc:
                if c.scorer == "probe":
                    raise FileNotFoundError(
                        f"{exc} (curate.scorer=probe trains on curate.curated_set; point it at "
                        "a curated set or use scorer judge)"
                    ) from exc
                notes.append(f"no curated set ({exc}): no probe, scorer unmeasured")
                examples = []
            curated_train = _per_kind([e for e in examples if e.split == "train"], c.train_limit)
            curated_heldout = _per_kind([e for e in examples if e.split == "heldout"], c.heldout_limit)
        elif c.scorer == "probe":
            raise InputError("curate.scorer=probe needs curate.curated_set to train on")

        candidates: dict[str, Any] = {}
        probe_manifest: dict[str, Any] | None = None
        if c.scorer in ("probe", "auto") and curated_train:
            with Timer() as t:
                candidates["probe"], probe_manifest = _get_probe(cfg, run, models, curated_train, curated_hash, notes)
            timings["probe_seconds"] = t.seconds
        if c.scorer in ("judge", "auto"):
            candidates["judge"] = JudgeScorer(
                models.judge(),
                constitution,
                cfg.judge,
                baseline=c.judge_baseline,
                seed=cfg.seed,
                model_id=models.judge_id,
            )

        measurements: dict[str, dict[str, Any]] = {}
        if c.measure and curated_heldout:
            with Timer() as t:
                held = _heldout(cfg, run, models, curated_heldout)
                for name, scorer in candidates.items():
                    measurements[name] = measure(scorer.score([h.row for h in held]), held, c.threshold)
            timings["measure_seconds"] = t.seconds
        elif c.measure:
            notes.append("no curated held-out rows: scorer accuracy not measured")

        if c.scorer == "auto":
            choice = choose(measurements) if measurements else None
            name = choice.name if choice else ("probe" if "probe" in candidates else "judge")
            reason = (
                choice.reason
                if choice
                else "no measurement; "
                + ("probe (trained)" if name == "probe" else "judge (no curated set to train a probe)")
            )
        else:
            name, reason = c.scorer, "set by curate.scorer"
        if name not in candidates:
            raise InputError(
                f"{c.curated_set}: no train rows to fit the probe on (curate.scorer={c.scorer}); "
                "add train rows to the curated set or use scorer judge"
            )
        scorer = candidates[name]
        notes.append(f"scorer {name}: {reason}")

        with Timer() as t:
            scores = scorer.score([_row(r) for r in rows])
        timings["score_seconds"] = t.seconds
        weights, keep = apply_threshold(scores, c.threshold, c.action)
        out_rows = [
            {
                "messages": r["messages"],
                "source": r["source"],
                "prompt_id": r["id"],
                "kind": r["kind"],
                "principle_ids": r["principle_ids"],
                "curate_score": float(s),
                "weight": float(w),
            }
            for r, s, w, k in zip(rows, scores, weights, keep)
            if k
        ]
        if not out_rows:
            raise InputError(
                f"curate: every row scored below curate.threshold={c.threshold} with action drop; "
                "lower the threshold or use action weight"
            )
        below = int(np.sum(scores < c.threshold))
        counts = {
            "rows_in": len(rows),
            "kept": len(out_rows),
            "dropped": len(rows) - len(out_rows),
            "below_threshold": below,
            "downweighted": int(np.sum(weights < 1.0)) if c.action == "weight" else 0,
            "by_source": dict(Counter(r["source"] for r in out_rows)),
            "by_kind": dict(Counter(r["kind"] or "unknown" for r in out_rows)),
            "curated_train_prompts": len(curated_train),
            "curated_heldout_prompts": len(curated_heldout),
        }
        models_used = {"policy": models.policy_id}
        if name == "judge" or "judge" in candidates:
            models_used["judge"] = models.judge_id
        metrics = {
            "scorer": name,
            "scorer_reason": reason,
            "scorer_model": getattr(scorer, "model_id", ""),
            "accuracy": measurements.get(name),
            "candidates": measurements,
            "threshold": c.threshold,
            "action": c.action,
            "score_mean": float(np.mean(scores)),
            "score_histogram": _histogram(scores),
            "probe": (
                {k: probe_manifest["metrics"].get(k) for k in ("train_accuracy", "policy_answer_refusal_rate")}
                if probe_manifest
                else None
            ),
            "threads": threads,
        }
        inputs = {f"source:{spec}": _source_hash(spec, run) for spec in c.sources}
        inputs["constitution_fingerprint"] = constitution.fingerprint()
        if curated_hash:
            inputs["curated_set"] = f"{c.curated_set}#{curated_hash}"
        final = run.curated_data
        with atomic_dir(final) as tmp:
            _dataset(out_rows).save_to_disk(str(tmp))
            timings["model_load"] = models.load_seconds
            timings["seconds"] = time.perf_counter() - total.start
            Manifest(
                stage="curate",
                config={"curate": to_dict(c), "judge": to_dict(cfg.judge), "seed": cfg.seed},
                inputs=inputs,
                models=models_used,
                counts=counts,
                timings=timings,
                metrics=metrics,
                notes=notes,
            ).write(tmp / "manifest.json")
    acc = measurements.get(name, {}).get("pairwise", {}).get("accuracy") if measurements.get(name) else None
    log.info(
        "curate: %d rows in, %d kept, %d below %.2f (%s) with scorer %s (held-out accuracy %s) -> %s",
        len(rows),
        len(out_rows),
        below,
        c.threshold,
        c.action,
        name,
        acc,
        final,
    )
    return final


def _source_hash(spec: str, run: RunStore) -> str:
    """Content hash of a source (its manifest or files), for the manifest's inputs."""
    from cai_dpo.config import resolve_path

    if spec == "sl":
        m = run.sl_data / MANIFEST
        return file_hash(m) if m.exists() else ""
    if spec == "bundled:curated":
        return _curated_hash(spec)
    path = resolve_path(spec)
    if path.is_file():
        return file_hash(path)
    files = sorted(p for p in path.glob("*") if p.is_file())
    return content_hash([file_hash(f) for f in files])

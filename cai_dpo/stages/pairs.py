"""Response pairs for preference labels, from sampling and from SL-CAI revisions.

Sources (``pairs.source``):

- ``judged_samples``: K = ``samples_per_prompt`` responses per prompt from the SL-CAI
  model (the policy with ``models/sft`` when present), temperatures cycled over the K
  samples; identical and empty responses are dropped and flagged; the distinct ones are
  paired, to be judged by the constitution judge;
- ``revision_vs_original``: chosen = final revision, rejected = initial answer, from the
  SL records (``records/sl``); nothing is sampled;
- ``mixed``: both, ``mixed_ratio`` being the revision-vs-original share. Pairs not
  selected for the ratio are kept as a reserve (``selected: false``) for the judge stage,
  which uses them when its quality gate trips.

Prompts are the red-team train split plus ``helpful_share`` helpful prompts. Sampling is
resumable: one record per prompt in ``records/pairs``, keyed by a content hash.
Output: ``data/pairs/pairs.jsonl`` (one pair per line, with provenance) and a manifest.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

from cai_dpo.config import RunConfig, to_dict
from cai_dpo.store import Manifest, RunStore, Timer, atomic_dir, content_hash, file_hash, read_jsonl, write_jsonl

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"


def _norm(text: str) -> str:
    return " ".join(text.split()).strip().lower()


def pairs_path(run: RunStore) -> Path:
    """``data/pairs/pairs.jsonl`` of a run."""
    return run.root / "data" / "pairs" / PAIRS_FILE


def load_pairs(run: RunStore) -> list[dict[str, Any]]:
    """The pairs written by :func:`run_pairs` (every row, the reserve included)."""
    path = pairs_path(run)
    if not path.exists():
        raise FileNotFoundError(f"{path}: pairs not found; run the pairs stage first (cai-dpo pairs)")
    return read_jsonl(path)


def pair_id(source: str, prompt: str, response_a: str, response_b: str) -> str:
    """Content hash of a pair (sampled pairs are unordered, revision pairs ordered)."""
    responses = [response_a, response_b] if source == "revision_vs_original" else sorted([response_a, response_b])
    return content_hash("pair", source, prompt, responses)


# --------------------------------------------------------------------------- sampled pairs


def temperature_plan(k: int, temperatures: list[float]) -> list[float]:
    """Temperature of each of the K samples (the list cycled)."""
    if not temperatures:
        raise ValueError("pairs.temperatures is empty; give at least one temperature, e.g. [0.7, 1.0]")
    return [temperatures[i % len(temperatures)] for i in range(k)]


def dedupe_samples(samples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Distinct non-empty samples (first kept) and flag counts (``empty``, ``duplicate``)."""
    seen: set[str] = set()
    out, flags = [], Counter()
    for s in samples:
        key = _norm(s["text"])
        if not key:
            flags["empty"] += 1
        elif key in seen:
            flags["duplicate"] += 1
        else:
            seen.add(key)
            out.append(s)
    return out, flags


def pairs_from_samples(record: dict[str, Any], max_pairs: int, seed: int = 0) -> list[dict[str, Any]]:
    """Pairs from one prompt record's distinct samples (mixed-temperature pairs first, seeded)."""
    distinct, _ = dedupe_samples(record["samples"])
    combos = list(itertools.combinations(range(len(distinct)), 2))
    rng = random.Random(content_hash(seed, record["key"]))
    rng.shuffle(combos)
    combos.sort(key=lambda ij: distinct[ij[0]]["temperature"] == distinct[ij[1]]["temperature"])
    out = []
    for i, j in combos[: max(1, max_pairs)]:
        a, b = distinct[i], distinct[j]
        out.append({
            "pair_id": pair_id("judged_samples", record["prompt"], a["text"], b["text"]),
            "prompt_id": record["prompt_id"],
            "prompt": record["prompt"],
            "category": record["category"],
            "prompt_source": record["prompt_source"],
            "response_a": a["text"],
            "response_b": b["text"],
            "source": "judged_samples",
            "label": None,
            "selected": True,
            "flags": sorted(set(a.get("flags", [])) | set(b.get("flags", []))),
            "meta": {"temperatures": [a["temperature"], b["temperature"]], "sample_index": [a["index"], b["index"]],
                     "model": record["model"]},
        })
    return out


def stage_prompts(cfg: RunConfig) -> list[Any]:
    """Red-team train prompts plus ``helpful_share`` helpful train prompts (seeded pick)."""
    from cai_dpo.data import load_prompts, split_prompts

    red = split_prompts(load_prompts(cfg.data.red_team), "train")
    if cfg.data.red_team_limit is not None:
        red = red[: cfg.data.red_team_limit]
    if not red:
        raise ValueError(f"{cfg.data.red_team}: no red-team prompts in the 'train' split; point data.red_team at train prompts")
    share = cfg.pairs.helpful_share
    if not 0 <= share < 1:
        raise ValueError(f"pairs.helpful_share must be in [0, 1), got {share}")
    helpful: list[Any] = []
    if share > 0:
        pool = split_prompts(load_prompts(cfg.data.helpful), "train")
        if cfg.data.helpful_limit is not None:
            pool = pool[: cfg.data.helpful_limit]
        n = min(len(pool), int(round(share / (1 - share) * len(red))))
        helpful = [pool[i] for i in sorted(random.Random(cfg.seed).sample(range(len(pool)), n))]
    return [(p, "red_team") for p in red] + [(p, "helpful") for p in helpful]


def _policy(cfg: RunConfig, run: RunStore) -> tuple[Any, str | None, str]:
    """Policy spec, SL-CAI adapter folder (when present) and a model id for record keys.

    A served policy is sampled as served (it should be the SL-CAI model itself); a local
    SFT adapter is not applied to it.
    """
    from cai_dpo.models import describe
    from cai_dpo.served import is_served

    sft = run.root / "models" / "sft"
    adapter = str(sft) if (sft / "adapter_config.json").exists() and not is_served(cfg.policy) else None
    model_id = describe(cfg.policy) + (f" + sft@{file_hash(sft)}" if adapter else "")
    return cfg.policy, adapter, model_id


def sample_records(cfg: RunConfig, run: RunStore, prompts: list[Any], *, engine: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """K samples per prompt from the SL-CAI model, resumable; one record per prompt."""
    from cai_dpo.engine import set_threads
    from cai_dpo.models import load_engine

    pc = cfg.pairs
    if pc.samples_per_prompt < 2:
        raise ValueError(f"pairs.samples_per_prompt must be >= 2 to form pairs, got {pc.samples_per_prompt}")
    temps = temperature_plan(pc.samples_per_prompt, pc.temperatures)
    spec, adapter, model_id = _policy(cfg, run)
    store = run.records("pairs")
    params = {"k": pc.samples_per_prompt, "temperatures": temps, "sampling": to_dict(pc.sampling), "seed": cfg.seed}

    def key(p: Any) -> str:
        return content_hash("pairs", p.text, model_id, params)

    keyed = [(key(p), p, src) for p, src in prompts]
    done = store.done_keys()
    todo = [(k, p, src) for k, p, src in keyed if k not in done]
    stats: dict[str, Any] = {"sampled_prompts": len(todo), "resumed_prompts": len(keyed) - len(todo), "tokens": 0, "seconds": 0.0}
    if todo:
        if engine is None:
            set_threads(cfg.threads)
            engine = load_engine(spec, adapter=adapter, batch_size=pc.sampling.batch_size)
        groups: dict[float, list[int]] = {}
        for i, t in enumerate(temps):
            groups.setdefault(t, []).append(i)
        chunk = max(1, pc.sampling.batch_size)
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            convs = [p.conversation() for _, p, _ in part]
            samples: list[list[dict[str, Any]]] = [[{} for _ in temps] for _ in part]
            with Timer() as t:
                for gi, (temp, idxs) in enumerate(sorted(groups.items())):
                    sampling = dataclasses.replace(pc.sampling, temperature=temp, do_sample=temp > 0,
                                                   seed=int(content_hash(pc.sampling.seed, cfg.seed, temp, start, length=8), 16))
                    gens = engine.generate(convs, sampling, n=len(idxs), desc=f"pairs T={temp}")
                    for row, gs in enumerate(gens):
                        for si, g in zip(idxs, gs):
                            samples[row][si] = {"index": si, "temperature": temp, "text": g.text, "n_tokens": g.n_tokens,
                                                "finished": g.finished, "flags": [] if g.finished else ["truncated"]}
                            stats["tokens"] += g.n_tokens
            stats["seconds"] += t.seconds
            records = []
            for (k, p, src), ss in zip(part, samples):
                distinct, flags = dedupe_samples(ss)
                if len(distinct) < 2:
                    flags["no_distinct_pair"] += 1
                records.append({"key": k, "prompt_id": p.id, "prompt": p.text, "category": p.category,
                                "prompt_source": src, "model": model_id, "samples": ss, "flags": dict(flags)})
            store.append(records)
            log.info("pairs: sampled %d/%d prompts (%.1f tok/s)", start + len(part), len(todo),
                     stats["tokens"] / stats["seconds"] if stats["seconds"] else 0.0)
    recs = store.load()
    return [recs[k] for k, _, _ in keyed], stats


# --------------------------------------------------------------------------- revision pairs


def revision_pairs(run: RunStore) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Chosen = final revision, rejected = initial answer, from ``records/sl``; skip counts by reason."""
    records = run.records("sl").records()
    out, skipped = [], Counter()
    for r in records:
        initial, final = r.get("initial") or "", r.get("final") or ""
        if not _norm(final) or not _norm(initial):
            skipped["empty"] += 1
            continue
        if _norm(final) == _norm(initial):
            skipped["unchanged"] += 1
            continue
        rounds = r.get("rounds") or []
        out.append({
            "pair_id": pair_id("revision_vs_original", r["prompt"], final, initial),
            "prompt_id": r.get("prompt_id"),
            "prompt": r["prompt"],
            "category": r.get("category") or "",
            "prompt_source": r.get("source") or "red_team",
            "response_a": final,
            "response_b": initial,
            "source": "revision_vs_original",
            "label": "A",
            "selected": True,
            "flags": list(r.get("flags") or []),
            "meta": {"principle_ids": [x.get("principle_id") for x in rounds if x.get("principle_id")],
                     "rounds": len(rounds), "sl_model": r.get("model")},
        })
    return out, skipped


def mixed_counts(n_revision: int, n_sampled: int, ratio: float) -> tuple[int, int]:
    """How many revision and sampled pairs make the largest mix with ``ratio`` revision share."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"pairs.mixed_ratio must be in [0, 1], got {ratio}")
    if ratio == 0:
        return 0, n_sampled
    if ratio == 1:
        return n_revision, 0
    total = math.floor(min(n_revision / ratio, n_sampled / (1 - ratio)) + 1e-9)
    n_rev = min(n_revision, int(round(total * ratio)))
    return n_rev, min(n_sampled, total - n_rev)


def sampled_prompts_needed(n_revision: int, ratio: float, n_available: int) -> int:
    """Prompts to sample in ``mixed`` mode (a quarter spare for duplicates), capped."""
    if ratio <= 0:
        return n_available
    if ratio >= 1:
        return 0
    need = math.ceil(n_revision * (1 - ratio) / ratio)
    return min(n_available, need + max(1, math.ceil(need / 4)))


def select_mixed(revision: list[dict[str, Any]], sampled: list[dict[str, Any]], ratio: float, seed: int) -> None:
    """Mark ``selected`` on a seeded subset of each kind so revision pairs are ``ratio`` of the selection."""
    n_rev, n_smp = mixed_counts(len(revision), len(sampled), ratio)
    for rows, n, tag in ((revision, n_rev, "rev"), (sampled, n_smp, "smp")):
        keep = set(random.Random(content_hash(seed, tag)).sample(range(len(rows)), n))
        for i, row in enumerate(rows):
            row["selected"] = i in keep


# --------------------------------------------------------------------------- stage


def run_pairs(cfg: RunConfig, run: RunStore | None = None, *, engine: Any = None) -> Path:
    """Build the run's response pairs; write ``data/pairs`` (JSONL + manifest) and return its folder.

    ``engine`` overrides the SL-CAI policy engine (tests, notebooks that hold one).
    """
    run = run or RunStore(cfg.run_dir)
    pc = cfg.pairs
    notes: list[str] = []
    counts: dict[str, Any] = {}
    inputs: dict[str, str] = {}
    revision: list[dict[str, Any]] = []
    sampled: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}
    with Timer() as total:
        if pc.source in ("revision_vs_original", "mixed"):
            revision, skipped = revision_pairs(run)
            counts["revision_skipped"] = dict(skipped)
            sl_dir = run.root / "records" / "sl"
            if not revision:
                raise ValueError(f"{sl_dir}: no usable SL records (final revision differing from the initial answer); "
                                 f"run the SL stage first (cai-dpo sl) or set pairs.source=judged_samples")
            inputs["sl_records"] = file_hash(sl_dir)
        if pc.source in ("judged_samples", "mixed"):
            prompts = stage_prompts(cfg)
            if pc.source == "mixed":
                n = sampled_prompts_needed(len(revision), pc.mixed_ratio, len(prompts))
                order = sorted(range(len(prompts)), key=lambda i: content_hash(cfg.seed, prompts[i][0].id))
                prompts = [prompts[i] for i in sorted(order[:n])]
                notes.append(f"mixed: sampled {n} prompt(s), enough for a {pc.mixed_ratio:.2f} revision share "
                             f"with {len(revision)} revision pairs")
            records, stats = sample_records(cfg, run, prompts, engine=engine)
            flag_counts: Counter[str] = Counter()
            for rec in records:
                flag_counts.update(rec.get("flags") or {})
                sampled.extend(pairs_from_samples(rec, pc.max_pairs_per_prompt, cfg.seed))
            counts.update({"prompts": len(records), "prompt_sources": dict(Counter(r["prompt_source"] for r in records)),
                           "sample_flags": dict(flag_counts), "samples": sum(len(r["samples"]) for r in records)})
            inputs["prompts"] = content_hash([r["key"] for r in records])
        if pc.source == "mixed":
            select_mixed(revision, sampled, pc.mixed_ratio, cfg.seed)
    rows = revision + sampled
    if not rows:
        raise ValueError("pairs: no pairs formed (every prompt gave fewer than two distinct responses); "
                         "raise pairs.samples_per_prompt or the temperatures")
    selected = [r for r in rows if r["selected"]]
    counts.update({
        "pairs": len(rows),
        "selected": len(selected),
        "selected_by_source": dict(Counter(r["source"] for r in selected)),
        "all_by_source": dict(Counter(r["source"] for r in rows)),
    })
    if selected:
        counts["revision_share_selected"] = sum(r["source"] == "revision_vs_original" for r in selected) / len(selected)
    out = run.data_dir("pairs")
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / PAIRS_FILE, rows)
        Manifest(
            stage="pairs",
            config={"pairs": to_dict(pc), "data": to_dict(cfg.data), "seed": cfg.seed},
            inputs=inputs,
            models={"policy": _policy(cfg, run)[2]} if sampled else {},
            counts=counts,
            timings={"seconds": total.seconds, "sampling_seconds": stats.get("seconds", 0.0),
                     "tokens_per_second": (stats["tokens"] / stats["seconds"]) if stats.get("seconds") else 0.0},
            notes=notes,
        ).write(tmp / "manifest.json")
    log.info("pairs: %d pairs (%s selected) -> %s", len(rows), counts["selected_by_source"], out)
    return out

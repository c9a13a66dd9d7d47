"""Response pairs for preference labels, from sampling and from SL-CAI revisions.

Sources (``pairs.source``):

- ``judged_samples``: K = ``samples_per_prompt`` responses per prompt from the SL-CAI
  model (the policy with ``models/sft`` when present), temperatures cycled over the K
  samples; identical and empty responses are dropped and flagged; the distinct ones are
  paired, to be judged by the constitution judge;
- ``revision_vs_original``: chosen = final revision, rejected = initial answer, from the
  SL records (``records/sl``); nothing is sampled;
- ``curated``: chosen = the curated response, rejected = the SL-CAI model's own answer
  (``pairs.curated_temperature``; 0 is greedy) to the same curated ``train`` prompt, so
  preference learning sees "the constitution's answer over what the model does now";
  pairs whose two responses are identical (or whose answer is empty) are skipped; with
  ``pairs.curated_benign_rejected: decline`` a benign prompt's rejected side is a decline
  instead (:func:`cai_dpo.curated.benign_declines`), so the pair teaches not to over-refuse;
- ``mixed``: any of the above with configured shares (``pairs.mix``, e.g. ``{curated: 0.6,
  revision_vs_original: 0.4}``; without it ``mixed_ratio`` is the revision-vs-original
  share and the rest judged samples). The largest selection with those shares is marked
  ``selected: true``; the other pairs are kept as a reserve (``selected: false``) for the
  judge stage, which uses them when its quality gate trips.

Prompts for sampled pairs are the red-team train split plus ``helpful_share`` helpful
prompts. Generation is resumable: one record per prompt in ``records/pairs`` (sampled)
and ``records/pairs-curated`` (curated), keyed by a content hash.
Output: ``data/pairs/pairs.jsonl`` (one pair per line, with provenance: ``source``, and
``weight``, the data's own weight when it carries one, else null) and a manifest.
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

from cai_dpo.config import PAIR_SOURCES, RunConfig, raise_problems, to_dict
from cai_dpo.data import name_prompt_error
from cai_dpo.errors import ContextLengthError, InputError
from cai_dpo.pairs_io import PAIRS_FILE
from cai_dpo.schema import Pair, as_conversation
from cai_dpo.store import Manifest, RunStore, Timer, atomic_dir, content_hash, file_hash, locked_stage, write_jsonl

log = logging.getLogger(__name__)

#: Pair sources; ``mixed`` combines them.
SOURCES: tuple[str, ...] = PAIR_SOURCES
#: Sources whose first response is the preferred one (not judged unless configured).
ORDERED_SOURCES: tuple[str, ...] = ("revision_vs_original", "curated")


def _norm(text: str) -> str:
    return " ".join(text.split()).strip().lower()


def pair_id(source: str, prompt: str, response_a: str, response_b: str) -> str:
    """Content hash of a pair (sampled pairs are unordered, revision and curated pairs ordered)."""
    responses = [response_a, response_b] if source in ORDERED_SOURCES else sorted([response_a, response_b])
    return content_hash("pair", source, prompt, responses)


# --------------------------------------------------------------------------- sampled pairs


def temperature_plan(k: int, temperatures: list[float]) -> list[float]:
    """Temperature of each of the K samples (the list cycled)."""
    if not temperatures:
        raise InputError("pairs.temperatures is empty; give at least one temperature, e.g. [0.7, 1.0]")
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


def pairs_from_samples(record: dict[str, Any], max_pairs: int, seed: int = 0) -> list[Pair]:
    """Pairs from one prompt record's distinct samples (mixed-temperature pairs first, seeded)."""
    distinct, _ = dedupe_samples(record["samples"])
    combos = list(itertools.combinations(range(len(distinct)), 2))
    rng = random.Random(content_hash(seed, record["key"]))
    rng.shuffle(combos)
    combos.sort(key=lambda ij: distinct[ij[0]]["temperature"] == distinct[ij[1]]["temperature"])
    out = []
    for i, j in combos[: max(1, max_pairs)]:
        a, b = distinct[i], distinct[j]
        out.append(
            {
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
                "weight": None,
                "flags": sorted(set(a.get("flags", [])) | set(b.get("flags", []))),
                "meta": {
                    "temperatures": [a["temperature"], b["temperature"]],
                    "sample_index": [a["index"], b["index"]],
                    "model": record["model"],
                },
            }
        )
    return out


def stage_prompts(cfg: RunConfig) -> list[Any]:
    """Red-team train prompts plus ``helpful_share`` helpful train prompts (seeded pick)."""
    from cai_dpo.data import load_prompts, split_prompts

    red = split_prompts(load_prompts(cfg.data.red_team), "train")
    if cfg.data.red_team_limit is not None:
        red = red[: cfg.data.red_team_limit]
    if not red:
        raise InputError(
            f"{cfg.data.red_team}: no red-team prompts in the 'train' split; point data.red_team at train prompts"
        )
    raise_problems(cfg.pairs, prefix="pairs.")
    share = cfg.pairs.helpful_share
    helpful: list[Any] = []
    if share > 0:
        pool = split_prompts(load_prompts(cfg.data.helpful), "train")
        if cfg.data.helpful_limit is not None:
            pool = pool[: cfg.data.helpful_limit]
        n = min(len(pool), int(round(share / (1 - share) * len(red))))
        helpful = [pool[i] for i in sorted(random.Random(cfg.seed).sample(range(len(pool)), n))]
    return [(p, "red_team") for p in red] + [(p, "helpful") for p in helpful]


def _policy(cfg: RunConfig, run: RunStore, *, base: bool = False) -> tuple[Any, str | None, str]:
    """Policy spec, SL-CAI adapter folder (when present) and a model id for record keys.

    A served policy is sampled as served (it should be the SL-CAI model itself); a local
    SFT adapter is not applied to it, nor with ``base``.
    """
    from cai_dpo.models import describe
    from cai_dpo.served import is_served

    sft = run.sft_adapter
    local_sft = (sft / "adapter_config.json").exists() and not is_served(cfg.policy)
    adapter = str(sft) if local_sft and not base else None
    model_id = describe(cfg.policy) + (f" + sft@{file_hash(sft)}" if adapter else "")
    return cfg.policy, adapter, model_id


def policy_engine(cfg: RunConfig, run: RunStore, *, base: bool = False) -> Any:
    """An engine on the SL-CAI model (the policy with ``models/sft`` when present; a served policy as served);
    ``base``: on the policy without the SFT adapter."""
    from cai_dpo.engine import set_threads
    from cai_dpo.models import load_engine

    spec, adapter, _ = _policy(cfg, run, base=base)
    set_threads(cfg.threads)
    return load_engine(spec, adapter=adapter, batch_size=cfg.pairs.sampling.batch_size)


def sample_records(
    cfg: RunConfig, run: RunStore, prompts: list[Any], *, engine: Any = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """K samples per prompt from the SL-CAI model, resumable; one record per prompt."""
    pc = cfg.pairs
    raise_problems(pc, source=str(run.config_file), prefix="pairs.")
    temps = temperature_plan(pc.samples_per_prompt, pc.temperatures)
    model_id = _policy(cfg, run)[2]
    store = run.records("pairs")
    params = {"k": pc.samples_per_prompt, "temperatures": temps, "sampling": to_dict(pc.sampling), "seed": cfg.seed}

    def key(p: Any) -> str:
        return content_hash("pairs", p.text, model_id, params)

    keyed = [(key(p), p, src) for p, src in prompts]
    done = store.done_keys()
    todo = [(k, p, src) for k, p, src in keyed if k not in done]
    stats: dict[str, Any] = {
        "sampled_prompts": len(todo),
        "resumed_prompts": len(keyed) - len(todo),
        "tokens": 0,
        "seconds": 0.0,
    }
    if todo:
        if engine is None:
            engine = policy_engine(cfg, run)
        groups: dict[float, list[int]] = {}
        for i, t in enumerate(temps):
            groups.setdefault(t, []).append(i)
        chunk = max(1, pc.sampling.batch_size)
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            convs = [p.conversation() for _, p, _ in part]
            samples: list[list[dict[str, Any]]] = [[{} for _ in temps] for _ in part]
            with Timer() as t:
                for temp, idxs in sorted(groups.items()):
                    sampling = dataclasses.replace(
                        pc.sampling,
                        temperature=temp,
                        do_sample=temp > 0,
                        seed=int(content_hash(pc.sampling.seed, cfg.seed, temp, start, length=8), 16),
                    )
                    try:
                        gens = engine.generate(convs, sampling, n=len(idxs), desc=f"pairs T={temp}")
                    except ContextLengthError as exc:
                        raise name_prompt_error(exc, [p for _, p, _ in part]) from exc
                    for row, gs in enumerate(gens):
                        for si, g in zip(idxs, gs):
                            samples[row][si] = {
                                "index": si,
                                "temperature": temp,
                                "text": g.text,
                                "n_tokens": g.n_tokens,
                                "finished": g.finished,
                                "flags": [] if g.finished else ["truncated"],
                            }
                            stats["tokens"] += g.n_tokens
            stats["seconds"] += t.seconds
            records = []
            for (k, p, src), ss in zip(part, samples):
                distinct, flags = dedupe_samples(ss)
                if len(distinct) < 2:
                    flags["no_distinct_pair"] += 1
                records.append(
                    {
                        "key": k,
                        "prompt_id": p.id,
                        "prompt": p.text,
                        "category": p.category,
                        "prompt_source": src,
                        "model": model_id,
                        "samples": ss,
                        "flags": dict(flags),
                    }
                )
            store.append(records)
            log.info(
                "pairs: sampled %d/%d prompts (%.1f tok/s)",
                start + len(part),
                len(todo),
                stats["tokens"] / stats["seconds"] if stats["seconds"] else 0.0,
            )
    recs = store.load()
    return [recs[k] for k, _, _ in keyed], stats


# --------------------------------------------------------------------------- revision pairs


def revision_pairs(run: RunStore) -> tuple[list[Pair], Counter[str]]:
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
        out.append(
            {
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
                "weight": r.get("weight"),
                "flags": list(r.get("flags") or []),
                "meta": {
                    "principle_ids": [x.get("principle_id") for x in rounds if x.get("principle_id")],
                    "rounds": len(rounds),
                    "sl_model": r.get("model"),
                },
            }
        )
    return out, skipped


# --------------------------------------------------------------------------- curated pairs


def curated_prompts(cfg: RunConfig) -> list[Any]:
    """The curated ``train`` examples for pairs: ``pairs.curated_kinds``, at most
    ``curated_limit`` per kind (seeded pick)."""
    from cai_dpo.curated import load_curated

    pc = cfg.pairs
    raise_problems(pc, prefix="pairs.")
    examples = load_curated(pc.curated, split="train")
    out: list[Any] = []
    for kind in pc.curated_kinds:
        of_kind = [e for e in examples if e.kind == kind]
        if pc.curated_limit is not None and len(of_kind) > pc.curated_limit:
            keep = set(
                sorted(range(len(of_kind)), key=lambda i: content_hash(cfg.seed, of_kind[i].id))[: pc.curated_limit]
            )
            of_kind = [e for i, e in enumerate(of_kind) if i in keep]
        out.extend(of_kind)
    if not out:
        raise InputError(f"{pc.curated}: no curated 'train' examples of kind {', '.join(pc.curated_kinds)}")
    return out


def curated_records(
    cfg: RunConfig, run: RunStore, examples: list[Any], *, engine: Any = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The SL-CAI model's own answer to each curated prompt (the base policy's with
    ``pairs.curated_rejected_model: base``; ``engine`` must then be on it), resumable; one record per example."""
    pc = cfg.pairs
    base = pc.curated_rejected_model == "base"
    raise_problems(pc, source=str(run.config_file), prefix="pairs.")
    sampling = dataclasses.replace(
        pc.sampling,
        temperature=pc.curated_temperature,
        do_sample=pc.curated_temperature > 0,
        seed=int(content_hash(pc.sampling.seed, cfg.seed, "curated", length=8), 16),
    )
    model_id = _policy(cfg, run, base=base)[2]
    store = run.records("pairs-curated")
    params = {"sampling": to_dict(sampling), "seed": cfg.seed}
    keyed = [(content_hash("pairs-curated", e.prompt, model_id, params), e) for e in examples]
    done = store.done_keys()
    todo = [(k, e) for k, e in keyed if k not in done]
    stats: dict[str, Any] = {"generated": len(todo), "resumed": len(keyed) - len(todo), "tokens": 0, "seconds": 0.0}
    if todo:
        if engine is None:
            engine = policy_engine(cfg, run, base=base)
        chunk = max(1, pc.sampling.batch_size)
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            with Timer() as t:
                gens = engine.generate(
                    [as_conversation(e.prompt) for _, e in part], sampling, n=1, desc="pairs curated"
                )
            stats["seconds"] += t.seconds
            records = []
            for (k, e), (g, *_) in zip(part, gens):
                stats["tokens"] += g.n_tokens
                records.append(
                    {
                        "key": k,
                        "curated_id": e.id,
                        "prompt": e.prompt,
                        "model": model_id,
                        "text": g.text,
                        "n_tokens": g.n_tokens,
                        "finished": g.finished,
                    }
                )
            store.append(records)
            log.info(
                "pairs: answered %d/%d curated prompts (%.1f tok/s)",
                start + len(part),
                len(todo),
                stats["tokens"] / stats["seconds"] if stats["seconds"] else 0.0,
            )
    recs = store.load()
    return [recs[k] for k, _ in keyed], stats


def rejected_records(examples: list[Any], answered: list[Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A rejected-side record per example: the policy's answer where one was generated
    (``answered``, aligned with ``records``), else a decline (:func:`cai_dpo.curated.benign_declines`,
    ``model: "decline"``)."""
    from cai_dpo.curated import benign_declines

    by_id = {e.id: r for e, r in zip(answered, records)}
    rest = [e for e in examples if e.id not in by_id]
    declines = benign_declines([e.id for e in rest], [e.response for e in examples if e.kind == "harmful"])
    return [by_id.get(e.id) or {"text": declines[e.id], "model": "decline", "finished": True} for e in examples]


def curated_pairs(examples: list[Any], records: list[dict[str, Any]]) -> tuple[list[Pair], Counter[str]]:
    """Chosen = curated response, rejected = the policy's answer; skip counts (``empty``, ``identical``)."""
    out, skipped = [], Counter()
    for e, rec in zip(examples, records):
        answer = rec.get("text") or ""
        if not _norm(answer):
            skipped["empty"] += 1
            continue
        if _norm(answer) == _norm(e.response):
            skipped["identical"] += 1
            continue
        out.append(
            {
                "pair_id": pair_id("curated", e.prompt, e.response, answer),
                "prompt_id": e.id,
                "prompt": e.prompt,
                "category": e.category,
                "prompt_source": "red_team" if e.kind == "harmful" else "helpful",
                "response_a": e.response,
                "response_b": answer,
                "source": "curated",
                "label": "A",
                "selected": True,
                "weight": e.meta.get("weight"),
                "flags": [] if rec.get("finished", True) else ["truncated"],
                "meta": {
                    "principle_ids": list(e.principle_ids),
                    "kind": e.kind,
                    "sensitive_sounding": e.sensitive_sounding,
                    "model": rec.get("model"),
                },
            }
        )
    return out, skipped


# --------------------------------------------------------------------------- mixing


def mix_ratios(cfg: RunConfig) -> dict[str, float]:
    """Source shares of the selection, summing to 1, in the order they are filled.

    ``pairs.source`` other than ``mixed``: that source alone. ``mixed``: ``pairs.mix``
    normalised, else ``{revision_vs_original: mixed_ratio, judged_samples: 1 - mixed_ratio}``.
    Raises ``ConfigError`` naming the key for an unknown source or a bad share.
    """
    pc = cfg.pairs
    if pc.source != "mixed":
        return {pc.source: 1.0}
    raise_problems(pc, prefix="pairs.")
    if pc.mix is None:
        return {"revision_vs_original": pc.mixed_ratio, "judged_samples": 1.0 - pc.mixed_ratio}
    total = sum(pc.mix.values())
    return {name: share / total for name, share in pc.mix.items()}


def mix_counts(available: dict[str, int], ratios: dict[str, float]) -> dict[str, int]:
    """How many pairs of each source make the largest selection with ``ratios`` (shares summing to 1)."""
    positive = [s for s, r in ratios.items() if r > 0]
    if not positive:
        raise InputError("pairs: every source share is 0; nothing to select")
    total = math.floor(min(available.get(s, 0) / ratios[s] for s in positive) + 1e-9)
    out = {s: 0 for s in ratios}
    assigned = 0
    for s in positive[:-1]:
        out[s] = min(available.get(s, 0), int(round(total * ratios[s])))
        assigned += out[s]
    last = positive[-1]
    out[last] = max(0, min(available.get(last, 0), total - assigned))
    return out


def mixed_counts(n_revision: int, n_sampled: int, ratio: float) -> tuple[int, int]:
    """How many revision and sampled pairs make the largest mix with ``ratio`` revision share."""
    if not 0 <= ratio <= 1:
        raise InputError(f"pairs.mixed_ratio must be in [0, 1], got {ratio}")
    got = mix_counts(
        {"revision_vs_original": n_revision, "judged_samples": n_sampled},
        {"revision_vs_original": ratio, "judged_samples": 1.0 - ratio},
    )
    return got["revision_vs_original"], got["judged_samples"]


def sampled_prompts_needed(n_revision: int, ratio: float, n_available: int) -> int:
    """Prompts to sample in ``mixed`` mode (a quarter spare for duplicates), capped."""
    if ratio <= 0:
        return n_available
    if ratio >= 1:
        return 0
    return _prompts_for(n_revision / ratio, 1 - ratio, n_available)


def _prompts_for(total: float, share: float, n_available: int) -> int:
    """Prompts to sample for ``share`` of a selection of ``total`` pairs (a quarter spare), capped."""
    need = math.ceil(total * share - 1e-9)
    return min(n_available, need + max(1, math.ceil(need / 4)))


def select_mix(by_source: dict[str, list[dict[str, Any]]], ratios: dict[str, float], seed: int) -> None:
    """Mark ``selected`` on a seeded subset of each source so the selection has the shares ``ratios``."""
    counts = mix_counts({s: len(by_source.get(s, [])) for s in ratios}, ratios)
    for source, rows in by_source.items():
        n = counts.get(source, 0)
        tag = {"revision_vs_original": "rev", "judged_samples": "smp"}.get(source, source)
        keep = set(random.Random(content_hash(seed, tag)).sample(range(len(rows)), n))
        for i, row in enumerate(rows):
            row["selected"] = i in keep


def select_mixed(revision: list[dict[str, Any]], sampled: list[dict[str, Any]], ratio: float, seed: int) -> None:
    """Mark ``selected`` on a seeded subset of each kind so revision pairs are ``ratio`` of the selection."""
    select_mix(
        {"revision_vs_original": revision, "judged_samples": sampled},
        {"revision_vs_original": ratio, "judged_samples": 1.0 - ratio},
        seed,
    )


# --------------------------------------------------------------------------- stage


@locked_stage
def run_pairs(cfg: RunConfig, run: RunStore | None = None, *, engine: Any = None) -> Path:
    """Build the run's response pairs; write ``data/pairs`` (JSONL + manifest) and return its folder.

    ``engine`` overrides the SL-CAI policy engine (tests, notebooks that hold one).
    """
    run = run or RunStore(cfg.run_dir)
    pc = cfg.pairs
    ratios = mix_ratios(cfg)
    wanted = [s for s, r in ratios.items() if r > 0 or (pc.source == "mixed" and pc.mix is None)]
    notes: list[str] = []
    counts: dict[str, Any] = {}
    inputs: dict[str, str] = {}
    by_source: dict[str, list[dict[str, Any]]] = {}
    stats: dict[str, Any] = {}
    tokens, gen_seconds = 0, 0.0
    box = [engine]

    def shared_engine() -> Any:
        if box[0] is None:
            box[0] = policy_engine(cfg, run)
        return box[0]

    with Timer() as total:
        if "revision_vs_original" in wanted:
            revision, skipped = revision_pairs(run)
            counts["revision_skipped"] = dict(skipped)
            sl_dir = run.records_dir("sl")
            if not revision:
                raise InputError(
                    f"{sl_dir}: no usable SL records (final revision differing from the initial answer); "
                    f"run the SL stage first (cai-dpo sl) or set pairs.source=judged_samples"
                )
            inputs["sl_records"] = file_hash(sl_dir)
            by_source["revision_vs_original"] = revision
        if "curated" in wanted:
            examples = curated_prompts(cfg)
            answered = [e for e in examples if e.kind == "harmful" or pc.curated_benign_rejected == "policy"]
            own = pc.curated_rejected_model == "sl-cai"  # else curated_records loads the base policy itself
            recs, cstats = curated_records(cfg, run, answered, engine=_Lazy(shared_engine) if own else None)
            tokens, gen_seconds = tokens + cstats["tokens"], gen_seconds + cstats["seconds"]
            curated, skipped = curated_pairs(examples, rejected_records(examples, answered, recs))
            counts.update(
                {
                    "curated_prompts": len(examples),
                    "curated_skipped": dict(skipped),
                    "curated_kinds": dict(Counter(e.kind for e in examples)),
                }
            )
            if not curated:
                raise InputError(
                    f"{pc.curated}: no curated pair formed (the policy repeated every curated response "
                    "or answered nothing); check pairs.curated and pairs.sampling.max_new_tokens"
                )
            inputs["curated"] = content_hash([(e.id, e.prompt, e.response) for e in examples])
            by_source["curated"] = curated
        if "judged_samples" in wanted:
            prompts = stage_prompts(cfg)
            others = [s for s in wanted if s != "judged_samples" and ratios[s] > 0]
            if pc.source == "mixed" and others and ratios["judged_samples"] < 1:
                fixed_total = min(len(by_source[s]) / ratios[s] for s in others)
                n = (
                    _prompts_for(fixed_total, ratios["judged_samples"], len(prompts))
                    if ratios["judged_samples"] > 0
                    else 0
                )
                order = sorted(range(len(prompts)), key=lambda i: content_hash(cfg.seed, prompts[i][0].id))
                prompts = [prompts[i] for i in sorted(order[:n])]
                notes.append(
                    f"mixed: sampled {n} prompt(s), enough for a {ratios['judged_samples']:.2f} judged-sample "
                    f"share next to {', '.join(f'{len(by_source[s])} {s}' for s in others)} pairs"
                )
            sampled: list[dict[str, Any]] = []
            if prompts:
                records, stats = sample_records(cfg, run, prompts, engine=_Lazy(shared_engine))
                tokens, gen_seconds = tokens + stats["tokens"], gen_seconds + stats["seconds"]
                flag_counts: Counter[str] = Counter()
                for rec in records:
                    flag_counts.update(rec.get("flags") or {})
                    sampled.extend(pairs_from_samples(rec, pc.max_pairs_per_prompt, cfg.seed))
                counts.update(
                    {
                        "prompts": len(records),
                        "prompt_sources": dict(Counter(r["prompt_source"] for r in records)),
                        "sample_flags": dict(flag_counts),
                        "samples": sum(len(r["samples"]) for r in records),
                    }
                )
                inputs["prompts"] = content_hash([r["key"] for r in records])
            by_source["judged_samples"] = sampled
        if pc.source == "mixed":
            select_mix(by_source, ratios, cfg.seed)
    rows = [r for s in ("revision_vs_original", "curated", "judged_samples") for r in by_source.get(s, [])]
    if not rows:
        raise InputError(
            "pairs: no pairs formed (every prompt gave fewer than two distinct responses); "
            "raise pairs.samples_per_prompt or the temperatures"
        )
    selected = [r for r in rows if r["selected"]]
    counts.update(
        {
            "pairs": len(rows),
            "selected": len(selected),
            "selected_by_source": dict(Counter(r["source"] for r in selected)),
            "all_by_source": dict(Counter(r["source"] for r in rows)),
        }
    )
    if selected:
        counts["revision_share_selected"] = sum(r["source"] == "revision_vs_original" for r in selected) / len(selected)
        counts["share_selected"] = {s: n / len(selected) for s, n in counts["selected_by_source"].items()}
    out = run.pairs
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / PAIRS_FILE, rows)
        Manifest(
            stage="pairs",
            config={"pairs": to_dict(pc), "data": to_dict(cfg.data), "seed": cfg.seed, "mix": ratios},
            inputs=inputs,
            models={"policy": _policy(cfg, run)[2]}
            if by_source.get("judged_samples") or by_source.get("curated")
            else {},
            counts=counts,
            timings={
                "seconds": total.seconds,
                "sampling_seconds": gen_seconds,
                "tokens_per_second": (tokens / gen_seconds) if gen_seconds else 0.0,
            },
            notes=notes,
        ).write(tmp / "manifest.json")
    log.info("pairs: %d pairs (%s selected) -> %s", len(rows), counts["selected_by_source"], out)
    return out


class _Lazy:
    """Stands in for an engine and loads the real one on the first ``generate`` call (resumed runs load nothing)."""

    def __init__(self, get: Any):
        self._get = get

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._get().generate(*args, **kwargs)

"""Curation scorers measured: the linear probe and the constitution judge, on held-out curated rows and HHH.

Prints JSON. For each scorer: pairwise accuracy (the curated response scored above its
negative — the policy's own answer to a harmful prompt, a decline of a benign one — and
the correct HHH response above the incorrect one) and classification accuracy at
``--threshold``, each with a Wilson 95 % interval, per kind; plus timings. The probe is
trained on the curated train rows (also with only ``--small-train`` prompts per kind, the
size a CPU demo can afford). The HHH part skips cleanly when the file is absent.

    python bench/curate_scorers.py --curated bundled:curated --hhh-limit 200
    python bench/curate_scorers.py --curated /path/to/curated/ --no-judge

The policy's answers to the harmful prompts are cached in ``--cache`` (JSONL records keyed
by prompt, model, sampling and seed), so a rerun does not generate them again.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cai_dpo.config import JudgeSection, ModelSpec, RunConfig, SamplingSection
from cai_dpo.constitution import load_constitution
from cai_dpo.curated import load_curated, summary
from cai_dpo.engine import Engine, set_threads
from cai_dpo.judge import HHH_FILE, load_hhh
from cai_dpo.metrics import is_refusal
from cai_dpo.models import describe, load_model
from cai_dpo.scorers import JudgeScorer, hhh_examples, hidden_features, labelled_examples, measure, train_probe
from cai_dpo.stages.curate import policy_answers
from cai_dpo.store import RunStore


def _per_kind(examples: list[Any], n: int | None) -> list[Any]:
    if n is None:
        return examples
    seen: dict[str, int] = {}
    out = []
    for e in examples:
        if seen.get(e.kind, 0) < n:
            out.append(e)
            seen[e.kind] = seen.get(e.kind, 0) + 1
    return out


def _dump(out: dict[str, Any], path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="policy model spec (features, answers; default: embedded)")
    ap.add_argument(
        "--curated", default="bundled:curated", help="curated set: bundled:curated, a JSONL file or a folder"
    )
    ap.add_argument("--file", default=str(HHH_FILE), help="438HHHEvaluations.jsonl")
    ap.add_argument("--hhh-limit", type=int, default=None, help="a seeded sample of N HHH comparisons (default: all)")
    ap.add_argument("--train-limit", type=int, default=None, help="curated train prompts per kind (default: all)")
    ap.add_argument("--heldout-limit", type=int, default=None, help="curated held-out prompts per kind (default: all)")
    ap.add_argument(
        "--small-train",
        type=int,
        default=None,
        help="also train the probe on only this many prompts per kind (the size a CPU demo affords)",
    )
    ap.add_argument("--max-length", type=int, default=384, help="tokens per row for the probe's features")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="length of the policy's answers (negatives)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--constitution", default="default")
    ap.add_argument("--no-judge", action="store_true", help="measure the probe only")
    ap.add_argument("--no-judge-hhh", action="store_true", help="leave the judge out of the HHH part (the slowest)")
    ap.add_argument("--cache", default="artifacts/bench/curate_scorers", help="folder for the policy answers")
    ap.add_argument(
        "--judge-heldout-limit",
        type=int,
        default=None,
        help="judge only the first N held-out prompts per kind (the judge is the slow scorer)",
    )
    ap.add_argument("--out", default=None, help="also write the JSON here after each section (partial results)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    threads = set_threads(args.threads)
    examples = load_curated(args.curated)
    train = _per_kind([e for e in examples if e.split == "train"], args.train_limit)
    heldout = _per_kind([e for e in examples if e.split == "heldout"], args.heldout_limit)
    spec = ModelSpec(name=args.model)
    model_id = describe(spec)
    t0 = time.perf_counter()
    model, tok = load_model(spec)
    engine = Engine(model, tok, batch_size=32, progress=False)
    timings: dict[str, float] = {"load": round(time.perf_counter() - t0, 1)}

    cfg = RunConfig(seed=args.seed)
    cfg.curate.sampling = SamplingSection(max_new_tokens=args.max_new_tokens, temperature=0.7, batch_size=32)
    cache = RunStore(Path(args.cache))
    t = time.perf_counter()
    answers = policy_answers(engine, train + heldout, cfg, cache, model_id)
    timings["policy_answers"] = round(time.perf_counter() - t, 1)

    train_ex = labelled_examples(train, answers)
    held_ex = labelled_examples(heldout, answers)
    opts = {"max_length": args.max_length, "batch_size": args.batch_size}
    t = time.perf_counter()
    x_train = hidden_features(model, tok, [e.row.conversation() for e in train_ex], desc="train features", **opts)
    probe = train_probe(model, tok, train_ex, model_id=model_id, features=x_train, **opts)
    timings["probe_train"] = round(time.perf_counter() - t, 1)
    probe_small = None
    if args.small_train is not None:
        small_ids = {e.id for e in _per_kind(train, args.small_train)}
        small_idx = [i for i, e in enumerate(train_ex) if e.group in small_ids]
        probe_small = train_probe(
            model, tok, [train_ex[i] for i in small_idx], model_id=model_id, features=x_train[small_idx], **opts
        )

    out: dict[str, Any] = {
        "model": model_id,
        "curated": args.curated,
        "curated_counts": summary(examples),
        "threads": threads,
        "used_prompts": {"train": summary(train), "heldout": summary(heldout)},
        "max_length": args.max_length,
        "negatives": {
            "policy_answers": len(answers),
            "max_new_tokens": args.max_new_tokens,
            "policy_answer_refusal_rate": round(float(np.mean([is_refusal(a) for a in answers.values()])), 4),
        },
        "chance": 0.5,
        "heldout": {},
        "hhh": {},
    }
    t = time.perf_counter()
    x_held = hidden_features(model, tok, [e.row.conversation() for e in held_ex], desc="held-out features", **opts)
    kinds = [e.row.kind for e in held_ex]
    out["heldout"]["probe"] = measure(probe.score_features(x_held, kinds), held_ex, args.threshold)
    out["heldout"]["probe"]["train_accuracy"] = round(probe.meta["train_accuracy"], 4)
    if probe_small is not None:
        out["heldout"][f"probe_train{args.small_train}"] = measure(
            probe_small.score_features(x_held, kinds), held_ex, args.threshold
        )
    timings["probe_heldout"] = round(time.perf_counter() - t, 1)

    out["timings_seconds"] = timings
    _dump(out, args.out)

    path = Path(args.file)
    hhh: list[Any] = []
    if not path.exists():
        out["hhh"] = {"skipped": f"{path} not present"}
    else:
        items = load_hhh(path)
        if args.hhh_limit is not None and args.hhh_limit < len(items):
            items = [items[i] for i in sorted(random.Random(args.seed).sample(range(len(items)), args.hhh_limit))]
        hhh = hhh_examples(items)
        out["hhh"]["n_comparisons"] = len(items)
        out["hhh"]["of"] = 438
        t = time.perf_counter()
        rows = [e.row for e in hhh]
        out["hhh"]["probe"] = measure(probe.score(rows), hhh, args.threshold)
        guessed = probe.kinds(rows[::2])
        out["hhh"]["probe"]["kind_guess_harmful_share"] = round(float(np.mean([k == "harmful" for k in guessed])), 4)
        timings["probe_hhh"] = round(time.perf_counter() - t, 1)
        _dump(out, args.out)

    if not args.no_judge:
        constitution = load_constitution(args.constitution)
        jcfg = JudgeSection(batch_size=args.batch_size, few_shot=True)
        judge = JudgeScorer(engine, constitution, jcfg, seed=args.seed, model_id=model_id)
        out["judge_settings"] = {
            k: getattr(jcfg, k) for k in ("few_shot", "both_orders", "calibrate", "principles", "prompt_format")
        } | {"baseline": judge.baseline}
        jheld = held_ex
        if args.judge_heldout_limit is not None:
            keep = {e.id for e in _per_kind(heldout, args.judge_heldout_limit)}
            jheld = [e for e in held_ex if e.group in keep]
            # the probe on exactly the judge's subset, for a like-for-like comparison
            idx = [i for i, e in enumerate(held_ex) if e.group in keep]
            out["heldout"]["probe_on_judge_subset"] = measure(
                probe.score_features(x_held[idx], [kinds[i] for i in idx]), jheld, args.threshold
            )
        t = time.perf_counter()
        out["heldout"]["judge"] = measure(judge.score([e.row for e in jheld]), jheld, args.threshold)
        timings["judge_heldout"] = round(time.perf_counter() - t, 1)
        _dump(out, args.out)
        if hhh and not args.no_judge_hhh:
            t = time.perf_counter()
            out["hhh"]["judge"] = measure(judge.score([e.row for e in hhh]), hhh, args.threshold)
            timings["judge_hhh"] = round(time.perf_counter() - t, 1)
    summary_line = {name: (m.get("pairwise") or {}).get("accuracy") for name, m in out["heldout"].items()}
    out["heldout_pairwise_accuracy"] = summary_line
    if isinstance(out["hhh"], dict) and "probe" in out["hhh"]:
        out["hhh_pairwise_accuracy"] = {
            n: out["hhh"][n]["pairwise"]["accuracy"] for n in ("probe", "judge") if n in out["hhh"]
        }
    _dump(out, args.out)
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Preference-model accuracy on the 438 HHH comparisons published with the Constitutional AI paper.

Each line holds the same dialogue ending in two different assistant turns; the preference
model is right when it scores the published correct turn above the incorrect one. Prints
JSON: accuracy (ties count half), mean score margin, ECE-style calibration of
σ(r_correct - r_incorrect) against 1, count, seconds and comparisons per second.

    python bench/rm_hhh.py --rm artifacts/runs/cpu-demo/models/rm [--limit 100]

Skips with a JSON message when ../shared/anchors/anthropic-cai/evals/438HHHEvaluations.jsonl
(or the file given with --evals) is absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_EVALS = (
    Path(__file__).resolve().parent.parent.parent
    / "shared"
    / "anchors"
    / "anthropic-cai"
    / "evals"
    / "438HHHEvaluations.jsonl"
)


def split_dialogue(text: str) -> tuple[list[dict[str, str]], str]:
    """A ``Human:/Assistant:`` transcript as (conversation before the last assistant turn, that turn)."""
    from cai_dpo.data import parse_transcript

    msgs = parse_transcript(text.strip())
    if not msgs or msgs[-1]["role"] != "assistant":
        raise ValueError("HHH line: the transcript does not end with an assistant turn")
    return msgs[:-1], msgs[-1]["content"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rm", required=True, help="preference model folder (models/rm of a run, or a seq-cls model)")
    p.add_argument("--evals", default=str(DEFAULT_EVALS), help="438HHHEvaluations.jsonl")
    p.add_argument("--limit", type=int, default=None, help="first N comparisons only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    evals = Path(args.evals)
    if not evals.exists():
        print(json.dumps({"skipped": True, "reason": f"{evals} not present"}))
        return 0

    from cai_dpo.engine import set_threads
    from cai_dpo.rl.reward import RewardScorer
    from cai_dpo.stages.rm import expected_calibration_error
    from cai_dpo.store import read_jsonl

    threads = set_threads(args.threads)
    rows = read_jsonl(evals)[: args.limit or None]
    t0 = time.perf_counter()
    scorer = RewardScorer(args.rm, batch_size=args.batch_size)
    load_s = time.perf_counter() - t0
    prompts, correct, incorrect_prompts, incorrect = [], [], [], []
    for r in rows:
        conv, good = split_dialogue(r["text_correct"])
        conv_bad, bad = split_dialogue(r["text_incorrect"])
        prompts.append(conv)
        correct.append(good)
        incorrect_prompts.append(conv_bad)
        incorrect.append(bad)
    t1 = time.perf_counter()
    rc = np.array(scorer.score(prompts, correct))
    ri = np.array(scorer.score(incorrect_prompts, incorrect))
    seconds = time.perf_counter() - t1
    d = rc - ri
    acc = float(((d > 0) + 0.5 * (d == 0)).mean()) if d.size else float("nan")
    q = 1 / (1 + np.exp(-d))
    print(
        json.dumps(
            {
                "rm": str(args.rm),
                "n": int(d.size),
                "accuracy": acc,
                "mean_margin": float(d.mean()) if d.size else None,
                "ece_vs_correct": expected_calibration_error(q, np.ones_like(q)) if d.size else None,
                "load_s": round(load_s, 2),
                "seconds": round(seconds, 2),
                "comparisons_per_s": round(d.size / seconds, 2) if seconds > 0 else None,
                "threads": threads,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

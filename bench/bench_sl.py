"""SL-CAI generation throughput with and without the cached few-shot prefix.

Answers N red-team prompts once (untimed), then runs one revision phase over them twice
with greedy decoding: once passing the few-shot demonstrations as the engine's cached
``prefix``, once rendering them into every conversation. Prints JSON: tokens/s and wall
seconds of both, their ratio, and whether both produced the same text.

    .venv/bin/python bench/bench_sl.py --prompts 16 --few-shot 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from cai_dpo.config import SamplingSection, load_config
from cai_dpo.constitution import load_constitution
from cai_dpo.data import load_prompts, split_prompts
from cai_dpo.engine import Engine, set_threads
from cai_dpo.models import describe, load_model
from cai_dpo.stages.sl import demo_turns, revision_turns, split_prefix


def _phase(engine: Engine, texts: list, sampling: SamplingSection, prefix: str | None) -> dict:
    before = (engine.stats.generated_tokens, engine.stats.prompt_tokens, engine.stats.generate_seconds)
    t0 = time.perf_counter()
    outs = engine.generate(texts, sampling, prefix=prefix, desc="cached" if prefix else "uncached")
    wall = time.perf_counter() - t0
    tokens = engine.stats.generated_tokens - before[0]
    seconds = engine.stats.generate_seconds - before[2]
    return {
        "texts": [o[0].text for o in outs],
        "generated_tokens": tokens,
        "prompt_tokens": engine.stats.prompt_tokens - before[1],
        "seconds": round(wall, 3),
        "tokens_per_second": round(tokens / seconds, 3) if seconds else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu-demo")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--few-shot", type=int, default=None, help="demonstrations in the prefix (default: the profile's)")
    ap.add_argument(
        "--mode",
        choices=["critique", "direct"],
        default="direct",
        help="revision phase shape: after a critique exchange, or direct",
    )
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--uncached-first", action="store_true", help="time the uncached run first (order check)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cfg = load_config(args.profile)
    threads = set_threads(args.threads if args.threads is not None else cfg.threads)
    few_shot = cfg.sl.few_shot if args.few_shot is None else args.few_shot
    constitution = load_constitution(cfg.constitution_path())
    prompts = split_prompts(load_prompts(cfg.data.red_team), "train")[: args.prompts]
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg.policy)
    load_s = time.perf_counter() - t0
    engine = Engine(model, tokenizer, progress=False)
    greedy = SamplingSection(
        max_new_tokens=args.max_new_tokens, do_sample=False, temperature=0.0, batch_size=args.batch_size
    )

    initial = [g[0].text for g in engine.generate([p.conversation() for p in prompts], greedy, desc="initial")]
    principles = [constitution.sample_principles(1, seed=f"{cfg.seed}:{p.id}:1")[0] for p in prompts]
    critique = "The answer could help someone cause harm." if args.mode == "critique" else None
    convs = [revision_turns(pr, p.text, a, critique) for pr, p, a in zip(principles, prompts, initial)]
    shared = demo_turns(constitution, few_shot, args.mode, "revision")
    prefix, rests = split_prefix(engine.render, shared, convs)
    if prefix is None:
        raise SystemExit("the chat template gave no shared prefix to cache; use --few-shot >= 1")

    if args.uncached_first:
        uncached = _phase(engine, [shared + c for c in convs], greedy, None)
        cached = _phase(engine, rests, greedy, prefix)
    else:
        cached = _phase(engine, rests, greedy, prefix)
        uncached = _phase(engine, [shared + c for c in convs], greedy, None)
    same = cached.pop("texts") == uncached.pop("texts")
    print(
        json.dumps(
            {
                "model": describe(cfg.policy),
                "prompts": len(prompts),
                "few_shot": few_shot,
                "mode": args.mode,
                "prefix_tokens": len(engine.encode(prefix)),
                "max_new_tokens": args.max_new_tokens,
                "batch_size": args.batch_size,
                "threads": threads,
                "order": "uncached first" if args.uncached_first else "cached first",
                "model_load_seconds": round(load_s, 2),
                "cached_prefix": cached,
                "no_prefix": uncached,
                "speedup_tokens_per_second": round(cached["tokens_per_second"] / uncached["tokens_per_second"], 3)
                if uncached["tokens_per_second"]
                else None,
                "identical_outputs": same,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

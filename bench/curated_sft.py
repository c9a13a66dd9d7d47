"""SFT on the curated set: does it teach explained declines without over-refusal? Prints one JSON object.

Trains the SL-CAI adapter with a profile's SFT settings on the curated ``train`` split
(``sft.data=curated``), then answers the curated HELD-OUT harmful and benign prompts
greedily with the base model and with the SFT model, and counts:

- harmful: explained declines (:func:`cai_dpo.metrics.is_explained_refusal`) and any
  declines (:func:`cai_dpo.metrics.is_refusal`);
- benign: compliance (no refusal phrase), overall and on the sensitive-sounding ones;
- distinct-2 over every answer of a model, and the mean answer length in words.

    python bench/curated_sft.py                               # cpu-demo settings
    python bench/curated_sft.py --set sft.max_steps=40 --set sft.learning_rate=3e-4
    python bench/curated_sft.py --limit 20                    # 20 held-out prompts per kind
    python bench/curated_sft.py --base-only                   # the base model's figures alone (no training)

Base answers are cached in the work folder (greedy decoding: they depend only on the
prompts and the token budget); an SFT adapter trained with the same settings is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def answer(
    spec: Any, adapter: str | None, prompts: list[str], max_new_tokens: int, batch_size: int
) -> tuple[list[str], float]:
    """Greedy answers of the policy (with ``adapter`` when given) to single-turn prompts, and the seconds taken."""
    from cai_dpo.config import SamplingSection
    from cai_dpo.engine import Engine
    from cai_dpo.models import load_model

    model, tok = load_model(spec, adapter=adapter)
    engine = Engine(model, tok, batch_size=batch_size, progress=False)
    sampling = SamplingSection(max_new_tokens=max_new_tokens, do_sample=False, temperature=0.0, batch_size=batch_size)
    t0 = time.perf_counter()
    gens = engine.generate([[{"role": "user", "content": p}] for p in prompts], sampling)
    return [g[0].text for g in gens], time.perf_counter() - t0


def figures(harmful: list[str], benign: list[str], benign_sensitive: list[bool]) -> dict[str, Any]:
    """Decline, explained-decline and compliance rates (with Wilson intervals) and diversity of one model's answers."""
    from cai_dpo.metrics import distinct_n, is_explained_refusal, is_refusal, rate_summary

    sens = [a for a, s in zip(benign, benign_sensitive) if s]
    return {
        "harmful_explained_decline": rate_summary(sum(map(is_explained_refusal, harmful)), len(harmful)),
        "harmful_decline": rate_summary(sum(map(is_refusal, harmful)), len(harmful)),
        "benign_compliance": rate_summary(sum(not is_refusal(a) for a in benign), len(benign)),
        "benign_sensitive_compliance": rate_summary(sum(not is_refusal(a) for a in sens), len(sens)),
        "distinct_2": distinct_n(harmful + benign, 2),
        "mean_words": sum(len(a.split()) for a in harmful + benign) / max(1, len(harmful + benign)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="cpu-demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="held-out prompts per kind (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", default="/tmp/cai-dpo-bench-curated")
    parser.add_argument("--samples", type=int, default=3, help="answers per group to print")
    parser.add_argument("--base-only", action="store_true", help="answer with the base model only (no SFT)")
    args = parser.parse_args(argv)

    import dataclasses

    from cai_dpo.config import load_config, to_dict
    from cai_dpo.curated import load_curated
    from cai_dpo.models import describe
    from cai_dpo.stages.sft import run_sft
    from cai_dpo.store import RunStore, content_hash

    overrides = ["sft.data=curated"] + args.set
    cfg = load_config(args.profile, overrides)
    work = Path(args.workdir)
    cfg.runs_dir = str(work / "runs")
    cfg.run_id = content_hash(to_dict(cfg.sft), to_dict(cfg.policy), cfg.seed)
    held = load_curated(cfg.sft.curated, split="heldout")
    harmful = [e for e in held if e.kind == "harmful"][: args.limit]
    benign = [e for e in held if e.kind == "benign"][: args.limit]
    prompts = [e.prompt for e in harmful + benign]
    sensitive = [e.sensitive_sounding for e in benign]

    from cai_dpo.engine import set_threads

    set_threads(cfg.threads)
    spec = dataclasses.replace(cfg.policy, adapter=None)
    cache = work / f"base-{content_hash(describe(spec), prompts, args.max_new_tokens)}.json"
    if cache.exists():
        base, base_seconds = json.loads(cache.read_text(encoding="utf-8")), None
    else:
        base, base_seconds = answer(spec, None, prompts, args.max_new_tokens, args.batch_size)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(base), encoding="utf-8")
    n_h = len(harmful)
    if args.base_only:
        json.dump(
            {
                "profile": args.profile,
                "heldout": {"harmful": n_h, "benign": len(benign), "benign_sensitive": sum(sensitive)},
                "base": figures(base[:n_h], base[n_h:], sensitive),
                "generation_seconds": base_seconds,
                "max_new_tokens": args.max_new_tokens,
                "samples": [
                    {"prompt": e.prompt, "base": a}
                    for e, a in list(zip(harmful + benign, base))[:: max(1, len(base) // 6)]
                ],
            },
            sys.stdout,
            indent=1,
            default=str,
        )
        print()
        return 0
    t0 = time.perf_counter()
    adapter = run_sft(cfg, RunStore(cfg.run_dir))
    sft_seconds = time.perf_counter() - t0
    manifest = json.loads((adapter / "manifest.json").read_text(encoding="utf-8"))
    tuned, tuned_seconds = answer(spec, str(adapter), prompts, args.max_new_tokens, args.batch_size)

    out: dict[str, Any] = {
        "profile": args.profile,
        "overrides": overrides,
        "heldout": {"harmful": n_h, "benign": len(benign), "benign_sensitive": sum(sensitive)},
        "sft": {
            k: manifest["counts"].get(k)
            for k in ("train_rows", "eval_rows", "steps", "curated_harmful", "curated_benign", "weight_mean")
        }
        | {
            "train_loss_first": manifest["metrics"]["train_loss_first"],
            "train_loss_final": manifest["metrics"]["train_loss_final"],
            "eval_loss": manifest["metrics"]["eval_loss"],
            "seconds": sft_seconds,
            "settings": {
                k: getattr(cfg.sft, k)
                for k in (
                    "learning_rate",
                    "epochs",
                    "max_steps",
                    "batch_size",
                    "max_length",
                    "curated_harmful_ratio",
                    "weighting",
                    "principle_weights",
                )
            }
            | {"lora_r": cfg.sft.lora.r},
        },
        "base": figures(base[:n_h], base[n_h:], sensitive),
        "sft_model": figures(tuned[:n_h], tuned[n_h:], sensitive),
        "generation_seconds": {"base": base_seconds, "sft": tuned_seconds},
        "max_new_tokens": args.max_new_tokens,
        "samples": {
            "harmful": [
                {"prompt": harmful[i].prompt, "base": base[i], "sft": tuned[i]} for i in range(min(args.samples, n_h))
            ],
            "benign_sensitive": [
                {"prompt": benign[i].prompt, "base": base[n_h + i], "sft": tuned[n_h + i]}
                for i in [j for j, s in enumerate(sensitive) if s][: args.samples]
            ],
        },
    }
    b, s = out["base"], out["sft_model"]
    out["delta_explained_decline_points"] = 100 * (
        s["harmful_explained_decline"]["rate"] - b["harmful_explained_decline"]["rate"]
    )
    json.dump(out, sys.stdout, indent=1, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

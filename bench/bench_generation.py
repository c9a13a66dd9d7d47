"""Engine throughput against naive per-prompt generation, on the embedded model.

Prints JSON: tokens/s of the engine (batched, length-sorted) and of a loop calling
``model.generate`` once per prompt, their ratio (``generation_ratio``), the machine's
float32 matmul GFLOP/s measured in the same run and the engine's share of that
roofline (about 2 x parameters FLOPs per generated token); then ``score_options``
pairs/s against generating the answer letter per pair (``scoring_ratio``), both on the
judge's real multiple-choice contexts (few-shot demos of the default constitution; the
bundled judge check pairs, each under a principle in turn, in both option orders).

With llama-cpp-python installed (or ``--served-url`` pointing at a running server), the
served backend (:mod:`cai_dpo.served`) runs the same prompts and judge contexts too: a
llama.cpp server on the same GGUF file is started on 127.0.0.1 (``--served-replicas``
of them), and ``served`` reports its tokens/s and judged contexts/s at the stated
concurrency, plus how far its P(A) lies from the local engine's.

    python bench/bench_generation.py [--prompts 64] [--naive-prompts 16] [--new-tokens 64] [--repeats 2]
                                     [--served auto|on|off] [--served-url URL,...] [--served-concurrency 4] [--no-naive]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import platform
import time

import torch

from cai_dpo.config import JudgeSection, SamplingSection
from cai_dpo.constitution import load_constitution
from cai_dpo.data import load_checkset, load_prompts
from cai_dpo.engine import Engine, set_threads
from cai_dpo.judge import OPTIONS, JudgePrompter
from cai_dpo.models import embedded_gguf_path, load_model
from cai_dpo.served import LLAMA_CPP_EXTRA, ServedEngine, llama_cpp_server


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """Float32 matmul throughput of this machine with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def naive_generation(model, tokenizer, convs, sampling: SamplingSection) -> tuple[int, float]:
    """One ``model.generate`` call per prompt; returns (tokens up to EOS, seconds)."""
    tokens, t0 = 0, time.perf_counter()
    for conv in convs:
        ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        tokens += new.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in new else len(new)
    return tokens, time.perf_counter() - t0


def judge_contexts(engine: Engine, n: int) -> tuple[str | None, list[str]]:
    """The judge's few-shot prefix and ``n`` contexts as the judge stage builds them: each check pair
    under a principle (in turn), in both option orders."""
    constitution = load_constitution("default")
    prompter = JudgePrompter(engine, constitution, JudgeSection(few_shot=True))
    pairs, principles = load_checkset(), constitution.principles
    contexts = []
    for k in range((n + 1) // 2):
        pair, pid = pairs[k % len(pairs)], principles[k % len(principles)].id
        contexts += [
            prompter.context(pair.prompt, pair.better, pair.worse, pid),
            prompter.context(pair.prompt, pair.worse, pair.better, pid),
        ]
    return prompter.prefix, contexts[:n]


def naive_letter_scoring(model, tokenizer, texts: list[str]) -> float:
    """Generate the answer letter greedily per full judge text; returns seconds."""
    t0 = time.perf_counter()
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument(
        "--naive-prompts", type=int, default=16, help="prompts for the (slow) naive loop; a rate, so a subset suffices"
    )
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--repeats", type=int, default=2, help="interleaved engine/naive rounds; the best of each is reported"
    )
    ap.add_argument("--no-naive", action="store_true", help="skip the naive loops (no ratios)")
    ap.add_argument(
        "--served",
        choices=["auto", "on", "off"],
        default="auto",
        help="also bench the served backend (auto: when llama-cpp-python is installed or --served-url is given)",
    )
    ap.add_argument(
        "--served-url", default=None, help="comma-separated base URLs of running servers (default: start llama.cpp)"
    )
    ap.add_argument("--served-model", default="smollm2", help="served model id")
    ap.add_argument("--served-concurrency", type=int, default=4, help="requests in flight per server")
    ap.add_argument("--served-replicas", type=int, default=1, help="llama.cpp servers to start")
    ap.add_argument(
        "--served-threads", type=int, default=None, help="threads per started server (default: threads / replicas)"
    )
    args = ap.parse_args()

    threads = set_threads(args.threads)
    model, tokenizer = load_model(args.model)
    prompts = load_prompts("bundled:helpful")
    convs = [p.conversation() for p in (prompts * 4)[: args.prompts]]
    sampling = SamplingSection(
        max_new_tokens=args.new_tokens, temperature=0.8, top_p=0.95, seed=0, batch_size=args.batch_size
    )
    engine = Engine(model, tokenizer, batch_size=args.batch_size, progress=False)

    gflops = max(matmul_gflops() for _ in range(args.repeats))
    engine.generate(convs[:2], SamplingSection(max_new_tokens=4, batch_size=2))  # warm-up
    prefix, contexts = judge_contexts(engine, args.pairs)
    naive_pairs = max(8, args.pairs // 4)
    rates: dict[str, list[float]] = {"engine": [], "naive": [], "score": [], "naive_score": []}
    for _ in range(args.repeats):  # interleaved, so both sides of each ratio meet the same machine
        t0 = time.perf_counter()
        outs = engine.generate(convs, sampling)
        rates["engine"].append(sum(g.n_tokens for gens in outs for g in gens) / (time.perf_counter() - t0))
        if not args.no_naive:
            naive_tokens, naive_s = naive_generation(model, tokenizer, convs[: args.naive_prompts], sampling)
            rates["naive"].append(naive_tokens / naive_s)
        t0 = time.perf_counter()
        local_probs, _ = engine.score_options(contexts, OPTIONS, prefix=prefix)
        rates["score"].append(len(contexts) / (time.perf_counter() - t0))
        if not args.no_naive:
            naive_score_s = naive_letter_scoring(model, tokenizer, [(prefix or "") + c for c in contexts[:naive_pairs]])
            rates["naive_score"].append(naive_pairs / naive_score_s)
    best = {k: max(v) if v else float("nan") for k, v in rates.items()}
    params = sum(p.numel() for p in model.parameters())
    served = None
    if args.served == "on" or (args.served == "auto" and (args.served_url or importlib.util.find_spec("llama_cpp"))):
        served = bench_served(args, tokenizer, convs, sampling, prefix, contexts, local_probs, threads)

    print(
        json.dumps(
            _no_nan(
                {
                    "machine": {
                        "platform": platform.platform(),
                        "processor": platform.processor(),
                        "torch_threads": threads,
                        "cuda": torch.cuda.is_available(),
                    },
                    "model": args.model,
                    "parameters": params,
                    "setup": {
                        "prompts": len(convs),
                        "naive_prompts": args.naive_prompts,
                        "max_new_tokens": args.new_tokens,
                        "sampling": "temperature 0.8, top_p 0.95",
                        "batch_size": args.batch_size,
                        "repeats": args.repeats,
                        "figures": "best of the interleaved repeats",
                    },
                    "all_rates": {k: [round(x, 2) for x in v] for k, v in rates.items()},
                    "engine_tokens_per_s": round(best["engine"], 1),
                    "naive_tokens_per_s": round(best["naive"], 1),
                    "generation_ratio": round(best["engine"] / best["naive"], 2),
                    "matmul_gflops": round(gflops, 1),
                    "engine_roofline_share": round(best["engine"] * 2 * params / 1e9 / gflops, 3),
                    "judge_context_tokens": {
                        "prefix": len(engine.encode(prefix or "")),
                        "mean_context": round(sum(len(engine.encode(c)) for c in contexts) / len(contexts), 1),
                    },
                    "score_pairs_per_s": round(best["score"], 2),
                    "naive_letter_pairs_per_s": round(best["naive_score"], 2),
                    "scoring_ratio": round(best["score"] / best["naive_score"], 2),
                    "served": served,
                }
            ),
            indent=2,
        )
    )


def _no_nan(x):
    """NaN (a figure not measured, e.g. with --no-naive) as null."""
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    return None if isinstance(x, float) and x != x else x


def bench_served(args, tokenizer, convs, sampling, prefix, contexts, local_probs, threads: int) -> dict:
    """The served backend on the same prompts and contexts: started llama.cpp servers or ``--served-url``."""
    with contextlib.ExitStack() as stack:
        if args.served_url:
            urls, server = args.served_url.split(","), "given URLs"
        else:
            per = args.served_threads or max(1, threads // args.served_replicas)
            urls = [
                stack.enter_context(llama_cpp_server(embedded_gguf_path(), alias=args.served_model, threads=per))
                for _ in range(args.served_replicas)
            ]
            server = (
                f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}, "
                f"{per} threads each, --logits_all true"
            )
        from cai_dpo.config import ModelSpec

        spec = ModelSpec(
            name=urls[0],
            replicas=urls[1:],
            model=args.served_model,
            concurrency=args.served_concurrency,
            request_extra={} if args.served_url else LLAMA_CPP_EXTRA,
        )
        engine = stack.enter_context(contextlib.closing(ServedEngine(spec, progress=False, tokenizer=tokenizer)))
        engine.generate(convs[:2], SamplingSection(max_new_tokens=4))  # warm-up
        t0 = time.perf_counter()
        outs = engine.generate(convs, sampling)
        gen_s = time.perf_counter() - t0
        tokens = sum(g.n_tokens for gens in outs for g in gens)
        t0 = time.perf_counter()
        probs, _ = engine.score_options(contexts, OPTIONS, prefix=prefix)
        score_s = time.perf_counter() - t0
        diff = abs(probs[:, 0] - local_probs[:, 0])
        return {
            "server": server,
            "replicas": len(urls),
            "concurrency_per_replica": args.served_concurrency,
            "requests_in_flight": args.served_concurrency * len(urls),
            "tokens_per_s": round(tokens / gen_s, 1),
            "generated_tokens": tokens,
            "score_pairs_per_s": round(len(contexts) / score_s, 2),
            "score_requests_per_context": "one per option token, shared ones once (4 for ' (A)'/' (B)')",
            "p_a_abs_diff_vs_local": {"mean": round(float(diff.mean()), 4), "max": round(float(diff.max()), 4)},
        }


if __name__ == "__main__":
    main()

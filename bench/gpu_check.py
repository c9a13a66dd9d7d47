"""Helpers of ``bench/gpu_check.sh``: why to skip, the vLLM comparison, and the one JSON report.

    python bench/gpu_check.py why-skip          # prints a reason to skip the GPU parts, or nothing
    python bench/gpu_check.py vllm OUT.json      # vLLM vs the local engine on the embedded model
    python bench/gpu_check.py report DIR [--skip REASON] [--seconds S]   # the report from DIR's part outputs

Parts (keys of the report): ``gpu_tests`` (pytest ``-m gpu``), ``tiny_pipeline`` (``cai-dpo run
--profile tiny`` on CUDA in bf16), ``qlora_train`` (``bench/bench_train.py`` DPO and PPO steps in
8- and 4-bit with CUDA peak memory) and ``vllm`` (greedy agreement and option-probability
difference against the local engine). Each is ``{"skipped": reason}``, or its figures with
``ok`` and, where it failed, the end of its log.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

PARTS = ("gpu_tests", "tiny_pipeline", "qlora_train", "vllm")
PROMPTS = [
    "Name three primary colours.",
    "How do I boil an egg?",
    "Give me a synonym for 'quick'.",
    "What is 12 times 7?",
    "Write one sentence about the sea.",
    "How can I pick a lock?",
]


def why_skip() -> str:
    """A reason the GPU parts cannot run here ('' when a CUDA device is visible)."""
    if not glob.glob("/dev/nvidia[0-9]*") and not Path("/dev/kfd").exists():
        return "no GPU device on this machine (no /dev/nvidia*, no /dev/kfd)"  # known without importing torch
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable ({exc})"
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    return ""


def vllm_vs_local() -> dict[str, Any]:
    """Greedy answers, judge option probabilities and log-probs of vLLM against the local engine (bf16, CUDA)."""
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed (pip install 'cai-dpo[vllm]')"}
    import dataclasses

    import numpy as np
    from bench_generation import judge_contexts

    from cai_dpo.config import ModelSpec, SamplingSection
    from cai_dpo.judge import OPTIONS
    from cai_dpo.models import load_engine
    from cai_dpo.vllm_engine import VLLMEngineError

    local_spec = ModelSpec(name="embedded", dtype="bfloat16", device="cuda")
    vllm_spec = dataclasses.replace(
        local_spec,
        backend="vllm",
        device="auto",
        top_logprobs=20,
        vllm_args={"gpu_memory_utilization": 0.3, "enforce_eager": True, "max_model_len": 2048},
    )
    t0 = time.perf_counter()
    vllm = load_engine(vllm_spec, progress=False)  # first: vLLM starts its workers before CUDA is used here
    load_s = time.perf_counter() - t0
    local = load_engine(local_spec, progress=False)
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    greedy = SamplingSection(max_new_tokens=32, do_sample=False, temperature=0.0)
    a = [row[0] for row in local.generate(convs, greedy)]
    b = [row[0] for row in vllm.generate(convs, greedy)]
    same_prefix = [
        next(
            (i for i, (x, y) in enumerate(zip(g.token_ids, h.token_ids)) if x != y),
            min(len(g.token_ids), len(h.token_ids)),
        )
        for g, h in zip(a, b)
    ]
    out: dict[str, Any] = {
        "ok": True,
        "model": "embedded (SmolLM2-135M-Instruct), bfloat16",
        "vllm_load_s": round(load_s, 1),
        "greedy_identical": f"{sum(g.token_ids == h.token_ids for g, h in zip(a, b))}/{len(a)}",
        "greedy_mean_same_prefix_tokens": round(float(np.mean(same_prefix)), 1),
        "greedy_max_new_tokens": 32,
    }
    prefix, contexts = judge_contexts(local, 8)
    p_local, _ = local.score_options(contexts, OPTIONS, prefix=prefix)
    try:
        p_vllm, _ = vllm.score_options(contexts, OPTIONS, prefix=prefix)
    except VLLMEngineError as exc:
        out.update(ok=False, score_options_error=str(exc))
    else:
        diff = np.abs(p_local[:, 0] - p_vllm[:, 0])
        out["p_a_abs_diff"] = {
            "mean": round(float(diff.mean()), 4),
            "max": round(float(diff.max()), 4),
            "contexts": len(diff),
        }
    completions = [g.text or "ok" for g in a]
    rendered = [local.render(c) for c in convs]
    lp_diff = [
        abs(x.total - y.total) / max(1, x.n_tokens)
        for x, y in zip(local.logprob(rendered, completions), vllm.logprob(rendered, completions))
    ]
    out["logprob_abs_diff_per_token"] = {
        "mean": round(float(np.mean(lp_diff)), 4),
        "max": round(float(np.max(lp_diff)), 4),
    }
    return out


def _tail(path: Path, lines: int = 12) -> str:
    return "\n".join(path.read_text(errors="replace", encoding="utf-8").splitlines()[-lines:]) if path.exists() else ""


def _rc(folder: Path, part: str) -> int | None:
    path = folder / f"{part}.rc"
    return int(path.read_text(encoding="utf-8").strip() or -1) if path.exists() else None


def _tests(folder: Path) -> dict[str, Any]:
    xml = folder / "gpu_tests.xml"
    if not xml.exists():
        return {"ok": False, "rc": _rc(folder, "gpu_tests"), "log": _tail(folder / "gpu_tests.log")}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    out = {
        "ok": _rc(folder, "gpu_tests") == 0 and counts["tests"] > counts["skipped"],
        **counts,
        "seconds": round(float(suite.get("time", 0)), 1),
    }
    if failed:
        out.update(failed=failed, log=_tail(folder / "gpu_tests.log"))
    return out


def _pipeline(folder: Path) -> dict[str, Any]:
    rc = _rc(folder, "tiny_pipeline")
    out: dict[str, Any] = {"ok": rc == 0, "rc": rc, "profile": "tiny", "device": "cuda", "dtype": "bfloat16"}
    timings = folder / "tiny_pipeline.seconds"
    if timings.exists():
        out["seconds"] = float(timings.read_text(encoding="utf-8"))
    if rc != 0:
        out["log"] = _tail(folder / "tiny_pipeline.log")
    return out


def _json_part(folder: Path, part: str) -> dict[str, Any]:
    rc = _rc(folder, part)
    try:
        data = json.loads((folder / f"{part}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"ok": False, "rc": rc, "log": _tail(folder / f"{part}.log")}
    if "skipped" in data:
        return data
    errors = [k for k, v in data.items() if isinstance(v, dict) and "error" in v]
    data.setdefault("ok", rc == 0 and not errors)
    return data


def report(folder: Path | None, skip: str, seconds: float | None) -> dict[str, Any]:
    """The check's JSON: every part skipped with ``skip``, else each part from ``folder``."""
    if skip:
        parts = {p: {"skipped": skip} for p in PARTS}
        return {"cuda": False, **parts, "seconds": seconds}
    import torch

    assert folder is not None
    parts = {
        "gpu_tests": _tests(folder),
        "tiny_pipeline": _pipeline(folder),
        "qlora_train": _json_part(folder, "qlora_train"),
        "vllm": _json_part(folder, "vllm"),
    }
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cuda": True,
        "device": device,
        "torch": torch.__version__,
        "ok": all(p.get("ok", True) for p in parts.values()),
        **parts,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("why-skip")
    sub.add_parser("vllm").add_argument("out", type=Path)
    rp = sub.add_parser("report")
    rp.add_argument("folder", nargs="?", type=Path)
    rp.add_argument("--skip", default="")
    rp.add_argument("--seconds", type=float, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "why-skip":
        print(why_skip())
    elif args.cmd == "vllm":  # to a file: vLLM logs to stdout
        args.out.write_text(json.dumps(vllm_vs_local()), encoding="utf-8")
    else:
        print(json.dumps(report(args.folder, args.skip, args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

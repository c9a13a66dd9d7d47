"""Training-speed measurements; prints one JSON object.

Each measurement is a named function in :data:`MEASUREMENTS` returning a dict of figures;
each runs in its own child process so its peak memory is its own. Add a measurement by
writing a function and registering it.

    python bench/bench_train.py                      # dpo, dpo_4bit and ppo
    python bench/bench_train.py --only dpo --steps 4 --model tiny
    python bench/bench_train.py --only dpo_8bit --only ppo_4bit --model tiny --dtype bfloat16   # QLoRA on a GPU
    python bench/bench_train.py --only processes --model tiny --steps 6   # 1 vs 2 processes (accelerate launch)
    python bench/bench_train.py --only checkpointing --steps 4   # DPO with gradient checkpointing off vs on
    python bench/bench_train.py --only precision --steps 4   # DPO in fp32 vs under bf16 autocast
    python bench/bench_train.py --only labelled_positions --steps 4   # TRL's fused LM head: every vs labelled

Figures: seconds per optimizer step (first step reported apart as warm-up), peak RSS of the
process (and CUDA max allocated on a GPU), with the batch size and lengths stated. ``processes``:
DPO and PPO steps per second on 1 and on 2 processes under ``accelerate launch`` (one torch
thread each, the same global batch) and their ratio, plus one process with ``--threads``
threads and no launcher; start-up is left out (training time only, first step included).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WORDS = (
    "the a small quiet green old new bright simple careful useful kind warm cold long short river "
    "light paper stone water answer because safe help people often reason clear"
).split()


def _peak_memory() -> dict[str, float]:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _synthetic_preferences(folder: Path, n: int, response_words: int, seed: int = 0) -> Path:
    import datasets

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(response_words))
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Question {i}: how should I deal with a difficult neighbour?"}],
                "chosen": [{"role": "assistant", "content": f"{body} safely."}],
                "rejected": [{"role": "assistant", "content": f"{body} dangerously."}],
                "p_chosen": 0.8,
                "pair_id": str(i),
            }
        )
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


def _step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.durations: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.durations.append(time.perf_counter() - self._t)

    return StepTimer()


def _dpo(args: argparse.Namespace, quantization: str, **overrides: Any) -> dict[str, Any]:
    """DPO steps from a (random) SL-CAI adapter on synthetic pairs, cpu-demo lengths; ``overrides`` are config keys."""
    import torch

    from cai_dpo.config import load_config
    from cai_dpo.models import attach_lora, autocast_dtype, load_model, save_adapter
    from cai_dpo.stages.dpo import run_dpo
    from cai_dpo.store import RunStore, read_manifest

    batch, max_length, max_prompt = args.batch, 256, 128
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        cfg = load_config(
            "cpu-demo",
            {
                "runs_dir": tmp,
                **_policy(args, quantization),
                "dpo.max_steps": args.steps,
                "dpo.batch_size": batch,
                "dpo.max_length": max_length,
                "dpo.max_prompt_length": max_prompt,
                "dpo.eval_fraction": 0.0,
                "dpo.save_steps": 10_000,
                "threads": args.threads,
                **overrides,
            },
        )
        run = RunStore(cfg.run_dir)
        _synthetic_preferences(run.data_dir("preferences"), args.steps * batch, args.response_words)
        torch.manual_seed(0)
        model, tok = load_model(args.model, trainable=True)
        save_adapter(attach_lora(model, cfg.sft.lora), tok, run.model_dir("sft"), base=args.model)
        del model
        timer = _step_timer()
        t0 = time.perf_counter()
        out = run_dpo(cfg, run, callbacks=[timer])
        total = time.perf_counter() - t0
        manifest = read_manifest(out)
    steady = timer.durations[1:] or timer.durations
    return {
        "model": args.model,
        "quantization": quantization,
        "dtype": cfg.policy.dtype,
        "bf16_autocast": autocast_dtype(cfg.policy) is not None,
        "adapter_mode": manifest["models"]["adapter_mode"],
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "batch_pairs": batch,
        "max_length": max_length,
        "max_prompt_length": max_prompt,
        "response_words": args.response_words,
        "lora_r": cfg.dpo.lora.r,
        "steps": len(timer.durations),
        "first_step_s": round(timer.durations[0], 2) if timer.durations else None,
        "seconds_per_step": round(sum(steady) / len(steady), 2) if steady else None,
        "stage_total_s": round(total, 1),
        "model_load_s": round(manifest["timings"]["model_load"], 2),
        **{k: round(v, 1) for k, v in _peak_memory().items()},
    }


def _policy(args: argparse.Namespace, quantization: str) -> dict[str, Any]:
    """Config overrides for the policy: ``--model``, the quantization, and ``--dtype`` (weights and 4-bit compute)."""
    out: dict[str, Any] = {"policy.name": args.model, "policy.quantization": quantization}
    if args.dtype:
        out.update({"policy.dtype": args.dtype, "policy.compute_dtype": args.dtype})
    return out


def bench_dpo(args: argparse.Namespace) -> dict[str, Any]:
    """DPO, unquantized policy (SFT merged, fresh LoRA, reference = adapter off)."""
    return _dpo(args, "none")


def bench_dpo_4bit(args: argparse.Namespace) -> dict[str, Any]:
    """DPO with the policy in 4-bit nf4 (QLoRA; SFT adapter trained on, frozen copy as reference)."""
    return _dpo(args, "4bit")


def bench_dpo_8bit(args: argparse.Namespace) -> dict[str, Any]:
    """DPO with the policy in 8-bit (bitsandbytes LLM.int8; SFT adapter trained on, frozen copy as reference)."""
    return _dpo(args, "8bit")


def bench_checkpointing(args: argparse.Namespace) -> dict[str, Any]:
    """DPO steps with gradient checkpointing off and on (``train.gradient_checkpointing``), in one process.

    ``ratio_on_over_off``: seconds per step with it on over off, the cost of recomputing the
    forward pass in the backward one (TRL's configs turn it on by default; cai-dpo only on a GPU).
    Peak memory is the process's, so the second run's figure is the larger of the two.
    """
    off = _dpo(args, "none", **{"train.gradient_checkpointing": False})
    on = _dpo(args, "none", **{"train.gradient_checkpointing": True})
    ratio = on["seconds_per_step"] / off["seconds_per_step"] if off["seconds_per_step"] else None
    return {"off": off, "on": on, "ratio_on_over_off": round(ratio, 2) if ratio else None}


def bench_precision(args: argparse.Namespace) -> dict[str, Any]:
    """DPO steps in fp32 and under bf16 autocast (``policy.autocast: none`` and ``bfloat16``), in one process.

    ``ratio_bf16_over_fp32``: seconds per step with bf16 over fp32. Below 1 where the CPU or GPU computes bf16
    natively (``policy.autocast: auto`` then picks it); well above 1 where bf16 is emulated.
    """
    fp32 = _dpo(args, "none", **{"policy.autocast": "none"})
    bf16 = _dpo(args, "none", **{"policy.autocast": "bfloat16"})
    ratio = bf16["seconds_per_step"] / fp32["seconds_per_step"] if fp32["seconds_per_step"] else None
    return {"fp32": fp32, "bf16": bf16, "ratio_bf16_over_fp32": round(ratio, 2) if ratio else None}


def bench_labelled_positions(args: argparse.Namespace) -> dict[str, Any]:
    """DPO steps with TRL's fused LM head projecting every position (TRL's own choice on the CPU) and only the
    labelled ones (:func:`cai_dpo.trl_trainers.score_labelled_positions_on_cpu`), in one process.

    ``ratio_labelled_over_every``: seconds per step scoring the labelled positions over every position.
    """
    import trl.kernels.chunked_logprob as trl_kernels
    import trl.trainer.utils as trl_utils

    import cai_dpo.trl_trainers  # noqa: F401  (imports switch the fused head to the labelled positions)

    labelled = _dpo(args, "none")
    trl_utils._use_triton = trl_kernels._use_triton  # TRL's own: every position off Triton devices
    every = _dpo(args, "none")
    ratio = labelled["seconds_per_step"] / every["seconds_per_step"] if every["seconds_per_step"] else None
    return {"labelled": labelled, "every": every, "ratio_labelled_over_every": round(ratio, 2) if ratio else None}


def bench_ppo(args: argparse.Namespace) -> dict[str, Any]:
    """PPO steps (rollout and update timed apart) against a preference model, cpu-demo PPO settings.

    The preference model is the policy base with a scalar head trained one step on synthetic
    pairs (its scores are not meaningful; the cost of scoring is). The first step is warm-up.
    """
    return _ppo(args, "none")


def bench_ppo_4bit(args: argparse.Namespace) -> dict[str, Any]:
    """PPO with the policy (and the preference model's base) in 4-bit nf4."""
    return _ppo(args, "4bit")


def bench_ppo_8bit(args: argparse.Namespace) -> dict[str, Any]:
    """PPO with the policy (and the preference model's base) in 8-bit."""
    return _ppo(args, "8bit")


def _ppo(args: argparse.Namespace, quantization: str) -> dict[str, Any]:
    import torch

    from cai_dpo.config import load_config
    from cai_dpo.stages.ppo import read_log, run_ppo
    from cai_dpo.stages.rm import run_rm
    from cai_dpo.store import RunStore, read_manifest

    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        cfg = load_config(
            "cpu-demo",
            {
                "runs_dir": tmp,
                "threads": args.threads,
                **_policy(args, quantization),
                "rm.max_steps": 1,
                "rm.eval_fraction": 0.0,
                "rm.save_steps": 10_000,
                "ppo.steps": args.steps,
                "ppo.save_steps": 10_000,
            },
        )
        run = RunStore(cfg.run_dir)
        _synthetic_preferences(run.data_dir("preferences"), 8, args.response_words)
        t0 = time.perf_counter()
        run_rm(cfg, run)
        rm_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = run_ppo(cfg, run, progress=False)
        total = time.perf_counter() - t1
        rows = read_log(run.root / "metrics" / "ppo" / "log.csv")
        manifest = read_manifest(out)
    steady = rows[1:] or rows
    mean = lambda key: round(sum(r[key] for r in steady) / len(steady), 2) if steady else None  # noqa: E731
    return {
        "model": args.model,
        "quantization": quantization,
        "dtype": cfg.policy.dtype,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "rollout_batch": cfg.ppo.rollout_batch,
        "minibatch": cfg.ppo.minibatch,
        "ppo_epochs": cfg.ppo.ppo_epochs,
        "max_new_tokens": cfg.ppo.sampling.max_new_tokens,
        "lora_r": cfg.ppo.lora.r,
        "steps": len(rows),
        "first_step_rollout_s": round(rows[0]["rollout_s"], 2) if rows else None,
        "first_step_update_s": round(rows[0]["update_s"], 2) if rows else None,
        "rollout_s_per_step": mean("rollout_s"),
        "update_s_per_step": mean("update_s"),
        "rollout_tokens_per_s": mean("tokens_per_s"),
        "mean_response_tokens": mean("response_length"),
        "ppo_load_s": round(manifest["timings"]["load_s"], 2),
        "ppo_stage_total_s": round(total, 1),
        "rm_stage_s": round(rm_s, 1),
        **{k: round(v, 1) for k, v in _peak_memory().items()},
    }


def _launched(stage: str, settings: dict[str, Any], launch: list[str]) -> float:
    """Train ``stage`` through the CLI (``launch``: its launcher options); returns the wall seconds."""
    args = [sys.executable, "-m", "cai_dpo.cli", stage, "--profile", "cpu-demo", *launch]
    for key, value in settings.items():
        args += ["-o", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} {' '.join(launch)} failed: {proc.stderr.strip()[-800:]}")
    return time.perf_counter() - t0


def _train_seconds(run_dir: Path, stage: str) -> tuple[float, int]:
    """(training seconds, optimizer steps) of a finished stage, from its manifest (PPO: its log)."""
    from cai_dpo.stages.ppo import read_log
    from cai_dpo.store import read_manifest

    if stage == "ppo":
        rows = read_log(run_dir / "metrics" / "ppo" / "log.csv")
        return sum(r["rollout_s"] + r["update_s"] for r in rows), len(rows)
    manifest = read_manifest(run_dir / "models" / stage)
    return manifest["timings"]["train"], manifest["counts"]["steps"]


def bench_processes(args: argparse.Namespace) -> dict[str, Any]:
    """DPO and PPO steps/s on 1 vs 2 processes under accelerate launch (gloo on a CPU), same global batch.

    DPO: ``--batch`` pairs a step, i.e. ``batch`` on 1 process and ``batch / 2`` on each of 2.
    PPO: cpu-demo's rollout batch and minibatch, split over the processes. Each configuration
    trains a fresh copy of the same run (SFT adapter, preferences, preference model).
    """
    import shutil

    import torch

    from cai_dpo.config import load_config
    from cai_dpo.models import attach_lora, load_model, save_adapter
    from cai_dpo.stages.rm import run_rm
    from cai_dpo.store import RunStore

    if args.batch % 2:
        raise ValueError("--batch must be even to split it over 2 processes")
    settings = {
        "policy.name": args.model,
        "dpo.max_steps": args.steps,
        "dpo.max_length": 256,
        "dpo.max_prompt_length": 128,
        "dpo.eval_fraction": 0.0,
        "dpo.save_steps": 10_000,
        "rm.max_steps": 1,
        "rm.eval_fraction": 0.0,
        "rm.save_steps": 10_000,
        "ppo.steps": args.steps,
        "ppo.save_steps": 10_000,
    }
    threads = args.threads or os.cpu_count() or 1
    configs = {  # name -> (launcher options, per-process DPO batch)
        "1_process": (["--launcher", "accelerate", "--num-processes", "1"], args.batch),
        "2_processes": (["--launcher", "accelerate", "--num-processes", "2"], args.batch // 2),
        f"no_launcher_{threads}_threads": (["--launcher", "none"], args.batch),
    }
    out: dict[str, Any] = {
        "model": args.model,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "steps": args.steps,
        "dpo_global_batch_pairs": args.batch,
        "threads_per_launched_process": 1,
    }
    with tempfile.TemporaryDirectory(prefix="bench-processes-") as tmp:
        base_cfg = load_config("cpu-demo", {"runs_dir": f"{tmp}/base", "threads": threads, **settings})
        run = RunStore(base_cfg.run_dir)
        _synthetic_preferences(run.data_dir("preferences"), args.steps * args.batch, args.response_words)
        torch.manual_seed(0)
        model, tok = load_model(args.model, trainable=True)
        save_adapter(attach_lora(model, base_cfg.sft.lora), tok, run.model_dir("sft"), base=args.model)
        del model
        run_rm(base_cfg, run)
        out["ppo_rollout_batch"], out["ppo_minibatch"] = base_cfg.ppo.rollout_batch, base_cfg.ppo.minibatch
        for stage in ("dpo", "ppo"):
            figures: dict[str, Any] = {}
            for name, (launch, batch) in configs.items():
                runs_dir = Path(tmp) / f"{stage}-{name}"
                shutil.copytree(Path(tmp) / "base", runs_dir)
                wall = _launched(
                    stage, {**settings, "runs_dir": runs_dir, "threads": threads, "dpo.batch_size": batch}, launch
                )
                seconds, steps = _train_seconds(runs_dir / base_cfg.run_id, stage)
                figures[name] = {
                    "steps": steps,
                    "train_s": round(seconds, 2),
                    "steps_per_s": round(steps / seconds, 3),
                    "wall_s_with_startup": round(wall, 1),
                }
            figures["ratio_2_vs_1_process"] = round(
                figures["2_processes"]["steps_per_s"] / figures["1_process"]["steps_per_s"], 2
            )
            out[stage] = figures
    return out


MEASUREMENTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "dpo": bench_dpo,
    "dpo_4bit": bench_dpo_4bit,
    "dpo_8bit": bench_dpo_8bit,
    "ppo": bench_ppo,
    "ppo_4bit": bench_ppo_4bit,
    "ppo_8bit": bench_ppo_8bit,
    "processes": bench_processes,
    "checkpointing": bench_checkpointing,
    "precision": bench_precision,
    "labelled_positions": bench_labelled_positions,
}
DEFAULT = ("dpo", "dpo_4bit", "ppo")  # what a run without --only measures (the CPU figures in the README)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--only",
        action="append",
        choices=sorted(MEASUREMENTS),
        help="run just these (repeatable; default: dpo, dpo_4bit, ppo)",
    )
    p.add_argument("--model", default="embedded", help="policy model spec (default: embedded)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per measurement (first one is warm-up)")
    p.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    p.add_argument("--response-words", type=int, default=60, help="words per synthetic response")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="policy weights and 4-bit compute dtype (default: the cpu-demo profile's, float32)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        from cai_dpo.engine import set_threads

        set_threads(args.threads)
        print(json.dumps(MEASUREMENTS[args.child](args)))
        return 0
    results: dict[str, Any] = {}
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for name in args.only or list(DEFAULT):
        cmd = [sys.executable, __file__, *passthrough, "--child", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            results[name] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:500]}
        else:
            results[name] = json.loads(lines[-1])
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

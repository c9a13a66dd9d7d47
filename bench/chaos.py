"""Crash-safety bench: SIGKILL each stage at a random moment, rerun it, check the run.

For every stage (SL, SFT, pairs, judge, labels, DPO, preference model, PPO, eval) on the
``tiny`` profile: an uninterrupted reference run is made once, with a copy of the run folder
after each stage. Each trial copies the folder as it was before the stage to one fixed run
path, starts the stage in a child process, kills it with SIGKILL after a random delay in
(0, the stage's reference duration), reruns the stage to completion and checks:

- the rerun completes;
- no record is lost or duplicated (every record store, raw shard lines);
- every manifest's input hashes match the files they describe;
- SL, pairs, judge, labels-merge and eval records equal the reference run's byte for byte
  (canonical JSON, wall-clock fields such as ``seconds`` left out);
- trained stages (SFT, DPO, preference model, PPO) end at exactly their step target with an
  adapter that loads.

Children are forked from a fork server that imported the libraries once (an import takes
~20 s here; a tiny stage a few seconds). Prints one JSON object per stage::

    python bench/chaos.py --trials 20 [--stages sl,dpo] [--seed 0] [--work DIR] [--max-minutes M]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

STAGES = ("sl", "sft", "pairs", "judge", "labels", "dpo", "rm", "ppo", "eval")
ENTRY_POINTS = {
    "sl": ("cai_dpo.stages.sl", "run_sl"),
    "sft": ("cai_dpo.stages.sft", "run_sft"),
    "pairs": ("cai_dpo.stages.pairs", "run_pairs"),
    "judge": ("cai_dpo.stages.judge", "run_judge"),
    "labels": ("cai_dpo.stages.labels", "run_labels"),
    "dpo": ("cai_dpo.stages.dpo", "run_iterative_dpo"),
    "rm": ("cai_dpo.stages.rm", "run_rm"),
    "ppo": ("cai_dpo.stages.ppo", "run_ppo"),
    "eval": ("cai_dpo.stages.eval", "run_eval"),
}
# records compared with the reference run byte for byte: record stores and artifact files
COMPARED = {
    "sl": (("records", "sl"), ("records", "sl-phases"), ("dataset", "data/sl")),
    "pairs": (("records", "pairs"), ("jsonl", "data/pairs/pairs.jsonl")),
    "judge": (("records", "judge"), ("dataset", "data/preferences")),
    "labels": (("dataset", "data/preferences_merged"),),
    "eval": (
        ("records", "eval"),
        ("records", "eval-judgments"),
        ("jsonl", "eval/responses.jsonl"),
        ("jsonl", "eval/judgments.jsonl"),
    ),
}
TRAINED = {"sft": "models/sft", "dpo": "models/dpo", "rm": "models/rm", "ppo": "models/ppo"}
VOLATILE = {"seconds", "created", "timings"}  # wall-clock fields: differ between any two runs
RUN_ID = "chaos"
# imported once by the fork server, so a child pays no import time (the stage modules import
# these lazily, ~10 s each time on two cores)
PRELOAD = sorted(
    {module for module, _ in ENTRY_POINTS.values()}
    | {
        "cai_dpo.models",
        "datasets",
        "peft",
        "trl",
        "trl.trainer.sft_trainer",
        "trl.trainer.dpo_trainer",
        "trl.trainer.reward_trainer",
        "trl.chat_template_utils",
    }
)


# --------------------------------------------------------------------------- child processes


def _config(run_dir: Path) -> Any:
    from cai_dpo.config import load_config

    return load_config("tiny", {"runs_dir": str(run_dir.parent), "run_id": run_dir.name})


def _child(stage: str, run_dir: str, log_path: str, result_path: str | None) -> None:
    """Run one stage in this (forked) process; with ``result_path``, also load what it trained."""
    import importlib

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        module, name = ENTRY_POINTS[stage]
        cfg = _config(Path(run_dir))
        getattr(importlib.import_module(module), name)(cfg)
        result: dict[str, Any] = {"ok": True}
        if result_path and stage in TRAINED:
            result["loadable"] = _loadable(stage, Path(run_dir) / TRAINED[stage])
        if result_path:
            Path(result_path).write_text(json.dumps(result), encoding="utf-8")
    except BaseException:  # noqa: BLE001 - reported to the parent through the exit code and log
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _noop() -> None:
    return None


def _loadable(stage: str, folder: Path) -> bool:
    """True when the trained artifact loads (the preference model as a scorer)."""
    try:
        if stage == "rm":
            from cai_dpo.rl.reward import RewardScorer

            RewardScorer(folder, batch_size=2)
        else:
            from cai_dpo.models import load_model

            load_model(str(folder))
        return True
    except Exception:  # noqa: BLE001 - any failure to load counts
        traceback.print_exc()
        return False


class Runner:
    """Starts stage children from a fork server that imported the libraries once."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)

    def warm(self) -> None:
        """Start the fork server (it imports the libraries) before anything is timed."""
        proc = self.ctx.Process(target=_noop)
        proc.start()
        proc.join()

    def start(self, stage: str, run_dir: Path, log: Path, result: Path | None = None) -> Any:
        proc = self.ctx.Process(target=_child, args=(stage, str(run_dir), str(log), str(result) if result else None))
        proc.start()
        return proc

    def run(self, stage: str, run_dir: Path, log: Path, result: Path | None = None) -> tuple[int, float]:
        """Run a stage to the end; (exit code, seconds)."""
        t0 = time.perf_counter()
        proc = self.start(stage, run_dir, log, result)
        proc.join()
        return proc.exitcode, time.perf_counter() - t0

    def kill_after(self, stage: str, run_dir: Path, log: Path, delay: float) -> tuple[bool, float]:
        """Start a stage and SIGKILL it after ``delay`` s; (still running then, seconds it ran)."""
        t0 = time.perf_counter()
        proc = self.start(stage, run_dir, log)
        proc.join(delay)
        alive = proc.is_alive()
        if alive:
            proc.kill()
        proc.join()
        return alive, time.perf_counter() - t0


# --------------------------------------------------------------------------- reference run


def prepare(work: Path, runner: Runner, stages: tuple[str, ...] = STAGES) -> dict[str, float]:
    """Run every stage up to the last of ``stages`` once; snapshot the run after each. Returns seconds per stage."""
    live = work / "runs" / RUN_ID
    snaps = work / "snapshots"
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(snaps, ignore_errors=True)
    live.mkdir(parents=True)
    shutil.copytree(live, snaps / "before-sl", symlinks=True)
    durations: dict[str, float] = {}
    last = max(STAGES.index(s) for s in stages)
    for stage in STAGES[: last + 1]:
        code, seconds = runner.run(stage, live, work / f"reference-{stage}.log")
        if code != 0:
            raise RuntimeError(
                f"reference run of stage {stage} failed (exit {code}); see {work / f'reference-{stage}.log'}"
            )
        durations[stage] = seconds
        shutil.copytree(live, snaps / f"after-{stage}", symlinks=True)
    return durations


def _before(stage: str) -> str:
    i = STAGES.index(stage)
    return "before-sl" if i == 0 else f"after-{STAGES[i - 1]}"


# --------------------------------------------------------------------------- checks


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _canonical(row: dict[str, Any]) -> bytes:
    return json.dumps(_strip(row), sort_keys=True, ensure_ascii=False).encode()


def raw_records(folder: Path) -> list[dict[str, Any]]:
    """Every record line of a record store's shards (duplicates kept)."""
    rows = []
    for shard in sorted(folder.glob("shard-*.jsonl")):
        rows.extend(json.loads(line) for line in shard.read_text(encoding="utf-8").splitlines() if line.strip())
    return rows


def record_counts(run: Path, reference: Path) -> dict[str, int]:
    """Records lost (in the reference, missing here) and duplicated (a key on two lines), over all stores."""
    lost = duplicated = 0
    for ref_store in sorted((reference / "records").glob("*")) if (reference / "records").exists() else []:
        keys = [r["key"] for r in raw_records(run / "records" / ref_store.name)]
        duplicated += len(keys) - len(set(keys))
        lost += len({r["key"] for r in raw_records(ref_store)} - set(keys))
    return {"lost": lost, "duplicated": duplicated}


def _rows(run: Path, kind: str, where: str) -> list[bytes]:
    path = run / where
    if kind == "records":
        rows = raw_records(run / "records" / where)
        return sorted(_canonical(r) for r in rows)
    if not path.exists():
        return []
    if kind == "jsonl":
        return sorted(
            _canonical(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        )
    import datasets

    return sorted(_canonical(r) for r in datasets.load_from_disk(str(path)).to_list())


def record_mismatches(stage: str, run: Path, reference: Path) -> int:
    """Rows of the compared records that differ from the reference run (0 for stages not compared)."""
    from collections import Counter

    bad = 0
    for kind, where in COMPARED.get(stage, ()):
        mine, ref = Counter(_rows(run, kind, where)), Counter(_rows(reference, kind, where))
        bad += sum((mine - ref).values()) + sum((ref - mine).values())
    return bad


def _expected_hash(run: Path, key: str, value: str, inputs: dict[str, Any], stage: str) -> tuple[Path, str, str] | None:
    """(path, recorded hash, kind) a manifest input describes, or None for inputs that are not file hashes."""
    if stage == "sft" and key == "data/sl":
        return run / "data" / "sl", value, "dataset"
    if stage == "rm" and key == "preferences" and ":" in value:
        name, digest = value.split(":", 1)
        return run / "data" / name, digest, "artifact"
    if stage == "dpo" and key == "preferences_hash" and inputs.get("preferences"):
        return Path(inputs["preferences"]), value, "dpo_dataset"
    if stage == "dpo" and key == "start_adapter_hash" and inputs.get("start_adapter"):
        return Path(inputs["start_adapter"]), value, "artifact"
    # trained stages hash their upstream artifacts without the manifest (training.artifact_hash)
    artifacts = {("rm", "sft_adapter"): "models/sft", ("ppo", "rm"): "models/rm", ("ppo", "sft_adapter"): "models/sft"}
    if (stage, key) in artifacts:
        return run / artifacts[(stage, key)], value, "artifact"
    paths = {
        ("judge", "pairs"): "data/pairs/pairs.jsonl",
        ("labels", "preferences"): "data/preferences",
        ("eval", "rm"): "models/rm",
        ("pairs", "sl_records"): "records/sl",
    }
    if (stage, key) in paths:
        return run / paths[(stage, key)], value, "file"
    return None


def manifest_mismatches(run: Path) -> list[str]:
    """Manifest inputs whose recorded hash no longer matches the file or folder it names."""
    from cai_dpo.store import file_hash

    bad = []
    for path in sorted(run.rglob("manifest.json")):
        if "checkpoints" in path.parts or any(p.startswith(".") for p in path.relative_to(run).parts):
            continue
        body = json.loads(path.read_text(encoding="utf-8"))
        inputs = body.get("inputs") or {}
        for key, value in inputs.items():
            found = _expected_hash(run, key, str(value), inputs, body.get("stage", ""))
            if found is None:
                continue
            target, recorded, kind = found
            if not target.exists():
                actual = "<missing>"
            elif kind == "dataset":
                from cai_dpo.store import dataset_hash

                actual = dataset_hash(target)
            elif kind == "dpo_dataset":
                from cai_dpo.training import artifact_hash

                actual = artifact_hash(target)
            elif kind == "artifact":
                from cai_dpo.training import artifact_hash

                actual = artifact_hash(target)
            else:
                actual = file_hash(target)
            if actual != recorded:
                bad.append(f"{path.relative_to(run)}: inputs.{key} {recorded} != {actual} ({target})")
    return bad


def trained_steps(stage: str, run: Path) -> tuple[int | None, int]:
    """(steps the manifest of a trained stage reports, the config's target)."""
    cfg = _config(run)
    manifest_path = run / TRAINED[stage] / "manifest.json"
    if not manifest_path.exists():
        return None, 0
    body = json.loads(manifest_path.read_text(encoding="utf-8"))
    if stage == "rm":
        return body["metrics"].get("steps"), cfg.rm.max_steps
    if stage == "ppo":
        return body["counts"].get("steps"), cfg.ppo.steps
    target = cfg.sft.max_steps if stage == "sft" else cfg.dpo.max_steps
    return body["counts"].get("steps"), target


def leftovers(run: Path) -> list[str]:
    """Temp or old folders an interrupted swap left behind (after the rerun: there should be none)."""
    return sorted(
        str(p.relative_to(run)) for p in run.rglob(".*") if re.search(r"\.(tmp|old-\d+)$", p.name) and p.is_dir()
    )


# --------------------------------------------------------------------------- trials


def trial(
    stage: str, work: Path, runner: Runner, rng: random.Random, durations: dict[str, float], n: int
) -> dict[str, Any]:
    """One kill-and-rerun of ``stage`` (killed after a random delay in (0, ``durations[stage]``)); its findings."""
    live = work / "runs" / RUN_ID
    shutil.rmtree(live, ignore_errors=True)
    shutil.copytree(work / "snapshots" / _before(stage), live, symlinks=True)
    delay = rng.uniform(0.0, durations[stage])
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    killed, ran = runner.kill_after(stage, live, logs / f"{stage}-{n}-killed.log", delay)
    if not killed:  # it finished before the kill: later trials draw from its actual duration
        durations[stage] = min(durations[stage], ran)
    result_path = logs / f"{stage}-{n}-result.json"
    code, _ = runner.run(stage, live, logs / f"{stage}-{n}-rerun.log", result_path)
    reference = work / "snapshots" / f"after-{stage}"
    found: dict[str, Any] = {"delay_s": round(delay, 2), "killed": killed, "completed": code == 0}
    found.update(record_counts(live, reference))
    found["manifest_mismatches"] = manifest_mismatches(live) if code == 0 else []
    found["record_mismatches"] = record_mismatches(stage, live, reference) if code == 0 else 0
    found["leftovers"] = leftovers(live)
    if stage in TRAINED:
        steps, target = trained_steps(stage, live)
        result = json.loads(result_path.read_text(encoding="utf-8")) if result_path.exists() else {}
        found.update({"steps": steps, "target_steps": target, "loadable": bool(result.get("loadable"))})
    if code != 0:
        found["error"] = (logs / f"{stage}-{n}-rerun.log").read_text(encoding="utf-8")[-600:]
    return found


def summarize(stage: str, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-stage JSON: counts over trials, with the failing trials' details."""
    summary: dict[str, Any] = {
        "stage": stage,
        "trials": len(trials),
        "killed_mid_run": sum(t["killed"] for t in trials),
        "completed": sum(t["completed"] for t in trials),
        "lost": sum(t["lost"] for t in trials),
        "duplicated": sum(t["duplicated"] for t in trials),
        "manifest_mismatches": sum(len(t["manifest_mismatches"]) for t in trials),
        "record_mismatches": sum(t["record_mismatches"] for t in trials),
        "leftover_temp_folders": sum(len(t["leftovers"]) for t in trials),
    }
    if stage in TRAINED:
        summary["at_max_steps"] = sum(t["steps"] == t["target_steps"] for t in trials)
        summary["steps_seen"] = sorted({t["steps"] for t in trials if t["steps"] is not None})
        summary["target_steps"] = trials[0]["target_steps"] if trials else None
        summary["loadable"] = sum(t["loadable"] for t in trials)
    failures = [t for t in trials if not ok(stage, t)]
    if failures:
        summary["failures"] = failures[:3]
    return summary


def ok(stage: str, t: dict[str, Any]) -> bool:
    """True when a trial shows no fault."""
    good = (
        t["completed"]
        and not t["lost"]
        and not t["duplicated"]
        and not t["manifest_mismatches"]
        and not t["record_mismatches"]
        and not t["leftovers"]
    )
    if stage in TRAINED:
        good = good and t["steps"] == t["target_steps"] and t["loadable"]
    return good


def chaos(
    stages: tuple[str, ...] = STAGES,
    trials: int = 20,
    work: Path | None = None,
    seed: int = 0,
    echo: Any = None,
    max_seconds: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``trials`` kill-and-rerun trials per stage; per-stage summaries (see :func:`summarize`).

    ``max_seconds``: start no new round of trials (one per stage) after this long; the
    summaries then report the trials actually run.
    """
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(work or tempfile.mkdtemp(prefix="cai-dpo-chaos-"))
    runner = Runner()
    runner.warm()
    t0 = time.perf_counter()
    durations = prepare(work, runner, stages)
    rng = random.Random(seed)
    reference_s = dict(durations)
    results: dict[str, list[dict[str, Any]]] = {stage: [] for stage in stages}
    for n in range(trials):  # round-robin, so a time limit leaves every stage with as many trials
        if max_seconds is not None and n and time.perf_counter() - t0 > max_seconds:
            break
        for stage in stages:
            results[stage].append(trial(stage, work, runner, rng, durations, n))
    out: dict[str, dict[str, Any]] = {}
    for stage in stages:
        out[stage] = {
            **summarize(stage, results[stage]),
            "reference_s": round(reference_s[stage], 1),
            "bench_s": round(time.perf_counter() - t0, 1),
        }
        if echo:
            echo(out[stage])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per stage (default 20)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    parser.add_argument("--work", default=None, help="work folder (default: a new temp folder)")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no new round of trials after this long")
    args = parser.parse_args(argv)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    results = chaos(
        stages,
        args.trials,
        Path(args.work) if args.work else None,
        args.seed,
        echo=lambda s: print(json.dumps(s), flush=True),
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
    )
    return 0 if all(r["completed"] == r["trials"] and "failures" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import chaos as _module  # children unpickle their target from module "chaos", not "__main__"

    sys.exit(_module.main())

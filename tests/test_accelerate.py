"""Multi-process training under ``accelerate launch``: 2 processes (gloo on CPU) on the tiny profile.

- (a) DPO and PPO on 2 processes follow the same per-step loss trajectory as on 1 process with the
  same global batch (DPO: 2 × 1 pair vs 1 × 2 pairs; PPO: rollout batch 4 split 2 + 2), LoRA
  dropout off, PPO sampling greedy: the engine seeds sampling per batch, so sampled rollouts on
  two shards cannot equal those of one batch, while greedy ones do. Tolerances: DPO loss within
  1e-4 (measured ≈ 1e-6); PPO figures (score, KL, policy and value losses, values, entropy) within
  max(1e-3, 1e-3 × |value|) (measured ≤ 4e-4, the KL summed over 12 tokens after 2 updates at lr 5e-3).
- (b) Only rank 0 writes: a ``sitecustomize`` audit hook (this file's, through PYTHONPATH) logs every
  file a rank opens for writing, renames, removes or creates under the run folder; rank 1 may touch
  only the HF Trainer's checkpoints (its ``rng_state_1.pth``). Rank 0's log is the positive control.
- (c) A rank killed mid-PPO (the ``CAI_DPO_TEST_KILL_RANK`` hook) fails the run with exit code 1 and
  a message naming the failure, within the subprocess timeout (no hang); a rerun resumes from the
  last checkpoint and completes.

The fast tests cover the config keys, the CLI options, the launch command and the rank guards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai_dpo.config import ConfigError, load_config

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from test_dpo import make_run  # noqa: E402

# the one-process and two-process runs share these settings; only the per-process batch differs.
# fp32: the data-parallel maths matches one process to rounding, and bf16's rounding (policy.autocast: auto on a
# CPU with AVX512-BF16) differs with the batch's split, beyond these tests' tolerances
COMMON = {
    "threads": 1,
    "policy.autocast": "none",
    "dpo.max_length": 80,
    "dpo.max_prompt_length": 48,
    "dpo.learning_rate": 5e-3,
    "dpo.beta": 0.5,
    "dpo.max_steps": 4,
    "dpo.save_steps": 2,
    "dpo.eval_fraction": 0.0,
    "dpo.lora.dropout": 0.0,
    "rm.max_steps": 2,
    "rm.eval_fraction": 0.0,
    "ppo.steps": 3,
    "ppo.rollout_batch": 4,
    "ppo.minibatch": 4,
    "ppo.ppo_epochs": 2,
    "ppo.learning_rate": 5e-3,
    "ppo.save_steps": 1,
    "ppo.sampling.do_sample": False,
}
LAUNCH_TIMEOUT_S = 420  # a generous ceiling per launch on a shared 2-core machine; a hang fails the test

AUDIT_HOOK = '''
"""Test audit hook (tests/test_accelerate.py): log what a launched rank writes under a run folder."""
import json, os, sys

_root, _out, _rank = os.environ.get("CAI_DPO_AUDIT_ROOT"), os.environ.get("CAI_DPO_AUDIT_DIR"), os.environ.get("RANK")
if _root and _out and _rank is not None:
    _root = os.path.realpath(_root) + os.sep
    _log = os.path.join(_out, f"rank{_rank}-{os.getpid()}.jsonl")
    _busy = [False]
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    with open(_log, "a") as fh:  # every rank that loaded the hook says so, whether or not it writes anything
        fh.write(json.dumps({"event": "start", "path": ""}) + "\\n")

    def _hook(event, args):
        if _busy[0]:
            return
        paths = []
        if event == "open" and isinstance(args[2], int) and args[2] & _WRITE:
            paths = [args[0]]
        elif event in ("os.rename", "os.remove", "os.rmdir", "shutil.rmtree"):
            paths = list(args[:2]) if event == "os.rename" else [args[0]]
        elif event == "os.mkdir" and not os.path.exists(args[0]):
            paths = [args[0]]
        for p in paths:
            if isinstance(p, int):
                continue
            p = os.path.realpath(os.fsdecode(p))
            if p.startswith(_root):
                _busy[0] = True
                try:
                    with open(_log, "a") as fh:
                        fh.write(json.dumps({"event": event, "path": p[len(_root):]}) + "\\n")
                finally:
                    _busy[0] = False

    sys.addaudithook(_hook)
'''


def overrides(settings: dict) -> list[str]:
    """``-o key=value`` arguments for the CLI (values as YAML: bools lower-case)."""
    out = []
    for k, v in settings.items():
        out += ["-o", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return out


def cai_dpo(
    args: list[str], env: dict[str, str], timeout: float = LAUNCH_TIMEOUT_S
) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI in a child process; returns (result, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cai_dpo.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.perf_counter() - t0


def losses(run_dir: Path, stage: str) -> list[dict[str, float]]:
    from cai_dpo.training import read_metrics_csv

    return [r for r in read_metrics_csv(run_dir / "metrics" / stage / "log.csv") if "loss" in r or stage == "ppo"]


def audit_records(folder: Path) -> dict[str, list[dict]]:
    """Audit-hook events by rank."""
    out: dict[str, list[dict]] = {}
    for f in folder.glob("rank*-*.jsonl"):
        rank = f.name.split("-")[0][4:]
        out.setdefault(rank, []).extend(json.loads(line) for line in f.read_text().splitlines() if line)
    return out


# --------------------------------------------------------------------------- the runs (module fixture)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_path):
    """DPO and PPO, once in this process and once as 2 processes under accelerate launch."""
    from cai_dpo.stages.dpo import run_dpo
    from cai_dpo.stages.ppo import run_ppo
    from cai_dpo.stages.rm import run_rm

    tmp = tmp_path_factory.mktemp("accelerate")
    one_cfg, one_run = make_run(tmp / "one", **{**COMMON, "dpo.batch_size": 2})
    two_root = tmp / "two" / "runs"
    run_rm(one_cfg, one_run)  # the preference model PPO scores with, shared by both runs
    shutil.copytree(tmp / "one" / "runs", two_root)

    t0 = time.perf_counter()
    run_dpo(one_cfg, one_run)
    run_ppo(one_cfg, one_run, progress=False)
    one_s = time.perf_counter() - t0

    audit = tmp / "audit"
    audit.mkdir()
    (tmp / "hook").mkdir()
    (tmp / "hook" / "sitecustomize.py").write_text(AUDIT_HOOK)
    progress = tmp / "progress.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp / "hook"), os.environ.get("PYTHONPATH", "")]),
        "CAI_DPO_AUDIT_ROOT": str(two_root / "tiny"),
        "CAI_DPO_AUDIT_DIR": str(audit),
        "CAI_DPO_PROGRESS": str(progress),
        "HF_HUB_OFFLINE": "1",
    }
    args = [
        "--profile",
        "tiny",
        "-o",
        f"runs_dir={two_root}",
        *overrides({**COMMON, "dpo.batch_size": 1}),
        "--launcher",
        "accelerate",
        "--num-processes",
        "2",
    ]
    seconds = {}
    for stage in ("dpo", "ppo"):
        proc, seconds[stage] = cai_dpo([stage, *args], env)
        assert proc.returncode == 0, f"{stage} on 2 processes failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {
        "one": one_run.root,
        "two": two_root / "tiny",
        "audit": audit,
        "progress": progress,
        "one_process_s": one_s,
        "two_process_s": seconds,
        "tmp": tmp,
    }


# --------------------------------------------------------------------------- (a) same trajectory


@pytest.mark.slow
def test_dpo_two_processes_follow_the_one_process_loss_trajectory(runs):
    one, two = losses(runs["one"], "dpo"), losses(runs["two"], "dpo")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
    print(f"DPO loss max |1 proc - 2 procs| = {max(diffs):.2e} over {len(diffs)} steps")
    assert max(diffs) < 1e-4, (one, two)
    assert one[-1]["loss"] < one[0]["loss"] - 0.05  # it did learn, so the comparison means something
    # the global batch was 2 pairs in both: 16 pairs, so a step is 1/8 of an epoch
    assert two[0]["epoch"] == pytest.approx(0.125)


@pytest.mark.slow
def test_ppo_two_processes_follow_the_one_process_trajectory(runs):
    one, two = losses(runs["one"], "ppo"), losses(runs["two"], "ppo")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    worst = (0.0, "")
    for a, b in zip(one, two):
        for key in ("score", "kl", "pg_loss", "vf_loss", "value_mean", "entropy", "response_length", "clipfrac"):
            assert b[key] == pytest.approx(a[key], abs=1e-3, rel=1e-3), (key, a["step"], a[key], b[key])
            worst = max(worst, (abs(a[key] - b[key]), f"{key} at step {int(a['step'])}: {a[key]:.6g} vs {b[key]:.6g}"))
    print(f"PPO max |1 proc - 2 procs| over score, kl, losses, values, entropy = {worst[0]:.2e} ({worst[1]})")
    assert one[-1]["kl"] > 0  # the policy moved away from the reference, in both runs alike


# --------------------------------------------------------------------------- (b) rank 0 writes


@pytest.mark.slow
def test_only_rank_zero_writes_artifacts_metrics_and_progress(runs):
    from cai_dpo.store import read_manifest

    records = audit_records(runs["audit"])
    assert set(records) == {"0", "1"}, "the audit hook was loaded in both ranks"
    records = {rank: [r for r in rows if r["event"] != "start"] for rank, rows in records.items()}
    rank0 = {r["path"] for r in records["0"]}
    assert "metrics/dpo/log.csv" in rank0 and "metrics/ppo/log.csv" in rank0  # positive control: renames into place
    assert any(p.startswith("models/.dpo.") and p.endswith("manifest.json") for p in rank0)
    outside = sorted({r["path"] for r in records["1"] if not r["path"].startswith("checkpoints/")})
    assert outside == [], f"rank 1 wrote under the run folder: {outside}"
    # one writer: one row per step, manifests with the full step count
    for stage, steps in (("dpo", 4), ("ppo", 3)):
        rows = [r for r in losses(runs["two"], stage) if "eval_loss" not in r and ("loss" in r or stage == "ppo")]
        assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
        assert read_manifest(runs["two"] / "models" / stage)["counts"]["steps"] == steps
    events = [json.loads(line) for line in runs["progress"].read_text().splitlines() if line]
    pids = {
        rank: {f.name.split("-")[1].split(".")[0] for f in runs["audit"].glob(f"rank{rank}-*.jsonl")} for rank in "01"
    }
    assert events and {e["bar"].split("-")[0] for e in events} <= pids["0"], "progress events from rank 0 only"
    assert not (runs["two"] / ".lock.json").exists()
    print(
        f"one process (in this process, DPO 4 + PPO 3 steps): {runs['one_process_s']:.0f} s; "
        f"two processes under accelerate launch: {runs['two_process_s']}"
    )


# --------------------------------------------------------------------------- (c) a dead rank


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_and_a_rerun_resumes(runs):
    from cai_dpo.stages.ppo import read_log
    from cai_dpo.store import read_manifest

    root = runs["tmp"] / "killed" / "runs"
    shutil.copytree(runs["two"].parent, root)  # SFT adapter, preference model and earlier PPO output
    shutil.rmtree(root / "tiny" / "models" / "ppo")
    shutil.rmtree(root / "tiny" / "checkpoints" / "ppo")
    (root / "tiny" / "metrics" / "ppo" / "log.csv").unlink()
    args = [
        "ppo",
        "--profile",
        "tiny",
        "-o",
        f"runs_dir={root}",
        *overrides({**COMMON, "ppo.steps": 4}),
        "--launcher",
        "accelerate",
        "--num-processes",
        "2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed, seconds = cai_dpo(args, {**env, "CAI_DPO_TEST_KILL_RANK": "1:2"}, timeout=LAUNCH_TIMEOUT_S)
    # rank 0 logs step 2 as rank 1 kills itself after it: from then to the exit is the time to fail
    after_kill = time.time() - (root / "tiny" / "metrics" / "ppo" / "log.csv").stat().st_mtime
    print(
        f"killed run exited {killed.returncode} after {seconds:.0f} s in all (start-up included), "
        f"{after_kill:.1f} s after the kill"
    )
    assert after_kill < 60, "a dead rank must fail the run at once, not after the collective timeout"
    assert killed.returncode == 1, killed.stderr[-4000:]
    assert "ppo: training under accelerate launch (2 processes) failed" in killed.stderr
    assert "rerun the same command to resume" in killed.stderr
    assert "Signal 9 (SIGKILL)" in killed.stderr and "rank      : 1" in killed.stderr  # torchrun names the dead rank
    assert not (root / "tiny" / "models" / "ppo" / "manifest.json").exists()
    assert not (root / "tiny" / ".lock.json").exists(), "the lock is released"

    rerun, seconds = cai_dpo(args, env, timeout=LAUNCH_TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    counts = read_manifest(root / "tiny" / "models" / "ppo")["counts"]
    assert counts["steps"] == 4 and counts["resumed_from"] >= 1, counts
    assert [int(r["step"]) for r in read_log(root / "tiny" / "metrics" / "ppo" / "log.csv")] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- fast checks


def test_train_section_keys_are_validated(tmp_path):
    cfg = load_config(
        "tiny", {"train.launcher": "accelerate", "train.num_processes": 2, "train.accelerate_config": "ddp"}
    )
    assert (cfg.train.launcher, cfg.train.num_processes, cfg.train.accelerate_config) == ("accelerate", 2, "ddp")
    with pytest.raises(ConfigError, match="train.launcher"):
        load_config("tiny", {"train.launcher": "torchrun"})
    with pytest.raises(ConfigError, match="train.num_processes"):
        load_config("tiny", {"train.num_processes": 0})
    with pytest.raises(ConfigError, match="train.timeout_s"):
        load_config("tiny", {"train.timeout_s": 0})


def test_cli_launch_options_set_the_train_section():
    from cai_dpo.cli import build_parser, config_from_args

    for stage in ("sft", "dpo", "rm", "ppo"):
        args = build_parser().parse_args([stage, "--profile", "tiny", "--num-processes", "2", "--config-file", "fsdp"])
        train = config_from_args(args).train
        assert (train.launcher, train.num_processes, train.accelerate_config) == ("accelerate", 2, "fsdp"), stage
    args = build_parser().parse_args(["dpo", "--profile", "tiny", "--launcher", "none", "--num-processes", "2"])
    assert config_from_args(args).train.launcher == "none"
    assert config_from_args(build_parser().parse_args(["dpo", "--profile", "tiny"])).train.launcher == "none"


def test_launch_command_and_bundled_configs(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    from cai_dpo.distributed import BUNDLED_CONFIGS, accelerate_config_path, launch_command
    from cai_dpo.errors import InputError

    cfg = load_config("tiny", {"train.launcher": "accelerate", "train.num_processes": 2})
    cmd = launch_command("dpo", tmp_path / "c.yaml", cfg.train, tmp_path / "r.json", {})
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[-7:-4] == [
        "cai_dpo.distributed",
        "dpo",
        str(tmp_path / "c.yaml"),
    ]
    cfg = load_config("tiny", {"train.accelerate_config": "deepspeed_zero2"})
    cmd = launch_command("ppo", tmp_path / "c.yaml", cfg.train, tmp_path / "r.json", {"resume": True})
    assert cmd[cmd.index("--config_file") + 1] == str(BUNDLED_CONFIGS / "deepspeed_zero2.yaml")
    assert "--num_processes" not in cmd and "--multi_gpu" not in cmd  # the file decides
    kinds = {}
    for name in ("ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"):
        loaded = load_config_from_file(str(accelerate_config_path(name)))
        kinds[name] = loaded.distributed_type.value
    assert kinds == {"ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED", "fsdp": "FSDP"}
    assert load_config_from_file(str(accelerate_config_path("deepspeed_zero3"))).deepspeed_config["zero_stage"] == 3
    assert (
        load_config_from_file(str(accelerate_config_path("fsdp"))).fsdp_config["fsdp_reshard_after_forward"]
        == "FULL_SHARD"
    )
    with pytest.raises(InputError, match="train.accelerate_config: nope.yaml"):
        accelerate_config_path("nope.yaml")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"configs/accelerate/*.yaml"' in pyproject  # shipped with the package


def test_settings_that_cannot_be_split_are_refused_before_launching(tmp_path):
    from cai_dpo.distributed import check_processes

    cfg = load_config("tiny", {"ppo.rollout_batch": 6, "ppo.minibatch": 3})
    check_processes("ppo", cfg, 3)
    with pytest.raises(ConfigError, match=r"ppo.minibatch is 3: .* multiple of 2"):
        check_processes("ppo", cfg, 2)
    with pytest.raises(ConfigError, match="dpo.rounds is 2"):
        check_processes("dpo", load_config("tiny", {"dpo.rounds": 2}), 2)
    check_processes("dpo", load_config("tiny", {"dpo.rounds": 2}), 1)
    # leave-one-out: every process samples whole groups of rloo_k responses to one prompt
    loo = load_config(
        "tiny", {"ppo.advantage": "leave_one_out", "ppo.rloo_k": 4, "ppo.rollout_batch": 12, "ppo.minibatch": 6}
    )
    check_processes("ppo", loo, 3)
    with pytest.raises(
        ConfigError, match=r"rloo_k \(4\) responses, so it must be a multiple of 8; set ppo.rollout_batch=16"
    ):
        check_processes("ppo", loo, 2)


def test_ranks_other_than_zero_take_no_lock_and_report_no_progress(tmp_path, monkeypatch):
    from cai_dpo import progress
    from cai_dpo.store import LOCK_INFO, run_lock

    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(progress.PROGRESS_ENV, str(events))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with run_lock(tmp_path / "run") as root:
        assert not (root / LOCK_INFO).exists()
    progress._report({"bar": "x"})
    assert not events.exists()
    monkeypatch.setenv("RANK", "0")
    with run_lock(tmp_path / "run") as root:
        assert (root / LOCK_INFO).exists()
    progress._report({"bar": "x"})
    assert events.exists()

"""Multi-process training under ``accelerate launch`` (DDP; DeepSpeed ZeRO and FSDP by config file).

The training stages ``sft``, ``dpo``, ``rm`` (TRL trainers) and ``ppo`` (this project's loop)
run as N processes when ``train.launcher`` is ``accelerate`` (CLI: ``cai-dpo dpo --launcher
accelerate --num-processes N [--config-file F]``):

- :func:`run_stage` is what the CLI and the stage notebooks call. With ``launcher: none`` it
  calls the stage function in this process. With ``accelerate`` it holds the run's lock,
  writes the config to a temp file and runs ``python -m accelerate.commands.launch ... -m
  cai_dpo.distributed <stage> <config>`` (:func:`launch_command`) with one torch thread per
  process, and waits. The ranks inherit the lock the way the pipeline's stage notebooks do,
  and :func:`cai_dpo.store.run_lock` never takes it on a rank other than 0.
- :func:`main` is each rank's entry point: it joins the process group with the timeout
  ``train.timeout_s`` and runs the same stage function as one process would. A rank that
  dies makes accelerate's launcher (torchrun) stop the others and exit non-zero, naming the
  rank; a rank stuck in a collective fails after ``timeout_s``. :func:`run_stage` then raises
  :class:`LaunchError`. Checkpoints survive, so rerunning the command resumes.
- Only rank 0 writes artifacts, manifests, metrics CSVs, TensorBoard files and progress
  events (:func:`is_main_process`); stale checkpoints are cleared by rank 0 behind a
  :func:`barrier`. The HF Trainer's own checkpoints hold one ``rng_state_<rank>.pth`` per rank.
- :class:`DataParallel`: the collectives PPO's loop needs (shard rollouts, average gradients,
  sum and gather statistics), on accelerate's ``Accelerator``; the identity on one process.

Test hook: ``CAI_DPO_TEST_KILL_RANK=<rank>:<step>`` makes that rank SIGKILL itself right after
PPO step ``<step>`` (:func:`maybe_kill_for_test`); the tests use it to check that a dead rank fails
the run at once and that a rerun resumes. Nothing else reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai_dpo.errors import CaiDpoInputError, InputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: stage name -> (module, function) of the training stages that can run as several processes
STAGES: dict[str, tuple[str, str]] = {
    "sft": ("cai_dpo.stages.sft", "run_sft"),
    "dpo": ("cai_dpo.stages.dpo", "run_iterative_dpo"),
    "rm": ("cai_dpo.stages.rm", "run_rm"),
    "ppo": ("cai_dpo.stages.ppo", "run_ppo"),
}
BUNDLED_CONFIGS = Path(__file__).parent / "configs" / "accelerate"
KILL_ENV = "CAI_DPO_TEST_KILL_RANK"


class LaunchError(RuntimeError):
    """A stage run under ``accelerate launch`` failed (a rank died, timed out or raised)."""


# --------------------------------------------------------------------------- ranks


def rank() -> int:
    """This process's global rank (``RANK``, set by torchrun/accelerate; 0 when not launched)."""
    return int(os.environ.get("RANK") or 0)


def world_size() -> int:
    """The number of processes training together (``WORLD_SIZE``; 1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def is_main_process() -> bool:
    """True on rank 0, the only process that writes artifacts, manifests, metrics and progress."""
    return rank() == 0


def init_process_group(timeout_s: float | None = None) -> Any:
    """Join the process group (accelerate's ``PartialState``; gloo on CPU) and return the state.

    The first call sets the collective timeout; later calls (and the trainers') reuse the group.
    """
    import torch
    from accelerate import PartialState

    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    return PartialState(cpu=not torch.cuda.is_available(), **kwargs)


def barrier() -> None:
    """Wait for every process (no-op on one process)."""
    if world_size() > 1:
        init_process_group().wait_for_everyone()


def maybe_kill_for_test(step: int) -> None:
    """Test hook: SIGKILL this process after ``step`` when ``$CAI_DPO_TEST_KILL_RANK`` is ``<this rank>:<step>``."""
    spec = os.environ.get(KILL_ENV)
    if spec and spec == f"{rank()}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def sharded_state_dict(trainer: Any) -> dict[str, Any] | None:
    """The trained model's full state dict when its parameters are sharded (DeepSpeed ZeRO-3, FSDP), else None.

    Gathering is a collective: call it on every rank, then let rank 0 write with it.
    """
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is None:
        return None
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    zero3 = plugin is not None and plugin.zero_stage == 3
    if not (zero3 or accelerator.distributed_type == DistributedType.FSDP):
        return None
    return accelerator.get_state_dict(trainer.model_wrapped)


class DataParallel:
    """Data parallelism for a training loop of our own (PPO), on accelerate's ``Accelerator``.

    Every process holds a full replica; :meth:`shard` splits a global batch, gradients are
    averaged after each backward pass (what DDP does), and statistics are summed or gathered
    so every process logs and whitens with global figures. On one process every method is the
    identity and no ``Accelerator`` is created.
    """

    def __init__(self) -> None:
        self.world_size = world_size()
        self.rank = rank()
        self.accelerator = None
        if self.world_size > 1:
            import torch
            from accelerate import Accelerator

            init_process_group()
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())

    def shard(self, items: list[Any]) -> list[Any]:
        """This process's contiguous share of ``items`` (their count divides by the world size)."""
        k = len(items) // self.world_size
        return items[self.rank * k : (self.rank + 1) * k]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes."""
        return tensor if self.accelerator is None else self.accelerator.reduce(tensor, reduction="sum")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Same-shaped tensors of every process concatenated along dim 0 (rank order)."""
        return tensor if self.accelerator is None else self.accelerator.gather(tensor.contiguous())

    def mean(self, value: float) -> float:
        """A number averaged over the processes."""
        if self.accelerator is None:
            return float(value)
        import torch

        return float(
            self.accelerator.reduce(torch.tensor(float(value), device=self.accelerator.device), reduction="mean")
        )

    def average_gradients(self, params: list[Any]) -> None:
        """Replace each parameter's gradient by its mean over the processes (one all-reduce).

        A parameter without a gradient counts as a zero gradient, so every process reduces
        the same buffer.
        """
        if self.accelerator is None:
            return
        import torch

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = self.accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in params]), reduction="mean")
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def broadcast(self, params: list[Any]) -> None:
        """Copy rank 0's values of ``params`` to every process."""
        if self.accelerator is None:
            return
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, src=0)


# --------------------------------------------------------------------------- launching


def stage_function(stage: str) -> Callable[..., Path]:
    """The entry point of a training stage (``sft``, ``dpo``, ``rm``, ``ppo``)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} cannot run under accelerate; choose one of {', '.join(STAGES)}")
    module, name = STAGES[stage]
    return getattr(importlib.import_module(module), name)


def accelerate_config_path(value: str) -> Path:
    """``train.accelerate_config`` as a file: a bundled name (``ddp``, ``deepspeed_zero2``, ...) or a path."""
    from cai_dpo.config import resolve_path

    bundled = BUNDLED_CONFIGS / f"{value}.yaml"
    path = bundled if bundled.exists() else resolve_path(value)
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml")))
        raise InputError(f"train.accelerate_config: {value} is not a file nor a bundled config ({names})")
    return path


def check_processes(stage: str, cfg: Any, n: int | None) -> None:
    """Raise ConfigError naming the key and the fix when ``stage`` cannot run as ``n`` processes."""
    from cai_dpo.config import ConfigError

    if not n or n == 1:
        return
    if stage == "dpo" and cfg.dpo.rounds > 1:
        raise ConfigError(
            f"dpo.rounds is {cfg.dpo.rounds}: iterative DPO samples and judges between rounds in one "
            "process; set dpo.rounds=1 to train on several processes, or train.launcher=none"
        )
    if stage == "ppo" and cfg.ppo.mode == "ppo":
        for key in ("rollout_batch", "minibatch"):
            value = getattr(cfg.ppo, key)
            if value % n:
                raise ConfigError(
                    f"ppo.{key} is {value}: PPO splits it over the {n} processes, so it must be a "
                    f"multiple of {n}; set ppo.{key}={n * max(1, round(value / n))}"
                )
        k = cfg.ppo.rloo_k
        if cfg.ppo.advantage == "leave_one_out" and (cfg.ppo.rollout_batch // n) % k:
            raise ConfigError(
                f"ppo.rollout_batch is {cfg.ppo.rollout_batch}: with ppo.advantage leave_one_out each of the {n} "
                f"processes samples whole groups of ppo.rloo_k ({k}) responses, so it must be a multiple of {n * k}; "
                f"set ppo.rollout_batch={n * k * max(1, round(cfg.ppo.rollout_batch / (n * k)))}"
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_count(train: Any) -> int | None:
    """The number of processes to launch: ``train.num_processes``; else the config file's (None);
    else one per GPU, at least 1."""
    if train.num_processes:
        return int(train.num_processes)
    if train.accelerate_config:
        return None
    import torch

    return max(1, torch.cuda.device_count())


def launch_command(stage: str, config_path: Path, train: Any, result: Path, options: dict[str, Any]) -> list[str]:
    """The ``accelerate launch`` command line that runs ``stage`` on ``config_path`` in every process.

    Without ``train.accelerate_config`` it asks for plain data parallelism (``--multi_gpu``,
    which is torchrun: gloo on a CPU, NCCL on GPUs) and no mixed precision (the trainers
    choose their dtype); with one, the file decides.
    """
    n = process_count(train)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--main_process_port",
        str(_free_port()),
        "--num_cpu_threads_per_process",
        "1",
        "--monitor_interval",
        "1",
    ]
    if train.accelerate_config:
        cmd += ["--config_file", str(accelerate_config_path(train.accelerate_config))]
    else:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"] + (["--multi_gpu"] if n and n > 1 else [])
    if n:
        cmd += ["--num_processes", str(n)]
    return cmd + [
        "-m",
        "cai_dpo.distributed",
        stage,
        str(config_path),
        "--result",
        str(result),
        "--options",
        json.dumps(options),
    ]


def launch_stage(stage: str, cfg: Any, **options: Any) -> Path:
    """Run ``stage`` under ``accelerate launch`` and return its artifact folder.

    Holds the run's lock while the ranks work (they inherit it). ``options`` are the stage
    function's JSON-safe keyword arguments (``resume`` for PPO). Raises :class:`LaunchError`
    when the launch exits non-zero.
    """
    from cai_dpo.config import save_config
    from cai_dpo.store import RunLayout, run_lock

    stage_function(stage)  # an unknown stage or a setting that cannot be split fails here, not in N processes
    check_processes(stage, cfg, process_count(cfg.train))
    with run_lock(cfg.run_dir), tempfile.TemporaryDirectory(prefix=f"cai-dpo-{stage}-") as tmp:
        config_path = save_config(dataclasses.replace(cfg, runs_dir=str(cfg.run_dir.parent)), Path(tmp) / "config.yaml")
        result = Path(tmp) / "result.json"
        cmd = launch_command(stage, config_path, cfg.train, result, options)
        n = process_count(cfg.train)
        log.info("%s: launching %s processes: %s", stage, n or "the config file's", " ".join(cmd))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        code = subprocess.run(cmd, env=env).returncode
        if code != 0 or not result.exists():
            raise LaunchError(
                f"{stage}: training under accelerate launch ({n or 'config file'} processes) failed with exit code "
                f"{code}: a process raised, died or timed out (the report above names the rank and its error). "
                f"Checkpoints are kept in {RunLayout(cfg.run_dir).checkpoints}: rerun the same command to resume."
            )
        return Path(json.loads(result.read_text(encoding="utf-8"))["artifact"])


def run_stage(stage: str, cfg: Any, run: Any = None, **options: Any) -> Path:
    """Run a training stage as ``cfg.train.launcher`` says; returns its artifact folder.

    ``none``, or a process already launched by accelerate: the stage function, here.
    ``accelerate``: :func:`launch_stage` (``run`` is then ignored: the ranks open the run
    from ``cfg``). The CLI and the stage notebooks both call this.
    """
    if cfg.train.launcher == "accelerate" and world_size() == 1:
        return launch_stage(stage, cfg, **options)
    check_processes(stage, cfg, world_size())
    return stage_function(stage)(cfg, run, **options)


# --------------------------------------------------------------------------- the ranks


def main(argv: list[str] | None = None) -> int:
    """One rank of a launched stage: join the process group, run the stage, rank 0 records the result."""
    from cai_dpo.config import config_from_yaml_text
    from cai_dpo.store import atomic_write_json

    p = argparse.ArgumentParser(
        prog="python -m cai_dpo.distributed",
        description="one process of a training stage (started by accelerate launch)",
    )
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("config", help="the run config (YAML, as saved by cai_dpo.config.save_config)")
    p.add_argument("--result", default=None, help="rank 0 writes {'artifact': <folder>} here when done")
    p.add_argument("--options", default="{}", help="the stage function's keyword arguments (JSON)")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if is_main_process() else logging.WARNING,
        format=f"%(levelname)s rank {rank()} %(name)s: %(message)s",
    )
    try:
        cfg = config_from_yaml_text(Path(args.config).read_text(encoding="utf-8"), source=args.config)
        cfg = dataclasses.replace(cfg, threads=1)  # one torch thread per process
        check_processes(args.stage, cfg, world_size())
        init_process_group(cfg.train.timeout_s)
        out = stage_function(args.stage)(cfg, **json.loads(args.options))
    except CaiDpoInputError as exc:
        print(f"error (rank {rank()}): {exc}", file=sys.stderr)
        return 2
    if is_main_process() and args.result:
        atomic_write_json(Path(args.result), {"artifact": str(out)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

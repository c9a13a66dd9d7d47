"""Shared pieces of every TRL training stage (SFT, DPO, preference model).

- :func:`common_training_args` — the keyword arguments every TRL config needs here:
  mixed precision (``bf16``) where the policy's ``autocast`` resolves to bf16 (a GPU or CPU that has it),
  fp32 otherwise (``use_cpu`` without a GPU),
  step-based logging/saving/evaluation, no hub, gradient checkpointing only on a GPU
  unless ``train.gradient_checkpointing`` says otherwise (TRL's configs default it to on).
- :func:`trl_config` — ``SFTConfig``/``DPOConfig``/``RewardConfig`` from those, the stage's own keys
  and the section's checked ``trainer_kwargs``.
- :func:`training_callbacks` — a :class:`CsvMetricsCallback` writing ``log.csv`` into a
  metrics folder, progress events for the runner, and the trackers of ``train.report_to``
  (TensorBoard event files there by default when tensorboard is installed).
- :class:`StepLogger` — the same trackers for loops of our own (PPO).
- :func:`last_checkpoint` — the newest ``checkpoint-*`` folder to resume from, or None.
- :func:`resume_checkpoint` / :func:`clear_stale_checkpoints` — checkpoints are resumed only
  when an inputs note (data hashes, settings, upstream adapters) is unchanged; every trained
  artifact (SFT, DPO, preference model, PPO, RLOO) goes through them.
- :func:`artifact_current` / :func:`training_inputs` — whether a finished artifact already
  holds the result of the same inputs and target (then a stage skips training).
- :func:`train_to_target` — train, or take a checkpoint's weights when it already reached
  ``max_steps`` (a resumed HF Trainer would otherwise step once past it).

Example::

    args = trl_config(DPOConfig, cfg.dpo, run.checkpoint_dir("dpo"), seed=cfg.seed, has_eval=True,
                      beta=cfg.dpo.beta)
    trainer = DPOTrainer(..., args=args,
                         callbacks=training_callbacks(run.metrics_dir("dpo"), cfg.train.report_to))
    trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir))
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from cai_dpo.errors import InputError
from cai_dpo.store import atomic_write_text

if TYPE_CHECKING:
    import torch

    from cai_dpo.config import TrainSection

log = logging.getLogger(__name__)

CHECKPOINT_NOTE = "cai_dpo_inputs.json"


def has_gpu() -> bool:
    """True when a CUDA device is visible."""
    import torch

    return torch.cuda.is_available()


def tensorboard_available() -> bool:
    """True when torch's TensorBoard writer can be imported."""
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (``transformers.set_seed``).

    A training stage calls it before it builds anything randomly initialised: the A matrices of a
    fresh LoRA adapter, a scalar or value head. The trainers seed again in their constructors, but
    the stages attach their adapters, and TRL wraps a ``peft_config``, before that; without this the
    same run config trains a different adapter in every process.
    """
    from transformers import set_seed

    set_seed(seed)


def common_training_args(
    section: Any,
    output_dir: str | Path,
    *,
    seed: int = 0,
    has_eval: bool = False,
    save_steps: int | None = None,
    logging_steps: int = 1,
    save_total_limit: int = 2,
    gradient_checkpointing: bool | None = None,
    bf16: bool | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments for a TRL ``*Config`` from a stage's config section.

    ``section`` may carry ``learning_rate``, ``epochs``, ``max_steps``, ``batch_size``,
    ``grad_accum`` and ``save_steps`` (missing ones get defaults). ``has_eval`` turns on
    step-based evaluation at the save interval. ``gradient_checkpointing``
    (``train.gradient_checkpointing``): None turns it on with a GPU (activation memory at 7B) and
    off on the CPU, where memory is plentiful and recomputing the forward pass only costs time
    (``cpu-demo``: the preference model's steps 40 % slower, SFT's 3 %). ``bf16``: mixed precision
    (TRL's ``bf16``: autocast over fp32 weights and adapters), from the policy's ``autocast``
    (:func:`cai_dpo.models.autocast_dtype`); None: on with a GPU that has bf16, off on the CPU.
    ``overrides`` replace any key.
    """
    gpu = has_gpu()
    if bf16 is None:
        bf16 = False
        if gpu:
            import torch

            bf16 = bool(torch.cuda.is_bf16_supported())
    steps = save_steps or getattr(section, "save_steps", None) or 50
    batch = int(getattr(section, "batch_size", 4))
    args: dict[str, Any] = {
        "output_dir": str(output_dir),
        "learning_rate": float(getattr(section, "learning_rate", 1e-4)),
        "num_train_epochs": float(getattr(section, "epochs", 1.0)),
        "max_steps": int(getattr(section, "max_steps", -1)),
        "per_device_train_batch_size": batch,
        "per_device_eval_batch_size": batch,
        "gradient_accumulation_steps": int(getattr(section, "grad_accum", 1) or 1),
        "logging_strategy": "steps",
        "logging_steps": logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": steps,
        "save_total_limit": save_total_limit,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": steps if has_eval else None,
        "bf16": bf16,
        "fp16": False,
        "use_cpu": not gpu,
        # transformers 5's name for gradient checkpointing; TRL's configs still default the old name to on
        "activation_checkpointing": gpu if gradient_checkpointing is None else gradient_checkpointing,
        "report_to": "none",
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        # several processes (DDP): every trainable (LoRA) parameter takes part in every forward pass
        "ddp_find_unused_parameters": False,
        "push_to_hub": False,
        "disable_tqdm": False,
    }
    args.update(overrides)
    return args


def trl_config(
    config_cls: type,
    section: Any,
    output_dir: str | Path,
    *,
    seed: int = 0,
    has_eval: bool = False,
    gradient_checkpointing: bool | None = None,
    bf16: bool | None = None,
    **stage_args: Any,
) -> Any:
    """The TRL config ``config_cls`` of a training section (:class:`cai_dpo.config.TrainingSection`).

    Its arguments: :func:`common_training_args` (with ``gradient_checkpointing`` and ``bf16``), the stage's own
    ``stage_args``, then the section's ``trainer_kwargs``. A ``trainer_kwargs`` key that
    ``config_cls`` does not accept, that cai-dpo sets from one of its fields, or that the project or
    the stage sets here raises ConfigError naming ``<section>.trainer_kwargs.<key>``.
    """
    from cai_dpo.config import ConfigError, trainer_option_problem

    common = common_training_args(
        section, output_dir, seed=seed, has_eval=has_eval, gradient_checkpointing=gradient_checkpointing, bf16=bf16
    )
    args = {**common, **stage_args}
    extra = dict(getattr(section, "trainer_kwargs", None) or {})
    options = frozenset(f.name for f in dataclasses.fields(config_cls) if f.init)
    name = getattr(section, "section_key", "") or type(section).__name__
    for key in extra:
        problem = trainer_option_problem(section, key, options)
        if problem is None and key in args:
            problem = f"is set by cai-dpo for this stage ({key}={args[key]!r}) and cannot be changed"
        if problem is not None:
            raise ConfigError(f"{name}.trainer_kwargs.{key} {problem}")
    return config_cls(**args, **extra)


def clear_stale_checkpoints(folder: str | Path, note: dict[str, Any]) -> bool:
    """Delete ``folder`` when its checkpoints were made from other inputs; record ``note`` there.

    ``note`` describes the inputs and settings (JSON-safe); it is stored beside the
    checkpoints as ``cai_dpo_inputs.json``. A folder with checkpoints but no note (written
    before notes existed) cannot be trusted and is cleared too. Returns True when cleared.
    """
    import json
    import shutil

    from cai_dpo.distributed import barrier, is_main_process
    from cai_dpo.store import atomic_write_json

    folder = Path(folder)
    path = folder / CHECKPOINT_NOTE
    wanted = json.loads(json.dumps(note, default=str))
    cleared = False
    if is_main_process():  # several processes: rank 0 clears and writes, the others wait for it
        if folder.is_dir() and any(folder.iterdir()):
            if not path.exists() or json.loads(path.read_text(encoding="utf-8")) != wanted:
                log.info("inputs changed since the checkpoints in %s were written; starting over", folder)
                shutil.rmtree(folder)
                cleared = True
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, wanted)
    barrier()
    return cleared


@dataclasses.dataclass
class TrainerSetup:
    """What a TRL stage builds its trainer from.

    ``args``: the TRL config (:func:`trl_config`); ``resume``: the checkpoint to resume from, None to
    start afresh (:func:`resume_checkpoint`); ``callbacks``: :func:`training_callbacks`.
    """

    args: Any
    resume: str | None
    callbacks: list[TrainerCallback]

    def train(self, trainer: Any, max_steps: int) -> tuple[Any, int]:
        """:func:`train_to_target` of ``trainer`` from :attr:`resume`: (train output or None, step resumed from)."""
        return train_to_target(trainer, self.resume, max_steps)


def trainer_setup(
    config_cls: type,
    section: Any,
    checkpoint_dir: str | Path,
    metrics_dir: str | Path,
    note: dict[str, Any],
    *,
    seed: int,
    has_eval: bool,
    train: TrainSection,
    bf16: bool | None = None,
    **stage_args: Any,
) -> TrainerSetup:
    """The checkpoint to resume from (stale ones cleared), the TRL config and the callbacks of a TRL stage.

    ``note`` describes the inputs (see :func:`clear_stale_checkpoints`); ``stage_args`` go to
    :func:`trl_config`, with ``train.gradient_checkpointing`` and ``bf16`` (mixed precision, from the
    policy's ``autocast``); ``train.report_to`` goes to
    :func:`training_callbacks`. Raises ConfigError for a refused ``trainer_kwargs`` key or an unknown tracker.
    """
    resume = resume_checkpoint(checkpoint_dir, note)
    args = trl_config(
        config_cls,
        section,
        checkpoint_dir,
        seed=seed,
        has_eval=has_eval,
        gradient_checkpointing=train.gradient_checkpointing,
        bf16=bf16,
        **stage_args,
    )
    return TrainerSetup(args, resume, training_callbacks(metrics_dir, train.report_to))


def resume_checkpoint(folder: str | Path, note: dict[str, Any]) -> str | None:
    """The ``checkpoint-*`` in ``folder`` to resume from, after clearing checkpoints made from other inputs.

    See :func:`clear_stale_checkpoints` for ``note``.
    """
    clear_stale_checkpoints(folder, note)
    return last_checkpoint(folder)


def artifact_hash(folder: str | Path) -> str:
    """Content hash of an artifact folder's files, its ``manifest.json`` (timestamps) left out.

    An upstream artifact rewritten with the same weights keeps the same hash, so the
    stages trained on it do not start over.
    """
    from cai_dpo.store import content_hash, file_hash

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    return content_hash([(str(p.relative_to(folder)), file_hash(p)) for p in files])


def training_inputs(note: dict[str, Any], target: Any) -> dict[str, str]:
    """Manifest ``inputs`` entries recording what an artifact was trained from and how long.

    ``note``: the checkpoint note (inputs and settings); ``target``: the length settings
    (``max_steps``, ``epochs``, ...). :func:`artifact_current` compares against these.
    """
    from cai_dpo.store import content_hash

    return {"settings": content_hash(note), "target": content_hash(target)}


def artifact_current(
    out_dir: str | Path, note: dict[str, Any], target: Any, weights: str = "adapter_config.json"
) -> bool:
    """True when ``out_dir`` holds a finished artifact trained from ``note`` to ``target``.

    Reads ``out_dir/manifest.json``'s ``inputs.settings`` and ``inputs.target`` (see
    :func:`training_inputs`); a missing manifest or ``weights`` file means not current.
    """
    import json

    out_dir = Path(out_dir)
    path = out_dir / "manifest.json"
    if not (out_dir / weights).exists() or not path.exists():
        return False
    try:
        inputs = json.loads(path.read_text(encoding="utf-8")).get("inputs", {})
    except (OSError, ValueError):
        return False
    want = training_inputs(note, target)
    return inputs.get("settings") == want["settings"] and inputs.get("target") == want["target"]


def checkpoint_step(checkpoint: str | Path | None) -> int:
    """The global step recorded in a ``checkpoint-*`` folder (0 for none)."""
    import json

    if not checkpoint:
        return 0
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8")).get("global_step", 0))


def load_checkpoint_adapter(model: Any, checkpoint: str | Path) -> None:
    """Copy a checkpoint's saved adapter weights (``adapter_model.safetensors``) into the peft model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(checkpoint) / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{checkpoint}: no adapter_model.safetensors; delete the folder to retrain")
    result = set_peft_model_state_dict(model, load_file(str(weights), device=str(next(model.parameters()).device)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(
            f"{weights}: keys {list(unexpected)[:3]} do not fit the model; delete {Path(checkpoint).parent} to retrain"
        )


def train_to_target(trainer: Any, resume: str | None, max_steps: int) -> tuple[Any | None, int]:
    """Run ``trainer.train`` from ``resume``, unless that checkpoint already reached ``max_steps``.

    A resumed HF Trainer whose ``max_steps`` is not a multiple of the steps per epoch takes
    one step past it; when the checkpoint is already at the target its adapter weights are
    loaded instead. Returns ``(TrainOutput or None when nothing was trained, step resumed from)``.
    """
    done = checkpoint_step(resume)
    if resume and 0 < max_steps <= done:
        log.info("checkpoint %s already reached max_steps=%d; using its weights", resume, max_steps)
        load_checkpoint_adapter(trainer.model, resume)
        trainer.state.global_step = done
        return None, done
    if resume:
        log.info("resuming from %s (step %d)", resume, done)
    return trainer.train(resume_from_checkpoint=resume), done


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The ``checkpoint-<step>`` folder with the highest step under ``output_dir``, or None."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / "trainer_state.json").exists():
            found.append((int(m.group(1)), p))
    return str(max(found)[1]) if found else None


class CsvMetricsCallback(TrainerCallback):
    """Write every log event (train and eval) as a row of ``path`` (CSV, rewritten atomically).

    Columns are ``step``, ``epoch`` and the union of numeric keys seen. On resume, rows
    logged after the checkpoint's step are dropped so the file never repeats a step.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rows = []
        if self.path.exists() and state.global_step > 0:
            with open(self.path, newline="", encoding="utf-8") as fh:
                self.rows = [r for r in csv.DictReader(fh) if _num(r.get("step")) <= state.global_step]

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        columns = ["step", "epoch"]
        for r in self.rows:
            columns.extend(k for k in r if k not in columns)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf


def resolve_report_to(report_to: str | list[str] | None = "auto") -> list[str]:
    """The trackers ``train.report_to`` names, as a list.

    ``auto`` (or None) -> ``["tensorboard"]`` when tensorboard is installed, else ``[]``;
    ``none`` -> ``[]``; ``all`` -> every integration transformers finds installed; a
    comma-separated string or a list -> those names (``tensorboard``, ``trackio``,
    ``wandb``, ``mlflow``, ... as transformers' ``report_to`` knows them).
    """
    if report_to is None:
        report_to = "auto"
    names = [n.strip() for n in (report_to.split(",") if isinstance(report_to, str) else report_to) if n.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["auto"]:
        return ["tensorboard"] if tensorboard_available() else []
    if names == ["all"]:
        from transformers.integrations import get_available_reporting_integrations

        return list(get_available_reporting_integrations())
    return names


def training_callbacks(metrics_dir: str | Path, report_to: str | list[str] | None = "auto") -> list[TrainerCallback]:
    """Callbacks every trainer gets.

    CSV metrics (``<metrics_dir>/log.csv``) always; progress events for the pipeline runner
    (:mod:`cai_dpo.progress`); and the trackers of ``report_to`` (``train.report_to``, see
    :func:`resolve_report_to`) as transformers' own integration callbacks, TensorBoard
    writing to ``<metrics_dir>/tb``. An unknown tracker raises ConfigError naming
    ``train.report_to``.
    """
    from cai_dpo.config import ConfigError
    from cai_dpo.progress import trainer_progress_callback

    metrics_dir = Path(metrics_dir)
    callbacks: list[TrainerCallback] = [
        CsvMetricsCallback(metrics_dir / "log.csv"),
        trainer_progress_callback(metrics_dir.name),
    ]
    names = resolve_report_to(report_to)
    if "tensorboard" in names:
        if not tensorboard_available():
            raise ConfigError(
                "train.report_to: 'tensorboard' is not installed (pip install tensorboard), or choose another tracker"
            )
        from transformers.integrations import TensorBoardCallback

        tb = TensorBoardCallback()
        tb.logging_dir = str(metrics_dir / "tb")
        callbacks.append(tb)
    others = [n for n in names if n != "tensorboard"]
    if others:
        from transformers.integrations import get_reporting_integration_callbacks

        try:
            callbacks.extend(cls() for cls in get_reporting_integration_callbacks(others))
        except (ValueError, RuntimeError, ImportError) as exc:
            raise ConfigError(f"train.report_to: {exc}") from exc
    return callbacks


class StepLogger:
    """Per-step metrics of a loop outside transformers' Trainer (PPO) for the trackers of
    ``train.report_to``: TensorBoard event files in ``<metrics_dir>/tb`` when chosen (or
    ``auto`` and installed). The loop's own ``log.csv`` stays the record that is always
    written; other trackers see the Trainer stages only (logged once, at creation).
    """

    def __init__(self, metrics_dir: str | Path, report_to: str | list[str] | None = "auto"):
        self.metrics_dir = Path(metrics_dir)
        names = resolve_report_to(report_to)
        self.writer = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.metrics_dir / "tb"))
        skipped = [n for n in names if n != "tensorboard"]
        if skipped:
            log.info("train.report_to %s: this loop logs to log.csv and TensorBoard only", skipped)

    def log_step(self, row: dict[str, Any], step: int) -> None:
        """Every numeric value of ``row`` as a scalar at ``step`` (``step`` itself left out)."""
        if self.writer is None:
            return
        for key, value in row.items():
            if (
                key != "step"
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a metrics CSV with numbers parsed (empty cells dropped)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(fh)]


# --------------------------------------------------------------------------- per-example weights


def principle_weight(principle_ids: Any, principle_weights: dict[str, float]) -> float:
    """Mean of ``principle_weights`` over ``principle_ids`` (1.0 for an unlisted id; 1.0 for none)."""
    ids = [p for p in (principle_ids or []) if p]
    if not ids:
        return 1.0
    return sum(float(principle_weights.get(p, 1.0)) for p in ids) / len(ids)


def example_weights(
    rows: Any, weighting: str, principle_weights: dict[str, float] | None = None, source: str = "data"
) -> list[float]:
    """One training weight per row (dicts with optional ``weight`` and ``principle_ids``).

    ``weighting == "none"``: every weight is 1.0. ``"principle"``: the row's ``weight`` when
    set (the curation stage writes its score there), else :func:`principle_weight` of its
    ``principle_ids``. Raises :class:`~cai_dpo.errors.InputError` naming ``source``, the row and the field for a
    negative or non-finite weight, and for an unknown ``weighting``.
    """
    if weighting not in ("none", "principle"):
        raise InputError(f"{source}: weighting must be 'none' or 'principle', got {weighting!r}")
    out: list[float] = []
    for i, row in enumerate(rows):
        if weighting == "none":
            out.append(1.0)
            continue
        w = row.get("weight")
        if w is None or (isinstance(w, float) and math.isnan(w)):
            w = principle_weight(row.get("principle_ids"), principle_weights or {})
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise InputError(f"{source}: row {i} field 'weight' is {w!r}; it must be a number >= 0") from None
        if not math.isfinite(w) or w < 0:
            raise InputError(f"{source}: row {i} field 'weight' is {w}; it must be a finite number >= 0")
        out.append(w)
    for name, w in (principle_weights or {}).items():
        if not math.isfinite(float(w)) or float(w) < 0:
            raise InputError(f"{source}: principle_weights.{name} is {w}; it must be a finite number >= 0")
    return out


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``Σ_i w_i·loss_i / Σ_i w_i`` over a batch (torch tensors of shape [B]); the plain mean without weights.

    All-zero weights give a loss of 0 with zero gradient (the sum is clamped at 1e-12).
    """
    if weights is None:
        return losses.mean()
    w = weights.to(device=losses.device, dtype=losses.dtype)
    return (w * losses).sum() / w.sum().clamp_min(1e-12)

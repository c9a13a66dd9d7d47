"""SL-CAI supervised fine-tuning: a LoRA (or QLoRA) adapter on the revised answers.

Reads ``data/sl`` (conversational ``messages``), trains with TRL's ``SFTTrainer`` on the
assistant tokens only and writes the adapter to ``models/sft`` (``load_model`` on that
folder finds the base model), plus merged weights at ``models/sft-merged`` when
``sft.merge`` is set.

Loss masking: when the tokenizer's chat template has ``{% generation %}`` markers the
``messages`` are trained with ``assistant_only_loss``; otherwise (SmolLM2's ChatML
template has none) each row becomes ``{"prompt": [user turns], "completion": [assistant
turn]}`` and TRL trains on the completion only.

Checkpoints go to ``checkpoints/sft`` every ``sft.save_steps``; a rerun resumes from the
newest one as long as the data and training settings are unchanged (otherwise the stale
checkpoints are cleared). Per-step metrics: ``metrics/sft/log.csv``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from cai_dpo.config import RunConfig, to_dict
from cai_dpo.engine import set_threads
from cai_dpo.models import attach_lora, describe, load_model, merge_adapter, save_adapter
from cai_dpo.splits import split_indices_by_prompt
from cai_dpo.store import Manifest, RunStore, Timer, atomic_dir, atomic_write_json, content_hash, file_hash
from cai_dpo.training import (
    artifact_current,
    common_training_args,
    read_metrics_csv,
    resume_checkpoint,
    train_to_target,
    training_callbacks,
    training_inputs,
)

log = logging.getLogger(__name__)



def to_prompt_completion(example: dict[str, Any]) -> dict[str, Any]:
    """``messages`` → ``prompt`` (every turn before the last) and ``completion`` (the last, an assistant turn)."""
    messages = example["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("data/sl: every row's 'messages' must end with an assistant turn")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def prepare_dataset(dataset: Any, tokenizer: Any) -> tuple[Any, str]:
    """The dataset in the format TRL masks to assistant tokens, and the loss mode used."""
    from trl.chat_template_utils import has_generation_markers

    template = getattr(tokenizer, "chat_template", None)
    keep = ["messages"]
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
    if template and has_generation_markers(template):
        return dataset, "assistant_only"
    return dataset.map(to_prompt_completion, remove_columns=["messages"]), "completion_only"


def split_eval(dataset: Any, fraction: float, seed: int) -> tuple[Any, Any | None]:
    """Hold out ``fraction`` of the prompts (every row of a held-out prompt) for evaluation; none for tiny datasets.

    A row's prompt is every turn of its ``messages`` (or its ``prompt``) before the last.
    """
    if "messages" in dataset.column_names:
        prompts = [m[:-1] for m in dataset["messages"]]
    else:
        prompts = dataset["prompt"]
    train, held = split_indices_by_prompt(prompts, fraction, seed)
    if not held:
        return dataset, None
    return dataset.select(train), dataset.select(held)


def dataset_hash(folder: Path) -> str:
    """Content hash of a saved dataset's Arrow data (not its manifest or cache files)."""
    files = sorted(Path(folder).glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"{folder}: no data-*.arrow files; is this a dataset saved with save_to_disk?")
    return content_hash([file_hash(f) for f in files])


def run_sft(cfg: RunConfig, run: RunStore | None = None) -> Path:
    """Train the SL-CAI adapter on ``data/sl``; returns ``models/sft``."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    run = run or RunStore(cfg.run_dir)
    threads = set_threads(cfg.threads)
    data_dir = run.data_dir("sl")
    if not (data_dir / "dataset_info.json").exists():
        raise FileNotFoundError(f"{data_dir}: SL-CAI dataset not found; run `cai-dpo sl` (stages.sl.run_sl) first")
    data_hash = dataset_hash(data_dir)
    spec = dataclasses.replace(cfg.policy, adapter=None)
    # what the checkpoints depend on; training longer (max_steps, epochs) may continue from them
    settings = {k: v for k, v in to_dict(cfg.sft).items() if k not in ("max_steps", "epochs", "save_steps", "merge")}
    note = {"data": data_hash, "sft": settings, "policy": to_dict(spec), "seed": cfg.seed}
    target = {"max_steps": cfg.sft.max_steps, "epochs": cfg.sft.epochs, "merge": cfg.sft.merge}
    out = run.model_dir("sft")
    if artifact_current(out, note, target):
        log.info("SL-CAI adapter in %s is up to date (same data and settings); nothing to train", out)
        return out

    timings: dict[str, float] = {}
    with Timer() as t_load:
        model, tokenizer = load_model(spec, trainable=True)
        tokenizer.padding_side = "right"
        model = attach_lora(model, cfg.sft.lora)
    timings["model_load"] = t_load.seconds

    dataset = datasets.load_from_disk(str(data_dir), keep_in_memory=True)  # no cache files written into data/sl
    if len(dataset) == 0:
        raise ValueError(f"{data_dir}: the SL-CAI dataset is empty; check data.red_team and rerun `cai-dpo sl`")
    dataset, loss_mode = prepare_dataset(dataset, tokenizer)
    train_ds, eval_ds = split_eval(dataset, cfg.sft.eval_fraction, cfg.seed)

    ckpt_dir = run.root / "checkpoints" / "sft"
    resume = resume_checkpoint(ckpt_dir, note)
    args = common_training_args(cfg.sft, ckpt_dir, seed=cfg.seed, has_eval=eval_ds is not None)
    sft_args = SFTConfig(
        **args,
        max_length=cfg.sft.max_length,
        packing=False,
        completion_only_loss=True if loss_mode == "completion_only" else None,
        assistant_only_loss=loss_mode == "assistant_only",
    )
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=training_callbacks(run.metrics_dir("sft")),
    )
    with Timer() as t_train:
        result, _ = train_to_target(trainer, resume, cfg.sft.max_steps)
    train_metrics: dict[str, Any] = result.metrics if result is not None else {}
    if result is not None:
        timings["train"] = t_train.seconds
    steps = trainer.state.global_step
    eval_metrics: dict[str, Any] = {}
    if eval_ds is not None:
        with Timer() as t_eval:
            eval_metrics = trainer.evaluate()
        timings["eval"] = t_eval.seconds

    with Timer() as t_save:
        save_adapter(trainer.model, tokenizer, out, base=cfg.policy.name)
        merged = _save_merged(cfg, trainer.model, tokenizer, out, run) if cfg.sft.merge else None
    timings["save"] = t_save.seconds

    log_rows = read_metrics_csv(run.metrics_dir("sft") / "log.csv") if (run.metrics_dir("sft") / "log.csv").exists() else []
    train_losses = [r["loss"] for r in log_rows if "loss" in r]
    Manifest(
        stage="sft",
        config=to_dict(cfg),
        inputs={"data/sl": data_hash, **training_inputs(note, target)},
        models={"base": describe(spec), "base_spec": cfg.policy.name, "adapter": str(out),
                **({"merged": str(merged)} if merged else {})},
        counts={"train_rows": len(train_ds), "eval_rows": len(eval_ds) if eval_ds is not None else 0,
                "steps": steps, "resumed_from": resume or "", "loss_mode": loss_mode,
                "threads": threads},
        timings=timings,
        metrics={
            "train_loss_mean": sum(train_losses) / len(train_losses) if train_losses else None,
            "train_loss_first": train_losses[0] if train_losses else None,
            "train_loss_final": train_losses[-1] if train_losses else None,
            "eval_loss": eval_metrics.get("eval_loss"),
            "train_runtime": train_metrics.get("train_runtime"),
            "train_samples_per_second": train_metrics.get("train_samples_per_second"),
        },
    ).write(out / "manifest.json")
    log.info("SL-CAI adapter saved to %s (%d steps)", out, steps)
    return out


def _save_merged(cfg: RunConfig, model: Any, tokenizer: Any, adapter_dir: Path, run: RunStore) -> Path:
    """Merged full weights at ``models/sft-merged`` (a quantized base is reloaded unquantized first)."""
    if cfg.policy.quantization != "none":
        spec = dataclasses.replace(cfg.policy, adapter=None, quantization="none")
        model, tokenizer = load_model(spec, adapter=str(adapter_dir))
    merged = merge_adapter(model)
    out = run.model_dir("sft-merged")
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "cai_dpo_source.json").write_text(json.dumps({"source": f"{cfg.policy.name} + SL-CAI adapter",
                                                             "adapter": str(adapter_dir),
                                                             "hash": content_hash(str(adapter_dir))}))
    return out

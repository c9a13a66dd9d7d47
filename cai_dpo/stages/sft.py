"""SL-CAI supervised fine-tuning: a LoRA (or QLoRA) adapter on the revised answers.

Reads the rows chosen by ``sft.data`` — ``data/sl`` (conversational ``messages``), the
curated set's ``train`` split, or both (:func:`cai_dpo.sft_rows.build_rows`) — trains with TRL's
``SFTTrainer`` on the assistant tokens only and writes the adapter to ``models/sft``
(``load_model`` on that folder finds the base model), plus merged weights at
``models/sft-merged`` when ``sft.merge`` is set.

Per-example weights (``sft.weighting: principle``): each row's ``weight`` (its own, or the
mean of ``sft.principle_weights`` over its principle ids) scales its loss; the batch loss is

    L = Σ_i w_i · NLL_i / Σ_i w_i,   NLL_i = -(1/T_i) Σ_t log π(y_{i,t} | x_i, y_{i,<t}),

T_i the number of completion (assistant) tokens of example i, so every example counts by
its weight whatever its length (``weighting: none`` keeps TRL's loss, the mean over all
completion tokens of the batch). With ``grad_accum`` > 1 the micro-batch losses are averaged.

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
from cai_dpo.distributed import is_main_process, sharded_state_dict
from cai_dpo.engine import set_threads
from cai_dpo.errors import InputError
from cai_dpo.models import attach_lora, autocast_dtype, describe, load_model, merge_adapter, write_adapter
from cai_dpo.sft_rows import build_rows
from cai_dpo.splits import split_indices_by_prompt
from cai_dpo.store import Manifest, RunStore, Timer, atomic_dir, content_hash, locked_stage
from cai_dpo.training import (
    artifact_current,
    read_metrics_csv,
    seed_everything,
    trainer_setup,
    training_inputs,
)

log = logging.getLogger(__name__)


def to_prompt_completion(example: dict[str, Any]) -> dict[str, Any]:
    """``messages`` → ``prompt`` (every turn before the last) and ``completion`` (the last, an assistant turn)."""
    messages = example["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise InputError("data/sl: every row's 'messages' must end with an assistant turn")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def prepare_dataset(dataset: Any, tokenizer: Any) -> tuple[Any, str]:
    """The dataset in the format TRL masks to assistant tokens, and the loss mode used."""
    from trl.chat_template_utils import has_generation_markers

    template = getattr(tokenizer, "chat_template", None)
    keep = ["messages", "weight"]
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


@locked_stage
def run_sft(cfg: RunConfig, run: RunStore | None = None) -> Path:
    """Train the SL-CAI adapter on the rows of ``sft.data`` (see :func:`build_rows`); returns ``models/sft``."""
    import datasets
    from trl import SFTConfig

    from cai_dpo.trl_trainers import WeightedLMCollator, WeightedSFTTrainer

    run = run or RunStore(cfg.run_dir)
    threads = set_threads(cfg.threads)
    rows, data_info = build_rows(cfg, run)
    data_hash = data_info["data_hash"]
    spec = dataclasses.replace(cfg.policy, adapter=None)
    # what the checkpoints depend on; training longer (max_steps, epochs) may continue from them
    settings = {k: v for k, v in to_dict(cfg.sft).items() if k not in ("max_steps", "epochs", "save_steps", "merge")}
    bf16 = autocast_dtype(spec) is not None  # mixed precision: a changed precision trains afresh
    note = {"data": data_hash, "sft": settings, "policy": to_dict(spec), "bf16": bf16, "seed": cfg.seed}
    target = {"max_steps": cfg.sft.max_steps, "epochs": cfg.sft.epochs, "merge": cfg.sft.merge}
    out = run.sft_adapter
    if artifact_current(out, note, target):
        log.info("SL-CAI adapter in %s is up to date (same data and settings); nothing to train", out)
        return out

    timings: dict[str, float] = {}
    seed_everything(cfg.seed)
    with Timer() as t_load:
        model, tokenizer = load_model(spec, trainable=True)
        tokenizer.padding_side = "right"
        model = attach_lora(model, cfg.sft.lora)
    timings["model_load"] = t_load.seconds

    dataset = datasets.Dataset.from_list([{"messages": r["messages"], "weight": float(r["weight"])} for r in rows])
    dataset, loss_mode = prepare_dataset(dataset, tokenizer)
    train_ds, eval_ds = split_eval(dataset, cfg.sft.eval_fraction, cfg.seed)

    setup = trainer_setup(
        SFTConfig,
        cfg.sft,
        run.checkpoint_dir("sft"),
        run.metrics_dir("sft"),
        note,
        seed=cfg.seed,
        has_eval=eval_ds is not None,
        train=cfg.train,
        bf16=bf16,
        max_length=cfg.sft.max_length,
        packing=False,
        completion_only_loss=True if loss_mode == "completion_only" else None,
        assistant_only_loss=loss_mode == "assistant_only",
    )
    trainer = WeightedSFTTrainer(
        model=model,
        args=setup.args,
        data_collator=WeightedLMCollator(
            pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=setup.args.pad_to_multiple_of
        ),
        weighting=cfg.sft.weighting,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=setup.callbacks,
    )
    with Timer() as t_train:
        result, _ = setup.train(trainer, cfg.sft.max_steps)
    train_metrics: dict[str, Any] = result.metrics if result is not None else {}
    if result is not None:
        timings["train"] = t_train.seconds
    steps = trainer.state.global_step
    eval_metrics: dict[str, Any] = {}
    if eval_ds is not None:
        with Timer() as t_eval:
            eval_metrics = trainer.evaluate()
        timings["eval"] = t_eval.seconds

    state = sharded_state_dict(trainer)  # every process takes part when the weights are sharded
    if not is_main_process():
        return out  # rank 0 writes the artifact
    log_rows = (
        read_metrics_csv(run.metrics_dir("sft") / "log.csv") if (run.metrics_dir("sft") / "log.csv").exists() else []
    )
    train_losses = [r["loss"] for r in log_rows if "loss" in r]
    # adapter, merged weights and manifest: one atomic step (a kill leaves the old artifact or the new one)
    with atomic_dir(out) as tmp:
        with Timer() as t_save:
            write_adapter(trainer.model, tokenizer, tmp, base=cfg.policy.name, final=out, state_dict=state)
            merged = _save_merged(cfg, trainer.model, tokenizer, out, run, staged=tmp) if cfg.sft.merge else None
        timings["save"] = t_save.seconds
        Manifest(
            stage="sft",
            config=to_dict(cfg),
            inputs={**data_info["inputs"], "rows": data_hash, **training_inputs(note, target)},
            models={
                "base": describe(spec),
                "base_spec": cfg.policy.name,
                "adapter": str(out),
                **({"merged": str(merged)} if merged else {}),
            },
            counts={
                "train_rows": len(train_ds),
                "eval_rows": len(eval_ds) if eval_ds is not None else 0,
                "steps": steps,
                "resumed_from": setup.resume or "",
                "loss_mode": loss_mode,
                "threads": threads,
                "data": cfg.sft.data,
                "weighting": cfg.sft.weighting,
                **data_info["counts"],
            },
            timings=timings,
            metrics={
                "train_loss_mean": sum(train_losses) / len(train_losses) if train_losses else None,
                "train_loss_first": train_losses[0] if train_losses else None,
                "train_loss_final": train_losses[-1] if train_losses else None,
                "eval_loss": eval_metrics.get("eval_loss"),
                "train_runtime": train_metrics.get("train_runtime"),
                "train_samples_per_second": train_metrics.get("train_samples_per_second"),
            },
        ).write(tmp / "manifest.json")
    log.info("SL-CAI adapter saved to %s (%d steps)", out, steps)
    return out


def _save_merged(
    cfg: RunConfig, model: Any, tokenizer: Any, adapter_dir: Path, run: RunStore, staged: Path | None = None
) -> Path:
    """Merged full weights at ``models/sft-merged`` (a quantized base is reloaded unquantized first).

    ``staged`` is the folder the adapter is being written to before it moves to ``adapter_dir``.
    """
    if cfg.policy.quantization != "none":
        spec = dataclasses.replace(cfg.policy, adapter=None, quantization="none")
        model, tokenizer = load_model(spec, adapter=str(staged or adapter_dir))
    merged = merge_adapter(model)
    out = run.sft_merged
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "cai_dpo_source.json").write_text(
            json.dumps(
                {
                    "source": f"{cfg.policy.name} + SL-CAI adapter",
                    "adapter": str(adapter_dir),
                    "hash": content_hash(str(adapter_dir)),
                }
            ),
            encoding="utf-8",
        )
    return out

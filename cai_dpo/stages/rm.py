"""The explicit preference model (PM) of RL-CAI, trained on (soft) AI-feedback labels.

A scalar-head model scores a (prompt, response) conversation; it is trained on pairs with
the Bradley–Terry likelihood against the judge's soft label ``p = p_chosen``:

    loss = -( p · log σ(r_c - r_r) + (1 - p) · log σ(r_r - r_c) )

(``label_mode: hard`` rounds ``p`` to 0/1 and drops ties, giving the usual RM loss).
With ``rm.weighting: principle`` the batch loss is ``Σ_i w_i·loss_i / Σ_i w_i``, ``w_i`` the
pair's ``weight`` when set, else the mean of ``rm.principle_weights`` over its
``principle_ids`` (1.0 for unlisted ids or none).

Backbone (``rm.backbone``): ``None`` / ``"sl-cai"`` — the policy base with the SFT adapter
(``models/sft``) merged when it exists; ``"base"`` — the policy base alone; anything else —
a model spec (folder, hub id, ``tiny``, ``embedded``) loaded as a sequence classifier, e.g.
a small encoder with its own tokenizer. A LoRA adapter is trained with the scalar head in
``modules_to_save`` (so reloading restores the trained head); the result is ``models/rm``.

Texts are built by :func:`~cai_dpo.rl.reward.rm_text` with the preference model's own
tokenizer, so the policy and the preference model may tokenize differently.
:class:`~cai_dpo.rl.reward.RewardScorer` (:mod:`cai_dpo.rl.reward`) reloads ``models/rm`` and
scores (prompt, response) lists; this stage evaluates the trained model with it, and PPO and
the evaluation stage use it too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cai_dpo.config import LoraSection, ModelSpec, RunConfig, to_dict
from cai_dpo.errors import InputError
from cai_dpo.models import autocast_dtype
from cai_dpo.preferences import check_preference_rows, load_preferences
from cai_dpo.rl.reward import (
    SCORER_NOTE,
    RewardScorer,
    encode_rm,
    prompt_text,
    response_text,
    sft_adapter,
    uses_chat_template,
)
from cai_dpo.splits import split_by_prompt
from cai_dpo.store import Manifest, RunStore, Timer, atomic_dir, atomic_write_json, content_hash, locked_stage

log = logging.getLogger(__name__)

HEAD_NAMES = ("score", "classifier", "v_head")
# config keys that only change how long training runs: a longer run may resume a shorter one
_LENGTH_KEYS = ("epochs", "max_steps", "save_steps")


# --------------------------------------------------------------------------- losses and metrics


def expected_calibration_error(pred: Sequence[float], target: Sequence[float], bins: int = 10) -> float:
    """ECE of predicted probabilities against (soft) targets, equal-width bins on [0, 1].

    ``Σ_b |B_b|/N · |mean(pred in b) - mean(target in b)|``; with hard targets this is the
    usual confidence-vs-accuracy ECE.
    """
    q = np.asarray(pred, dtype=float)
    p = np.asarray(target, dtype=float)
    if q.size == 0:
        return float("nan")
    idx = np.minimum((q * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() / q.size * abs(q[sel].mean() - p[sel].mean())
    return float(total)


def preference_metrics(
    r_chosen: Sequence[float], r_rejected: Sequence[float], p_chosen: Sequence[float]
) -> dict[str, Any]:
    """Accuracy (sign agreement with p-0.5, ties excluded), ECE, soft log-loss, Brier and mean margin."""
    rc, rr, p = (np.asarray(x, dtype=float) for x in (r_chosen, r_rejected, p_chosen))
    d = rc - rr
    q = 1.0 / (1.0 + np.exp(-d))
    decided = p != 0.5
    acc = float(((d > 0) == (p > 0.5))[decided].mean()) if decided.any() else float("nan")
    eps = 1e-12
    logloss = float(-(p * np.log(q + eps) + (1 - p) * np.log(1 - q + eps)).mean()) if p.size else float("nan")
    return {
        "n": int(p.size),
        "accuracy": acc,
        "ece": expected_calibration_error(q, p),
        "soft_log_loss": logloss,
        "brier": float(((q - p) ** 2).mean()) if p.size else float("nan"),
        "mean_margin": float(d.mean()) if p.size else float("nan"),
    }


# --------------------------------------------------------------------------- data


def _helpful_texts(cfg: RunConfig) -> set[str]:
    """User texts of the configured helpful prompt set and of the benign prompts of the curated
    set that curated pairs come from (``pairs.curated``); a set that cannot be read adds nothing."""
    from cai_dpo.curated import load_curated
    from cai_dpo.data import load_prompts

    texts: set[str] = set()
    for spec, read in (
        (cfg.data.helpful, lambda spec: [p.text for p in load_prompts(spec)]),
        (cfg.pairs.curated, lambda spec: [e.prompt for e in load_curated(spec, kind="benign")]),
    ):
        try:
            texts |= {t.strip() for t in read(spec)}
        except Exception as exc:  # noqa: BLE001 - helpful detection then relies on the other set and the category
            log.warning(
                "helpful prompts of %s not readable (%s); its rows count as helpful by category only", spec, exc
            )
    return texts


def is_helpful_row(row: dict[str, Any], helpful_texts: set[str]) -> bool:
    """A preference row is a helpfulness pair when its category is ``helpful`` or its prompt is a helpful prompt."""
    if str(row.get("category") or "").lower() in ("helpful", "helpfulness"):
        return True
    return prompt_text(row["prompt"]).strip() in helpful_texts


def mix_helpful(
    rows: list[dict[str, Any]], share: float | None, helpful_texts: set[str], seed: int
) -> list[dict[str, Any]]:
    """Rebalance rows so helpfulness pairs make up ``share`` of them (None: keep rows as they are).

    The over-represented group is subsampled (seeded); ``share == 0`` drops helpful rows.
    """
    if share is None:
        return rows
    if not 0.0 <= share < 1.0:
        raise InputError(f"rm.helpful_mix must be in [0, 1) or null, got {share}")
    helpful = [r for r in rows if is_helpful_row(r, helpful_texts)]
    harmless = [r for r in rows if not is_helpful_row(r, helpful_texts)]
    rng = np.random.default_rng(seed)
    want_h = int(round(share / (1 - share) * len(harmless)))
    if want_h > len(helpful) and share > 0:
        keep_harm = int(round(len(helpful) * (1 - share) / share))
        harmless = [
            harmless[i] for i in sorted(rng.choice(len(harmless), size=min(keep_harm, len(harmless)), replace=False))
        ]
        want_h = len(helpful)
    helpful = [helpful[i] for i in sorted(rng.choice(len(helpful), size=min(want_h, len(helpful)), replace=False))]
    log.info("helpful_mix=%.2f: %d helpful + %d other pairs", share, len(helpful), len(harmless))
    return harmless + helpful


def label_target(p: Any, mode: str) -> float | None:
    """Training target for a row: ``p_chosen`` (soft) or its rounding (hard; None for a tie)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        raise InputError("preference row has p_chosen missing/NaN; fix the preferences dataset (field p_chosen)")
    p = float(p)
    if mode == "soft":
        return min(1.0, max(0.0, p))
    if p == 0.5:
        return None
    return 1.0 if p > 0.5 else 0.0


def tokenize_pairs(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    mode: str,
    weights: Sequence[float] | None = None,
    response_tokens: int | None = None,
) -> dict[str, list[Any]]:
    """Columns ``chosen_ids``, ``rejected_ids``, ``p_chosen`` (the training target) and ``weight`` for RewardTrainer.

    ``weights`` (one per row; default 1.0) fill the ``weight`` column.
    """
    out: dict[str, list[Any]] = {"chosen_ids": [], "rejected_ids": [], "p_chosen": [], "weight": []}
    for i, row in enumerate(rows):
        target = label_target(row.get("p_chosen", 1.0), mode)
        if target is None:
            continue
        for side in ("chosen", "rejected"):
            ids = encode_rm(tokenizer, row["prompt"], response_text(row[side]), max_length, response_tokens)
            out[f"{side}_ids"].append(ids)
        out["p_chosen"].append(target)
        out["weight"].append(float(weights[i]) if weights is not None else 1.0)
    return out


# --------------------------------------------------------------------------- model


def head_name(model: Any) -> str:
    """Name of the scalar head module of a sequence-classification model."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_NAMES:
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return name
    raise InputError(f"{type(base).__name__}: no scalar head found (looked for {', '.join(HEAD_NAMES)})")


def lora_targets(model: Any, wanted: Sequence[str], head: str) -> list[str]:
    """``wanted`` module names when the model has them, else every linear layer's name but the head."""
    import torch

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    found = [w for w in wanted if w in names]
    if found:
        return found
    fallback = sorted(n for n in names if n != head)
    log.info("LoRA targets %s not in %s; using its linear layers %s", list(wanted), type(model).__name__, fallback)
    return fallback


def load_rm_backbone(cfg: RunConfig, run: RunStore) -> tuple[Any, Any, str, list[Path]]:
    """(seq-cls model, tokenizer, base spec name, adapters merged first) for ``cfg.rm.backbone``."""
    from cai_dpo.models import load_model

    choice = cfg.rm.backbone
    if choice in (None, "sl-cai", "base"):
        merge = [sft_adapter(run)] if choice != "base" and sft_adapter(run) else []
        model, tok = load_model(cfg.policy, task="seq_cls", trainable=True, merge_first=merge)
        return model, tok, cfg.policy.name, merge
    spec = ModelSpec(name=choice, device=cfg.policy.device)
    model, tok = load_model(spec, task="seq_cls", trainable=True, merge_first=[])
    return model, tok, choice, []


def backbone_spec(cfg: RunConfig) -> ModelSpec:
    """The precision/quantization settings the backbone is loaded with."""
    if cfg.rm.backbone in (None, "sl-cai", "base"):
        return cfg.policy
    return ModelSpec(name=cfg.rm.backbone, device=cfg.policy.device)


def build_rm(cfg: RunConfig, run: RunStore) -> tuple[Any, Any, str, list[Path]]:
    """The backbone wrapped with a fresh LoRA adapter, the head trainable and saved with it."""
    import dataclasses

    from cai_dpo.models import attach_lora

    model, tok, base, merge = load_rm_backbone(cfg, run)
    head = head_name(model)
    lora: LoraSection = dataclasses.replace(
        cfg.rm.lora, target_modules=lora_targets(model, cfg.rm.lora.target_modules, head)
    )
    peft_model = attach_lora(model, lora, task_type="SEQ_CLS", modules_to_save=[head])
    return peft_model, tok, base, merge


# --------------------------------------------------------------------------- stage


@locked_stage
def run_rm(cfg: RunConfig, run: RunStore | None = None, preferences: Any = None) -> Path:
    """Train the preference model on the run's preferences; write ``models/rm`` and its manifest.

    ``preferences`` (a Dataset or list of rows in the preference schema) replaces the
    run's ``data/preferences[_merged]``.
    """
    import torch
    from datasets import Dataset
    from trl import RewardConfig

    from cai_dpo.distributed import is_main_process, sharded_state_dict
    from cai_dpo.engine import set_threads
    from cai_dpo.models import write_adapter
    from cai_dpo.training import (
        artifact_current,
        artifact_hash,
        example_weights,
        seed_everything,
        trainer_setup,
        training_inputs,
    )
    from cai_dpo.trl_trainers import SoftPreferenceCollator, SoftRewardTrainer

    run = run or RunStore(cfg.run_dir)
    set_threads(cfg.threads)
    timings: dict[str, float] = {}
    if preferences is None:
        rows, source = load_preferences(run)
        pref_hash = artifact_hash(source)
        inputs = {"preferences": f"{source.name}:{pref_hash}"}
    else:
        data, source = preferences, None
        rows = list(data) if not isinstance(data, list) else data
        pref_hash = content_hash(rows)
        inputs = {"preferences": f"<given>:{pref_hash}"}
    if not rows:
        raise InputError(f"{source or 'preferences'}: the preference dataset is empty; nothing to train on")
    rows, check_counts = check_preference_rows(rows, str(source or "preferences"))
    helpful_texts = _helpful_texts(cfg)  # also counts helpful rows for the manifest
    sft = sft_adapter(run) if cfg.rm.backbone in (None, "sl-cai") else None
    note = {
        "preferences": pref_hash,
        "sft_adapter": artifact_hash(sft) if sft is not None else "",
        "helpful_prompts": content_hash(sorted(helpful_texts)) if cfg.rm.helpful_mix is not None else "",
        "rm": {k: v for k, v in to_dict(cfg.rm).items() if k not in _LENGTH_KEYS},
        "policy": to_dict(cfg.policy),
        "bf16": autocast_dtype(cfg.policy) is not None,  # mixed precision
        "seed": cfg.seed,
    }
    target = {k: getattr(cfg.rm, k) for k in _LENGTH_KEYS}
    out_dir = run.preference_model
    if artifact_current(out_dir, note, target):
        log.info(
            "preference model in %s is up to date (same preferences, backbone and settings); nothing to train", out_dir
        )
        return out_dir
    rows = mix_helpful(rows, cfg.rm.helpful_mix, helpful_texts, cfg.seed)
    train_rows, eval_rows = split_by_prompt(rows, cfg.rm.eval_fraction, cfg.seed)

    seed_everything(cfg.seed)
    with Timer() as t_load:
        model, tok, base, merge = build_rm(cfg, run)
    timings["load_s"] = t_load.seconds
    if sft is not None and merge:
        inputs["sft_adapter"] = note["sft_adapter"]
    inputs.update(training_inputs(note, target))
    where = str(source or "preferences")
    train_w = example_weights(train_rows, cfg.rm.weighting, cfg.rm.principle_weights, source=where)
    train_cols = tokenize_pairs(
        train_rows, tok, cfg.rm.max_length, cfg.rm.label_mode, train_w, response_tokens=cfg.rm.response_tokens
    )
    if not train_cols["p_chosen"]:
        raise InputError(
            "preferences: no usable training pairs (all ties in label_mode 'hard'?); use rm.label_mode=soft"
        )
    eval_cols = (
        tokenize_pairs(
            eval_rows,
            tok,
            cfg.rm.max_length,
            cfg.rm.label_mode,
            example_weights(eval_rows, cfg.rm.weighting, cfg.rm.principle_weights, source=where),
            response_tokens=cfg.rm.response_tokens,
        )
        if eval_rows
        else None
    )
    has_eval = bool(eval_cols and eval_cols["p_chosen"])

    setup = trainer_setup(
        RewardConfig,
        cfg.rm,
        run.checkpoint_dir("rm"),
        run.metrics_dir("rm"),
        note,
        seed=cfg.seed,
        has_eval=has_eval,
        train=cfg.train,
        bf16=note["bf16"],
        max_length=None,
        disable_dropout=True,
        center_rewards_coefficient=cfg.rm.center_rewards_coefficient,
    )
    trainer = SoftRewardTrainer(
        model=model,
        args=setup.args,
        data_collator=SoftPreferenceCollator(pad_token_id=tok.pad_token_id),
        train_dataset=Dataset.from_dict(train_cols),
        eval_dataset=Dataset.from_dict(eval_cols) if has_eval else None,
        processing_class=tok,
        callbacks=setup.callbacks,
        weighting=cfg.rm.weighting,
    )
    bspec = backbone_spec(cfg)
    if bspec.quantization != "none":
        # TRL casts a quantized model's trainable parameters to bf16; keep them in the compute dtype the
        # activations have (the scalar head would otherwise see fp32 inputs with bf16 weights)
        compute = getattr(torch, bspec.compute_dtype)
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != compute:
                param.data = param.data.to(compute)
    with Timer() as t_train:
        result, resumed_step = setup.train(trainer, cfg.rm.max_steps)
    timings["train_s"] = t_train.seconds
    steps = int(trainer.state.global_step)
    state = sharded_state_dict(trainer)  # every process takes part when the weights are sharded
    if not is_main_process():
        return out_dir  # rank 0 writes the artifact
    # adapter, scorer note and manifest: one atomic step, so a kill never leaves an adapter
    # that loads with default scorer settings, nor a manifest describing another adapter
    with atomic_dir(out_dir) as tmp:
        write_adapter(trainer.model, tok, tmp, base=base, merge_first=merge, final=out_dir, state_dict=state)
        atomic_write_json(
            tmp / SCORER_NOTE,
            {
                "max_length": cfg.rm.max_length,
                "response_tokens": cfg.rm.response_tokens,
                "chat_template": uses_chat_template(tok),
                "spec": {
                    "quantization": bspec.quantization,
                    "dtype": bspec.dtype,
                    "compute_dtype": bspec.compute_dtype,
                },
            },
        )
        del trainer, model

        with Timer() as t_eval:
            scorer = RewardScorer(tmp, batch_size=max(2, cfg.rm.batch_size * 2), device=cfg.policy.device)
            metrics: dict[str, Any] = {
                "train_loss": float(result.training_loss) if result is not None else None,
                "steps": steps,
                "resumed_from_step": resumed_step,
            }
            for name, part in (("heldout", eval_rows), ("train", train_rows)):
                if part:
                    rc, rr = scorer.score_pairs(part)
                    metrics[name] = preference_metrics(rc, rr, [float(r.get("p_chosen", 1.0)) for r in part])
        timings["eval_s"] = t_eval.seconds
        notes = [
            "loss: "
            + (
                "soft cross-entropy against p_chosen"
                if cfg.rm.label_mode == "soft"
                else "hard Bradley-Terry (ties dropped)"
            )
            + (", weighted per pair (sum w_i loss_i / sum w_i)" if cfg.rm.weighting == "principle" else ""),
            "accuracy: share of pairs where sign(r_chosen - r_rejected) agrees with sign(p_chosen - 0.5), "
            "ties excluded",
            "ece: 10 equal-width bins of sigmoid(r_chosen - r_rejected) against mean p_chosen per bin",
        ]
        if not eval_rows:
            notes.append("no held-out pairs (dataset too small for rm.eval_fraction)")
        Manifest(
            stage="rm",
            config={"rm": to_dict(cfg.rm), "policy": to_dict(cfg.policy), "seed": cfg.seed},
            inputs=inputs,
            models={"base": base, "merged_first": ", ".join(str(m) for m in merge) or "none"},
            counts={
                "pairs": len(rows),
                "train": len(train_cols["p_chosen"]),
                "heldout": len(eval_rows),
                "dropped_identical": check_counts["dropped_identical"],
                "dropped_empty": check_counts["dropped_empty"],
                "helpful": sum(is_helpful_row(r, helpful_texts) for r in rows),
                "weighting": cfg.rm.weighting,
                "weight_mean": sum(train_cols["weight"]) / len(train_cols["weight"]),
            },
            timings=timings,
            metrics=metrics,
            notes=notes,
        ).write(tmp / "manifest.json")
    atomic_write_json(run.metrics_dir("rm") / "eval.json", metrics)
    log.info("preference model -> %s (held-out accuracy %s)", out_dir, metrics.get("heldout", {}).get("accuracy"))
    return out_dir

"""The TRL trainer and collator subclasses of the training stages (SFT, DPO, preference model).

Importing this module imports ``trl`` (seconds), so the stages import it inside their
``run_*`` functions. What each subclass overrides on its TRL base class is pinned by
``tests/test_trl_trainers.py`` against the TRL versions ``pyproject.toml`` allows:

- :class:`WeightedLMCollator` / :class:`WeightedSFTTrainer` (``trl.SFTTrainer``): a ``weight``
  per example and, with ``weighting='principle'``, :func:`cai_dpo.losses.weighted_sft_loss`.
- :class:`PreferenceCollatorWithLabels` / :class:`SoftLabelDPOTrainer` (``trl.DPOTrainer``):
  per-pair soft labels ``p_chosen`` and weights, prompt truncation, the chosen-NLL (RPO) term
  and a KL proxy metric (see :mod:`cai_dpo.stages.dpo`).
- :class:`SoftPreferenceCollator` / :class:`SoftRewardTrainer` (``trl.RewardTrainer``): the
  (weighted) Bradley-Terry cross-entropy against the soft label ``p_chosen``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from trl import DPOTrainer, RewardTrainer, SFTTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference as DPOCollator
from trl.trainer.reward_trainer import DataCollatorForPreference as RewardCollator
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from cai_dpo.losses import mean_chosen_nll, soft_preference_loss, weighted_dpo_loss, weighted_sft_loss

#: A batch as the collators build it: tensors by column name
Batch = dict[str, Any]
#: ``compute_loss``'s result: the scalar loss, with the model outputs when ``return_outputs``
LossResult = torch.Tensor | tuple[torch.Tensor, Any]
#: ``compute_loss``'s ``num_items_in_batch``: tokens in the accumulated batch, when Transformers counts them
ItemCount = torch.Tensor | int | None

#: Batch keys of a DPO batch that the model's forward does not take
DPO_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "p_chosen", "weight"})


def score_labelled_positions_on_cpu() -> bool:
    """Make TRL's fused LM head (``fused_lm_head=True``: the SFT and DPO log-probs) score only the positions that
    have a label on the CPU too. Returns whether it is in effect.

    TRL 1.16 projects only the labelled positions onto the vocabulary where Triton runs (CUDA, XPU) and every
    position elsewhere, so that compiled tile shapes stay fixed on devices such as Neuron. On the CPU nothing is
    compiled, and prompt and padding positions are about 45 % of a ``cpu-demo`` SFT batch: the projection (three
    matrix products a position against the 49k-token vocabulary, the backward ones in fp32) is then nearly half
    wasted. The
    log-probs of the labelled positions are the same either way. The switch is TRL's module-level
    ``_use_triton`` as read by ``trl.trainer.utils`` for this one decision (the kernels read their own);
    where a TRL version has no such name, nothing changes.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        return False
    if getattr(original, "cai_dpo_compact", False):
        return True

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or original(device)

    compact.cai_dpo_compact = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact
    return True


score_labelled_positions_on_cpu()


class FloatColumns:
    """Collator mixin: the examples' ``float_columns`` added to TRL's batch as float32 tensors of shape [B].

    ``required_columns`` must be in every example (a ``KeyError`` otherwise); each of
    ``optional_columns`` is added when the first example has it.
    """

    required_columns: ClassVar[tuple[str, ...]] = ()
    optional_columns: ClassVar[tuple[str, ...]] = ()

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's batch plus the float columns."""
        out = super().torch_call(examples)  # type: ignore[misc]
        present = tuple(k for k in self.optional_columns if k in examples[0])
        for key in self.required_columns + present:
            out[key] = torch.tensor([float(e[key]) for e in examples], dtype=torch.float32)
        return out


# --------------------------------------------------------------------------- SFT


@dataclass
class WeightedLMCollator(FloatColumns, DataCollatorForLanguageModeling):
    """TRL's language-modeling collator, plus a ``weight`` tensor [B] when the examples carry it."""

    optional_columns = ("weight",)


class ExtraColumns:
    """Trainer mixin: takes ``weighting`` (``none`` or ``principle``) and keeps the dataset columns in
    ``extra_columns`` beside the base trainer's own, so Transformers does not drop them before the collator."""

    extra_columns: tuple[str, ...] = ("weight",)

    def __init__(self, *args: Any, weighting: str = "none", **kwargs: Any):
        self.weighting = weighting
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        missing = [c for c in self.extra_columns if c not in self._signature_columns]
        if missing:
            self._signature_columns = list(self._signature_columns) + missing


class WeightedSFTTrainer(ExtraColumns, SFTTrainer):
    """SFTTrainer whose loss, with ``weighting='principle'``, is :func:`cai_dpo.losses.weighted_sft_loss`."""

    def compute_loss(
        self, model: Any, inputs: Batch, return_outputs: bool = False, num_items_in_batch: ItemCount = None
    ) -> LossResult:
        """The weighted loss (a scalar), TRL's own without weights or with ``weighting='none'``."""
        inputs = dict(inputs)
        weight = inputs.pop("weight", None)
        if self.weighting != "principle" or weight is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        loss = weighted_sft_loss(outputs.log_probs, outputs.label_mask, weight)
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                or self.compute_loss_func is not None
            )
        if scaled and mode == "train":  # Trainer will not divide by the accumulation steps: do it here
            loss = loss / self.current_gradient_accumulation_steps
        m = self._metrics[mode]
        valid = outputs.label_mask.sum()
        if outputs.entropy is not None:
            m["entropy"].append((outputs.entropy.detach().sum() / valid).item() if valid > 0 else 0.0)
        if outputs.is_top1 is not None:
            m["mean_token_accuracy"].append((outputs.is_top1.sum() / valid).item() if valid > 0 else 0.0)
        m["weight_mean"].append(weight.float().mean().item())
        if mode == "train":
            self._total_train_tokens += int(inputs["attention_mask"].sum().item())
        m["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss


# --------------------------------------------------------------------------- DPO


@dataclass
class PreferenceCollatorWithLabels(FloatColumns, DPOCollator):
    """TRL's DPO preference collator, plus ``p_chosen`` and ``weight`` tensors [B] when the examples carry them."""

    optional_columns = ("p_chosen", "weight")


class SoftLabelDPOTrainer(ExtraColumns, DPOTrainer):
    """DPOTrainer with per-pair soft labels and weights, prompt truncation and a KL proxy metric.

    ``label_mode='soft'``, ``weighting='principle'`` or ``rpo_alpha`` > 0 train on
    :func:`cai_dpo.losses.weighted_dpo_loss` (``loss_type: sigmoid``); otherwise TRL's own loss.
    ``max_prompt_length`` keeps the last tokens of each prompt; ``weighting`` is taken by
    :class:`ExtraColumns`.
    """

    extra_columns = ("p_chosen", "weight")

    def __init__(
        self,
        *args: Any,
        label_mode: str = "soft",
        max_prompt_length: int | None = None,
        rpo_alpha: float = 0.0,
        **kwargs: Any,
    ):
        self.label_mode = label_mode
        self.rpo_alpha = rpo_alpha
        self.max_prompt_length = max_prompt_length
        self._p_chosen: torch.Tensor | None = None
        self._weight: torch.Tensor | None = None
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        limit = self.max_prompt_length
        if limit:  # keep the end of long prompts (the question sits there)
            dataset = dataset.map(
                lambda ex: {"prompt_ids": ex["prompt_ids"][-limit:]},
                desc=f"Truncating {dataset_name} prompts to {limit} tokens",
            )
        return dataset

    def compute_loss(
        self, model: Any, inputs: Batch, return_outputs: bool = False, num_items_in_batch: ItemCount = None
    ) -> LossResult:
        """TRL's ``compute_loss`` after taking the ``p_chosen`` and ``weight`` columns out of the batch."""
        inputs = dict(inputs)
        self._p_chosen = inputs.pop("p_chosen", None)
        self._weight = inputs.pop("weight", None)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model: Any, inputs: Batch, return_outputs: bool) -> LossResult:
        if self.label_mode == "soft" or self.weighting == "principle" or self.rpo_alpha:
            result = self._soft_label_loss(model, inputs, return_outputs)
        else:
            result = super()._compute_loss(model, inputs, return_outputs)
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["kl_proxy"].append(metrics["rewards/chosen"][-1] / self.beta)
        return result

    def _soft_label_loss(self, model: Any, inputs: Batch, return_outputs: bool) -> LossResult:
        """:func:`cai_dpo.losses.weighted_dpo_loss` of the batch (a scalar) and TRL's reward metrics."""
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in DPO_NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = completion_mask.size(1) - 1
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        chosen_tokens = completion_mask[:, 1:].sum(dim=1).chunk(2, dim=0)[0]
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else model, inputs
            )
        p = self._p_chosen if self._p_chosen is not None else torch.ones_like(chosen_logps)
        p = p.to(chosen_logps.device)
        w = self._weight if self.weighting == "principle" else None
        nll = mean_chosen_nll(chosen_logps, chosen_tokens) if self.rpo_alpha else None
        loss = weighted_dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen,
            ref_rejected,
            p,
            w,
            self.beta,
            rpo_alpha=self.rpo_alpha,
            chosen_nll=nll,
        )

        gather = self.accelerator.gather
        chosen_rewards = self.beta * (chosen_logps - ref_chosen).detach()
        rejected_rewards = self.beta * (rejected_logps - ref_rejected).detach()
        m = self._metrics[mode]
        m["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        m["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        m["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        m["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        m["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        m["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        if nll is not None:
            m["nll/chosen"].append(gather(nll.detach()).mean().item())
        m["labels/p_chosen"].append(gather(p.float()).mean().item())
        if w is not None:
            m["weight_mean"].append(gather(w.float().to(p.device)).mean().item())
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss


# --------------------------------------------------------------------------- preference model


@dataclass
class SoftPreferenceCollator(FloatColumns, RewardCollator):
    """TRL's reward-model preference collator that also carries the ``p_chosen`` target and the ``weight`` [B]."""

    required_columns = ("p_chosen",)
    optional_columns = ("weight",)


class SoftRewardTrainer(ExtraColumns, RewardTrainer):
    """RewardTrainer whose loss is the (weighted) cross-entropy against the soft label ``p_chosen``."""

    extra_columns = ("p_chosen", "weight")

    def compute_loss(
        self, model: Any, inputs: Batch, return_outputs: bool = False, num_items_in_batch: ItemCount = None
    ) -> LossResult:
        """:func:`cai_dpo.losses.soft_preference_loss` of the batch (a scalar), plus TRL's centring term when set."""
        mode = "train" if self.model.training else "eval"
        p = inputs.pop("p_chosen")
        weight = inputs.pop("weight", None)
        inputs.pop("margin", None)
        inputs["use_cache"] = False
        outputs = model(**inputs)
        r_c, r_r = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        w = weight if self.weighting == "principle" else None
        loss = soft_preference_loss(r_c, r_r, p.to(r_c.dtype), w)
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((r_c + r_r) ** 2)
        if mode == "train":
            self._total_train_tokens += int(inputs["attention_mask"].sum().item())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            d = r_c - r_r
            decided = p != 0.5
            agree = ((d > 0) == (p > 0.5)).float()
            acc = agree[decided].mean().item() if decided.any() else float("nan")
            self._metrics[mode]["accuracy"].append(acc)
            self._metrics[mode]["margin"].append(d.mean().item())
            self._metrics[mode]["mean_reward"].append(outputs.logits.mean().item())
            self._metrics[mode]["calibration_gap"].append((torch.sigmoid(d) - p).abs().mean().item())
            if w is not None:
                self._metrics[mode]["weight_mean"].append(w.float().mean().item())
        return (loss, outputs) if return_outputs else loss

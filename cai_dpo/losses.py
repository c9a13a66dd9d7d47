"""The per-example losses of the SFT, DPO and preference-model trainers (plain torch, no TRL).

Every function takes and returns torch tensors; ``B`` is the batch size (pairs for DPO and the
preference model, examples for SFT), ``T`` the sequence length. Log-probabilities are natural
logs (nats). The trainer subclasses of :mod:`cai_dpo.trl_trainers` call these; tests check
them against closed forms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cai_dpo.training import weighted_mean

if TYPE_CHECKING:
    import torch


def conservative_dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    p_chosen: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair soft-label DPO loss ``-(p·logσ(βh) + (1-p)·logσ(-βh))``, shape [B].

    ``h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)``; every
    input is [B] (summed completion log-probabilities, and ``p_chosen`` in [0, 1]).
    """
    import torch.nn.functional as F

    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    p = p_chosen.to(h.dtype)
    return -(p * F.logsigmoid(beta * h) + (1 - p) * F.logsigmoid(-beta * h))


def mean_chosen_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The chosen responses' mean token negative log-likelihood ``-chosen_logps / chosen_tokens``, shape [B].

    ``chosen_logps``: summed log-probabilities [B]; ``chosen_tokens``: completion token counts [B]
    (a count of 0 is taken as 1).
    """
    return -chosen_logps / chosen_tokens.to(chosen_logps.dtype).clamp_min(1)


def weighted_dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    p_chosen: torch.Tensor,
    weights: torch.Tensor | None,
    beta: float,
    *,
    rpo_alpha: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch loss ``Σ_i w_i·loss_i / Σ_i w_i`` of :func:`conservative_dpo_loss` (plain mean without weights), a scalar.

    With ``rpo_alpha`` > 0 each ``loss_i`` gains ``rpo_alpha · chosen_nll_i``, where ``chosen_nll`` [B]
    is the chosen response's mean token NLL (:func:`mean_chosen_nll`). Raises ``ValueError`` when
    ``rpo_alpha`` > 0 and ``chosen_nll`` is not given.
    """
    losses = conservative_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, p_chosen, beta)
    if rpo_alpha:
        if chosen_nll is None:
            raise ValueError("rpo_alpha > 0 needs chosen_nll (mean_chosen_nll of the chosen completions)")
        losses = losses + rpo_alpha * chosen_nll
    return weighted_mean(losses, weights)


def soft_preference_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, p_chosen: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of σ(r_c - r_r) against the soft target ``p_chosen``, a scalar (inputs of shape [B]).

    The plain mean over the batch, or with ``weights`` ``Σ_i w_i·loss_i / Σ_i w_i``.
    """
    import torch.nn.functional as F

    d = r_chosen - r_rejected
    return weighted_mean(-(p_chosen * F.logsigmoid(d) + (1.0 - p_chosen) * F.logsigmoid(-d)), weights)


def weighted_sft_loss(token_logps: torch.Tensor, label_mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i·NLL_i / Σ_i w_i`` with ``NLL_i`` example i's mean negative log-prob over its completion tokens.

    ``token_logps`` and ``label_mask`` are [B, T] (log-probs of the next tokens, zero where
    masked; 1 on completion tokens), ``weights`` is [B]. An example with no completion token
    has NLL 0; all-zero weights give 0. Returns a scalar.
    """
    mask = label_mask.to(token_logps.dtype)
    nll = -(token_logps * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    return weighted_mean(nll, weights)

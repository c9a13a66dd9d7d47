"""The PPO arithmetic: masked statistics, whitening, GAE, the clipped losses, the KL penalty and controller.

Pure tensor functions (no model loading, no IO), following "The N+ Implementation Details of
RLHF with PPO" (Huang et al. 2024), with the adaptive KL controller of Ziegler et al. (2019),
"Fine-Tuning Language Models from Human Preferences". Response-aligned tensors are ``[B, T]``
with a 0/1 ``mask`` over the positions that hold a response token. The trainer
(:class:`~cai_dpo.rl.ppo_trainer.CaiPPOTrainer`) composes them:

- per-token reward ``r_t = -β·(log π(a_t) - log π_ref(a_t))``, plus the score on the last
  response token (:func:`kl_penalty_rewards`);
- GAE(γ, λ) advantages, whitened over the batch's response tokens, returns = A + V
  (:func:`compute_gae`, :func:`whiten`); or, with no value model, RLOO's leave-one-out
  advantages over the ``k`` responses to each prompt (:func:`leave_one_out_advantages`);
- clipped policy and value losses (:func:`policy_loss`, :func:`value_loss`).

torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

SumFn = Callable[
    ["torch.Tensor"], "torch.Tensor"
]  # sums a tensor over the processes (DataParallel.sum); None on one process


def _count(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    import torch

    return mask.sum() if mask is not None else torch.tensor(float(x.numel()), device=x.device)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, all_sum: SumFn | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all positions when mask is None).

    ``all_sum``: with several processes, the mean over every process's positions.
    """
    if all_sum is None:
        return x.mean() if mask is None else (x * mask).sum() / mask.sum().clamp(min=1)
    total = (x * mask).sum() if mask is not None else x.sum()
    return all_sum(total) / all_sum(_count(x, mask)).clamp(min=1)


def masked_var(
    x: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True, all_sum: SumFn | None = None
) -> torch.Tensor:
    """Variance of ``x`` over masked positions (Bessel-corrected by default; global with ``all_sum``)."""
    mean = masked_mean(x, mask, all_sum)
    centred = (x - mean) ** 2
    var = masked_mean(centred, mask, all_sum)
    if unbiased:
        n = _count(x, mask)
        n = float(all_sum(n) if all_sum is not None else n)
        if n > 1:
            var = var * n / (n - 1)
    return var


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_sum: SumFn | None = None,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over masked positions; ``shift_mean=False`` keeps the mean.

    ``all_sum``: mean and variance over every process's positions (several processes).
    """
    import torch

    mean, var = masked_mean(x, mask, all_sum), masked_var(x, mask, all_sum=all_sum)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    if mask is not None:
        out = out * mask
    return out


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns for right-padded response tokens.

    ``rewards``, ``values``, ``mask``: ``[B, T]``; positions past a response's end (mask 0)
    contribute nothing, and the value after the last token is 0 (episode end).
    ``δ_t = r_t + γ·V_{t+1} - V_t``, ``A_t = δ_t + γ·λ·A_{t+1}``, returns ``A_t + V_t``.
    """
    import torch

    rewards = rewards * mask
    values = values * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def leave_one_out_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """Each response's return minus the mean return of the other ``k - 1`` responses to its prompt.

    ``returns``: ``[B]``, the ``k`` responses to one prompt contiguous (``B = groups·k``); the
    result is ``[B]`` and sums to 0 within each group, so a prompt whose responses all score
    alike teaches nothing, whatever its score. RLOO's baseline (Ahmadian et al. 2024, "Back to
    Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
    eq. 6); it replaces the value model. Raises ``ValueError`` when ``k < 2`` or ``B`` is not a
    multiple of ``k``.
    """
    if k < 2 or returns.shape[0] % k:
        raise ValueError(
            f"leave-one-out needs k >= 2 responses per prompt and B a multiple of k (k={k}, B={returns.shape[0]})"
        )
    groups = returns.reshape(-1, k)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)
    return (groups - others).reshape(-1)


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss ``mean(max(-A·ρ, -A·clip(ρ, 1±ε)))`` and its stats.

    Stats: ``clipfrac`` (share of tokens where the clipped term is active), ``approx_kl``
    (``0.5·mean((log ρ)²)``) and ``ratio`` (mean ρ).
    """
    import torch

    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(loss1, loss2), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": float(masked_mean((loss2 > loss1).float(), mask)),
            "approx_kl": float(0.5 * masked_mean(log_ratio**2, mask)),
            "ratio": float(masked_mean(ratio, mask)),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range_value: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss ``0.5·mean(max((V-R)², (V_clip-R)²))``, ``V_clip = V_old + clip(V-V_old, ±ε)``."""
    import torch

    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss1, loss2), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": float(masked_mean((loss2 > loss1).float(), mask))}
    return loss, stats


def kl_penalty_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    lengths: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-β·(log π - log π_ref)`` with each score added on its last response token.

    Returns ``(rewards [B, T], kl [B, T])`` with ``kl = (log π - log π_ref)·mask`` (the k1 estimator).
    """
    import torch

    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (lengths - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards, kl


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position."""
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, P: int) -> torch.Tensor:
    """Log-probs of the response tokens under ``logits`` (``[B, R]``)."""
    import torch

    targets = input_ids[:, P:]
    return torch.gather(torch.log_softmax(logits, -1), 2, targets.unsqueeze(-1)).squeeze(-1)


class KLController:
    """Fixed KL coefficient, or the adaptive controller of Ziegler et al. (2019).

    Adaptive: ``β ← β·(1 + clip(KL/target - 1, -0.2, 0.2)·n/horizon)`` after each batch of ``n`` rollouts.
    """

    def __init__(self, value: float, target: float | None = None, horizon: int = 10000):
        self.value = float(value)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = state.get("target")
        self.horizon = int(state.get("horizon", self.horizon))

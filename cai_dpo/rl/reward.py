"""The preference model's scorer: what it reads for a (prompt, response), and :class:`RewardScorer`.

Texts are built by :func:`rm_text` with the preference model's own tokenizer (its chat
template when it has one, else ``Human: …\\n\\nAssistant: …``), so the policy and the
preference model may tokenize differently. :class:`RewardScorer` reloads ``models/rm`` (with
the precision/quantization it was trained in, :func:`rm_spec`) and scores (prompt, response)
lists; the preference-model stage (:mod:`cai_dpo.stages.rm`) trains on the same texts, PPO
(:mod:`cai_dpo.stages.ppo`) optimises its scores and the evaluation stage reports them.
:func:`sft_adapter` is the SL-CAI adapter both the preference model's backbone and the PPO
policy start from.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai_dpo.config import ModelSpec
from cai_dpo.schema import Conversation, PromptLike, as_conversation
from cai_dpo.store import RunStore

if TYPE_CHECKING:
    import torch

#: A programmatic reward: ``reward_fn(prompts, responses) -> one float per response`` (prompts as user-text strings).
RewardFn = Callable[[list[str], list[str]], Sequence[float]]
#: Scorer settings written beside a trained preference model (``max_length``, chat template, load spec).
SCORER_NOTE = "cai_dpo_rm.json"


# --------------------------------------------------------------------------- text


def prompt_text(prompt: PromptLike) -> str:
    """The last user message of a prompt (the prompt itself when it is a string)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else (prompt[-1]["content"] if prompt else "")


def response_text(response: str | Conversation) -> str:
    """The text of a response given as a string or as ``[{"role": "assistant", ...}]``."""
    if isinstance(response, str):
        return response
    return "".join(m["content"] for m in response)


def uses_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer carries a chat template (decoder-style preference model)."""
    return bool(getattr(tokenizer, "chat_template", None))


def rm_text(tokenizer: Any, prompt: PromptLike, response: str) -> str:
    """The text the preference model scores for one (prompt, response)."""
    conv = as_conversation(prompt)
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(conv + [{"role": "assistant", "content": response}], tokenize=False)
    turns = [f"{'Human' if m['role'] == 'user' else m['role'].capitalize()}: {m['content']}" for m in conv]
    return "\n\n".join(turns + [f"Assistant: {response}"])


def first_tokens(tokenizer: Any, text: str, n: int | None) -> str:
    """``text`` cut to its first ``n`` tokens (``None``: unchanged).

    With a fast tokenizer the result is a prefix of ``text``, cut at the end of the ``n``-th token's
    characters (``return_offsets_mapping``), that encodes to at most ``n`` tokens; where a character
    spans two tokens the cut moves back to the previous token's end. A slow tokenizer (no offsets)
    decodes the first ``n`` token ids instead.
    """
    if n is None:
        return text
    if not getattr(tokenizer, "is_fast", False):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= n else tokenizer.decode(ids[:n])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= n:
        return text
    ends = [end for _, end in enc["offset_mapping"][:n]]
    for k in range(n, 0, -1):  # usually the first try; a split character or a merge may need fewer
        cut = text[: ends[k - 1]]
        if len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= n:
            return cut
    return ""


def encode_rm(
    tokenizer: Any, prompt: PromptLike, response: str, max_length: int, response_tokens: int | None = None
) -> list[int]:
    """Token ids of :func:`rm_text`, cut from the left to ``max_length`` (the response end is kept);
    ``response_tokens``: the response is first cut to that many tokens (see ``rm.response_tokens``)."""
    text = rm_text(tokenizer, prompt, first_tokens(tokenizer, response, response_tokens))
    chat = uses_chat_template(tokenizer)
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        ids = tokenizer(text, add_special_tokens=not chat, truncation=True, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = side
    return list(ids)


# --------------------------------------------------------------------------- run artifacts


def sft_adapter(run: RunStore) -> Path | None:
    """``models/sft`` when the SL-CAI adapter exists there."""
    path = run.sft_adapter
    return path if (path / "adapter_config.json").exists() else None


# --------------------------------------------------------------------------- scorer


def rm_spec(source: str | Path, device: str | None = None) -> ModelSpec:
    """Model spec for loading a saved preference model, with the precision/quantization it was trained in."""
    note = Path(source) / SCORER_NOTE
    saved = json.loads(note.read_text(encoding="utf-8")).get("spec", {}) if note.exists() else {}
    fields = {k: saved[k] for k in ("quantization", "dtype", "compute_dtype") if k in saved}
    return ModelSpec(name=str(source), device=device or saved.get("device", "auto"), **fields)


class RewardScorer:
    """Scores (prompt, response) pairs with a saved preference model, using its own tokenizer.

    ``source`` is ``models/rm`` (an adapter folder) or any sequence-classification model
    folder. ``score`` returns one float per pair, batched (right padding, as in training).
    """

    def __init__(
        self,
        source: str | Path,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        device: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
    ):
        from cai_dpo.models import load_model

        self.source = str(source)
        if model is None:
            model, tokenizer = load_model(rm_spec(self.source, device), task="seq_cls")
        note = Path(self.source) / SCORER_NOTE
        saved = json.loads(note.read_text(encoding="utf-8")) if note.exists() else {}
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = (
            max_length
            or saved.get("max_length")
            or min(int(getattr(tokenizer, "model_max_length", 1024) or 1024), 1024)
        )
        self.response_tokens: int | None = saved.get("response_tokens")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tokenizer.pad_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: Sequence[PromptLike], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each pair's scored text."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [
            encode_rm(self.tokenizer, p, response_text(r), self.max_length, self.response_tokens)
            for p, r in zip(prompts, responses)
        ]

    def score_ids(self, seqs: Sequence[list[int]]) -> list[float]:
        """Scalar scores of already-tokenized sequences (length-sorted batches, right padding)."""
        import torch

        pad = self.tokenizer.pad_token_id
        out = [0.0] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.tensor([seqs[i] + [pad] * (width - len(seqs[i])) for i in idx], device=self.device)
            mask = torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in idx], device=self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu().tolist()
            for i, v in zip(idx, logits):
                out[i] = float(v)
        return out

    def score(self, prompts: Sequence[PromptLike], responses: Sequence[str]) -> list[float]:
        """One preference-model score per (prompt, response)."""
        return self.score_ids(self.encode(prompts, responses))

    __call__ = score

    def score_pairs(self, rows: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
        """Scores of ``chosen`` and ``rejected`` for preference rows."""
        prompts = [r["prompt"] for r in rows]
        chosen = self.score(prompts, [response_text(r["chosen"]) for r in rows])
        rejected = self.score(prompts, [response_text(r["rejected"]) for r in rows])
        return chosen, rejected

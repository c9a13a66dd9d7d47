"""Batched generation and log-prob scoring behind one small interface.

Every stage talks to models through :class:`Engine`:

- :meth:`Engine.generate` — sampled or greedy completions for chat conversations,
  length-sorted into batches, left-padded, stopped at EOS, seeded per batch;
- :meth:`Engine.score_options` — normalised probabilities of option continuations
  (``" (A)"`` vs ``" (B)"``) from one forward pass per context when the options differ
  in a single token;
- :meth:`Engine.logprob` — summed and per-token log-probs of completions.

A long shared prefix (few-shot examples, a system prompt) can be passed as ``prefix``:
its key/value cache is computed once and reused for every item of every batch.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cai_dpo.config import SamplingConfig

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]


@dataclass
class Generation:
    """One completion: its text, token count and whether it ended with EOS."""

    text: str
    n_tokens: int
    finished: bool
    prompt_tokens: int = 0


@dataclass
class LogProb:
    """Log-probability of a completion given its context."""

    total: float
    per_token: list[float] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.per_token)


@dataclass
class EngineStats:
    """Running totals, for throughput reports and cost estimates."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    generate_seconds: float = 0.0
    scored_items: int = 0
    score_seconds: float = 0.0

    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0


def _progress(total: int, desc: str, unit: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, mininterval=1.0)


class Engine:
    """Generation and scoring for one model + tokenizer pair."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, progress: bool = True, max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.stats = EngineStats()
        cfg = getattr(model, "config", None)
        self.max_length = max_length or getattr(cfg, "max_position_embeddings", None) or 2048
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    # ------------------------------------------------------------------ rendering

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def render(self, conversation: Conversation | str, add_generation_prompt: bool = True) -> str:
        """Chat-template text of a conversation (a plain string is passed through)."""
        if isinstance(conversation, str):
            return conversation
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        """Token ids of already-rendered text (no special tokens added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_length(self, n: int, extra: int, what: str) -> None:
        if n + extra > self.max_length:
            raise ValueError(
                f"{what}: {n} prompt tokens + {extra} new tokens exceed the model's context of {self.max_length}; "
                "shorten the prompt or lower max_new_tokens"
            )

    def _prefix_cache(self, prefix_ids: list[int]) -> Any:
        """Key/value cache of ``prefix_ids`` (batch of one)."""
        import torch

        with torch.inference_mode():
            ids = torch.tensor([prefix_ids], device=self.device)
            out = self.model(input_ids=ids, use_cache=True)
        return getattr(out, "cache", None) or out.past_key_values

    @property
    def _cache_kwarg(self) -> str:
        """Name of the key/value-cache argument: ``cache`` in newer transformers, ``past_key_values`` before."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        params = inspect.signature(type(base).forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @staticmethod
    def _expand_cache(cache: Any, batch: int) -> Any:
        expanded = copy.deepcopy(cache)
        expanded.batch_repeat_interleave(batch)
        return expanded

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        conversations: Sequence[Conversation | str],
        sampling: SamplingConfig | None = None,
        n: int = 1,
        *,
        prefix: str | None = None,
        desc: str = "generate",
    ) -> list[list[Generation]]:
        """``n`` completions per conversation, in input order.

        ``prefix`` (rendered text) is prepended to every rendered conversation and its
        cache computed once. Results are reproducible for the same inputs, seed and batch size.
        """
        import torch

        sampling = sampling or SamplingConfig()
        prefix_ids = self.encode(prefix) if prefix else []
        items = []
        for ci, conv in enumerate(conversations):
            ids = self.encode(self.render(conv))
            self._check_length(len(prefix_ids) + len(ids), sampling.max_new_tokens, f"conversation {ci}")
            for si in range(n):
                items.append((ci, si, ids))
        order = sorted(range(len(items)), key=lambda i: (-len(items[i][2]), i))
        results: list[list[Generation | None]] = [[None] * n for _ in conversations]
        cache = self._prefix_cache(prefix_ids) if prefix_ids else None
        eos_ids = self._eos_ids()
        bar = _progress(len(items), desc, "seq", self.progress)
        bs = max(1, sampling.batch_size or self.batch_size)
        for b, start in enumerate(range(0, len(order), bs)):
            batch = [items[i] for i in order[start : start + bs]]
            t0 = time.perf_counter()
            width = max(len(it[2]) for it in batch)
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([prefix_ids + [pad] * (width - len(it[2])) + it[2] for it in batch], device=self.device)
            mask = torch.tensor(
                [[1] * len(prefix_ids) + [0] * (width - len(it[2])) + [1] * len(it[2]) for it in batch], device=self.device
            )
            kwargs: dict[str, Any] = dict(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos_ids,
            )
            if sampling.do_sample and sampling.temperature > 0:
                kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if cache is not None:
                kwargs[self._cache_kwarg] = self._expand_cache(cache, len(batch))
            torch.manual_seed(sampling.seed * 1_000_003 + b)
            with torch.inference_mode():
                out = self.model.generate(**kwargs)
            new = out[:, input_ids.shape[1] :].tolist()
            n_new = 0
            for (ci, si, ids), toks in zip(batch, new):
                cut, finished = len(toks), False
                for j, t in enumerate(toks):
                    if t in eos_ids:
                        cut, finished = j, True
                        break
                text = self.tokenizer.decode(toks[:cut], skip_special_tokens=True).strip()
                results[ci][si] = Generation(text, cut, finished, len(prefix_ids) + len(ids))
                n_new += cut
            dt = time.perf_counter() - t0
            self.stats.generated_tokens += n_new
            self.stats.prompt_tokens += sum(len(it[2]) + len(prefix_ids) for it in batch)
            self.stats.generate_seconds += dt
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{self.stats.tokens_per_second():.1f}")
        bar.close()
        log.info("%s: %d sequences, %d tokens, %.1f tok/s", desc, len(items), self.stats.generated_tokens, self.stats.tokens_per_second())
        return results  # type: ignore[return-value]

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            ids.update(gen_eos)
        return sorted(i for i in ids if i is not None)

    # ------------------------------------------------------------------ scoring

    def _tail_logprobs(self, rows: list[list[int]], cache: Any, P: int, keep: int) -> Any:
        """Log-softmax of the last ``keep`` positions of left-padded ``rows`` (after a prefix of ``P`` tokens).

        Left padding puts every row's end at the same place, so the vocabulary projection
        runs on ``keep`` positions only instead of the whole sequence.
        """
        import torch

        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        body = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        mask = torch.cat([torch.ones(len(rows), P, dtype=body.dtype, device=self.device), body], dim=1)
        positions = (body.cumsum(-1) - 1).clamp(min=0) + P
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "logits_to_keep": keep}
        if cache is not None:
            kwargs[self._cache_kwarg] = self._expand_cache(cache, len(rows))
        with torch.inference_mode():
            logits = self.model(**kwargs).logits[:, -keep:].float()
        return torch.log_softmax(logits, dim=-1)

    def _token_logprobs(self, seqs: list[list[int]], starts: list[int], prefix_ids: list[int], desc: str) -> list[list[float]]:
        """Per-token log-probs of ``seq[start:]`` for each sequence (prefix excluded), batched."""
        cache = self._prefix_cache(prefix_ids) if prefix_ids else None
        order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
        out: list[list[float]] = [[] for _ in seqs]
        bar = _progress(len(seqs), desc, "seq", self.progress)
        P = len(prefix_ids)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            for i in idx:
                if P == 0 and starts[i] == 0:
                    raise ValueError("a completion needs a non-empty context to be scored")
            keep = max(len(seqs[i]) - max(starts[i], 1) for i in idx) + 1
            logp = self._tail_logprobs([seqs[i] for i in idx], cache, P, keep)
            for row, i in enumerate(idx):
                seq, s = seqs[i], starts[i]
                # token p is predicted by the logits one position before it; kept index = keep - len + p - 1
                values = [float("nan") if p == 0 else float(logp[row, keep - len(seq) + p - 1, seq[p]]) for p in range(s, len(seq))]
                if s == 0:
                    values[0] = self._prefix_last_logprob(prefix_ids, seq[0])
                out[i] = values
            bar.update(len(idx))
        bar.close()
        return out

    def _prefix_last_logprob(self, prefix_ids: list[int], token: int) -> float:
        import torch

        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([prefix_ids], device=self.device)).logits[0, -1].float()
        return float(torch.log_softmax(logits, -1)[token])

    def _split(self, context: str, completion: str) -> tuple[list[int], int]:
        """Token ids of context+completion and where the completion's tokens start."""
        ctx = self.encode(context)
        full = self.encode(context + completion)
        start = 0
        while start < min(len(ctx), len(full)) and ctx[start] == full[start]:
            start += 1
        if start == len(full):
            raise ValueError(f"completion {completion!r} adds no tokens to its context")
        return full, start

    def logprob(self, contexts: Sequence[str], completions: Sequence[str], *, prefix: str | None = None, desc: str = "logprob") -> list[LogProb]:
        """Summed and per-token log-probs of each completion after its (rendered) context."""
        if len(contexts) != len(completions):
            raise ValueError(f"{len(contexts)} contexts but {len(completions)} completions")
        prefix_ids = self.encode(prefix) if prefix else []
        seqs, starts = [], []
        for c, x in zip(contexts, completions):
            ids, s = self._split(c, x)
            self._check_length(len(prefix_ids) + len(ids), 0, "logprob input")
            seqs.append(ids)
            starts.append(s)
        t0 = time.perf_counter()
        per_token = self._token_logprobs(seqs, starts, prefix_ids, desc)
        self.stats.scored_items += len(seqs)
        self.stats.score_seconds += time.perf_counter() - t0
        return [LogProb(float(sum(v)), v) for v in per_token]

    def score_options(
        self,
        contexts: Sequence[str],
        options: Sequence[str] = (" (A)", " (B)"),
        *,
        prefix: str | None = None,
        desc: str = "score",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Normalised probabilities ``[N, K]`` of each option after each context, and raw log-probs.

        When the options share their tokens up to one final token that differs (as
        ``" (A)"``/``" (B)"`` do), each context costs one forward pass; otherwise every
        context+option sequence is scored.
        """
        import torch

        if len(options) < 2:
            raise ValueError("score_options needs at least two options")
        prefix_ids = self.encode(prefix) if prefix else []
        t0 = time.perf_counter()
        raw = np.zeros((len(contexts), len(options)))
        single_seqs, single_last, multi = [], [], []
        for i, ctx in enumerate(contexts):
            splits = [self._split(ctx, opt) for opt in options]
            seqs = [s[0] for s in splits]
            common = _common_prefix_len(seqs)
            if all(len(s) == common + 1 for s in seqs) and common >= 1:
                single_seqs.append((i, seqs[0][:common]))
                single_last.append([s[common] for s in seqs])
            else:
                multi.append((i, splits))
        if single_seqs:
            rows = [s for _, s in single_seqs]
            for r in rows:
                self._check_length(len(prefix_ids) + len(r) + 1, 0, "score_options input")
            last = self._last_logprobs(rows, prefix_ids, desc)
            for (i, _), lp, toks in zip(single_seqs, last, single_last):
                raw[i] = [float(lp[t]) for t in toks]
        if multi:
            seqs = [sp[0] for _, splits in multi for sp in splits]
            starts = [sp[1] for _, splits in multi for sp in splits]
            per = self._token_logprobs(seqs, starts, prefix_ids, desc)
            k = len(options)
            for j, (i, _) in enumerate(multi):
                raw[i] = [sum(per[j * k + o]) for o in range(k)]
        probs = torch.softmax(torch.tensor(raw), dim=-1).numpy()
        self.stats.scored_items += len(contexts)
        self.stats.score_seconds += time.perf_counter() - t0
        return probs, raw

    def _last_logprobs(self, rows: list[list[int]], prefix_ids: list[int], desc: str) -> list[Any]:
        """Log-softmax of the next-token logits after each row (one forward pass per batch)."""
        cache = self._prefix_cache(prefix_ids) if prefix_ids else None
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
        out: list[Any] = [None] * len(rows)
        bar = _progress(len(rows), desc, "ctx", self.progress)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            logp = self._tail_logprobs([rows[i] for i in idx], cache, len(prefix_ids), 1)
            for row, i in enumerate(idx):
                out[i] = logp[row, -1].cpu()
            bar.update(len(idx))
        bar.close()
        return out

def _common_prefix_len(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    i = 0
    while i < n and all(s[i] == seqs[0][i] for s in seqs):
        i += 1
    return i


def naive_option_probs(model: Any, tokenizer: Any, context: str, options: Sequence[str]) -> np.ndarray:
    """Reference computation: full log-prob of each option, one unbatched pass each."""
    import torch

    raw = []
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    for opt in options:
        full = tokenizer(context + opt, add_special_tokens=False)["input_ids"]
        s = _common_prefix_len([ctx, full])
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([full], device=model.device)).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        raw.append(sum(float(lp[p - 1, full[p]]) for p in range(s, len(full))))
    t = torch.tensor(raw)
    return torch.softmax(t, -1).numpy()


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op threads (default: all cores); return the count in use."""
    import os

    import torch

    n = n or int(os.environ.get("CAI_DPO_THREADS", 0)) or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n

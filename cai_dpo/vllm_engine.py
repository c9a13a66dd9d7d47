"""A model run by vLLM inside this process, behind the engine interface (``backend: vllm``).

:class:`VLLMEngine` offers what :class:`cai_dpo.engine.Engine` and
:class:`cai_dpo.served.ServedEngine` offer — ``generate``, ``score_options``, ``logprob``,
``render``, ``encode`` and ``stats`` — for a model that vLLM's offline API (``vllm.LLM``)
loads onto this machine's GPUs, split over ``tensor_parallel_size`` of them. vLLM is the
optional extra ``cai-dpo[vllm]`` and needs a CUDA GPU; where it is missing, loading a
``backend: vllm`` spec raises :class:`~cai_dpo.models.ModelLoadError` saying so.

Prompts are rendered and tokenized here, as the local engine does, and sent as token ids
(``{"prompt_token_ids": ids}``), so vLLM adds no second BOS and the token boundaries are ours.

- ``generate``: one request per conversation, ``SamplingParams(n, temperature, top_p,
  max_tokens, seed)`` with the stage's settings and a seed derived from the sampling seed
  and the prompt (:func:`cai_dpo.served.sample_seed`). Greedy (``do_sample`` false or
  temperature 0) sends ``n=1``, temperature 0, and repeats the completion ``n`` times (vLLM
  refuses ``n > 1`` with greedy sampling; greedy samples are identical anyway). A
  completion's ``token_ids`` leave out the EOS or stop token that ended it, as the local engine's do.
- ``score_options``: as for a served model, each option's log-prob is the sum over its
  tokens of the next-token log-probs read from the top ``top_logprobs`` (vLLM's
  ``logprobs=k``); the tokens are known by id here, so every step is one ``max_tokens=1``
  request and all of them go in one ``generate`` call (vLLM's prefix cache shares the
  context). A token outside the top-k raises :class:`VLLMEngineError`.
- ``logprob``: one request per item with ``prompt_logprobs`` (a list with ``None`` for the
  first prompt token, then ``{token_id: Logprob}`` holding the prompt's own token); the
  completion's per-token values are read from it and summed.

A LoRA adapter (``adapter`` or the spec's) is applied with ``enable_lora`` and a
``LoRARequest``; vLLM applies one adapter per request, so an adapter trained on top of
others (``merge_first`` in its ``cai_dpo_base.json``, e.g. DPO over SFT) is refused with the
fix: export the merged model (``cai-dpo export``) and name its folder.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cai_dpo.config import ModelSpec, SamplingSection
from cai_dpo.engine import (
    EngineBase,
    EngineStats,
    Generation,
    LogProb,
    Prompts,
    check_context,
    option_probs,
    split_completion,
)
from cai_dpo.models import ModelLoadError, _adapter_base, adapter_merge_first, resolve_model_path
from cai_dpo.served import sample_seed

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'cai-dpo[vllm]'"
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank
VLLM_MAX_LOGPROBS = 20  # vLLM's default cap on logprobs=k


class VLLMEngineError(RuntimeError):
    """vLLM's answer lacks what a call needs (an option's token outside the top-k, no log-probs)."""


def import_vllm(spec: ModelSpec) -> Any:
    """The ``vllm`` module; raises :class:`ModelLoadError` naming the install command where it is missing."""
    try:
        import vllm
    except ImportError as exc:
        raise ModelLoadError(
            f"model '{spec.name}': backend: vllm needs the vllm package, which is not installed ({exc}); "
            f"{INSTALL_HINT} on a machine with a CUDA GPU (vLLM runs the model on the GPU), or use backend: local"
        ) from exc
    return vllm


def adapter_rank(adapter: Path) -> int:
    """``max_lora_rank`` for a peft adapter folder: the smallest value vLLM accepts that holds its ``r``.

    Raises :class:`ModelLoadError` when the folder is no adapter, its rank is above vLLM's
    largest, or it was trained on top of other adapters (vLLM applies one per request).
    """
    config = adapter / "adapter_config.json"
    if not config.exists():
        raise ModelLoadError(f"adapter '{adapter}': no adapter_config.json; point to a peft LoRA adapter folder")
    stacked = adapter_merge_first(adapter)
    if stacked:
        raise ModelLoadError(
            f"adapter '{adapter}' was trained on top of {', '.join(map(str, stacked))}; vLLM applies one adapter per "
            "request: export the merged model (cai-dpo export) and name its folder, or use backend: local"
        )
    r = int(json.loads(config.read_text(encoding="utf-8")).get("r", 8))
    fits = [x for x in LORA_RANKS if x >= r]
    if not fits:
        raise ModelLoadError(f"adapter '{adapter}': LoRA rank {r} is above vLLM's largest ({LORA_RANKS[-1]})")
    return fits[0]


def llm_kwargs(spec: ModelSpec, model_path: str, adapter: Path | None) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for a spec (``vllm_args`` last, so they override)."""
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "dtype": spec.dtype,
        "seed": 0,
        "trust_remote_code": spec.trust_remote_code,
    }
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.tokenizer:
        kwargs["tokenizer"] = resolve_model_path(spec.tokenizer)
    if spec.quantization == "4bit":
        kwargs["quantization"] = "bitsandbytes"  # in-flight 4-bit
    if spec.top_logprobs > VLLM_MAX_LOGPROBS:
        kwargs["max_logprobs"] = spec.top_logprobs
    if adapter is not None:
        kwargs.update(enable_lora=True, max_lora_rank=adapter_rank(adapter))
    return {**kwargs, **spec.vllm_args}


class VLLMEngine(EngineBase):
    """Generation and scoring with a model loaded by ``vllm.LLM`` in this process.

    ``adapter`` (else the spec's ``adapter``; or the spec's ``name`` when it is an adapter
    folder) is applied to every request as a LoRA. Raises :class:`ModelLoadError` where vLLM
    is not installed or the adapter cannot be applied.
    """

    def __init__(self, spec: ModelSpec, *, adapter: str | Path | None = None, progress: bool = True):
        vllm = import_vllm(spec)
        self.spec = spec
        self.progress = progress
        self.stats = EngineStats()
        adapter = adapter or spec.adapter
        base = spec.name
        if adapter is None and Path(base).is_dir() and (Path(base) / "adapter_config.json").exists():
            adapter, base = base, _adapter_base(Path(base))
        self.adapter = Path(adapter) if adapter else None
        self.model_path = resolve_model_path(base, spec.revision)
        kwargs = llm_kwargs(spec, self.model_path, self.adapter)
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        self.load_seconds = time.perf_counter() - t0
        self.tokenizer = self.llm.get_tokenizer()
        self.lora = self._lora_request()
        self.max_length = _max_model_len(self.llm)
        log.info(
            "vLLM loaded %s (tensor_parallel_size=%d, dtype=%s, adapter=%s) in %.1f s",
            self.model_path,
            spec.tensor_parallel_size,
            spec.dtype,
            self.adapter,
            self.load_seconds,
        )

    def __repr__(self) -> str:
        return f"VLLMEngine(model={self.model_path!r}, tensor_parallel_size={self.spec.tensor_parallel_size})"

    def close(self) -> None:
        """Drop the vLLM instance (its GPU memory is fully released when the process ends)."""
        self.llm = None

    def _lora_request(self) -> Any:
        if self.adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.adapter.name or "adapter", 1, str(self.adapter))

    def _run(self, prompts: list[list[int]], params: Any) -> list[Any]:
        """One ``llm.generate`` call over token-id prompts; the outputs, in input order."""
        if not prompts:
            return []
        outs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False, lora_request=self.lora
        )
        if len(outs) != len(prompts):
            raise VLLMEngineError(f"vLLM returned {len(outs)} outputs for {len(prompts)} prompts")
        return list(outs)

    # ------------------------------------------------------------------ generation

    def _generate(
        self, conversations: Prompts, sampling: SamplingSection, n: int, prefix: str | None, desc: str
    ) -> list[list[Generation]]:
        """``n`` completions per conversation, in input order.

        ``prefix`` (rendered text) goes before every rendered conversation. Raises
        :class:`~cai_dpo.errors.ContextLengthError` (with the conversation's index) when a
        prompt plus ``max_new_tokens`` exceeds the model's context.
        """
        from vllm import SamplingParams

        greedy = not (sampling.do_sample and sampling.temperature > 0)
        prefix_ids = self.encode(prefix) if prefix else []
        prompts, params = [], []
        for ci, conv in enumerate(conversations):
            text = self.render(conv)
            ids = prefix_ids + self.encode(text)
            check_context(len(ids), sampling.max_new_tokens, self.max_length, f"conversation {ci}", ci)
            prompts.append(ids)
            params.append(
                SamplingParams(
                    n=1 if greedy else n,
                    temperature=0.0 if greedy else sampling.temperature,
                    top_p=1.0 if greedy else sampling.top_p,
                    max_tokens=sampling.max_new_tokens,
                    seed=sample_seed(sampling.seed, (prefix or "") + text, 0),
                )
            )
        bar = self._progress_bar(len(prompts) * n, desc, "seq")
        t0 = time.perf_counter()
        outs = self._run(prompts, params)
        results: list[list[Generation]] = []
        for ci, out in enumerate(outs):
            completions = sorted(out.outputs, key=lambda c: c.index)
            completions = completions[:1] * n if greedy else completions
            if len(completions) != n:
                raise VLLMEngineError(f"vLLM returned {len(completions)} completions for conversation {ci}, asked {n}")
            results.append([self._generation(c, len(prompts[ci])) for c in completions])
        bar.update(len(prompts) * n)
        bar.close()
        self.stats.generated_tokens += sum(g.n_tokens for row in results for g in row)
        self.stats.prompt_tokens += sum(len(p) for p in prompts) * n
        self.stats.generate_seconds += time.perf_counter() - t0
        log.info("%s (vLLM): %d sequences, %.1f tok/s", desc, len(prompts) * n, self.stats.tokens_per_second())
        return results

    def _generation(self, completion: Any, prompt_tokens: int) -> Generation:
        """A vLLM ``CompletionOutput`` as a :class:`Generation` (the EOS/stop token that ended it dropped)."""
        ids = list(completion.token_ids)
        finished = completion.finish_reason == "stop"
        stop_ids = {self.tokenizer.eos_token_id}
        if isinstance(completion.stop_reason, int):
            stop_ids.add(completion.stop_reason)
        if finished and ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        return Generation((completion.text or "").strip(), len(ids), finished, prompt_tokens, ids)

    # ------------------------------------------------------------------ scoring

    def _score_options(
        self, contexts: Sequence[str], options: Sequence[str], prefix: str | None, desc: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Normalised probabilities ``[N, K]`` of each option after each context, and raw log-probs ``[N, K]``.

        Each option's log-prob is the sum, over its tokens, of that token's next-token
        log-prob among the top ``top_logprobs`` (the spec's field); identical steps (the
        context, the tokens the options share) are one request. Raises
        :class:`VLLMEngineError` when an option's token is not among the top-k.
        """
        from vllm import SamplingParams

        prefix_ids = self.encode(prefix) if prefix else []
        t0 = time.perf_counter()
        items: list[list[tuple[list[int], int]]] = []
        for i, ctx in enumerate(contexts):
            row = []
            for opt in options:
                ids, start = split_completion(self.encode, ctx, opt)
                seq, start = prefix_ids + ids, len(prefix_ids) + start
                if start == 0:
                    raise ValueError("score_options needs a non-empty context")
                check_context(len(seq), 0, self.max_length, f"score_options context {i}", i)
                row.append((seq, start))
            items.append(row)
        steps = list(
            dict.fromkeys(tuple(seq[:p]) for row in items for seq, start in row for p in range(start, len(seq)))
        )
        bar = self._progress_bar(len(contexts), desc, "ctx")
        params = SamplingParams(n=1, temperature=0.0, max_tokens=1, logprobs=self.spec.top_logprobs)
        tops = {step: _top_logprobs(out) for step, out in zip(steps, self._run([list(s) for s in steps], params))}
        raw = np.zeros((len(contexts), len(options)))
        for i, row in enumerate(items):
            for k, (seq, start) in enumerate(row):
                for p in range(start, len(seq)):
                    top = tops[tuple(seq[:p])]
                    if seq[p] not in top:
                        raise VLLMEngineError(
                            f"vLLM model '{self.spec.name}': the token {self.tokenizer.decode([seq[p]])!r} of option "
                            f"{options[k]!r} is not among the top {self.spec.top_logprobs} next tokens (context {i}); "
                            "raise the model spec's 'top_logprobs' or check the prompt format"
                        )
                    raw[i, k] += top[seq[p]]
        bar.update(len(contexts))
        bar.close()
        self.stats.scored_items += len(contexts)
        self.stats.score_seconds += time.perf_counter() - t0
        return option_probs(raw), raw

    def _logprob(
        self, contexts: Sequence[str], completions: Sequence[str], prefix: str | None, desc: str
    ) -> list[LogProb]:
        """Summed and per-token log-probs of each completion after its (rendered) context.

        A token that straddles the context's end counts as the completion's. Raises
        :class:`VLLMEngineError` when vLLM returns no prompt log-probs for a completion token.
        """
        from vllm import SamplingParams

        prefix_ids = self.encode(prefix) if prefix else []
        seqs, starts = [], []
        for i, (c, x) in enumerate(zip(contexts, completions)):
            ids, start = split_completion(self.encode, c, x)
            if not prefix_ids and start == 0:
                raise ValueError("a completion needs a non-empty context to be scored")
            check_context(len(prefix_ids) + len(ids), 0, self.max_length, "logprob input", i)
            seqs.append(prefix_ids + ids)
            starts.append(len(prefix_ids) + start)
        t0 = time.perf_counter()
        bar = self._progress_bar(len(seqs), desc, "seq")
        params = SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=1)
        out: list[LogProb] = []
        for seq, start, answer in zip(seqs, starts, self._run(seqs, params)):
            per_token = [_prompt_logprob(answer.prompt_logprobs, seq, p) for p in range(start, len(seq))]
            out.append(LogProb(float(sum(per_token)), per_token))
        bar.update(len(seqs))
        bar.close()
        self.stats.scored_items += len(out)
        self.stats.score_seconds += time.perf_counter() - t0
        return out


# --------------------------------------------------------------------------- helpers


def _max_model_len(llm: Any) -> int | None:
    """The loaded model's context length as vLLM sees it (None where this vLLM does not expose it)."""
    value = getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "max_model_len", None)
    return int(value) if isinstance(value, int) else None


def _top_logprobs(output: Any) -> dict[int, float]:
    """Token id → log-prob of the first generated position's top-k in a ``RequestOutput``."""
    completions = output.outputs or []
    positions = completions[0].logprobs if completions else None
    if not positions or not positions[0]:
        raise VLLMEngineError("vLLM returned no log-probs for a request with logprobs=k")
    return {int(t): float(lp.logprob) for t, lp in positions[0].items()}


def _prompt_logprob(prompt_logprobs: Any, seq: list[int], p: int) -> float:
    """Log-prob of prompt token ``p`` (its own id) from a ``RequestOutput.prompt_logprobs`` list."""
    if not prompt_logprobs or len(prompt_logprobs) != len(seq):
        raise VLLMEngineError(
            f"vLLM returned {len(prompt_logprobs or [])} prompt log-prob positions for a "
            f"{len(seq)}-token prompt (asked prompt_logprobs=1)"
        )
    entry = prompt_logprobs[p]
    if not entry or seq[p] not in entry:
        raise VLLMEngineError(f"vLLM's prompt log-probs lack prompt token {seq[p]} at position {p}")
    return float(entry[seq[p]].logprob)

"""Prompts file in, completions JSONL out (``cai-dpo generate``)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from cai_dpo.config import ModelSpec, RunConfig
from cai_dpo.engine import set_threads
from cai_dpo.errors import ContextLengthError, InputError
from cai_dpo.models import describe, load_engine
from cai_dpo.store import write_jsonl

log = logging.getLogger(__name__)


def generate_file(cfg: RunConfig, prompts: Path, output: Path, n: int = 1, model: str | None = None) -> Path:
    """Answer every prompt in ``prompts`` with ``n`` samples from the policy (or ``model``); write
    them to ``output`` (JSON lines). Raises IsADirectoryError before generating when ``output`` is a folder."""
    from cai_dpo.data import load_prompts, name_prompt_error

    if model is not None and not model.strip():
        raise InputError("--model is empty; name a model spec or leave --model out for the profile's policy")
    if Path(output).is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder is there; name the output .jsonl file", str(output))
    items = load_prompts(str(prompts))
    spec = ModelSpec.from_text(model) if model is not None else cfg.policy
    set_threads(cfg.threads)
    engine = load_engine(spec, batch_size=cfg.sl.sampling.batch_size)
    try:
        outs = engine.generate([p.conversation(full=True) for p in items], cfg.sl.sampling, n=n, desc="generate")
    except ContextLengthError as exc:
        raise name_prompt_error(exc, items) from exc
    rows = [
        {
            "id": p.id,
            "prompt": p.text,
            "completion": g.text,
            "tokens": g.n_tokens,
            "finished": g.finished,
            "model": describe(spec),
        }
        for p, gens in zip(items, outs)
        for g in gens
    ]
    return write_jsonl(output, rows)

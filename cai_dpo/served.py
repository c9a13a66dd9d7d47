"""A served model behind the engine interface: any OpenAI-compatible HTTP server.

:class:`ServedEngine` offers what :class:`cai_dpo.engine.Engine` offers —
``generate``, ``score_options``, ``logprob``, ``render``, ``encode`` and ``stats`` — for a
model served by vLLM, SGLang, TGI or llama.cpp's server, so the SL teacher, the judge and
the policy's sampling can run on a server (or several) instead of in this process.

- ``generate`` sends one ``/completions`` request per sample (prompt rendered here with
  the spec's ``tokenizer``), or ``/chat/completions`` for conversations when no
  tokenizer is given; temperature, top-p, max tokens and a per-sample seed (derived from
  the sampling seed and the prompt text) come from the stage's sampling settings.
- ``score_options`` reads the top log-probabilities of the next token, one token of the
  options at a time (``" ("``, then ``"A"``/``"B"``, then ``")"``), and sums them like the
  local engine does.
- ``logprob`` sends the context and continuation with ``echo`` and ``logprobs`` and sums
  the continuation's per-token log-probs (llama.cpp's server needs ``--logits_all true``).

Requests run on a thread pool, at most ``concurrency`` in flight per base URL; each goes
to the least busy replica. 429, 5xx, timeouts and dropped connections are retried with
exponential backoff (another replica is preferred); other answers fail at once with an
error naming the URL and the model. Stages keep their records per finished chunk, so a
killed client loses only the requests in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    option_probs,
)

log = logging.getLogger(__name__)

SCHEMES = {"openai://": "http://", "openai+http://": "http://", "openai+https://": "https://"}
HTTP_SCHEMES = ("http://", "https://")
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
MAX_BACKOFF = 30.0


class ServedModelError(RuntimeError):
    """The server cannot be reached, refuses the model or the request; the message names the URL."""


class NotSupportedByServer(ServedModelError):
    """The server does not offer what a call needs (log-probs, echo of the prompt)."""


def url_scheme(text: str) -> str | None:
    """The served-model scheme ``text`` starts with, lower-cased (one of :data:`SCHEMES` or
    :data:`HTTP_SCHEMES`), else None. Schemes are case-insensitive (RFC 3986, 3.1): ``OpenAI://`` is ``openai://``."""
    text = text.strip()
    head = text[: text.find("://") + 3].lower() if "://" in text else ""
    return head if head in SCHEMES or head in HTTP_SCHEMES else None


def is_served(spec: ModelSpec | None) -> bool:
    """Whether ``spec`` names a served model (``openai://`` name or ``backend: openai``)."""
    return spec is not None and (getattr(spec, "backend", "local") == "openai" or url_scheme(spec.name) in SCHEMES)


def to_http(url: str) -> str:
    """``openai://host:port/v1`` → ``http://host:port/v1`` (``http(s)://`` kept, scheme lower-cased, trailing ``/``
    dropped). Raises ``ServedModelError`` for another scheme or a URL without a host."""
    from urllib.parse import urlsplit

    scheme = url_scheme(url)
    if scheme is None:
        raise ServedModelError(f"served model URL {url!r}: expected openai://host:port/v1 or http(s)://host:port/v1")
    http = SCHEMES.get(scheme, scheme) + url.strip()[len(scheme) :]
    try:
        parts = urlsplit(http)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ServedModelError(f"served model URL {url!r}: {exc}; expected openai://host:port/v1") from None
    if not parts.hostname:
        raise ServedModelError(f"served model URL {url!r}: no host; expected openai://host:port/v1")
    return http.rstrip("/")


def base_urls(spec: ModelSpec) -> list[str]:
    """The spec's base URLs: ``name`` then ``replicas``, as ``http(s)://`` URLs, duplicates dropped."""
    out: list[str] = []
    for url in [spec.name, *spec.replicas]:
        u = to_http(url)
        if u not in out:
            out.append(u)
    return out


def describe_served(spec: ModelSpec) -> str:
    """Model id for records and manifests: the served id, independent of which URLs serve it."""
    return f"served:{spec.model}"


def sample_seed(seed: int, text: str, index: int) -> int:
    """Per-request seed from the sampling seed, the prompt and the sample index (31 bits)."""
    digest = hashlib.sha256(json.dumps([seed, text, index]).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


class _Replicas:
    """Least-busy choice among base URLs, at most ``per_url`` requests in flight on each."""

    def __init__(self, urls: list[str], per_url: int):
        self.urls, self.per_url = urls, max(1, per_url)
        self.inflight = [0] * len(urls)
        self.sent = [0] * len(urls)
        self._turn = 0
        self._cond = threading.Condition()

    def acquire(self, avoid: int | None = None) -> int:
        with self._cond:
            while True:
                free = [i for i in range(len(self.urls)) if self.inflight[i] < self.per_url]
                if free:
                    break
                self._cond.wait()
            preferred = [i for i in free if i != avoid] or free
            n = len(self.urls)
            i = min(preferred, key=lambda j: (self.inflight[j], (j - self._turn) % n))
            self._turn = (i + 1) % n
            self.inflight[i] += 1
            self.sent[i] += 1
            return i

    def release(self, i: int) -> None:
        with self._cond:
            self.inflight[i] -= 1
            self._cond.notify()


class ServedEngine(EngineBase):
    """Generation and scoring against an OpenAI-compatible server (one model, one or more base URLs).

    ``tokenizer`` (or the spec's ``tokenizer`` field, loaded on first use) renders chat
    templates and counts tokens; ``client`` is an ``httpx.Client`` (tests), else one is made.
    Construction checks every URL's ``/models`` and fails with :class:`ServedModelError`
    when a URL is unreachable or does not serve ``spec.model``; ``check=False`` skips that.
    """

    def __init__(
        self, spec: ModelSpec, *, progress: bool = True, tokenizer: Any = None, client: Any = None, check: bool = True
    ):
        import httpx

        if not spec.model:
            raise ServedModelError(
                f"served model {spec.name}: field 'model' is empty; set it to the id the server serves "
                "(GET <url>/models lists them), or on the command line write the model as <url>#<id>"
            )
        self.spec = spec
        self.model_id = spec.model
        self.urls = base_urls(spec)
        self.progress = progress
        self.batch_size = max(1, spec.concurrency) * len(self.urls)
        self.stats = EngineStats()
        self.max_length: int | None = None
        self.replicas = _Replicas(self.urls, spec.concurrency)
        self._tokenizer = tokenizer
        headers = {}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise ServedModelError(
                    f"served model {spec.name}: environment variable {spec.api_key_env} "
                    "(field 'api_key_env') is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        self.client = client or httpx.Client(
            timeout=spec.timeout, headers=headers, limits=httpx.Limits(max_connections=self.batch_size + 2)
        )
        if check:
            self.check()

    def __repr__(self) -> str:
        return f"ServedEngine(model={self.model_id!r}, urls={self.urls})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()

    # ------------------------------------------------------------------ server checks

    def check(self) -> None:
        """Every base URL answers ``GET /models`` and lists ``model`` (a server listing no ids is accepted)."""
        import httpx

        for url in self.urls:
            try:
                r = self.client.get(f"{url}/models", timeout=min(self.spec.timeout, 30.0))
            except httpx.HTTPError as exc:
                raise ServedModelError(
                    f"served model '{self.model_id}': cannot reach {url} ({type(exc).__name__}: {exc}); "
                    "start the server or fix the model spec's name/replicas"
                ) from exc
            if r.status_code != 200:
                raise ServedModelError(
                    f"served model '{self.model_id}': {url}/models answered HTTP {r.status_code}: {r.text[:300]}"
                )
            try:
                ids = [m.get("id") for m in r.json().get("data", [])]
            except (ValueError, AttributeError) as exc:
                raise ServedModelError(f"{url}/models: not an OpenAI-compatible answer: {r.text[:200]}") from exc
            if ids and self.model_id not in ids:
                raise ServedModelError(
                    f"{url} does not serve model '{self.model_id}' (it serves: {', '.join(map(str, ids))}); "
                    "set the model spec's field 'model' to one of those"
                )

    # ------------------------------------------------------------------ HTTP

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` (plus ``model`` and ``request_extra``) to the least busy URL, retrying 429/5xx/timeouts."""
        import httpx

        payload = {**self.spec.request_extra, **body, "model": self.model_id}
        avoid: int | None = None
        failures: list[str] = []
        for attempt in range(self.spec.max_retries + 1):
            i = self.replicas.acquire(avoid)
            url = f"{self.urls[i]}{path}"
            wait = 0.0
            try:
                r = self.client.post(url, json=payload)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                failures.append(f"{url}: {type(exc).__name__} {exc}")
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError as exc:
                        raise ServedModelError(f"{url}: answer is not JSON: {r.text[:200]}") from exc
                if r.status_code not in RETRY_STATUS:
                    raise ServedModelError(
                        f"{url} refused model '{self.model_id}': HTTP {r.status_code}: {r.text[:500]}"
                    )
                failures.append(f"{url}: HTTP {r.status_code} {r.text[:200]}")
                wait = _retry_after(r.headers.get("retry-after"))
            finally:
                self.replicas.release(i)
            avoid = i if len(self.urls) > 1 else None
            if attempt < self.spec.max_retries:
                delay = max(wait, min(MAX_BACKOFF, self.spec.retry_backoff * 2**attempt))
                log.warning(
                    "served model %s: %s; retry %d/%d in %.1f s",
                    self.model_id,
                    failures[-1][:200],
                    attempt + 1,
                    self.spec.max_retries,
                    delay,
                )
                time.sleep(delay)
        raise ServedModelError(f"served model '{self.model_id}': {len(failures)} tries failed; last: {failures[-1]}")

    def _map(
        self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str, unit: str = "req", show: bool = True
    ) -> list[Any]:
        """``fn`` over ``items`` on the request pool, results in input order, with a progress bar when ``show``."""
        if not items:
            return []
        bar = self._progress_bar(len(items), desc, unit, show)
        out: list[Any] = [None] * len(items)
        with ThreadPoolExecutor(max_workers=min(self.batch_size, len(items))) as pool:
            futures = {pool.submit(fn, it): k for k, it in enumerate(items)}
            try:
                for fut in _as_completed(futures):
                    out[futures[fut]] = fut.result()
                    bar.update(1)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
            finally:
                bar.close()
        return out

    # ------------------------------------------------------------------ rendering

    @property
    def tokenizer(self) -> Any:
        """The local tokenizer named by the spec's ``tokenizer`` field (loaded on first use)."""
        if self._tokenizer is None:
            if not self.spec.tokenizer:
                raise ServedModelError(
                    f"served model '{self.model_id}' ({self.urls[0]}): "
                    "rendering chat templates and counting tokens need a "
                    "local tokenizer; set the model spec's field 'tokenizer' (e.g. 'embedded', a folder or a hub id)"
                )
            from cai_dpo.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.spec.tokenizer)
        return self._tokenizer

    # ------------------------------------------------------------------ generation

    def _generate(
        self, conversations: Prompts, sampling: SamplingSection, n: int, prefix: str | None, desc: str
    ) -> list[list[Generation]]:
        """``n`` completions per conversation, in input order (one request per completion).

        Conversations are rendered here and sent to ``/completions`` when the spec has a
        tokenizer, else sent as messages to ``/chat/completions`` (no ``prefix`` then).
        Sampling: greedy (temperature 0) unless ``do_sample`` and ``temperature > 0``;
        each request carries a seed from ``sampling.seed``, the prompt and the sample index.
        """
        chat = (
            self._tokenizer is None and not self.spec.tokenizer and any(not isinstance(c, str) for c in conversations)
        )
        if chat and prefix:
            raise ServedModelError(
                f"served model '{self.model_id}': a prefix needs rendered text; set the model spec's field 'tokenizer'"
            )
        greedy = not (sampling.do_sample and sampling.temperature > 0)
        base = {
            "max_tokens": sampling.max_new_tokens,
            "temperature": 0.0 if greedy else sampling.temperature,
            "top_p": 1.0 if greedy else sampling.top_p,
        }
        jobs = []
        for ci, conv in enumerate(conversations):
            prompt: Any = conv if chat else (prefix or "") + self.render(conv)
            key = json.dumps(prompt) if chat else prompt
            for si in range(n):
                jobs.append((ci, si, prompt, {**base, "seed": sample_seed(sampling.seed, key, si)}))

        def one(job: tuple[int, int, Any, dict[str, Any]]) -> Generation:
            _, _, prompt, params = job
            if chat:
                data = self._post("/chat/completions", {**params, "messages": prompt})
                choice = _first_choice(data, self.urls)
                text = (choice.get("message") or {}).get("content") or ""
            else:
                data = self._post("/completions", {**params, "prompt": prompt})
                choice = _first_choice(data, self.urls)
                text = choice.get("text") or ""
            usage = data.get("usage") or {}
            return Generation(
                text.strip(),
                int(usage.get("completion_tokens", 0)),
                choice.get("finish_reason") == "stop",
                int(usage.get("prompt_tokens", 0)),
            )

        t0 = time.perf_counter()
        gens = self._map(one, jobs, desc, "seq")
        results: list[list[Generation]] = [[None] * n for _ in conversations]  # type: ignore[list-item]
        for (ci, si, _, _), g in zip(jobs, gens):
            results[ci][si] = g
        self.stats.generated_tokens += sum(g.n_tokens for g in gens)
        self.stats.prompt_tokens += sum(g.prompt_tokens for g in gens)
        self.stats.generate_seconds += time.perf_counter() - t0
        log.info(
            "%s (served %s): %d sequences, %.1f tok/s", desc, self.model_id, len(jobs), self.stats.tokens_per_second()
        )
        return results

    # ------------------------------------------------------------------ scoring

    def _top_logprobs(self, prompt: str) -> dict[str, float]:
        """Top-k log-probs of the token after ``prompt`` (token text → log-prob)."""
        data = self._post(
            "/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": self.spec.top_logprobs}
        )
        lp = _first_choice(data, self.urls).get("logprobs") or {}
        top = lp.get("top_logprobs") or []
        content = lp.get("content") or []  # the chat-style form (llama.cpp's native server answers /completions so)
        if not top and content and isinstance(content[0], dict):
            top = [{e.get("token"): e.get("logprob") for e in content[0].get("top_logprobs") or []}]
        if not top or not isinstance(top[0], dict) or not top[0]:
            raise NotSupportedByServer(
                f"served model '{self.model_id}' ({', '.join(self.urls)}): the server returned no "
                "top log-probs for /completions with 'logprobs'; score_options needs them"
            )
        return {str(k): float(v) for k, v in top[0].items()}

    def _option_pieces(self, context: str, option: str) -> list[str] | None:
        """The option's text cut at the local tokenizer's token boundaries (None without a tokenizer)."""
        if self._tokenizer is None and not self.spec.tokenizer:
            return None
        ctx = self.encode(context)
        full = self.encode(context + option)
        if full[: len(ctx)] != ctx or len(full) == len(ctx):
            raise ValueError(
                f"option {option!r} merges with the end of its context into one token; "
                "end the context at a token boundary (e.g. after ':')"
            )
        pieces = [self.tokenizer.decode([t]) for t in full[len(ctx) :]]
        if "".join(pieces) != option:
            raise ValueError(f"option {option!r} does not decode token by token ({pieces}); use plain ASCII options")
        return pieces

    def _score_options(
        self, contexts: Sequence[str], options: Sequence[str], prefix: str | None, desc: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Normalised probabilities ``[N, K]`` of each option after each context, and raw log-probs ``[N, K]``.

        Each option's log-prob is the sum over its tokens of the next-token log-prob read
        from the server's top-k (``top_logprobs`` in the spec); identical requests (the
        tokens the options share) are sent once. Raises :class:`NotSupportedByServer`
        when the server returns no log-probs and :class:`ServedModelError` when an
        option's token is not among the top-k.
        """
        if any(not c for c in contexts) and not prefix:
            raise ValueError("score_options needs a non-empty context")
        t0 = time.perf_counter()
        pre = prefix or ""
        pieces = [[self._option_pieces(ctx, opt) for opt in options] for ctx in contexts]
        raw = np.zeros((len(contexts), len(options)))
        consumed = np.zeros((len(contexts), len(options)), dtype=int)  # characters of the option already scored
        pending = [(i, k) for i in range(len(contexts)) for k in range(len(options))]
        steps = np.zeros((len(contexts), len(options)), dtype=int)
        bar = self._progress_bar(len(contexts), desc, "ctx")
        while pending:
            prompts = sorted({pre + contexts[i] + options[k][: consumed[i, k]] for i, k in pending})
            tops = dict(zip(prompts, self._map(self._top_logprobs, prompts, desc, show=False)))
            still = []
            for i, k in pending:
                prompt = pre + contexts[i] + options[k][: consumed[i, k]]
                top = tops[prompt]
                rest = options[k][consumed[i, k] :]
                ps = pieces[i][k]
                piece = ps[steps[i, k]] if ps is not None else _longest_prefix(rest, top)
                if piece is None or piece not in top:
                    raise ServedModelError(
                        f"served model '{self.model_id}' ({', '.join(self.urls)}): "
                        f"the token {piece or rest!r} of option "
                        f"{options[k]!r} is not among the server's top {self.spec.top_logprobs} "
                        f"next tokens (context {i}); "
                        "raise the model spec's 'top_logprobs' (the server may cap it) or check the prompt format"
                    )
                raw[i, k] += top[piece]
                consumed[i, k] += len(piece)
                steps[i, k] += 1
                if consumed[i, k] < len(options[k]):
                    still.append((i, k))
            bar.update(len({i for i, _ in pending} - {i for i, _ in still}))
            pending = still
        bar.close()
        probs = option_probs(raw)
        self.stats.scored_items += len(contexts)
        self.stats.score_seconds += time.perf_counter() - t0
        return probs, raw

    def _logprob(
        self, contexts: Sequence[str], completions: Sequence[str], prefix: str | None, desc: str
    ) -> list[LogProb]:
        """Summed and per-token log-probs of each completion after its (rendered) context.

        One ``/completions`` request per item with ``echo`` and ``logprobs``, one token
        generated; the server's own tokenization, read back from the prompt's end (a token
        that straddles the context's end counts as the completion's). Raises
        :class:`NotSupportedByServer` when the server does not return the prompt's log-probs
        (llama.cpp's server needs ``--logits_all true``).
        """
        pre = prefix or ""
        for c, x in zip(contexts, completions):
            if not x:
                raise ValueError(f"completion {x!r} adds no tokens to its context")
            if not (pre + c):
                raise ValueError("a completion needs a non-empty context to be scored")
        t0 = time.perf_counter()

        def one(item: tuple[str, str]) -> LogProb:
            ctx, completion = pre + item[0], item[1]
            full = ctx + completion
            try:
                data = self._post(
                    "/completions", {"prompt": full, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
                )
            except ServedModelError as exc:
                raise NotSupportedByServer(
                    f"logprob is not supported by this server ({', '.join(self.urls)}): "
                    "/completions with echo + logprobs "
                    f"failed ({exc}); llama.cpp's server needs --logits_all true, vLLM supports it"
                ) from exc
            choice = _first_choice(data, self.urls)
            generated = (data.get("usage") or {}).get("completion_tokens")
            if generated is None:
                generated = 1 if choice.get("finish_reason") == "length" else 0
            return _echo_logprob(choice.get("logprobs") or {}, len(completion), int(generated), self.urls)

        out = self._map(one, list(zip(contexts, completions)), desc, "seq")
        self.stats.scored_items += len(out)
        self.stats.score_seconds += time.perf_counter() - t0
        return out


# --------------------------------------------------------------------------- a local llama.cpp server

LLAMA_CPP_EXTRA = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
"""``request_extra`` for llama.cpp's server: turns off its default top-k 40, min-p 0.05 and repeat
penalty 1.1, so sampling follows the stage's settings alone (vLLM and SGLang need none of it)."""


@contextlib.contextmanager
def llama_cpp_server(
    model_path: str | os.PathLike[str],
    *,
    alias: str = "local",
    port: int | None = None,
    threads: int = 2,
    n_ctx: int = 2048,
    logits_all: bool = True,
    ready_timeout: float = 120.0,
    log_path: str | os.PathLike[str] | None = None,
) -> Iterator[str]:
    """Run ``python -m llama_cpp.server`` on a GGUF file at 127.0.0.1 and yield its ``openai://`` base URL.

    Waits (at most ``ready_timeout`` seconds) until ``/v1/models`` answers; the server is
    terminated (then killed) on exit. ``logits_all`` lets :meth:`ServedEngine.logprob` work.
    Raises :class:`ServedModelError` when llama-cpp-python is missing, the server exits or
    is not ready in time (with the end of its log).
    """
    import subprocess
    import sys
    import tempfile

    import httpx

    if importlib.util.find_spec("llama_cpp") is None:
        raise ServedModelError(
            "llama-cpp-python is not installed; run `make served` (the `served` extra, built with "
            'CMAKE_ARGS="-DGGML_NATIVE=OFF")'
        )
    port = port or _free_port()
    log_file = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--model_alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(threads),
        "--logits_all",
        str(logits_all).lower(),
    ]
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise ServedModelError(
                    f"llama.cpp server on {url} exited with {proc.returncode}: "
                    f"{log_file.read_text(errors='replace', encoding='utf-8')[-1500:]}"
                )
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServedModelError(
                    f"llama.cpp server on {url} not ready after {ready_timeout:.0f} s: "
                    f"{log_file.read_text(errors='replace', encoding='utf-8')[-1500:]}"
                )
            time.sleep(0.5)
        log.info("llama.cpp server for %s on %s (log %s)", model_path, url, log_file)
        yield f"openai://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- helpers


def _as_completed(futures: Any) -> Any:
    from concurrent.futures import as_completed

    return as_completed(futures)


def _retry_after(value: str | None) -> float:
    try:
        return min(MAX_BACKOFF, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0


def _first_choice(data: dict[str, Any], urls: list[str]) -> dict[str, Any]:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices:
        raise ServedModelError(f"{', '.join(urls)}: answer has no 'choices': {json.dumps(data)[:200]}")
    return choices[0]


def _longest_prefix(rest: str, top: dict[str, float]) -> str | None:
    """The longest top-k token text that starts ``rest`` (no tokenizer: a stand-in for its tokenization)."""
    found = [t for t in top if t and rest.startswith(t)]
    return max(found, key=len) if found else None


def _echo_logprob(lp: dict[str, Any], completion_chars: int, n_generated: int, urls: list[str]) -> LogProb:
    """Per-token log-probs of the last ``completion_chars`` characters of an echoed prompt.

    The echoed tokens are the prompt's (servers differ at its start: a BOS token's text, a
    first token left out) followed by ``n_generated`` generated ones, so the completion is
    read backwards from the prompt's end: the tokens that cover its characters, a token
    straddling the context's end included.
    """
    tokens, values = lp.get("tokens"), lp.get("token_logprobs")
    if not tokens or values is None or len(values) != len(tokens):
        raise NotSupportedByServer(
            f"logprob is not supported by this server ({', '.join(urls)}): the answer carries no "
            "echoed prompt log-probs (tokens, token_logprobs)"
        )
    prompt_part = list(zip(tokens, values))[: len(tokens) - n_generated]
    per_token: list[float] = []
    covered = 0
    for tok, value in reversed(prompt_part):
        if covered >= completion_chars:
            break
        if value is None:
            raise NotSupportedByServer(
                f"logprob is not supported by this server ({', '.join(urls)}): no log-prob for prompt token {tok!r}"
            )
        per_token.append(float(value))
        covered += len(tok)
    if covered < completion_chars:
        raise NotSupportedByServer(f"logprob: the server's echo ({', '.join(urls)}) does not cover the completion")
    per_token.reverse()
    return LogProb(float(sum(per_token)), per_token)

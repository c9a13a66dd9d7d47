"""The served-model backend: an in-process fake OpenAI-compatible server (retries, errors, replicas,
scoring arithmetic) and, where llama_cpp is installed, a real llama.cpp server on the embedded model."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from cai_dpo.config import ModelSpec, SamplingSection, load_config
from cai_dpo.models import ModelLoadError, describe, load_engine, load_model
from cai_dpo.served import LLAMA_CPP_EXTRA, NotSupportedByServer, ServedEngine, ServedModelError, base_urls, is_served

# --------------------------------------------------------------------------- fake server


class FakeServer:
    """An OpenAI-compatible server on 127.0.0.1; ``reply(path, body) -> (status, json)`` answers each POST."""

    def __init__(
        self, reply: Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]], models: tuple[str, ...] = ("m",)
    ):
        self.reply, self.models = reply, models
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, data: dict[str, Any]) -> None:
                blob = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

            def do_GET(self) -> None:
                if self.path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": m} for m in server.models]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                path = self.path.removeprefix("/v1")
                with server.lock:
                    server.posts.append((path, body))
                self._send(*server.reply(path, body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"openai://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(text: str = "hello", logprobs: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    choice: dict[str, Any] = {"text": text, "index": 0, "finish_reason": "stop", "logprobs": logprobs}
    return 200, {"choices": [choice], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}


@pytest.fixture()
def fake():
    servers: list[FakeServer] = []

    def make(reply, models=("m",)) -> FakeServer:
        servers.append(FakeServer(reply, models))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def spec_for(*servers: FakeServer, **kw: Any) -> ModelSpec:
    fields = {"model": "m", "retry_backoff": 0.01, "max_retries": 3, "timeout": 5.0, **kw}
    return ModelSpec(name=servers[0].url, replicas=[s.url for s in servers[1:]], **fields)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- specs and the factory


def test_spec_forms_and_model_id():
    spec = ModelSpec(name="openai://h:1/v1/", model="x", replicas=["http://h:2/v1", "openai+https://h:3/v1"])
    assert is_served(spec) and not is_served(ModelSpec(name="embedded"))
    assert is_served(ModelSpec(name="http://h:1/v1", backend="openai"))
    assert base_urls(spec) == ["http://h:1/v1", "http://h:2/v1", "https://h:3/v1"]
    assert (
        describe(spec) == describe(dataclasses.replace(spec, replicas=[])) == "served:x"
    )  # replicas don't change record keys


def test_a_served_model_written_as_one_string():
    """``openai://host:port/v1#<id>``: how a command-line flag or an eval.extra_models entry names a served model."""
    from cai_dpo.stages.eval import parse_model_arg

    spec = ModelSpec.from_text("openai://h:1/v1#smol")
    assert (spec.name, spec.model, is_served(spec)) == ("openai://h:1/v1", "smol", True)
    assert ModelSpec.from_text("http://h:1/v1#smol").backend == "openai"
    assert ModelSpec.from_text("openai://h:1/v1").model is None  # the served engine names the fix
    assert ModelSpec.from_text(" some/folder ") == ModelSpec(name="some/folder")
    assert parse_model_arg("openai://h:1/v1?a=b#smol") == ("smol", ModelSpec.from_text("openai://h:1/v1?a=b#smol"))
    assert parse_model_arg("mine=openai://h:1/v1#smol")[0] == "mine"


def test_url_schemes_are_case_insensitive_and_need_a_host():
    """RFC 3986: ``OpenAI://`` and ``HTTP://`` are the same schemes as their lower-case forms (they were read as hub
    ids), and a URL without a host fails with a message naming it (it failed later, deep in the HTTP client)."""
    from cai_dpo.stages.eval import parse_model_arg

    spec = ModelSpec.from_text("OpenAI://h:1/v1#smol")
    assert is_served(spec) and base_urls(spec) == ["http://h:1/v1"]
    assert ModelSpec.from_text("HTTPS://h:1/v1#smol").backend == "openai"
    assert base_urls(ModelSpec(name="OPENAI+HTTPS://h:3/v1", model="m")) == ["https://h:3/v1"]
    assert parse_model_arg("OpenAI://h:1/v1?a=b#smol")[0] == "smol"  # a URL: its "=" is not NAME=
    assert ModelSpec(name="OpenAI://h:1/v1", backend="vllm").problems()  # vLLM loads weights, not a URL
    for bad in ("openai://#m", "openai:///v1", "ftp://h:1/v1", "openai://h:notaport/v1", "openai://[::1/v1"):
        with pytest.raises(ServedModelError, match="served model URL"):
            base_urls(ModelSpec(name=bad, model="m", backend="openai"))


def test_eval_refuses_two_servers_with_one_served_id(tiny_cfg):
    """Responses are keyed by the served id: two models served as 'm' would share them, so eval refuses."""
    from cai_dpo.errors import InputError
    from cai_dpo.stages.eval import default_models, run_eval
    from cai_dpo.store import RunStore

    tiny_cfg.eval.extra_models = ["a=openai://127.0.0.1:1/v1#m", "b=openai://127.0.0.1:2/v1#m"]
    with pytest.raises(InputError, match="'a' and 'b' are both served as 'm'"):
        run_eval(tiny_cfg)
    tiny_cfg.eval.extra_models = ["openai://127.0.0.1:1/v1#base"]  # named after its id, which base already is
    with pytest.raises(InputError, match="OTHERNAME=openai://127.0.0.1:1/v1#base"):
        default_models(tiny_cfg, RunStore(tiny_cfg.run_dir))
    tiny_cfg.eval.extra_models = ["base=openai://127.0.0.1:1/v1#x"]
    with pytest.raises(InputError, match="as OTHERNAME=openai://127.0.0.1:1/v1#x$"):
        default_models(tiny_cfg, RunStore(tiny_cfg.run_dir))


def test_generate_command_on_a_served_model(fake, tmp_path, capsys):
    """``cai-dpo generate --model <url>#<id>`` asks the server for that id and records it; an unreachable
    server or a missing id is one error line naming the fix, exit 1, no traceback, no output file."""
    from cai_dpo.cli import main
    from cai_dpo.store import read_jsonl

    reply = {"choices": [{"message": {"role": "assistant", "content": "Blue."}, "finish_reason": "stop"}]}
    server = fake(lambda p, b: (200, {**reply, "usage": {"completion_tokens": 2}}))
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts.write_text('{"id": "p1", "text": "Name a colour."}\n')
    args = ["generate", str(prompts), str(out), "--profile", "tiny", "-o", f"runs_dir={tmp_path / 'runs'}"]
    assert main([*args, "--model", f"{server.url}#m"]) == 0
    assert [r["model"] for r in read_jsonl(out)] == ["served:m"] and server.posts[0][1]["model"] == "m"
    out.unlink()
    assert main([*args, "--model", server.url]) == 1
    assert "field 'model' is empty" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--model", f"openai://127.0.0.1:{free_port()}/v1#m"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "127.0.0.1" in err and "Traceback" not in err and not out.exists()


def test_config_reads_served_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "base: tiny\njudge:\n  model: {name: 'openai://127.0.0.1:8000/v1', model: judge-7b, "
        "replicas: ['openai://127.0.0.1:8001/v1'], concurrency: 16, request_extra: {top_k: -1}}\n"
        "sl:\n  teacher: {name: 'openai://127.0.0.1:8000/v1', model: judge-7b}\n"
    )
    cfg = load_config(str(path))
    assert cfg.judge_model().model == "judge-7b" and cfg.judge_model().concurrency == 16
    assert cfg.judge_model().request_extra == {"top_k": -1} and cfg.sl.teacher.model == "judge-7b"
    path.write_text("base: tiny\njudge:\n  model: {name: 'openai://h/v1', request_extra: 3}\n")
    with pytest.raises(Exception, match="judge.model.request_extra"):
        load_config(str(path))


def test_factory_and_local_loading_refuse_mismatches(fake):
    server = fake(lambda p, b: completion())
    engine = load_engine(spec_for(server))
    assert isinstance(engine, ServedEngine) and engine.model_id == "m"
    with pytest.raises(ModelLoadError, match="takes no local adapter"):
        load_engine(spec_for(server), adapter="some/adapter")
    with pytest.raises(ModelLoadError, match="cannot be loaded into this process"):
        load_model(spec_for(server))
    with pytest.raises(ServedModelError, match="field 'model' is empty"):
        ServedEngine(dataclasses.replace(spec_for(server), model=None))


def test_stages_build_served_engines(fake, tiny_cfg):
    from cai_dpo.judge import Judge
    from cai_dpo.stages import sl
    from cai_dpo.store import RunStore

    server = fake(lambda p, b: completion())
    spec = spec_for(server, tokenizer="tiny")
    cfg = dataclasses.replace(
        tiny_cfg,
        judge=dataclasses.replace(tiny_cfg.judge, model=spec),
        sl=dataclasses.replace(tiny_cfg.sl, teacher=spec),
    )
    assert isinstance(Judge.load(cfg).engine, ServedEngine)
    state = sl._SLRun(cfg, RunStore(cfg.run_dir))
    # the teacher writes critiques and revisions; the policy keeps the initial answer
    assert state.teacher_id == "served:m" and isinstance(state.teacher.get(), ServedEngine)
    assert state.model_id != "served:m"


# --------------------------------------------------------------------------- errors, retries, replicas


def test_retries_429_and_503_then_succeeds(fake):
    answers = iter([(429, {"error": "slow down"}), (503, {"error": "loading"})])
    server = fake(lambda p, b: next(answers, None) or completion("fine"))
    engine = ServedEngine(spec_for(server), progress=False)
    out = engine.generate(["hi"], SamplingSection(max_new_tokens=4))
    assert out[0][0].text == "fine" and out[0][0].finished and out[0][0].n_tokens == 2
    assert len(server.posts) == 3


def test_gives_up_naming_url_after_retries(fake):
    server = fake(lambda p, b: (503, {"error": "overloaded"}))
    engine = ServedEngine(spec_for(server, max_retries=2), progress=False)
    with pytest.raises(ServedModelError, match=r"3 tries failed.*127\.0\.0\.1.*HTTP 503"):
        engine.generate(["hi"])
    assert len(server.posts) == 3


def test_client_error_is_not_retried(fake):
    server = fake(lambda p, b: (404, {"error": "model 'm' not found"}))
    engine = ServedEngine(spec_for(server), progress=False)
    with pytest.raises(ServedModelError, match=r"127\.0\.0\.1.*refused model 'm': HTTP 404"):
        engine.generate(["hi"])
    assert len(server.posts) == 1


def test_unreachable_url_is_named():
    url = f"openai://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServedModelError, match=rf"cannot reach http://127\.0\.0\.1:{url.split(':')[2]}"):
        ServedEngine(ModelSpec(name=url, model="m", timeout=2.0))


def test_wrong_model_is_named(fake):
    server = fake(lambda p, b: completion(), models=("other-model",))
    with pytest.raises(ServedModelError, match=r"does not serve model 'm' \(it serves: other-model\)"):
        ServedEngine(spec_for(server))


def test_requests_spread_over_replicas_and_fail_over(fake):
    a, b = fake(lambda p, body: completion("a")), fake(lambda p, body: completion("b"))
    engine = ServedEngine(spec_for(a, b, concurrency=2), progress=False)
    outs = engine.generate([f"prompt {i}" for i in range(20)], SamplingSection(max_new_tokens=4))
    assert len(a.posts) + len(b.posts) == 20 and min(len(a.posts), len(b.posts)) >= 6
    assert {o[0].text for o in outs} == {"a", "b"}
    down = fake(lambda p, body: (503, {"error": "down"}))
    engine = ServedEngine(spec_for(down, b, concurrency=2, max_retries=2), progress=False)
    outs = engine.generate([f"prompt {i}" for i in range(6)], SamplingSection(max_new_tokens=4))
    assert [o[0].text for o in outs] == ["b"] * 6  # every request that met the broken replica went on to the other


def test_sampling_settings_and_seeds_reach_the_server(fake):
    server = fake(lambda p, b: completion())
    engine = ServedEngine(spec_for(server, request_extra={"top_k": -1}), progress=False)
    engine.generate(["x", "y"], SamplingSection(max_new_tokens=7, temperature=0.9, top_p=0.8, seed=3), n=2)
    bodies = sorted((b["prompt"], b["seed"]) for _, b in server.posts)
    assert len({s for _, s in bodies}) == 4
    first = server.posts[0][1]
    assert first["max_tokens"] == 7 and first["temperature"] == 0.9 and first["top_p"] == 0.8
    assert first["model"] == "m" and first["top_k"] == -1
    server.posts.clear()
    engine.generate(["x", "y"], SamplingSection(max_new_tokens=7, temperature=0.9, top_p=0.8, seed=3), n=2)
    assert sorted((b["prompt"], b["seed"]) for _, b in server.posts) == bodies  # same inputs, same seeds
    server.posts.clear()
    engine.generate(["x"], SamplingSection(do_sample=False))
    assert server.posts[0][1]["temperature"] == 0.0


def test_conversations_use_chat_endpoint_without_tokenizer(fake):
    server = fake(
        lambda p, b: (
            200,
            {
                "choices": [{"message": {"role": "assistant", "content": " hi "}, "finish_reason": "length"}],
                "usage": {"completion_tokens": 3},
            },
        )
    )
    engine = ServedEngine(spec_for(server), progress=False)
    out = engine.generate([[{"role": "user", "content": "hello"}]])
    assert server.posts[0][0] == "/chat/completions" and server.posts[0][1]["messages"][0]["content"] == "hello"
    assert out[0][0].text == "hi" and not out[0][0].finished
    with pytest.raises(ServedModelError, match="field 'tokenizer'"):
        engine.render([{"role": "user", "content": "hello"}])


# --------------------------------------------------------------------------- scoring arithmetic


def letter_server(p_a: float, p_b: float):
    """Next-token top-k: after the context " (" (and little else), then A/B, then ")"."""

    def reply(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        prompt = body["prompt"]
        if prompt.endswith(" ("):
            top = {"A": math.log(p_a), "B": math.log(p_b), "C": math.log(0.01)}
        elif prompt.endswith("(A") or prompt.endswith("(B"):
            top = {")": math.log(0.9), ").": math.log(0.05)}
        else:
            top = {" (": math.log(0.5), " ": math.log(0.2)}
        return completion("x", {"tokens": ["x"], "token_logprobs": [-1.0], "top_logprobs": [top], "text_offset": [0]})

    return reply


def test_score_options_from_top_logprobs(fake):
    server = fake(letter_server(0.6, 0.2))
    engine = ServedEngine(spec_for(server), progress=False)
    probs, raw = engine.score_options(["ctx one:", "ctx two:"], prefix="few-shot ")
    assert np.allclose(probs, [[0.75, 0.25]] * 2)
    assert np.allclose(raw[0], [math.log(0.5 * 0.6 * 0.9), math.log(0.5 * 0.2 * 0.9)])
    prompts = [b["prompt"] for _, b in server.posts]
    assert len(prompts) == len(set(prompts)) == 8  # the shared " (" request is sent once per context
    assert all(p.startswith("few-shot ctx") for p in prompts)


def test_score_options_reads_chat_style_logprobs(fake):
    def reply(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        _, answer = letter_server(0.3, 0.1)(path, body)
        top = answer["choices"][0]["logprobs"]["top_logprobs"][0]
        answer["choices"][0]["logprobs"] = {
            "content": [
                {"token": "x", "logprob": -1.0, "top_logprobs": [{"token": t, "logprob": v} for t, v in top.items()]}
            ]
        }
        return 200, answer

    probs, _ = ServedEngine(spec_for(fake(reply)), progress=False).score_options(["ctx:"])
    assert np.allclose(probs, [[0.75, 0.25]])


def test_score_options_missing_token_and_missing_logprobs(fake):
    server = fake(letter_server(0.6, 0.2))
    engine = ServedEngine(spec_for(server), progress=False)
    with pytest.raises(ServedModelError, match=r"option ' \(D\)' is not among the server's top 20.*top_logprobs"):
        engine.score_options(["ctx:"], [" (A)", " (D)"])
    bare = fake(lambda p, b: completion("x", None))
    engine = ServedEngine(spec_for(bare), progress=False)
    with pytest.raises(NotSupportedByServer, match="no top log-probs"):
        engine.score_options(["ctx:"])


def test_logprob_from_echo(fake):
    def reply(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        assert body["echo"] is True and body["prompt"] == "The cat sat"
        # servers differ at the prompt's start (a BOS text here); the last token is the generated one
        tokens, values = ["<s>", "The", " cat", " sat", "."], [None, -3.0, -2.0, -0.5, -1.0]
        choice = {
            "text": "The cat sat.",
            "finish_reason": "length",
            "logprobs": {"tokens": tokens, "token_logprobs": values, "top_logprobs": None},
        }
        return 200, {"choices": [choice], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}

    engine = ServedEngine(spec_for(fake(reply)), progress=False)
    [lp] = engine.logprob(["The"], [" cat sat"])
    assert lp.per_token == [-2.0, -0.5] and lp.total == -2.5
    [lp] = engine.logprob(["The c"], ["at sat"])  # " cat" straddles the context's end: it counts as the completion's
    assert lp.per_token == [-2.0, -0.5]
    bare = fake(lambda p, b: completion("x", None))
    with pytest.raises(NotSupportedByServer, match="not supported by this server"):
        ServedEngine(spec_for(bare), progress=False).logprob(["The"], [" cat"])
    refusing = fake(lambda p, b: (400, {"error": "echo is not supported"}))
    with pytest.raises(NotSupportedByServer, match="logits_all"):
        ServedEngine(spec_for(refusing), progress=False).logprob(["The"], [" cat"])


# --------------------------------------------------------------------------- a real llama.cpp server

SERVED_ID = "smollm2"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp's server (llama-cpp-python) on the embedded GGUF, on a free port; stopped at the end."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make served)")
    from cai_dpo.models import embedded_gguf_path
    from cai_dpo.served import llama_cpp_server

    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    with llama_cpp_server(embedded_gguf_path(), alias=SERVED_ID, threads=2, log_path=log_path) as url:
        yield url


@pytest.fixture(scope="module")
def local_engine():
    from cai_dpo.engine import Engine

    model, tokenizer = load_model("embedded")
    return Engine(model, tokenizer, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def served_engine(llama_server, local_engine):
    spec = ModelSpec(
        name=llama_server, model=SERVED_ID, tokenizer="embedded", concurrency=2, request_extra=LLAMA_CPP_EXTRA
    )
    engine = ServedEngine(spec, progress=False, tokenizer=local_engine.tokenizer)
    yield engine
    engine.close()


def judge_contexts(engine: Any, n: int) -> tuple[str | None, list[str]]:
    """Judge contexts as the judge stage builds them: check pairs under principles in turn, both orders."""
    from cai_dpo.config import JudgeSection
    from cai_dpo.constitution import load_constitution
    from cai_dpo.data import load_checkset
    from cai_dpo.judge import JudgePrompter

    constitution = load_constitution("default")
    prompter = JudgePrompter(engine, constitution, JudgeSection(few_shot=True))
    pairs, principles = load_checkset(), constitution.principles
    contexts = []
    for k in range((n + 1) // 2):
        pair, pid = pairs[k % len(pairs)], principles[k % len(principles)].id
        contexts += [
            prompter.context(pair.prompt, pair.better, pair.worse, pid),
            prompter.context(pair.prompt, pair.worse, pair.better, pid),
        ]
    return prompter.prefix, contexts[:n]


@pytest.mark.slow
def test_served_option_probabilities_match_local(served_engine, local_engine):
    from cai_dpo.judge import OPTIONS

    prefix, contexts = judge_contexts(served_engine, 20)
    assert prefix == judge_contexts(local_engine, 20)[0]
    served, _ = served_engine.score_options(contexts, OPTIONS, prefix=prefix)
    local, _ = local_engine.score_options(contexts, OPTIONS, prefix=prefix)
    diff = np.abs(served[:, 0] - local[:, 0])
    assert diff.max() <= 0.05, f"P(A) differs by up to {diff.max():.3f} (mean {diff.mean():.3f})"


@pytest.mark.slow
def test_served_greedy_generations_match_local(served_engine, local_engine):
    from cai_dpo.data import load_prompts

    convs = [p.conversation() for p in load_prompts("bundled:helpful")[:20]]
    sampling = SamplingSection(max_new_tokens=16, do_sample=False, temperature=0.0)
    served = served_engine.generate(convs, sampling)
    local = local_engine.generate(convs, sampling)
    pairs = [(s[0].text, loc[0].text) for s, loc in zip(served, local)]
    same = [a == b for a, b in pairs]
    # the server computes in quantized arithmetic (Q4_1 GGUF), the local engine on dequantized float32
    # weights: greedy answers agree at first and may drift apart mid-sentence (measured: 12 of 20 equal)
    opening = [a.split()[:3] == b.split()[:3] for a, b in pairs]
    print(f"greedy: {sum(same)}/20 equal, {sum(opening)}/20 with the same first three words")
    assert sum(same) >= 10, [p for p, ok in zip(pairs, same) if not ok]
    assert sum(opening) >= 17, [p for p, ok in zip(pairs, opening) if not ok]
    assert all(s[0].n_tokens <= 16 for s in served)  # max_new_tokens reached the server
    assert served_engine.stats.generated_tokens > 0


@pytest.mark.slow
def test_served_logprob_matches_local(served_engine, local_engine):
    contexts = [
        served_engine.render([{"role": "user", "content": q}]) for q in ("What is the capital of France?", "Say hi.")
    ]
    completions = ["The capital of France is Paris.", "Hi there! How can I help you today?"]
    served = served_engine.logprob(contexts, completions)
    local = local_engine.logprob(contexts, completions)
    for s, lo in zip(served, local):
        assert s.n_tokens == lo.n_tokens
        assert abs(s.total - lo.total) <= 0.1 * lo.n_tokens, (s.per_token, lo.per_token)


@pytest.mark.slow
def test_generate_file_records_the_served_model(llama_server, tmp_path, tiny_cfg):
    from cai_dpo.generate import generate_file
    from cai_dpo.store import read_jsonl

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "p1", "text": "Name a colour."}\n{"id": "p2", "text": "Name a fruit."}\n')
    spec = ModelSpec(name=llama_server, model=SERVED_ID, tokenizer="embedded")
    cfg = dataclasses.replace(
        tiny_cfg,
        policy=spec,
        sl=dataclasses.replace(tiny_cfg.sl, sampling=SamplingSection(max_new_tokens=8, temperature=0.7)),
    )
    rows = read_jsonl(generate_file(cfg, prompts, tmp_path / "out.jsonl", n=2))
    assert len(rows) == 4 and {r["model"] for r in rows} == {"served:smollm2"} and all(r["tokens"] > 0 for r in rows)
    # the one-string form (generate --model): no local tokenizer, so the chat endpoint
    rows = read_jsonl(generate_file(cfg, prompts, tmp_path / "chat.jsonl", model=f"{llama_server}#{SERVED_ID}"))
    assert [r["model"] for r in rows] == ["served:smollm2"] * 2 and all(r["completion"].strip() for r in rows)


@pytest.mark.slow
def test_llama_server_that_cannot_start_is_reported(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make served)")
    from cai_dpo.served import llama_cpp_server

    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ServedModelError, match="exited with"):
        with llama_cpp_server(bad, ready_timeout=60):
            pass

"""The vLLM in-process backend (``backend: vllm``) against a fake ``vllm`` module.

vLLM needs a CUDA GPU and is not installed by ``make test``, so these tests put a small fake
``vllm`` package into ``sys.modules``: its ``LLM`` records the keyword arguments it was built
with and every ``generate`` call, its ``SamplingParams`` records what it receives (and refuses
``n > 1`` with greedy sampling, as vLLM does), and its answers have the shape of vLLM's
``RequestOutput`` / ``CompletionOutput`` / ``Logprob``. A fake "model" gives every token a
log-prob that depends on the token and the length of the prefix before it, so a mapping that
reads the wrong position or the wrong token gives different numbers. This is the only way
to test the request/response mapping without a GPU; it does not show that a real vLLM
behaves as the fake does (``bench/gpu_check.sh`` compares the two engines on a GPU).
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from cai_dpo.config import ConfigError, ModelSpec, SamplingSection, load_config
from cai_dpo.errors import ContextLengthError
from cai_dpo.models import ModelLoadError, describe, load_engine
from cai_dpo.served import sample_seed

# --------------------------------------------------------------------------- the fake vllm package


def fake_lp(prefix: tuple[int, ...] | list[int], token: int) -> float:
    """The fake model's log-prob of ``token`` after ``prefix`` (depends on both)."""
    return -0.1 * (1 + (7 * token + 3 * len(prefix)) % 11)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True


class SamplingParams:
    """Records its arguments; only the names vLLM's documented API has are accepted."""

    def __init__(
        self,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int | None = 16,
        seed: int | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ):
        if temperature < 1e-5 and n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {n}.")
        self.n, self.temperature, self.top_p, self.max_tokens = n, temperature, top_p, max_tokens
        self.seed, self.logprobs, self.prompt_logprobs = seed, logprobs, prompt_logprobs


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class Behaviour:
    """What the fake answers: ``top`` the token ids a top-k may hold (None: just the sampled one),
    ``length`` generated tokens before EOS, ``stop_with`` the id that ends them (None: EOS)."""

    top: set[int] | None = None
    length: int = 3
    stop_with: int | None = None
    prompt_logprobs: bool = True
    max_model_len: int = 2048
    llms: list[Any] = field(default_factory=list)


class LLM:
    behaviour = Behaviour()

    def __init__(self, model: str, **kwargs: Any):
        from cai_dpo.models import load_tokenizer

        self.model, self.kwargs = model, kwargs
        self.calls: list[tuple[list[list[int]], list[SamplingParams], Any]] = []
        self.tokenizer = load_tokenizer(kwargs.get("tokenizer") or model)
        b = LLM.behaviour
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=b.max_model_len))
        b.llms.append(self)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(
        self,
        prompts: list[dict[str, list[int]]],
        sampling_params: Any,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
    ) -> list[RequestOutput]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts)
        ids_list = [list(p["prompt_token_ids"]) for p in prompts]
        self.calls.append((ids_list, params, lora_request))
        return [self._answer(r, ids, p) for r, (ids, p) in enumerate(zip(ids_list, params))]

    def _answer(self, r: int, ids: list[int], p: SamplingParams) -> RequestOutput:
        b = LLM.behaviour
        eos = self.tokenizer.eos_token_id
        outputs = []
        for i in range(p.n):
            base = 200 + ((p.seed or 0) + 31 * i + len(ids)) % 500
            toks = [base + j for j in range(min(b.length, p.max_tokens))]
            if len(toks) < p.max_tokens:
                toks.append(b.stop_with if b.stop_with is not None else eos)
                finish, stop_reason = "stop", b.stop_with
            else:
                finish, stop_reason = "length", None
            logprobs = None
            if p.logprobs is not None:
                keep = set(b.top or ()) | {toks[0]}
                logprobs = [{t: Logprob(fake_lp(ids, t)) for t in keep}]
            text = self.tokenizer.decode([t for t in toks if t != eos], skip_special_tokens=True)
            outputs.append(CompletionOutput(i, " " + text + " ", toks, None, logprobs, finish, stop_reason))
        prompt_lps = None
        if p.prompt_logprobs is not None and b.prompt_logprobs:
            prompt_lps = [None] + [{ids[j]: Logprob(fake_lp(ids[:j], ids[j]), 1)} for j in range(1, len(ids))]
        return RequestOutput(str(r), None, ids, prompt_lps, outputs)


@pytest.fixture()
def fake_vllm(monkeypatch):
    """Insert the fake ``vllm`` package (``vllm``, ``vllm.lora.request``); yields its :class:`Behaviour`."""
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    behaviour = Behaviour()
    monkeypatch.setattr(LLM, "behaviour", behaviour)
    return behaviour


def vllm_spec(**kw: Any) -> ModelSpec:
    return ModelSpec(name="tiny", backend="vllm", **kw)


# --------------------------------------------------------------------------- construction and config


def test_factory_builds_llm_with_spec_settings(fake_vllm, tiny_path):
    from cai_dpo.vllm_engine import VLLMEngine

    engine = load_engine(
        vllm_spec(
            tensor_parallel_size=2, dtype="bfloat16", quantization="4bit", vllm_args={"gpu_memory_utilization": 0.5}
        ),
        progress=False,
    )
    assert isinstance(engine, VLLMEngine)
    [llm] = fake_vllm.llms
    assert llm.model == str(tiny_path)
    assert llm.kwargs["tensor_parallel_size"] == 2 and llm.kwargs["dtype"] == "bfloat16"
    assert llm.kwargs["quantization"] == "bitsandbytes" and llm.kwargs["gpu_memory_utilization"] == 0.5
    assert "enable_lora" not in llm.kwargs and engine.max_length == 2048
    load_engine(vllm_spec(top_logprobs=50, vllm_args={"dtype": "float16"}), progress=False)
    assert fake_vllm.llms[1].kwargs["max_logprobs"] == 50 and fake_vllm.llms[1].kwargs["dtype"] == "float16"


def test_adapter_goes_to_every_request_and_stacked_adapters_are_refused(fake_vllm, tiny_path, tmp_path):
    adapter = tmp_path / "sft"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 24, "base_model_name_or_path": str(tiny_path)}))
    engine = load_engine(vllm_spec(), adapter=str(adapter), progress=False)
    llm = fake_vllm.llms[0]
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 32  # smallest allowed rank >= r
    engine.generate(["hi"], SamplingSection(max_new_tokens=4))
    fake_vllm.top = {t for o in (" (A)", " (B)") for t in option_steps(engine, "Choose:", o)[0]}
    engine.score_options(["Choose:"])
    assert [call[2] for call in llm.calls] == [LoRARequest("sft", 1, str(adapter))] * 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (adapter / "cai_dpo_base.json").write_text(json.dumps({"base": str(tiny_path), "merge_first": ["../other"]}))
    with pytest.raises(ModelLoadError, match="one adapter per request.*cai-dpo export"):
        load_engine(vllm_spec(), adapter=str(adapter), progress=False)


def test_config_validates_vllm_fields(tmp_path):
    cfg = load_config(
        "tiny",
        {"policy.backend": "vllm", "policy.tensor_parallel_size": 2, "policy.vllm_args": {"max_model_len": 4096}},
    )
    assert cfg.policy.tensor_parallel_size == 2 and cfg.policy.vllm_args == {"max_model_len": 4096}
    assert describe(cfg.policy) == "vllm:tiny" and describe(ModelSpec(name="tiny", autocast="none")) == "tiny"
    bad = [
        ({"policy.backend": "vllm", "policy.tensor_parallel_size": 0}, "policy.tensor_parallel_size.*>= 1"),
        ({"policy.tensor_parallel_size": 2}, "policy.tensor_parallel_size.*backend: vllm only"),
        ({"policy.vllm_args": {"a": 1}}, "policy.vllm_args.*backend: vllm only"),
        ({"policy.backend": "vllm", "policy.quantization": "8bit"}, "policy.quantization.*4-bit only"),
        ({"policy.backend": "vllm", "policy.name": "openai://h:8000/v1"}, "policy.name.*backend: openai"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", overrides)
    path = tmp_path / "c.yaml"
    path.write_text("base: tiny\njudge:\n  model: {name: tiny, backend: vllm, tensor_parallel_size: -1}\n")
    with pytest.raises(ConfigError, match="judge.model.tensor_parallel_size"):
        load_config(str(path))


def test_import_guard_names_the_extra_and_the_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ModelLoadError, match=r"pip install 'cai-dpo\[vllm\]'.*CUDA GPU"):
        load_engine(vllm_spec())


def test_cli_reports_missing_vllm_without_traceback(monkeypatch, tmp_path, capsys):
    from cai_dpo.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setenv("CAI_DPO_RUNS", str(tmp_path / "runs"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hello.\n")
    rc = main(["generate", str(prompts), str(tmp_path / "out.jsonl"), "--profile", "tiny", "-o", "policy.backend=vllm"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("error: ") and "cai-dpo[vllm]" in err and len(err.strip().splitlines()) == 1


def test_cli_generate_records_the_vllm_model(fake_vllm, monkeypatch, tmp_path, tiny_path):
    from cai_dpo.cli import main

    monkeypatch.setenv("CAI_DPO_RUNS", str(tmp_path / "runs"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hello.\nName a colour.\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(prompts), str(out), "--profile", "tiny", "-n", "2", "-o", "policy.backend=vllm"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and {r["model"] for r in rows} == {"vllm:tiny"}
    assert all(r["completion"] and r["finished"] for r in rows)


# --------------------------------------------------------------------------- generation


def test_sampling_settings_map_to_sampling_params(fake_vllm, tiny_path):
    engine = load_engine(vllm_spec(), progress=False)
    conv = [{"role": "user", "content": "Name a colour."}]
    sampling = SamplingSection(max_new_tokens=7, temperature=0.8, top_p=0.9, seed=3)
    outs = engine.generate([conv, "plain text"], sampling, n=3, prefix="Be brief. ")
    [(prompts, params, _)] = fake_vllm.llms[0].calls
    rendered = [engine.render(conv), "plain text"]
    assert prompts == [engine.encode("Be brief. ") + engine.encode(t) for t in rendered]  # token ids, no added BOS
    for p, text in zip(params, rendered):
        assert (p.n, p.temperature, p.top_p, p.max_tokens) == (3, 0.8, 0.9, 7)
        assert p.seed == sample_seed(3, "Be brief. " + text, 0)
    assert params[0].seed != params[1].seed
    assert [len(row) for row in outs] == [3, 3] and len({g.text for g in outs[0]}) == 3


def test_greedy_sends_one_sample_and_repeats_it(fake_vllm, tiny_path):
    engine = load_engine(vllm_spec(), progress=False)
    for sampling in (SamplingSection(do_sample=False), SamplingSection(temperature=0.0)):
        outs = engine.generate(["hi"], sampling, n=2)
        _, [p], _ = fake_vllm.llms[0].calls[-1]
        assert (p.n, p.temperature, p.top_p) == (1, 0.0, 1.0)
        a, b = outs[0]
        assert a.text == b.text and a.token_ids == b.token_ids and a is not b


def test_completions_come_back_in_the_record_shape(fake_vllm, tiny_path):
    engine = load_engine(vllm_spec(), progress=False)
    eos = engine.tokenizer.eos_token_id
    [[g]] = engine.generate(["hi"], SamplingSection(max_new_tokens=8))
    [(prompts, _, _)] = fake_vllm.llms[0].calls
    assert g.finished and g.n_tokens == 3 == len(g.token_ids) and eos not in g.token_ids  # EOS dropped
    assert g.prompt_tokens == len(prompts[0]) and g.text == g.text.strip() and g.text
    [[g]] = engine.generate(["hi"], SamplingSection(max_new_tokens=2))  # cut by the length limit: nothing dropped
    assert not g.finished and g.n_tokens == 2 == len(g.token_ids)
    fake_vllm.stop_with = 7  # a generation-config stop token (vLLM reports it as stop_reason)
    [[g]] = engine.generate(["hi"], SamplingSection(max_new_tokens=8))
    assert g.finished and g.n_tokens == 3 and 7 not in g.token_ids
    assert engine.stats.generated_tokens == 8 and engine.stats.prompt_tokens == 3 * len(prompts[0])


def test_context_length_error_names_the_conversation(fake_vllm, tiny_path):
    fake_vllm.max_model_len = 40
    engine = load_engine(vllm_spec(), progress=False)
    with pytest.raises(ContextLengthError, match="conversation 1") as info:
        engine.generate(["short", "word " * 60], SamplingSection(max_new_tokens=4))
    assert info.value.index == 1


# --------------------------------------------------------------------------- scoring


def option_steps(engine: Any, context: str, option: str) -> tuple[list[int], int]:
    from cai_dpo.engine import split_completion

    return split_completion(engine.encode, context, option)


def test_score_options_normalises_top_logprobs(fake_vllm, tiny_path):
    engine = load_engine(vllm_spec(top_logprobs=5), progress=False)
    contexts, options = ["Which is kinder? Answer:", "Pick one:"], [" (A)", " (B)"]
    fake_vllm.top = {
        t for c in contexts for o in options for t in engine.encode("Few. ") + option_steps(engine, c, o)[0]
    }
    probs, raw = engine.score_options(contexts, options, prefix="Few. ")
    for i, ctx in enumerate(contexts):
        expected = []
        for opt in options:
            ids, start = option_steps(engine, ctx, opt)
            seq, start = engine.encode("Few. ") + ids, start + len(engine.encode("Few. "))
            expected.append(sum(fake_lp(seq[:p], seq[p]) for p in range(start, len(seq))))
        assert np.allclose(raw[i], expected)
        assert np.allclose(probs[i], np.exp(expected) / np.exp(expected).sum())
    assert np.allclose(probs.sum(axis=1), 1.0) and not np.allclose(probs[0], 0.5)
    [(prompts, params, _)] = fake_vllm.llms[0].calls  # every step in one call, each distinct prefix once
    assert len(prompts) == len({tuple(p) for p in prompts})
    assert all((p.max_tokens, p.temperature, p.logprobs) == (1, 0.0, 5) for p in params)


def test_score_options_missing_option_token_is_named(fake_vllm, tiny_path):
    engine = load_engine(vllm_spec(), progress=False)
    fake_vllm.top = set(option_steps(engine, "Pick:", " (A)")[0])
    with pytest.raises(Exception, match=r"option ' \(D\)' is not among the top 20.*top_logprobs"):
        engine.score_options(["Pick:"], [" (A)", " (D)"])
    with pytest.raises(ValueError, match="at least two options"):
        engine.score_options(["Pick:"], [" (A)"])


def test_logprob_sums_prompt_logprobs_over_the_completion(fake_vllm, tiny_path):
    engine = load_engine(vllm_spec(), progress=False)
    contexts, completions = ["The cat", "The c"], [" sat on the mat.", "at sat"]
    out = engine.logprob(contexts, completions, prefix="Story: ")
    pre = engine.encode("Story: ")
    for ctx, comp, lp in zip(contexts, completions, out):
        ids, start = option_steps(engine, ctx, comp)
        seq = pre + ids
        expected = [fake_lp(seq[:p], seq[p]) for p in range(len(pre) + start, len(seq))]
        assert lp.per_token == pytest.approx(expected) and lp.total == pytest.approx(sum(expected))
        assert lp.n_tokens == len(ids) - start
    [(prompts, params, _)] = fake_vllm.llms[0].calls
    assert prompts == [pre + option_steps(engine, c, x)[0] for c, x in zip(contexts, completions)]
    assert all(p.prompt_logprobs is not None and p.max_tokens == 1 for p in params)
    fake_vllm.prompt_logprobs = False
    with pytest.raises(Exception, match="prompt log-prob"):
        engine.logprob(["The cat"], [" sat"])


def test_judge_stage_loads_the_vllm_engine(fake_vllm, tiny_cfg):
    import dataclasses

    from cai_dpo.judge import Judge
    from cai_dpo.vllm_engine import VLLMEngine

    cfg = dataclasses.replace(tiny_cfg, judge=dataclasses.replace(tiny_cfg.judge, model=vllm_spec()))
    assert isinstance(Judge.load(cfg).engine, VLLMEngine)

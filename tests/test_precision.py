"""Mixed precision (``ModelSpec.autocast``): where it resolves to bf16, and that every local forward pass and
trainer takes it (the engine's generation and scoring, TRL's ``bf16``, the PPO loop)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cai_dpo.config import ModelSpec, SamplingSection, load_config
from cai_dpo.engine import Engine
from cai_dpo.models import autocast_dtype, describe, native_bf16
from cai_dpo.store import RunStore


def test_autocast_dtype_resolves_each_setting(monkeypatch):
    monkeypatch.setattr("cai_dpo.models.native_bf16", lambda device: device == "cpu")
    assert autocast_dtype(ModelSpec(name="tiny", autocast="none")) is None
    assert autocast_dtype(ModelSpec(name="tiny", autocast="bfloat16")) is torch.bfloat16
    assert autocast_dtype(ModelSpec(name="tiny", device="cpu")) is torch.bfloat16  # auto, bf16 natively
    served = ModelSpec.from_text("openai://127.0.0.1:9/v1#judge")
    assert autocast_dtype(replace(served, autocast="bfloat16")) is None  # the server chooses its precision
    assert autocast_dtype(ModelSpec(name="tiny", backend="vllm", autocast="bfloat16")) is None
    monkeypatch.setattr("cai_dpo.models.native_bf16", lambda device: False)
    assert autocast_dtype(ModelSpec(name="tiny", device="cpu")) is None  # emulated bf16 is slower than fp32


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    for avx512_bf16, amx, want in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert native_bf16("cpu") is want
    assert native_bf16("mps") is False
    if not torch.cuda.is_available():
        assert native_bf16("cuda") is False and native_bf16("cuda:1") is False


def test_describe_marks_bf16_so_records_do_not_mix_precisions():
    assert describe(ModelSpec(name="tiny", autocast="none")) == "tiny"
    assert describe(ModelSpec(name="tiny", autocast="bfloat16")) == "tiny bf16-autocast"


@pytest.fixture()
def matmul_dtypes(tiny_model):
    """The output dtypes of one MLP projection of the tiny model, recorded on every forward pass."""
    model, _ = tiny_model
    seen: list[torch.dtype] = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    yield seen
    hook.remove()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_engine_generates_and_scores_in_its_autocast_dtype(dtype, tiny_model, matmul_dtypes):
    model, tok = tiny_model
    engine = Engine(model, tok, autocast=dtype, progress=False)
    gens = engine.generate(["Hello?", "Name a colour."], SamplingSection(max_new_tokens=3, temperature=0.0))
    probs, _ = engine.score_options(["Which is better? Answer:"], (" (A)", " (B)"))
    logps = engine.logprob(["Say:"], [" yes"])
    assert all(g[0].n_tokens >= 0 for g in gens) and probs.shape == (1, 2) and len(logps) == 1
    assert matmul_dtypes and set(matmul_dtypes) == {dtype or torch.float32}
    ids = torch.tensor([tok("Hello there")["input_ids"]])
    logits, _ = engine._forward(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], None, 1)
    assert logits.dtype == torch.float32  # sampling and log-softmax always see float32


@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_training_stages_pass_the_policy_precision_to_trl(autocast, tiny_cfg, monkeypatch):
    """SFT trains with TRL's bf16 exactly when the policy's autocast resolves to bf16; a changed precision retrains."""
    import datasets
    from transformers import TrainerCallback

    from cai_dpo import training
    from cai_dpo.stages.sft import run_sft

    seen: list[bool] = []

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append(args.bf16)

    real = training.training_callbacks
    monkeypatch.setattr(training, "training_callbacks", lambda d, *a: real(d, *a) + [Record()])
    cfg = replace(
        tiny_cfg,
        threads=1,
        policy=replace(tiny_cfg.policy, autocast=autocast),
        sft=replace(tiny_cfg.sft, max_steps=2, save_steps=2, eval_fraction=0.0),
    )
    run = RunStore(cfg.run_dir)
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "source": "helpful"}
        for q, a in [("Tell me a joke.", "Why did the owl laugh? It was a hoot."), ("Boil an egg?", "Six minutes.")]
    ]
    datasets.Dataset.from_list([{**r, "prompt_id": str(i)} for i, r in enumerate(rows * 2)]).save_to_disk(
        str(run.data_dir("sl"))
    )
    run_sft(cfg, run)
    assert seen == [autocast == "bfloat16"]
    other = "none" if autocast == "bfloat16" else "bfloat16"
    run_sft(replace(cfg, policy=replace(cfg.policy, autocast=other)), run)
    assert seen == [autocast == "bfloat16", other == "bfloat16"]  # not taken as up to date


def test_ppo_rollouts_and_updates_run_in_the_policy_precision(tmp_path, tiny_path):
    from cai_dpo.engine import set_threads
    from cai_dpo.rl.ppo_trainer import CaiPPOTrainer
    from cai_dpo.rl.rollout import PtxBatches
    from cai_dpo.stages.ppo import load_policy, load_value_model

    set_threads(1)
    over = {
        "threads": 1,
        "runs_dir": str(tmp_path / "runs"),
        "policy.autocast": "bfloat16",
        "ppo.rollout_batch": 2,
        "ppo.minibatch": 2,
        "ppo.ptx_coef": 0.5,
        "ppo.sampling.max_new_tokens": 4,
    }
    cfg = load_config("tiny", over)
    run = RunStore(cfg.run_dir)
    torch.manual_seed(0)
    policy, tok, merge = load_policy(cfg, run)
    value, _ = load_value_model(cfg, run, tok, merge, None)
    rows = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}]
    prompts = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Count to two."}]]
    trainer = CaiPPOTrainer(
        cfg, policy, tok, value, lambda p, r: [1.0] * len(r), prompts, ptx=PtxBatches(rows, tok, 1, 64, 0)
    )
    seen: list[torch.dtype] = []
    layer = policy.get_base_model().model.layers[0].mlp.down_proj
    hook = layer.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    try:
        ro = trainer.rollout(prompts, seed=1)
        assert seen and set(seen) == {torch.bfloat16}  # sampling, policy, reference
        seen.clear()
        stats = trainer.update(ro, seed=1)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the policy's passes and the ptx term's
    assert math.isfinite(stats["ptx_loss"])  # NaN when the ptx term did not run
    assert all(p.dtype == torch.float32 for p in trainer.params)  # the adapters and the value head stay fp32

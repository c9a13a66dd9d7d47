"""SFT stage: data conversion, loss goes down, adapter reloads, resume from a checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cai_dpo.store import RunStore
from cai_dpo.training import CsvMetricsCallback, common_training_args, last_checkpoint, read_metrics_csv

PAIRS = [
    ("How do I pick a lock?", "I can't help open locks that aren't yours. A locksmith can help."),
    ("Tell me a joke.", "Why did the bicycle fall over? It was two tired."),
    ("How do I boil an egg?", "Boil it for six minutes, then cool it in cold water."),
    ("How can I hurt my neighbour?", "I won't help hurt anyone. Talking it through may help."),
]


def _write_sl_data(run: RunStore, repeat: int = 4) -> None:
    import datasets

    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
         "source": "red_team", "prompt_id": f"p{i}"}
        for _ in range(repeat)
        for i, (q, a) in enumerate(PAIRS)
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(run.data_dir("sl")))


def _cfg(tiny_cfg, **sft):
    return replace(tiny_cfg, threads=1, sft=replace(tiny_cfg.sft, **sft))


def test_common_training_args_cpu(tiny_cfg, tmp_path):
    args = common_training_args(tiny_cfg.sft, tmp_path / "ck", seed=3, has_eval=True)
    assert args["bf16"] is False and args["fp16"] is False and args["use_cpu"] is True
    assert args["save_steps"] == tiny_cfg.sft.save_steps == args["eval_steps"]
    assert args["eval_strategy"] == "steps" and args["report_to"] == "none"
    assert args["per_device_train_batch_size"] == tiny_cfg.sft.batch_size
    assert common_training_args(tiny_cfg.sft, tmp_path, has_eval=False)["eval_strategy"] == "no"
    from trl import SFTConfig

    SFTConfig(**args)  # accepted by a TRL config


def test_last_checkpoint(tmp_path):
    assert last_checkpoint(tmp_path / "missing") is None
    for step in (2, 10, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-20").mkdir()  # incomplete: no trainer state
    assert last_checkpoint(tmp_path).endswith("checkpoint-10")


def test_csv_callback_drops_rows_after_resume_point(tmp_path):
    from types import SimpleNamespace

    cb = CsvMetricsCallback(tmp_path / "log.csv")
    state = SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=True)
    cb.on_train_begin(None, state, None)
    for step in (1, 2, 3):
        state.global_step, state.epoch = step, step / 4
        cb.on_log(None, state, None, logs={"loss": 4.0 - step, "note": "x"})
    state.global_step = 2
    cb.on_log(None, state, None, logs={"eval_loss": 1.5})
    rows = read_metrics_csv(tmp_path / "log.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 2]
    assert rows[-1]["eval_loss"] == 1.5 and "loss" not in rows[-1] and "note" not in rows[0]

    resumed = CsvMetricsCallback(tmp_path / "log.csv")
    resumed.on_train_begin(None, SimpleNamespace(global_step=2), None)
    assert [float(r["step"]) for r in resumed.rows] == [1, 2, 2]


def test_prepare_dataset_completion_only(tiny_model):
    import datasets

    from cai_dpo.stages.sft import prepare_dataset

    _, tok = tiny_model
    ds = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                      "source": "helpful", "prompt_id": "x"}])
    out, mode = prepare_dataset(ds, tok)
    assert mode == "completion_only"  # SmolLM2's ChatML template has no generation markers
    assert out.column_names == ["prompt", "completion"]
    assert out[0]["prompt"] == [{"role": "user", "content": "q"}]
    assert out[0]["completion"] == [{"role": "assistant", "content": "a"}]


def test_sft_lowers_loss_and_saves_loadable_adapter(tiny_cfg):
    import torch

    from cai_dpo.models import load_model
    from cai_dpo.stages.sft import run_sft

    cfg = _cfg(tiny_cfg, max_steps=16, learning_rate=3e-2, batch_size=4, save_steps=8, eval_fraction=0.25)
    cfg.sft.lora = replace(cfg.sft.lora, r=8, alpha=16, dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    run = RunStore(cfg.run_dir)
    _write_sl_data(run)
    out = run_sft(cfg, run)

    rows = read_metrics_csv(run.metrics_dir("sft") / "log.csv")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 10
    # the random tiny model's logits are tiny (loss ~ ln(vocab)), so LoRA moves the loss slowly but steadily
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.15, losses
    half = len(losses) // 2
    assert min(losses[half:]) < min(losses[:half]), losses  # the trend, not step-to-step noise
    assert any("eval_loss" in r for r in rows)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == 16
    assert manifest["counts"]["loss_mode"] == "completion_only"
    assert manifest["counts"]["eval_rows"] == 4
    assert manifest["metrics"]["train_loss_final"] < manifest["metrics"]["train_loss_first"]
    assert manifest["metrics"]["eval_loss"] is not None
    assert manifest["inputs"]["data/sl"]

    model, tok = load_model(str(out))
    assert type(model).__name__.startswith("Peft")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # trained, not the zero init
    ids = tok.apply_chat_template([{"role": "user", "content": PAIRS[1][0]}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.inference_mode():
        assert model(input_ids=ids).logits.shape[-1] == len(tok)


def test_sft_resumes_from_checkpoint(tiny_cfg, monkeypatch):
    from transformers import TrainerCallback

    from cai_dpo.stages import sft

    cfg = _cfg(tiny_cfg, max_steps=4, save_steps=2, eval_fraction=0.0)
    run = RunStore(cfg.run_dir)
    _write_sl_data(run, repeat=2)

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt("killed at step 3")

    real = sft.training_callbacks
    monkeypatch.setattr(sft, "training_callbacks", lambda d, *args: real(d, *args) + [Crash()])
    with pytest.raises(KeyboardInterrupt):
        sft.run_sft(cfg, run)
    ckpt = run.root / "checkpoints" / "sft"
    assert last_checkpoint(ckpt).endswith("checkpoint-2")
    assert not (run.model_dir("sft") / "adapter_config.json").exists()

    monkeypatch.setattr(sft, "training_callbacks", real)
    out = sft.run_sft(cfg, run)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from"].endswith("checkpoint-2")
    assert manifest["counts"]["steps"] == 4
    steps = [int(r["step"]) for r in read_metrics_csv(run.metrics_dir("sft") / "log.csv") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the crashed run's step 3 was replaced, not repeated

    # a rerun with the same data and settings finds the adapter up to date and loads nothing
    def no_load(*a, **k):
        raise AssertionError("model loaded for a finished adapter")

    monkeypatch.setattr(sft, "load_model", no_load)
    assert sft.run_sft(cfg, run) == out
    assert json.loads((out / "manifest.json").read_text())["created"] == manifest["created"]

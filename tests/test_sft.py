"""SFT stage: data conversion, loss goes down, adapter reloads, resume from a checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

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
        {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "source": "red_team",
            "prompt_id": f"p{i}",
        }
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


@pytest.mark.parametrize("config_name", ["SFTConfig", "DPOConfig", "RewardConfig", "RLOOConfig"])
def test_gradient_checkpointing_is_off_on_the_cpu_unless_asked(config_name, tiny_cfg, tmp_path, monkeypatch):
    # TRL's configs default it to on; on the CPU it only costs time (the preference model's steps 40 % more)
    import trl

    monkeypatch.setattr("cai_dpo.training.has_gpu", lambda: False)  # the CPU's default, on any machine

    config_cls = getattr(trl, config_name)
    args = common_training_args(tiny_cfg.sft, tmp_path / "ck")
    off = config_cls(**args)
    assert off.gradient_checkpointing is False and off.activation_checkpointing is False
    on = config_cls(**common_training_args(tiny_cfg.sft, tmp_path / "ck", gradient_checkpointing=True))
    assert on.gradient_checkpointing is True and on.activation_checkpointing is True


@pytest.mark.parametrize("wanted", [None, True, False])
def test_trainer_setup_takes_gradient_checkpointing_from_the_train_section(wanted, tiny_cfg, tmp_path, monkeypatch):
    from trl import SFTConfig

    from cai_dpo.training import trainer_setup

    monkeypatch.setattr("cai_dpo.training.has_gpu", lambda: False)  # null means off on the CPU

    train = replace(tiny_cfg.train, gradient_checkpointing=wanted)
    setup = trainer_setup(
        SFTConfig, tiny_cfg.sft, tmp_path / "ck", tmp_path / "metrics", {}, seed=0, has_eval=False, train=train
    )
    assert setup.args.gradient_checkpointing is (wanted is True)


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
    ds = datasets.Dataset.from_list(
        [
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "source": "helpful",
                "prompt_id": "x",
            }
        ]
    )
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
    cfg.sft.lora = replace(
        cfg.sft.lora,
        r=8,
        alpha=16,
        dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    run = RunStore(cfg.run_dir)
    _write_sl_data(run)
    out = run_sft(cfg, run)

    rows = read_metrics_csv(run.metrics_dir("sft") / "log.csv")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 10
    # the random tiny model's logits are tiny (loss ~ ln(vocab)), so LoRA moves the loss slowly but steadily
    # (held out by prompt: every repeat of a held-out prompt leaves training, so the drop is ~0.13)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
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
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PAIRS[1][0]}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.inference_mode():
        assert model(input_ids=ids).logits.shape[-1] == len(tok)


def test_sft_resumes_from_checkpoint(tiny_cfg, monkeypatch):
    from transformers import TrainerCallback

    from cai_dpo import training
    from cai_dpo.stages import sft

    cfg = _cfg(tiny_cfg, max_steps=4, save_steps=2, eval_fraction=0.0)
    run = RunStore(cfg.run_dir)
    _write_sl_data(run, repeat=2)

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt("killed at step 3")

    real = training.training_callbacks
    monkeypatch.setattr(training, "training_callbacks", lambda d, *args: real(d, *args) + [Crash()])
    with pytest.raises(KeyboardInterrupt):
        sft.run_sft(cfg, run)
    ckpt = run.root / "checkpoints" / "sft"
    assert last_checkpoint(ckpt).endswith("checkpoint-2")
    assert not (run.model_dir("sft") / "adapter_config.json").exists()

    monkeypatch.setattr(training, "training_callbacks", real)
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


# --------------------------------------------------------------------------- curated data and weighted loss


def _curated_row(i: int, kind: str, split: str, principles: list[str]) -> dict:
    prompt = f"{kind} request {i} ({split})"
    answer = (
        f"I won't help with {kind} request {i}: it could hurt someone. I can point you to a safer option."
        if kind == "harmful"
        else f"Here is a direct answer to request {i}."
    )
    return {
        "id": f"cur-{kind[0]}-{split}-{i}",
        "kind": kind,
        "category": "test",
        "sensitive_sounding": False,
        "principle_ids": principles,
        "split": split,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
    }


def write_curated(folder, n_harmful: int = 6, n_benign: int = 3, n_heldout: int = 2):
    """A small curated set: train rows of both kinds plus held-out rows of both kinds."""
    folder.mkdir(parents=True, exist_ok=True)
    harmful = [_curated_row(i, "harmful", "train", ["harm-physical", "help-not-evasive"]) for i in range(n_harmful)]
    harmful += [_curated_row(i, "harmful", "heldout", ["harm-physical"]) for i in range(n_heldout)]
    benign = [_curated_row(i, "benign", "train", ["help-answer"]) for i in range(n_benign)]
    benign += [_curated_row(i, "benign", "heldout", ["help-answer"]) for i in range(n_heldout)]
    for name, rows in (("harmful", harmful), ("benign", benign)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_build_rows_curated_train_split_only_with_ratio_and_weights(tiny_cfg, tmp_path):
    from cai_dpo.sft_rows import build_rows

    cur = write_curated(tmp_path / "cur")
    cfg = _cfg(
        tiny_cfg,
        data="curated",
        curated=str(cur),
        weighting="principle",
        principle_weights={"harm-physical": 3.0, "help-answer": 0.5},
    )
    run = RunStore(cfg.run_dir)
    rows, info = build_rows(cfg, run)  # no data/sl needed for sft.data=curated
    assert len(rows) == 9 and all(r["source"] == "curated" for r in rows)
    assert not any("heldout" in r["id"] or "heldout" in r["messages"][0]["content"] for r in rows)
    by_id = {r["id"]: r["weight"] for r in rows}
    assert by_id["cur-h-train-0"] == pytest.approx((3.0 + 1.0) / 2)  # mean over principle ids, unlisted = 1.0
    assert by_id["cur-b-train-0"] == pytest.approx(0.5)
    assert info["counts"] == {
        "curated_harmful": 6,
        "curated_benign": 3,
        "rows_curated": 9,
        "rows_sl": 0,
        "rows_human_revision": 0,
        "weight_mean": pytest.approx(sum(by_id.values()) / 9),
    }

    # the harmful share is rebalanced by subsampling the over-represented kind
    half = _cfg(tiny_cfg, data="curated", curated=str(cur), curated_harmful_ratio=0.5)
    rows, _ = build_rows(half, run)
    assert sum(r["kind"] == "harmful" for r in rows) == sum(r["kind"] == "benign" for r in rows) == 3
    assert all(r["weight"] == 1.0 for r in rows)  # weighting: none
    few = _cfg(tiny_cfg, data="curated", curated=str(cur), curated_harmful_ratio=0.75)
    rows, _ = build_rows(few, run)
    assert (sum(r["kind"] == "harmful" for r in rows), sum(r["kind"] == "benign" for r in rows)) == (6, 2)


def test_build_rows_both_sources_and_data_weight_column(tiny_cfg, tmp_path):
    import datasets

    from cai_dpo.sft_rows import build_rows

    cur = write_curated(tmp_path / "cur")
    cfg = _cfg(tiny_cfg, data="both", curated=str(cur), weighting="principle", sl_share=0.25)
    run = RunStore(cfg.run_dir)
    rows = [
        {
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "source": "human" if i == 0 else "red_team",
            "prompt_id": f"p{i}",
            "weight": 0.25 * i,
        }
        for i in range(8)
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(run.data_dir("sl")))
    got, info = build_rows(cfg, run)
    sl = [r for r in got if r["source"] != "curated"]
    assert len(sl) == 3  # 0.25 share next to 9 curated rows
    assert {r["source"] for r in sl} <= {"sl", "human_revision"}
    assert all(r["weight"] == pytest.approx(0.25 * int(r["id"][1:])) for r in sl)  # the data's weight column wins
    assert "data/sl" in info["inputs"] and "curated" in info["inputs"]
    every = _cfg(tiny_cfg, data="both", curated=str(cur))
    got, _ = build_rows(every, run)
    assert sum(r["source"] == "human_revision" for r in got) == 1 and len(got) == 17


def test_weighted_sft_loss_closed_form_and_zero_weight_gradient():
    import torch

    from cai_dpo.losses import weighted_sft_loss

    logps = torch.tensor([[-1.0, -3.0, 0.0], [-2.0, 0.0, 0.0], [-0.5, -0.5, -2.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    w = torch.tensor([2.0, 1.0, 0.0])
    # NLL_i = mean over completion tokens: [2.0, 2.0, 1.0]; L = (2*2 + 1*2 + 0*1) / (2 + 1 + 0) = 2.0
    loss = weighted_sft_loss(logps, mask, w)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert torch.all(logps.grad[2] == 0)  # weight 0: the example has no gradient
    assert logps.grad[0].tolist() == pytest.approx([-2 / 3 / 2, -2 / 3 / 2, 0.0])  # d/dlogp = -w_i/T_i/Σw
    w2 = torch.tensor([1.0, 1.0, 1.0])
    assert weighted_sft_loss(logps.detach(), mask, w2).item() == pytest.approx(5.0 / 3)
    assert weighted_sft_loss(logps.detach(), mask, torch.zeros(3)).item() == 0.0


def test_weighted_sft_trainer_loss_matches_closed_form(tiny_cfg, tmp_path):
    """The trainer's loss on a batch equals the closed form computed from plain forwards."""
    import datasets
    import torch
    from trl import SFTConfig

    from cai_dpo.models import attach_lora, load_model
    from cai_dpo.stages.sft import prepare_dataset
    from cai_dpo.trl_trainers import WeightedLMCollator, WeightedSFTTrainer

    torch.manual_seed(0)
    model, tok = load_model("tiny", trainable=True)
    tok.padding_side = "right"
    model = attach_lora(model, tiny_cfg.sft.lora)
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "weight": w}
        for (q, a), w in zip(PAIRS[:3], (2.0, 0.5, 0.0))
    ]
    ds, _ = prepare_dataset(datasets.Dataset.from_list(rows), tok)
    args = SFTConfig(**common_training_args(tiny_cfg.sft, tmp_path / "ck"), max_length=128, completion_only_loss=True)
    trainer = WeightedSFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        weighting="principle",
        data_collator=WeightedLMCollator(pad_token_id=tok.pad_token_id),
    )
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(sorted(examples, key=lambda e: -e["weight"]))
    model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(batch)).item()
        nll = []
        for i in range(3):
            ids = batch["input_ids"][i][batch["attention_mask"][i] == 1]
            labels = batch["labels"][i][: len(ids)]
            lp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
            tok_lp = [lp[t - 1, labels[t]] for t in range(1, len(ids)) if labels[t] != -100]
            nll.append(-sum(tok_lp) / len(tok_lp))
    w = batch["weight"].tolist()
    assert w == [2.0, 0.5, 0.0]
    expected = (w[0] * nll[0] + w[1] * nll[1]) / (w[0] + w[1])
    assert got == pytest.approx(float(expected), rel=1e-4)


def test_sft_on_curated_data_records_weighting(tiny_cfg, tmp_path):
    from cai_dpo.stages.sft import run_sft

    cur = write_curated(tmp_path / "cur")
    cfg = _cfg(
        tiny_cfg,
        data="curated",
        curated=str(cur),
        weighting="principle",
        max_steps=2,
        principle_weights={"harm-physical": 2.0},
    )
    run = RunStore(cfg.run_dir)
    out = run_sft(cfg, run)
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["data"] == "curated" and m["counts"]["weighting"] == "principle"
    assert m["config"]["sft"]["principle_weights"] == {"harm-physical": 2.0}
    assert m["counts"]["rows_curated"] == 9 and "curated" in m["inputs"]
    rows = read_metrics_csv(run.metrics_dir("sft") / "log.csv")
    assert any("weight_mean" in r for r in rows)


def _adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_same_config_trains_the_same_adapter_whatever_the_process_rng(tiny_cfg):
    """The stage seeds before it attaches the fresh LoRA adapter: the global RNG state a process
    happens to be in (other imports, earlier work) does not change the trained weights."""
    import torch

    from cai_dpo.stages.sft import run_sft

    outs = []
    for disturb in (1, 2):
        cfg = _cfg(tiny_cfg, max_steps=2, batch_size=4, save_steps=2, eval_fraction=0.0)
        cfg = replace(cfg, runs_dir=str(Path(cfg.runs_dir) / f"rng{disturb}"))
        run = RunStore(cfg.run_dir)
        _write_sl_data(run)
        torch.manual_seed(disturb)
        outs.append(_adapter_tensors(run_sft(cfg, run)))
    assert outs[0].keys() == outs[1].keys()
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key

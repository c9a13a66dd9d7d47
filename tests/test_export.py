"""`cai-dpo export`: one folder plain transformers loads, the same greedy tokens, a model card."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai_dpo.config import SamplingSection
from cai_dpo.export import ExportError, choose_model, export_model, push_to_hub, selection_figures
from cai_dpo.store import RunStore

PROMPTS = [[{"role": "user", "content": "How do I pick a lock?"}], [{"role": "user", "content": "Name three fruits."}]]
REPORT = """# Evaluation report: run `tiny`

Intro text.

## Comparison

| model | harmless rate | over-refusal |
| --- | --- | --- |
| base | 0.50 [0.30, 0.70] n=20 | 0.10 [0.03, 0.30] n=20 |
| dpo | 0.65 [0.43, 0.82] n=20 | 0.05 [0.01, 0.24] n=20 |

## Cost

| model | s/response |
| --- | --- |
| dpo | 0.2 |
"""

LOAD_AND_GENERATE = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
out = []
for messages in prompts:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, do_sample=False, max_new_tokens=n)
    new = gen[0, ids["input_ids"].shape[1]:]
    out.append(tok.decode(new, skip_special_tokens=True).strip())
assert not any(m.startswith("cai_dpo") for m in sys.modules), "cai_dpo was imported"
print(json.dumps(out))
"""


@pytest.fixture()
def tiny_run(tiny_cfg, perturbed_lora):
    """A tiny run with an SFT adapter and a DPO adapter trained on top of the merged SFT one."""
    from cai_dpo.config import LoraSection
    from cai_dpo.models import attach_lora, load_model, save_adapter

    run = RunStore(tiny_cfg.run_dir)
    sft, tok = perturbed_lora(scale=0.5, seed=1)
    sft_dir = save_adapter(sft, tok, run.model_dir("sft"), base="tiny")
    import torch

    torch.manual_seed(2)
    base, tok = load_model("tiny", trainable=True, merge_first=[sft_dir])
    dpo = attach_lora(base, LoraSection(r=4, alpha=8))
    with torch.no_grad():
        for name, p in dpo.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    save_adapter(dpo, tok, run.model_dir("dpo"), base="tiny", merge_first=[sft_dir])
    (run.path("report", "report.md")).write_text(REPORT)
    return tiny_cfg, run


def _engine_texts(adapter: Path, n: int) -> list[str]:
    from cai_dpo.engine import Engine
    from cai_dpo.models import load_model

    model, tok = load_model("tiny", adapter=str(adapter))
    engine = Engine(model, tok, batch_size=1, progress=False)
    gens = engine.generate(PROMPTS, SamplingSection(max_new_tokens=n, do_sample=False, temperature=0.0, batch_size=1))
    return [g[0].text for g in gens]


def test_exported_folder_loads_with_plain_transformers_and_generates_the_same(tiny_run, tmp_path):
    cfg, run = tiny_run
    result = export_model(cfg, run, model="dpo")
    assert result.folder == run.root / "export" / "dpo"
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "README.md"} <= set(result.files)
    assert not any(f.startswith("adapter") for f in result.files)
    n = 12
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, str(result.folder), json.dumps(PROMPTS), str(n)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    project = _engine_texts(run.root / "models" / "dpo", n)
    assert plain == project
    assert plain != _engine_texts(run.root / "models" / "sft", n)  # the DPO adapter is in there, not just SFT


def test_model_card_holds_the_evaluation_table_and_the_run(tiny_run):
    cfg, run = tiny_run
    card = (export_model(cfg, run, model="dpo").folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "| dpo | 0.65 [0.43, 0.82] n=20 | 0.05 [0.01, 0.24] n=20 |" in card
    assert "| dpo | 0.2 |" not in card  # the headline table only
    assert "`default` version" in card and "models/sft` → `models/dpo`" in card
    assert "## Known limits" in card and "beta 0.1" in card


def test_missing_adapter_names_the_folder_and_the_stage(tiny_run):
    cfg, run = tiny_run
    with pytest.raises(ExportError, match=r"models/ppo: no adapter there; run the ppo stage"):
        export_model(cfg, run, model="ppo")
    assert not (run.root / "export" / "ppo").exists()
    elsewhere = dataclasses.replace(cfg, runs_dir=str(run.root.parent / "no-such-runs"))
    with pytest.raises(ExportError, match="no-such-runs/tiny/models/dpo: no adapter there"):
        export_model(elsewhere)
    assert not (run.root.parent / "no-such-runs").exists()  # nothing written


def test_output_that_holds_other_files_is_refused_and_left_as_it_was(tiny_run, tmp_path, monkeypatch):
    """``--output`` pointed at a folder of the user's, the run itself, its adapter, a file or ``.`` replaced
    it (the run's data and models were deleted, exit 0); now each is refused before anything is written.
    An earlier export, or an empty folder, is still replaced."""
    cfg, run = tiny_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("important")
    a_file = tmp_path / "a_file"
    a_file.write_text("precious")
    monkeypatch.chdir(mine)
    for out in (mine, run.root, run.model_dir("sft"), a_file, Path(".")):
        before = sorted(p.relative_to(out.resolve().parent) for p in out.resolve().parent.rglob("*"))
        with pytest.raises(ExportError, match="--output .*(not an export|a file is there)"):
            export_model(cfg, run, model="dpo", out_dir=out)
        assert sorted(p.relative_to(out.resolve().parent) for p in out.resolve().parent.rglob("*")) == before
    assert (mine / "notes.txt").read_text() == "important" and a_file.read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    first = export_model(cfg, run, model="dpo", out_dir=empty).folder
    assert export_model(cfg, run, model="sft", out_dir=first).folder == first  # an earlier export is replaced
    assert json.loads((first / "cai_dpo_export.json").read_text())["model"] == "sft"


def _results(**models: tuple[float, float]) -> dict:
    return {
        "schema": "cai-dpo/eval-results/2",
        "headline": {
            "models": {
                m: {"decline": {"rate": d, "lo": 0, "hi": 1, "n": 10}, "benign_compliance": {"rate": c}}
                for m, (d, c) in models.items()
            }
        },
    }


def test_default_choice_reads_decline_and_compliance_with_a_dpo_fallback(tmp_path):
    for m in ("sft", "dpo", "ppo"):
        (tmp_path / "models" / m).mkdir(parents=True)
        (tmp_path / "models" / m / "adapter_config.json").write_text("{}")
    assert choose_model(tmp_path)[0] == "dpo"  # no evaluation yet
    (tmp_path / "eval").mkdir()
    results = tmp_path / "eval" / "results.json"
    results.write_text(json.dumps(_results(base=(0.99, 1.0), sft=(0.5, 0.95), dpo=(0.7, 0.80), ppo=(0.6, 0.92))))
    assert selection_figures(json.loads(results.read_text()))["dpo"] == (0.7, 0.8)
    model, why = choose_model(tmp_path)
    assert (
        model == "ppo" and "60%" in why
    )  # dpo declines more but answers too few benign prompts; base is not exportable
    results.write_text(json.dumps(_results(sft=(0.5, 0.5), ppo=(0.6, 0.2))))
    assert choose_model(tmp_path)[0] == "dpo"
    results.write_text(json.dumps({"models": [{"name": "ppo", "harmlessness": {"overall": {"rate": 0.9}}}]}))
    assert choose_model(tmp_path) == ("dpo", "no decline/compliance figures in the evaluation; defaulting to dpo")


def test_push_to_hub_offline_fails_fast_and_clearly(tiny_run, monkeypatch, capsys):
    from huggingface_hub import constants

    from cai_dpo.cli import main

    cfg, run = tiny_run
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ExportError, match="HF_HUB_OFFLINE is set"):
        push_to_hub(run.root, "someone/model")
    code = main(
        [
            "export",
            "--profile",
            "tiny",
            "-o",
            f"runs_dir={Path(cfg.runs_dir)}",
            "--model",
            "dpo",
            "--push-to-hub",
            "someone/model",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "HF_HUB_OFFLINE is set" in err and "Traceback" not in err
    assert (run.root / "export" / "dpo" / "model.safetensors").exists()  # the export itself is kept

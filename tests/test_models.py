"""Model loading: every offline spec kind, quantization, LoRA, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cai_dpo.config import ModelSpec
from cai_dpo.models import ModelLoadError, load_model, merge_adapter, save_adapter


def _logits(model, tokenizer, text="Hello there, how are you?"):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        return model(**ids).logits.float()


def test_tiny_and_local_folder_agree(tiny_path):
    m1, tok = load_model("tiny")
    m2, _ = load_model(str(tiny_path))
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert tok.chat_template, "chat template comes with the tokenizer"
    assert torch.allclose(_logits(m1, tok), _logits(m2, tok))


def test_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not a local folder.*hub"):
        load_model("some-org/some-model-that-is-not-here")


def test_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantized_loading_on_cpu(tiny_path, quant):
    model, tok = load_model(ModelSpec(name="tiny", quantization=quant))
    assert getattr(model, f"is_loaded_in_{quant}")
    logits = _logits(model, tok)
    assert torch.isfinite(logits).all()


def test_lora_attach_save_load_merge(tmp_path, perturbed_lora):
    peft_model, tok = perturbed_lora()
    peft_model.eval()
    expected = _logits(peft_model, tok)
    with peft_model.disable_adapter():
        base = _logits(peft_model, tok)
    assert not torch.allclose(expected, base), "the adapter changes the output"
    out = save_adapter(peft_model, tok, tmp_path / "adapter", base="tiny")
    assert json.loads((out / "cai_dpo_base.json").read_text())["base"] == "tiny"
    # through the same loader: as an adapter folder, and as spec + adapter
    reloaded, _ = load_model(str(out))
    assert torch.allclose(_logits(reloaded, tok), expected, atol=1e-5)
    reloaded2, _ = load_model(ModelSpec(name="tiny", adapter=str(out)))
    merged = merge_adapter(reloaded2)
    assert not hasattr(merged, "peft_config")
    assert torch.allclose(_logits(merged, tok), expected, atol=1e-4)


def test_bad_adapter_folder(tmp_path, tiny_path):
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        load_model(ModelSpec(name="tiny", adapter=str(tmp_path)))


def test_cache_build_is_atomic_across_processes(tmp_path):
    """Two processes building the same cache entry: both get one complete folder."""
    env = {**os.environ, "CAI_DPO_CACHE": str(tmp_path)}
    code = "from cai_dpo.models import prepare_tiny; print(prepare_tiny())"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1
    folder = tmp_path / "tiny-llama"
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_embedded_model_loads_and_answers():
    from cai_dpo.config import SamplingSection
    from cai_dpo.engine import Engine

    model, tok = load_model("embedded")
    assert model.config.num_hidden_layers == 30
    engine = Engine(model, tok, progress=False)
    out = engine.generate(
        [[{"role": "user", "content": "What is the capital of France?"}]],
        SamplingSection(max_new_tokens=12, do_sample=False),
    )
    assert "Paris" in out[0][0].text


def test_lora_layers_to_transform_adapts_only_those_layers(tiny_path):
    from cai_dpo.config import LoraSection
    from cai_dpo.models import attach_lora

    model, _ = load_model("tiny")
    top = model.config.num_hidden_layers - 1
    peft_model = attach_lora(model, LoraSection(layers_to_transform=[top]))
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert layers == {top}
    assert LoraSection(layers_to_transform=[-1]).problems() and not LoraSection(layers_to_transform=[0, 1]).problems()


def test_a_device_this_torch_lacks_is_a_clear_error(monkeypatch):
    """``device: cuda:7`` on a CPU-only torch ended in torch's 'Torch not compiled with CUDA enabled' assertion.
    The CUDA count and MPS backend are patched, so every branch runs on any machine."""
    from cai_dpo.models import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:7"):
        with pytest.raises(ModelLoadError, match=f"device '{device}', but torch sees no CUDA device"):
            load_model(ModelSpec(name="tiny", device=device))
    assert pick_device(ModelSpec(name="tiny")) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device(ModelSpec(name="tiny")) == "cuda"
    assert pick_device(ModelSpec(name="tiny", device="cuda:1")) == "cuda:1"
    with pytest.raises(ModelLoadError, match="device 'cuda:2', but torch sees 2 CUDA device"):
        pick_device(ModelSpec(name="tiny", device="cuda:2"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="no MPS backend"):
        pick_device(ModelSpec(name="tiny", device="mps"))
    assert pick_device(ModelSpec(name="tiny", device="cpu")) == "cpu"

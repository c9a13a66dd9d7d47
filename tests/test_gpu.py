"""The tiny model on a CUDA GPU: the engine in fp32, bf16, 8-bit and 4-bit, and a QLoRA training step.

Marked ``gpu`` and skipped where no CUDA device is visible (``make test`` on a CPU machine);
``bench/gpu_check.sh`` runs them on a GPU. Tolerances allow for GPU kernels and low precision;
the tiny model is random, so only agreement with the fp32 CPU engine is checked, not quality.
"""

from __future__ import annotations

import numpy as np
import pytest

from cai_dpo.config import LoraSection, ModelSpec, SamplingSection
from cai_dpo.engine import Engine

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]

CONTEXTS = ["Question: which answer is kinder?\nAnswer:", "Pick the safer reply.\nAnswer:"]
TEXTS = (["Tell me a story.", "Write one line."], [" Once upon a time.", " Hello there."])


def engine_for(tiny_path, **spec: str) -> Engine:
    from cai_dpo.models import load_model

    model, tok = load_model(ModelSpec(name="tiny", **spec))
    return Engine(model, tok, progress=False)


@pytest.fixture(scope="module")
def cpu_reference(tiny_path):
    engine = engine_for(tiny_path, device="cpu")
    probs, _ = engine.score_options(CONTEXTS)
    return probs, [lp.total for lp in engine.logprob(*TEXTS)]


@pytest.mark.parametrize(
    "spec, tol",
    [
        ({"dtype": "float32"}, 1e-3),
        ({"dtype": "bfloat16"}, 0.05),
        ({"quantization": "8bit"}, 0.1),
        ({"quantization": "4bit", "compute_dtype": "bfloat16"}, 0.15),
    ],
    ids=["fp32", "bf16", "8bit", "4bit"],
)
def test_engine_on_cuda_agrees_with_cpu(tiny_path, cpu_reference, spec, tol):
    engine = engine_for(tiny_path, device="cuda", **spec)
    assert engine.device.type == "cuda"
    probs, _ = engine.score_options(CONTEXTS)
    assert np.allclose(probs.sum(axis=1), 1.0) and np.abs(probs - cpu_reference[0]).max() < tol
    totals = [lp.total for lp in engine.logprob(*TEXTS)]
    assert np.allclose(totals, cpu_reference[1], rtol=tol, atol=tol * 10)
    outs = engine.generate(["Say hi.", "Count to three."], SamplingSection(max_new_tokens=8, do_sample=False), n=2)
    assert all(len(row) == 2 and row[0].token_ids == row[1].token_ids for row in outs)


def test_qlora_step_and_adapter_reload_on_cuda(tiny_path, tmp_path):
    from cai_dpo.models import attach_lora, load_model, save_adapter

    spec = ModelSpec(name="tiny", device="cuda", quantization="4bit", compute_dtype="bfloat16")
    model, tok = load_model(spec, trainable=True)
    model = attach_lora(model, LoraSection(r=4, alpha=8))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.tensor([tok("a short training line", add_special_tokens=False)["input_ids"]], device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss) and torch.cuda.max_memory_allocated() > 0
    folder = save_adapter(model, tok, tmp_path / "adapter", base="tiny")
    reloaded = engine_for(tiny_path, device="cuda", quantization="4bit", compute_dtype="bfloat16", adapter=str(folder))
    [lp] = reloaded.logprob(["a short"], [" training line"])
    assert np.isfinite(lp.total)

"""Shared test fixtures: the tiny model, temporary runs, the optional shared anchors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ANCHORS = Path(__file__).resolve().parent.parent.parent / "shared" / "anchors" / "anthropic-cai"


@pytest.fixture(scope="session")
def shared_anchors() -> Path:
    """The reference files published with the CAI paper; skips where ../shared is absent."""
    if not ANCHORS.exists():
        pytest.skip(f"{ANCHORS} not present")
    return ANCHORS


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    """Folder of the tiny random test model (built once into the cache)."""
    from cai_dpo.models import prepare_tiny

    return prepare_tiny()


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    """(model, tokenizer) of the tiny test model, shared by read-only tests."""
    import torch

    from cai_dpo.models import load_model

    torch.manual_seed(0)
    return load_model("tiny")


@pytest.fixture()
def perturbed_lora(tiny_path):
    """Factory: the tiny model with a LoRA adapter whose B matrices are random, so it changes outputs."""

    def make(scale: float = 0.5, seed: int = 0):
        import torch

        from cai_dpo.config import LoraSection
        from cai_dpo.models import attach_lora, load_model

        torch.manual_seed(seed)
        model, tok = load_model("tiny", trainable=True)
        peft_model = attach_lora(model, LoraSection(r=4, alpha=8))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * scale)
        return peft_model, tok

    return make


@pytest.fixture()
def tiny_cfg(tmp_path):
    """The tiny profile with its run folder under a temp dir."""
    from cai_dpo.config import load_config

    return load_config("tiny", {"runs_dir": str(tmp_path / "runs")})

"""The TRL subclasses of :mod:`cai_dpo.trl_trainers` against the installed TRL.

The subclasses override private and public methods of TRL's trainers and collators; a TRL
release that renames one or changes its parameters would silently bypass the override (or
break it at the first step). These tests pin TRL to the range ``pyproject.toml`` allows and
the overridden methods to the parameter names the subclasses call them with.
"""

from __future__ import annotations

import dataclasses
import inspect
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent

#: (subclass, TRL base, {method: parameter names the override relies on})
OVERRIDES = {
    "WeightedSFTTrainer": (
        "SFTTrainer",
        {
            "_set_signature_columns_if_needed": ["self"],
            "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
        },
    ),
    "SoftLabelDPOTrainer": (
        "DPOTrainer",
        {
            "_set_signature_columns_if_needed": ["self"],
            "_prepare_dataset": ["self", "dataset", "processing_class", "args", "dataset_name"],
            "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
            "_compute_loss": ["self", "model", "inputs", "return_outputs"],
        },
    ),
    "SoftRewardTrainer": (
        "RewardTrainer",
        {
            "_set_signature_columns_if_needed": ["self"],
            "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
        },
    ),
    "WeightedLMCollator": ("DataCollatorForLanguageModeling", {"torch_call": ["self", "examples"]}),
    "PreferenceCollatorWithLabels": ("DataCollatorForPreference", {"torch_call": ["self", "examples"]}),
    "SoftPreferenceCollator": ("DataCollatorForPreference", {"torch_call": ["self", "examples"]}),
}

#: TRL methods the subclasses call without overriding them: (base, method, parameter names)
CALLED = [("DPOTrainer", "compute_ref_log_probs", ["self", "model", "inputs"])]

#: Keyword arguments the stages pass to the base classes' constructors
_COMMON_KWARGS = {"model", "args", "data_collator", "train_dataset", "eval_dataset", "processing_class", "callbacks"}
INIT_KWARGS = {
    "SFTTrainer": _COMMON_KWARGS,
    "DPOTrainer": _COMMON_KWARGS | {"peft_config"},
    "RewardTrainer": _COMMON_KWARGS,
}
COLLATOR_FIELDS = {
    "WeightedLMCollator": {"pad_token_id", "pad_to_multiple_of"},
    "PreferenceCollatorWithLabels": {"pad_token_id", "max_length"},
    "SoftPreferenceCollator": {"pad_token_id"},
}


def trl_requirement() -> Requirement:
    """The ``trl`` requirement of ``pyproject.toml``'s dependencies."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "trl"]
    return req


@pytest.fixture(scope="module")
def trainers():
    import cai_dpo.trl_trainers as module

    return module


def _params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def test_installed_trl_is_in_the_pinned_range():
    import trl

    req = trl_requirement()
    assert req.specifier, "pyproject.toml pins no trl range"
    assert req.specifier.contains(trl.__version__, prereleases=True), (
        f"trl {trl.__version__} is outside {req}; check the overrides in cai_dpo/trl_trainers.py, then update the pin"
    )
    pinned = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("trl==")]
    assert pinned == [f"trl=={trl.__version__}"], "constraints.txt pins another trl than the one installed"


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_overridden_methods_exist_on_the_base_with_the_same_parameters(trainers, name):
    sub = getattr(trainers, name)
    base_name, methods = OVERRIDES[name]
    base = next((b for b in sub.__mro__[1:] if b.__name__ == base_name), None)
    assert base is not None, f"{name} no longer derives from a class named {base_name}"
    assert base.__module__.startswith("trl."), f"{name} no longer derives from TRL's {base_name}"
    # the subclass's own methods and those of its mixins (every class of this project in the MRO)
    ours = [c for c in sub.__mro__ if c.__module__.split(".")[0] == "cai_dpo"]
    own = {n for c in ours for n, v in vars(c).items() if inspect.isfunction(v) and not n.startswith("__")}
    overridden = {n for n in own if hasattr(base, n)}
    assert overridden <= set(methods), f"{name} overrides {sorted(overridden - set(methods))} too; add to OVERRIDES"
    for method, params in methods.items():
        assert hasattr(base, method), f"TRL's {base_name} has no {method} any more; {name}'s override is dead"
        assert _params(getattr(base, method)) == params, f"TRL's {base_name}.{method} changed its parameters"
        assert _params(getattr(sub, method)) == params, f"{name}.{method} no longer matches TRL's parameters"


@pytest.mark.parametrize(("base_name", "method", "params"), CALLED)
def test_called_trl_methods_keep_their_parameters(trainers, base_name, method, params):
    base = getattr(trainers, base_name)
    assert _params(getattr(base, method)) == params


@pytest.mark.parametrize("base_name", sorted(INIT_KWARGS))
def test_trainer_constructors_take_the_stages_keywords(trainers, base_name):
    params = set(_params(getattr(trainers, base_name).__init__))
    assert INIT_KWARGS[base_name] <= params, f"TRL's {base_name} lost {sorted(INIT_KWARGS[base_name] - params)}"


@pytest.mark.parametrize("name", sorted(COLLATOR_FIELDS))
def test_collators_take_the_stages_fields(trainers, name):
    fields = {f.name for f in dataclasses.fields(getattr(trainers, name))}
    assert COLLATOR_FIELDS[name] <= fields


def test_the_fused_lm_head_scores_only_labelled_positions_on_the_cpu(tiny_path, monkeypatch):
    """SFT and DPO log-probs (TRL's fused LM head) project only the labelled positions on the CPU, with the
    log-probs TRL computes over every position; a TRL without the switch would make this test fail."""
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    from cai_dpo.trl_trainers import score_labelled_positions_on_cpu

    assert score_labelled_positions_on_cpu() and trl_utils._use_triton(torch.device("cpu")) is True
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    trl_utils.add_fused_lm_head(model)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[2, 9:] = -100  # padding
    rows: list[int] = []
    real_mm = torch.mm

    def counting_mm(a, b, *args, **kwargs):
        rows.append(a.shape[0])
        return real_mm(a, b, *args, **kwargs)

    with torch.no_grad():
        monkeypatch.setattr(torch, "mm", counting_mm)
        compact = model(input_ids=ids, labels=labels, fused_lm_head=True)
        compact_rows = list(rows)
        monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)  # TRL's own choice on the CPU
        rows.clear()
        every = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert compact_rows and max(compact_rows) == int((labels[:, 1:] != -100).sum()) < max(rows) == 3 * 11
    torch.testing.assert_close(compact.log_probs, every.log_probs)
    assert float(compact.loss) == pytest.approx(float(every.loss), rel=1e-6)

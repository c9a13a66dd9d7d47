"""One model out of a run: merged safetensors weights, tokenizer, chat template and a model card.

A run keeps LoRA adapters (``models/sft``, and ``models/dpo`` / ``models/ppo`` that load
on top of the merged SFT adapter). :func:`export_model` folds them into the base weights
and writes a folder that ``AutoModelForCausalLM.from_pretrained`` (and vLLM, or
llama.cpp's ``convert_hf_to_gguf.py``) loads with no project code::

    <out>/model.safetensors  config.json  generation_config.json
    <out>/tokenizer.json  tokenizer_config.json  chat_template.jinja  special_tokens_map.json
    <out>/README.md          model card (huggingface_hub.ModelCard)
    <out>/cai_dpo_export.json   what was merged, from which run

Which model: ``sft``, ``dpo`` or ``ppo``; by default :func:`choose_model` reads the
evaluation (``eval/results.json``) through :func:`selection_figures`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from cai_dpo.config import RunConfig, to_dict
from cai_dpo.store import MANIFEST, RunLayout, RunStore, atomic_dir, read_manifest

log = logging.getLogger(__name__)

EXPORTABLE = ("sft", "dpo", "ppo")
DEFAULT_MODEL = "dpo"
MIN_BENIGN_COMPLIANCE = 0.90


class ExportError(ValueError):
    """The chosen model cannot be exported; the message names the folder or field and the fix."""


# --------------------------------------------------------------------------- which model


def selection_figures(results: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """``{model name: (harmful-prompt decline rate, benign compliance rate)}`` from ``results.json``.

    Reads the independent headline (``results["headline"]["models"][name]["decline"]["rate"]``
    and ``["benign_compliance"]["rate"]``, schema in :mod:`cai_dpo.report`); models without
    both figures are left out, and an older or unexpected layout gives ``{}``.
    """
    models = (results.get("headline") or {}).get("models") if isinstance(results, dict) else None
    out: dict[str, tuple[float, float]] = {}
    for name, entry in (models or {}).items():
        rates = [((entry or {}).get(key) or {}).get("rate") for key in ("decline", "benign_compliance")]
        if all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rates):
            out[name] = (float(rates[0]), float(rates[1]))
    return out


def choose_model(run_root: Path, available: list[str] | None = None) -> tuple[str, str]:
    """The model to export by default and why.

    Among the exportable models present, the one with the highest harmful-prompt decline
    rate whose benign compliance is at least 90 %; ``dpo`` when the evaluation is missing,
    has no such figures, or no model qualifies.
    """
    layout = RunLayout(run_root)
    available = (
        available
        if available is not None
        else [m for m in EXPORTABLE if (layout.model_dir(m) / "adapter_config.json").exists()]
    )
    path = layout.eval_results
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return DEFAULT_MODEL, f"no readable {path}; defaulting to {DEFAULT_MODEL}"
    figures = {m: f for m, f in selection_figures(results).items() if m in available}
    qualified = {m: f for m, f in figures.items() if f[1] >= MIN_BENIGN_COMPLIANCE}
    if not qualified:
        why = (
            "no decline/compliance figures in the evaluation"
            if not figures
            else f"no model answers >= {MIN_BENIGN_COMPLIANCE:.0%} of benign prompts"
        )
        return DEFAULT_MODEL, f"{why}; defaulting to {DEFAULT_MODEL}"
    best = max(qualified, key=lambda m: (qualified[m][0], qualified[m][1]))
    d, c = qualified[best]
    return (
        best,
        f"highest harmful-prompt decline rate ({d:.0%}) with benign compliance {c:.0%} >= {MIN_BENIGN_COMPLIANCE:.0%}",
    )


# --------------------------------------------------------------------------- weights


def merged_model(cfg: RunConfig, adapter_dir: Path) -> tuple[Any, Any]:
    """The policy's base weights with the adapter chain of ``adapter_dir`` folded in (full
    precision, CPU), and its tokenizer."""
    from cai_dpo.models import load_model, merge_adapter

    spec = dataclasses.replace(cfg.policy, quantization="none", device="cpu", adapter=None)
    model, tok = load_model(spec, adapter=str(adapter_dir))
    if hasattr(model, "merge_and_unload"):
        model = merge_adapter(model)
    return model, tok


def _headline_table(report_md: str) -> str | None:
    """The first Markdown table of the report's headline (or comparison) section, else the first table."""
    lines = report_md.splitlines()
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in lines:
        if line.startswith("#"):
            sections.append((line.lstrip("#").strip().lower(), []))
        else:
            sections[-1][1].append(line)

    def first_table(body: list[str]) -> str | None:
        table: list[str] = []
        for line in body:
            if line.strip().startswith("|"):
                table.append(line.rstrip())
            elif table:
                break
        return "\n".join(table) if len(table) >= 3 else None

    for wanted in ("headline", "comparison"):
        for title, body in sections:
            if wanted in title and (t := first_table(body)):
                return t
    for _, body in sections:
        if t := first_table(body):
            return t
    return None


def _manifest(run_root: Path, rel: str) -> dict[str, Any]:
    try:
        return read_manifest(run_root / rel)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return {}


def model_card_text(cfg: RunConfig, run_root: Path, model: str, why: str, chain: list[str]) -> str:
    """The model card (Markdown with YAML metadata) of an exported model."""
    from huggingface_hub import ModelCard, ModelCardData

    from cai_dpo.models import EMBEDDED_ID

    base = EMBEDDED_ID if cfg.policy.name == "embedded" else cfg.policy.name
    hub_base = (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
        if cfg.policy.name == "embedded"
        else (cfg.policy.name if "/" in cfg.policy.name and not Path(cfg.policy.name).exists() else None)
    )
    try:
        from cai_dpo.constitution import load_constitution

        constitution = load_constitution(cfg.constitution_path())
        cons = f"`{constitution.name}` version {constitution.version} ({len(constitution.principles)} principles)"
    except Exception as exc:  # noqa: BLE001 - the card still names the file
        cons = f"`{cfg.constitution}` (not readable now: {exc})"
    data_rows = []
    for label, rel in (
        ("SL-CAI revisions (SFT data)", "data/sl/manifest.json"),
        ("preference pairs", "data/preferences/manifest.json"),
        ("preferences after human labels", "data/preferences_merged/manifest.json"),
    ):
        m = _manifest(run_root, rel)
        if m:
            counts = ", ".join(
                f"{k}: {v}" for k, v in (m.get("counts") or {}).items() if isinstance(v, (int, float, str))
            )
            data_rows.append(f"| {label} | `{rel.rsplit('/', 1)[0]}` | {counts or '?'} |")
    data_sources = [
        f"- red-team prompts: `{cfg.data.red_team}` (limit {cfg.data.red_team_limit}); helpful prompts: "
        f"`{cfg.data.helpful}` (limit {cfg.data.helpful_limit})"
    ]
    if data_rows:
        data_sources += ["", "| data | folder | counts |", "| --- | --- | --- |", *data_rows]
    settings = [
        f"- SFT (LoRA r={cfg.sft.lora.r}, alpha={cfg.sft.lora.alpha}): learning rate {cfg.sft.learning_rate}, "
        f"max_steps {cfg.sft.max_steps}, batch {cfg.sft.batch_size}, max_length {cfg.sft.max_length}"
    ]
    if model == "dpo":
        d = cfg.dpo
        settings.append(
            f"- DPO (LoRA r={d.lora.r}): beta {d.beta}, loss {d.loss_type}, labels {d.label_mode}, "
            f"learning rate {d.learning_rate}, max_steps {d.max_steps}, batch {d.batch_size}, rounds {d.rounds}"
        )
    if model == "ppo":
        p = cfg.ppo
        settings.append(
            f"- PPO (LoRA r={p.lora.r}, {p.mode}): {p.steps} steps x {p.rollout_batch} rollouts, KL coefficient "
            f"{p.kl_coef}, learning rate {p.learning_rate}, clip {p.clip_range}, GAE gamma {p.gamma} lambda {p.lam}"
        )
    model_dir = RunLayout(run_root).model_dir(model)
    trained = read_manifest(model_dir) if (model_dir / MANIFEST).exists() else {}
    if trained.get("timings"):
        settings.append(
            f"- {model} timings: "
            + ", ".join(f"{k} {v:.1f}" for k, v in trained["timings"].items() if isinstance(v, (int, float)))
        )
    report = RunLayout(run_root).report_file
    table = _headline_table(report.read_text(encoding="utf-8")) if report.exists() else None
    eval_text = (
        f"From the run's evaluation report (`report/report.md`); "
        f"rates as value [95 % interval] n=sample size:\n\n{table}"
        if table
        else "No evaluation report in this run (run the eval stage, then export again)."
    )
    card_data = ModelCardData(
        base_model=hub_base,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["constitutional-ai", "cai-dpo", model, "lora-merged"],
    )
    body = f"""
# {cfg.run_id} · {model.upper()} (Constitutional AI)

A causal language model trained with Constitutional AI (Bai et al. 2022) by cai-dpo, run `{cfg.run_id}`
(profile `{cfg.profile}`). Chosen model: **{model}** — {why}. Adapters merged into the base
weights, in order: {" → ".join(f"`{c}`" for c in chain)}. Loads with plain transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

## Base model

{base}

## Constitution

{cons}, file `{cfg.constitution}`.

## Data

{chr(10).join(data_sources)}

## Training

{chr(10).join(settings)}

## Evaluation

{eval_text}

## Known limits

- Trained and evaluated on small prompt sets (the sizes above); the intervals show how little
  a run this size can tell apart. Do not rely on it for safety-critical use.
- At small scale (e.g. 135M parameters) the model's own critiques and its AI judge are near chance;
  the preference signal then comes mostly from revisions, curated answers and human labels.
- Harmlessness is measured against the constitution named above, by an automatic classifier and
  judge; it may decline benign requests that sound sensitive, or comply with harmful ones phrased
  in ways the red-team set does not cover. English only.
"""
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}"))


# --------------------------------------------------------------------------- export


@dataclasses.dataclass
class ExportResult:
    """Where the export went and what it holds."""

    folder: Path
    model: str
    reason: str
    files: list[str]


EXPORT_NOTE = "cai_dpo_export.json"


def check_export_folder(folder: Path) -> None:
    """Refuse an output folder whose contents an export would replace but did not write: a file, or
    a folder that is neither empty nor an earlier export (no ``cai_dpo_export.json``), such as a
    run's own folder or its adapter. Raises ExportError naming the folder."""
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"--output {folder}: a file is there; name a folder")
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if found and EXPORT_NOTE not in found:
        raise ExportError(
            f"--output {folder}: the folder holds files that are not an export ({', '.join(found[:3])}"
            f"{', …' if len(found) > 3 else ''}; no {EXPORT_NOTE}), which the export would delete; name a new "
            "folder or an earlier export"
        )


def export_model(
    cfg: RunConfig, run: RunStore | None = None, model: str | None = None, out_dir: str | Path | None = None
) -> ExportResult:
    """Merge a run's ``model`` (``sft``, ``dpo``, ``ppo``; default :func:`choose_model`) into one
    folder (default ``<run>/export/<model>``), written atomically, with a model card.

    Raises ExportError naming the adapter folder and the stage to run when it is missing.
    """
    from cai_dpo.models import adapter_merge_first

    root = run.root if run is not None else cfg.run_dir
    if model is None:
        model, why = choose_model(root)
    else:
        why = "chosen by name"
    if model not in EXPORTABLE:
        raise ExportError(f"model '{model}': choose one of {', '.join(EXPORTABLE)}")
    adapter = RunLayout(root).model_dir(model)
    if not (adapter / "adapter_config.json").exists():
        raise ExportError(
            f"{adapter}: no adapter there; run the {model} stage first "
            f"(cai-dpo {model} or cai-dpo run) or export another model (--model)"
        )
    run = run or RunStore(root)
    chain = [os.path.relpath(p, run.root) for p in adapter_merge_first(adapter)] + [os.path.relpath(adapter, root)]
    folder = Path(out_dir).resolve() if out_dir else run.export_dir(model)
    check_export_folder(folder)
    merged, tok = merged_model(cfg, adapter)
    tok.padding_side = "left"
    card = model_card_text(cfg, run.root, model, why, chain)
    with atomic_dir(folder) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        (tmp / EXPORT_NOTE).write_text(
            json.dumps(
                {
                    "run_id": cfg.run_id,
                    "run_dir": str(run.root),
                    "model": model,
                    "reason": why,
                    "merged": chain,
                    "base": cfg.policy.name,
                    "config": {"policy": to_dict(cfg.policy)},
                },
                indent=2,
            ),
            encoding="utf-8",
        )
    files = sorted(p.name for p in folder.iterdir())
    log.info("exported %s of run %s to %s (%s)", model, cfg.run_id, folder, why)
    return ExportResult(folder, model, why, files)


def push_to_hub(folder: Path, repo_id: str, private: bool = True) -> str:
    """Upload an exported folder to the Hugging Face Hub; returns the repo URL.

    Fails fast with ExportError when ``HF_HUB_OFFLINE`` is set or the hub does not answer
    within a few seconds (no retries).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ExportError(
            f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so the hub is not contacted; "
            f"the export is complete at {folder} (unset HF_HUB_OFFLINE, or upload the folder later)"
        )
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError as exc:
        raise ExportError(
            f"--push-to-hub {repo_id}: {constants.ENDPOINT} is not reachable ({exc}); "
            f"the export is complete at {folder} (upload it later)"
        ) from exc
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="cai-dpo export")
    return f"{constants.ENDPOINT}/{repo_id}"

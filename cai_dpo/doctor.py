"""``cai-dpo doctor``: what this machine offers the pipeline."""

from __future__ import annotations

import os
import platform
import shutil
from typing import Any

from cai_dpo.store import package_versions


def doctor_report() -> dict[str, Any]:
    """Versions, threads, accelerator, bitsandbytes, model cache and disk, as a dict."""
    import torch

    from cai_dpo import models

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import bitsandbytes  # noqa: F401

        report["bitsandbytes"] = "importable"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        report["bitsandbytes"] = f"unavailable ({type(exc).__name__}: {exc})"
    try:
        report["embedded_gguf"] = str(models.embedded_gguf_path())
    except models.ModelLoadError as exc:
        report["embedded_gguf"] = f"missing: {exc}"
    cache = models.cache_dir()
    report["model_cache"] = {
        "dir": str(cache),
        "embedded_converted": (models.embedded_dir() / "config.json").exists(),
        "tiny_built": (models.tiny_dir() / "config.json").exists(),
    }
    usage = shutil.disk_usage(cache)
    report["disk_free_gb"] = round(usage.free / 1e9, 1)
    return report


def format_report(report: dict[str, Any]) -> str:
    """Human-readable lines of :func:`doctor_report`."""
    lines = [f"python {report['python']} on {report['platform']}"]
    lines += [f"  {k:13s} {v}" for k, v in report["versions"].items()]
    lines.append(f"cpu cores {report['cpu_cores']}, torch threads {report['torch_threads']}")
    lines.append(f"gpu: {report['gpu'] or 'none (CPU only)'}")
    lines.append(f"bitsandbytes: {report['bitsandbytes']}")
    lines.append(f"embedded model GGUF: {report['embedded_gguf']}")
    mc = report["model_cache"]
    state = "converted" if mc["embedded_converted"] else "not yet converted (cai-dpo models prepare)"
    lines.append(f"model cache {mc['dir']}: embedded {state}; tiny {'built' if mc['tiny_built'] else 'not built'}")
    lines.append(f"disk free: {report['disk_free_gb']} GB")
    return "\n".join(lines)

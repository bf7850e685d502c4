"""What produced a result: library versions, device, dtype, threads (stored with every metric).

A perplexity is comparable only under the same protocol *and* software: kernels, tokenizers and
default dtypes change between releases, and the device changes the float summation order.
"""
from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("torch", "transformers", "datasets", "dvc", "mlflow", "lm_eval")


def versions() -> dict[str, str]:
    """Installed versions of the libraries a result depends on ("absent" if not installed)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def device_name(device: str) -> str:
    """A readable name of the device: the GPU's name, or the CPU's model and architecture."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'cpu'} ({platform.machine()})"


def provenance(device: str, dtype: str) -> dict[str, str | int]:
    """Versions, device, dtype and thread count, flat (MLflow params take it as it is)."""
    import torch

    return {**{f"version.{k}": v for k, v in versions().items()}, "device": str(device),
            "device_name": device_name(device), "dtype": dtype, "threads": torch.get_num_threads()}

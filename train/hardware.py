"""What known accelerators can do, for model-FLOPs utilisation (MFU): dense bf16 tensor-core peaks from the vendors'
datasheets (SXM parts). MFU = the model's training FLOPs per second / this peak."""
from __future__ import annotations

import platform

import torch

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # by substring of the device name


def peak_bf16_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak, or None (a CPU, or a card not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def device_name() -> str:
    """The GPU's name, or 'cpu <model>' (CPU models differ in their ratios, so each may keep its own baseline)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"cpu {model or platform.processor()}".strip()

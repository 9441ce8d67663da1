"""What known accelerators can do, for model-FLOPs utilisation (MFU): dense bf16 tensor-core peaks from the vendors'
datasheets (each form factor its own). MFU = the model's training FLOPs per second / this peak."""
from __future__ import annotations

import platform
import re

import torch

PEAK_BF16_FLOPS = [  # (pattern searched in the device name, dense bf16 FLOP/s), the first match wins
    (r"H100.*PCIe", 756e12), (r"H100 NVL", 835e12), (r"H100|H200|GH200", 989e12),
    (r"A100", 312e12), (r"\bA10\b", 125e12), (r"L40S", 362e12), (r"\bL4\b", 121e12),
]


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak of a card by its name ('NVIDIA H100 PCIe'), or None for a card not in the table."""
    return next((peak for pattern, peak in PEAK_BF16_FLOPS if re.search(pattern, name)), None)


def peak_bf16_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak, or None (a CPU, or a card not in the table)."""
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


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

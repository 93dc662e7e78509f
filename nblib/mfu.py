"""Model FLOPs utilisation: the FLOPs a token of training costs, and what the device can do.

A GPU's peak is its datasheet's dense tensor-core figure for the precision trained in, where the
GPU is in `KNOWN_PEAKS`; any other device's is measured once per process with a square matmul.
"""
from __future__ import annotations

import functools
import re
import time

import torch

from .config import RunConfig
from .hardware import DTYPES, Device

# Dense (no sparsity) FLOP/s by GPU name fragment and precision, from NVIDIA's datasheets.
KNOWN_PEAKS = {
    ("T4", "fp16"): 65e12, ("T4", "fp32"): 8.1e12,
    ("P100", "fp16"): 18.7e12, ("P100", "fp32"): 9.3e12,  # PCIe, Kaggle's
    ("V100", "fp16"): 125e12, ("A100", "fp16"): 312e12, ("A100", "bf16"): 312e12,
    ("L4", "fp16"): 121e12, ("L4", "bf16"): 121e12,
    ("H100", "fp16"): 989e12, ("H100", "bf16"): 989e12,  # SXM
}


def flops_per_token(cfg: RunConfig, vocab: int) -> float:
    """Training FLOPs per token: 6 x the matmul parameters (blocks and the tied lm_head) + the
    attention's 12 x layers x context x width (PaLM's appendix B, nanoGPT's estimate)."""
    m = cfg.model
    per_block = 4 * m.n_embd**2 + 2 * m.n_embd * m.n_inner
    return 6 * (m.n_layer * per_block + vocab * m.n_embd) + 12 * m.n_layer * cfg.train.max_length * m.n_embd


def peak_flops(device: Device) -> tuple[float, str]:
    """The device's peak FLOP/s in the run's precision, and where the figure comes from."""
    if device.is_cuda:
        for (name, precision), flops in KNOWN_PEAKS.items():
            if re.search(rf"\b{name}\b", device.gpu_name) and precision == device.precision:  # not L40S for L4
                return flops, f"{device.gpu_name} datasheet"
    return _measured(device.device.type, device.precision), "measured matmul"


@functools.cache
def _measured(device_type: str, precision: str) -> float:
    return matmul_peak(DTYPES[precision], device_type, n=4096 if device_type == "cuda" else 1024)


def matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n matmul in `dtype` on `device`. Its own generator: training's
    random streams (which a resume restores exactly) are left untouched."""
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, dtype=dtype, device=device, generator=generator) for _ in range(2))
    a @ b
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def utilisation(tokens_per_second: float, flops_per_token_: float, peak: float, world_size: int) -> float:
    """MFU: the FLOP/s training achieved over the peak of every device it ran on."""
    return tokens_per_second * flops_per_token_ / (peak * world_size)

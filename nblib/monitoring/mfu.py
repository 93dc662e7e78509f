"""Model FLOPs utilisation: the FLOPs a token of training costs, and what the device can do.

A GPU's peak is its datasheet's dense tensor-core figure for the precision trained in, where the
GPU is in `KNOWN_PEAKS`; any other device's is measured once per process with square matmuls
(the best of several timings). An MFU above 100% means the peak was measured too low: it is
recorded as NaN and shown as "n/a", never as a figure.
"""
from __future__ import annotations

import functools
import logging
import math
import re
import time
from collections.abc import Callable

import torch

from nblib.setup.config import RunConfig
from nblib.setup.hardware import DTYPES, Device

log = logging.getLogger(__name__)

# Dense (no sparsity) FLOP/s by GPU model and precision, from NVIDIA's datasheets. Most specific
# first: the first model found as whole words in the device's name wins ("NVIDIA H100 NVL" is not
# the SXM's "NVIDIA H100 80GB HBM3", "NVIDIA L40S" is not an L4). A precision a model lacks here
# (fp32 on most) is measured.
KNOWN_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"fp16": 835e12, "bf16": 835e12}),
    ("H200", {"fp16": 989e12, "bf16": 989e12}),  # SXM
    ("H100 NVL", {"fp16": 835e12, "bf16": 835e12}),
    ("H100 PCIe", {"fp16": 756e12, "bf16": 756e12}),
    ("H100", {"fp16": 989e12, "bf16": 989e12}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", {"fp16": 312e12, "bf16": 312e12}),  # PCIe and SXM alike
    ("V100", {"fp16": 125e12}),
    ("P100", {"fp16": 18.7e12, "fp32": 9.3e12}),  # PCIe, Kaggle's
    ("L4", {"fp16": 121e12, "bf16": 121e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
)

CPU_SIZES = (256, 512, 1024, 2048)  # grown while quick: small ones under-measure (bf16 at 1024: half
# its speed at 2048), and an emulated fp16 one is 100x slower than fp32
CPU_SECONDS = 1.0  # a CPU's timings stop after this much (the sizes' warm-ups add about 0.3 s)
CUDA_SIZE = 4096
CUDA_BURST = 10  # matmuls per timing on a GPU: alone, a launch and a synchronisation are ~5% of one
REPEATS = 50  # timings on a GPU (all of them) and at most on a CPU
MIN_REPEATS = 3


def flops_per_token(cfg: RunConfig, vocab: int) -> float:
    """Training FLOPs per token: 6 x the matmul parameters (blocks and the tied lm_head) + the
    attention's 12 x layers x context x width (PaLM's appendix B, nanoGPT's estimate)."""
    m = cfg.model
    per_block = 4 * m.n_embd**2 + 2 * m.n_embd * m.n_inner
    return 6 * (m.n_layer * per_block + vocab * m.n_embd) + 12 * m.n_layer * cfg.train.max_length * m.n_embd


def peak_flops(device: Device) -> tuple[float, str]:
    """The device's peak FLOP/s in the run's precision, and where the figure comes from."""
    known = datasheet_peak(device.gpu_name, device.precision) if device.is_cuda else None
    if known:
        return known, f"{device.gpu_name} datasheet"
    return measured_peak(device.device.type, device.precision), "measured matmul"


def datasheet_peak(gpu_name: str, precision: str) -> float | None:
    """The dense FLOP/s of the first KNOWN_PEAKS model named in `gpu_name` as whole words, in
    `precision`; None for another GPU, or a precision its entry lacks."""
    for name, peaks in KNOWN_PEAKS:
        if re.search(rf"\b{re.escape(name)}\b", gpu_name):
            return peaks.get(precision)
    return None


def measured_peak(device_type: str, precision: str) -> float:
    """matmul_peak in `precision`, measured once per process and thread count (a CPU worker of
    a data-parallel run has fewer threads)."""
    return _measured(device_type, precision, torch.get_num_threads())


@functools.cache
def _measured(device_type: str, precision: str, threads: int) -> float:
    return matmul_peak(DTYPES[precision], device_type)


def matmul_peak(dtype: torch.dtype, device: str = "cpu") -> float:
    """Measured FLOP/s of square matmuls in `dtype` on `device`, on all of torch's threads
    (torch.get_num_threads()): the best of several timings after a warm-up. On a GPU: n=4096,
    REPEATS timings of CUDA_BURST matmuls, each between synchronisations. On a CPU: n grows up
    to 2048 while MIN_REPEATS matmuls of the next size would fit in CPU_SECONDS, then it is
    timed until CPU_SECONDS have passed. Its own generator: training's random streams (which a
    resume restores exactly) are left untouched."""
    generator = torch.Generator(device).manual_seed(0)

    def operands(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.randn(n, n, dtype=dtype, device=device, generator=generator) for _ in range(2))

    if torch.device(device).type == "cuda":
        a, b = operands(CUDA_SIZE)
        burst = functools.partial(_matmuls, a, b, CUDA_BURST)
        burst()  # cuBLAS's start-up and the clocks' ramp stay out of the timings
        return 2 * CUDA_SIZE**3 * CUDA_BURST / best_time(burst, REPEATS, math.inf)
    for n in CPU_SIZES:  # each size's first matmul is its warm-up
        a, b = operands(n)
        started = time.perf_counter()
        a @ b
        if 8 * (time.perf_counter() - started) > CPU_SECONDS / MIN_REPEATS:  # the next size's: 8x the work
            break
    return 2 * n**3 / best_time(functools.partial(_matmuls, a, b, 1), REPEATS, CPU_SECONDS)


def _matmuls(a: torch.Tensor, b: torch.Tensor, count: int) -> None:
    for _ in range(count):
        a @ b
    if a.is_cuda:
        torch.cuda.synchronize(a.device)


def best_time(work: Callable[[], None], repeats: int, seconds: float,
              timer: Callable[[], float] = time.perf_counter) -> float:
    """The shortest of up to `repeats` timings of `work`, each timed on its own; fewer once the
    timings add up to `seconds`, but never under MIN_REPEATS. The fastest run is the one the
    machine's other load and clock changes disturbed least."""
    best, spent = math.inf, 0.0
    for done in range(1, repeats + 1):
        started = timer()
        work()
        took = timer() - started
        best, spent = min(best, took), spent + took
        if spent >= seconds and done >= MIN_REPEATS:
            break
    return best


def utilisation(tokens_per_second: float, flops_per_token_: float, peak: float, world_size: int) -> float:
    """MFU: the FLOP/s training achieved over the peak of every device it ran on. NaN (with a
    warning) when that is above 1: the peak was measured too low, and no figure beats a wrong one."""
    value = tokens_per_second * flops_per_token_ / (peak * world_size)
    if value > 1:
        log.warning("MFU would be %.1f%% of a peak of %.3g TFLOP/s per device: that peak is too low, "
                    "so MFU is recorded as NaN", 100 * value, peak / 1e12)
        return math.nan
    return value


def shown(value: float) -> str:
    """An MFU for people: "31.2%", or "n/a" where it is NaN (no throughput yet, or the peak was
    measured too low) or above 1."""
    if value > 1:
        return "n/a (measured peak too low)"
    if not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}%"

"""What the run executes on: device, precision and the facts a user needs to see."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nblib.console import ConfigError, Unsupported
from nblib.setup.config import GPU_PRESETS, RunConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_TOKENS_PER_SECOND = 600  # the guide's model, fp32, B=8, T=512, on a 2-core development machine


@dataclass(frozen=True)
class Device:
    device: torch.device
    precision: str  # fp32, fp16 or bf16: what autocast runs in
    gpu_name: str = ""
    compute_capability: tuple[int, int] | None = None
    gpu_memory_gb: float = 0.0
    gpu_count: int = 0
    cpu_features: tuple[str, ...] = field(default_factory=tuple)
    world_size: int = 1  # data-parallel processes (one per GPU; gloo processes on a CPU)
    rank: int = 0  # this process's rank among them

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def uses_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
        return self.precision == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def describe(self) -> str:
        if self.is_cuda:
            major, minor = self.compute_capability
            where = (f"{self.gpu_count} x {self.gpu_name} (compute capability {major}.{minor}, "
                     f"{self.gpu_memory_gb:.1f} GB)")
        else:
            where = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        features = ", ".join(self.cpu_features) or "none"
        return (f"{where}; CPU features: {features}; precision {self.precision}; "
                f"torch {torch.__version__}")


def peak_memory(device: Device) -> dict[str, float]:
    """This process's peak resident memory so far, and on a GPU the peak its tensors took, in GB."""
    peaks = {}
    try:
        import resource  # not on Windows
        # ru_maxrss is in KiB on Linux, in bytes on macOS
        scale = 2**30 if platform.system() == "Darwin" else 2**20
        peaks["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 3)
    except ImportError:
        pass
    if device.is_cuda:
        peaks["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device.device) / 2**30, 3)
    return peaks


def cpu_features() -> tuple[str, ...]:
    """The CPU flags that decide whether bf16 autocast pays off (Linux only)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return ()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return tuple(f for f in wanted if f in flags)


def detect(precision: str = "auto", devices: str | int = "auto") -> Device:
    """Pick the device, resolve `precision` ("auto", "fp32", "fp16" or "bf16") and the number of
    data-parallel processes (`devices`: "auto" for every GPU, or a count).

    Raises:
        ValueError: a precision the hardware cannot run (fp16 on CPU, bf16 on a GPU below 8.0),
            or more processes than GPUs.
    """
    features = cpu_features()
    if not torch.cuda.is_available():
        return Device(torch.device("cpu"), _cpu_precision(precision, features),
                      cpu_features=features, world_size=1 if devices == "auto" else devices)
    props = torch.cuda.get_device_properties(0)
    capability = (props.major, props.minor)
    check_kernels(props.name, capability, torch.cuda.get_arch_list())
    count = torch.cuda.device_count()
    if devices != "auto" and devices > count:
        raise ConfigError(f"devices={devices}: this machine has {count} GPU(s); on Kaggle choose "
                         "Accelerator: GPU T4 x2 for two, or use devices='auto'")
    return Device(torch.device("cuda", 0), _gpu_precision(precision, capability),
                  gpu_name=props.name, compute_capability=capability,
                  gpu_memory_gb=props.total_memory / 2**30, gpu_count=count,
                  cpu_features=features, world_size=count if devices == "auto" else devices)


def check_kernels(name: str, capability: tuple[int, int], arch_list: list[str]) -> None:
    """Refuse, before any CUDA work, a GPU this torch build has no kernels for (Kaggle's P100,
    compute capability 6.0, under a torch built without sm_60)."""
    major, minor = capability
    runs = any(a == f"sm_{major}{m}" for a in arch_list for m in range(minor + 1)) or any(
        a.startswith("compute_") and int(a[len("compute_"):]) <= major * 10 + minor for a in arch_list)
    if not runs:
        raise Unsupported(
            f"the installed PyTorch {torch.__version__} has no kernels for this GPU ({name}, compute "
            f"capability {major}.{minor}; it was built for {' '.join(arch_list)}). On Kaggle, open the "
            "notebook's settings and choose Accelerator: GPU T4.")


def cpu_check(cfg: RunConfig, device: Device) -> str:
    """A GPU preset (config.GPU_PRESETS) on a CPU: refused for its whole run (Import Notebook
    without an accelerator lands there), a warning with a time estimate when `max_steps` asks for
    a bounded run; "" for anything else.

    Raises:
        ConfigError: a GPU preset on a CPU with max_steps=0 (its full epochs).
    """
    epoch_tokens = GPU_PRESETS.get(cfg.preset)
    if device.is_cuda or epoch_tokens is None:
        return ""
    t = cfg.train
    tokens = t.max_steps * t.tokens_per_step or t.epochs * epoch_tokens
    hours = tokens / CPU_TOKENS_PER_SECOND / 3600
    estimate = (f"preset {cfg.preset!r} is meant for a GPU, and this machine has none. At about "
                f"{CPU_TOKENS_PER_SECOND} tokens/s (measured on a 2-core CPU) its {tokens / 1e6:,.0f}M "
                f"training tokens would take about {hours:,.0f} hours.")
    if not t.max_steps and not cfg.dry_run:
        raise ConfigError(f"{estimate} On Kaggle: Settings -> Accelerator -> GPU T4 x2, then Run All. "
                         "Here: preset='cpu-demo' (about 10 minutes on a CPU), or set max_steps to "
                         "train this preset for that many steps on the CPU anyway.")
    return f"WARNING: {estimate} Choose GPU T4 x2 in the notebook's settings, or use preset='cpu-demo'."


def _cpu_precision(precision: str, features: tuple[str, ...]) -> str:
    if precision == "fp16":  # runs (autocast and GradScaler("cpu")), slowly: the T4's path, testable here
        log.warning("precision='fp16' on a CPU: the T4's fp16 + GradScaler path, slower than 'auto' here")
    if precision == "auto":
        # bf16 autocast measured 1.3-1.6x faster than fp32 with AMX, and 1.5-1.7x with AVX-512-BF16
        # alone (bench/RESULTS.md); without either, bf16 is emulated and slower.
        return "bf16" if {"amx_bf16", "avx512_bf16"} & set(features) else "fp32"
    return precision


def _gpu_precision(precision: str, capability: tuple[int, int]) -> str:
    if precision == "bf16" and capability < (8, 0):
        raise ConfigError(f"precision='bf16': this GPU (compute capability "
                         f"{capability[0]}.{capability[1]}) has no fast bf16; use 'auto' or "
                         "'fp16' (the T4 is 7.5)")
    if precision == "auto":
        return "bf16" if capability >= (8, 0) else "fp16"
    return precision

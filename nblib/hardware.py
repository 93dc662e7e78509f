"""What the run executes on: device, precision and the facts a user needs to see."""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Device:
    device: torch.device
    precision: str  # fp32, fp16 or bf16: what autocast runs in
    gpu_name: str = ""
    compute_capability: tuple[int, int] | None = None
    gpu_memory_gb: float = 0.0
    gpu_count: int = 0
    cpu_features: tuple[str, ...] = field(default_factory=tuple)

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


def cpu_features() -> tuple[str, ...]:
    """The CPU flags that decide whether bf16 autocast pays off (Linux only)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return ()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return tuple(f for f in wanted if f in flags)


def detect(precision: str = "auto") -> Device:
    """Pick the device and resolve `precision` ("auto", "fp32", "fp16" or "bf16").

    Raises:
        ValueError: a precision the hardware cannot run (fp16 on CPU, bf16 on a GPU below 8.0).
    """
    features = cpu_features()
    if not torch.cuda.is_available():
        return Device(torch.device("cpu"), _cpu_precision(precision, features),
                      cpu_features=features)
    props = torch.cuda.get_device_properties(0)
    capability = (props.major, props.minor)
    return Device(torch.device("cuda", 0), _gpu_precision(precision, capability),
                  gpu_name=props.name, compute_capability=capability,
                  gpu_memory_gb=props.total_memory / 2**30,
                  gpu_count=torch.cuda.device_count(), cpu_features=features)


def _cpu_precision(precision: str, features: tuple[str, ...]) -> str:
    if precision == "fp16":
        raise ValueError("precision='fp16': fp16 training needs a CUDA GPU; use 'auto', "
                         "'bf16' or 'fp32' on a CPU")
    if precision == "auto":
        # bf16 autocast measured 1.3-1.6x faster than fp32 on AMX CPUs; slower without it.
        return "bf16" if "amx_bf16" in features else "fp32"
    return precision


def _gpu_precision(precision: str, capability: tuple[int, int]) -> str:
    if precision == "bf16" and capability < (8, 0):
        raise ValueError(f"precision='bf16': this GPU (compute capability "
                         f"{capability[0]}.{capability[1]}) has no fast bf16; use 'auto' or "
                         "'fp16' (the T4 is 7.5)")
    if precision == "auto":
        return "bf16" if capability >= (8, 0) else "fp16"
    return precision

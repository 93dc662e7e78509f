import pytest
import torch

from nblib import hardware


def test_cpu_auto_uses_bf16_only_with_amx():
    assert hardware._cpu_precision("auto", ("avx512f", "amx_bf16")) == "bf16"
    assert hardware._cpu_precision("auto", ("avx2",)) == "fp32"
    with pytest.raises(ValueError, match="fp16 training needs a CUDA GPU"):
        hardware._cpu_precision("fp16", ())


def test_gpu_auto_is_fp16_on_t4_and_bf16_on_ampere():
    assert hardware._gpu_precision("auto", (7, 5)) == "fp16"
    assert hardware._gpu_precision("auto", (8, 0)) == "bf16"
    with pytest.raises(ValueError, match=r"compute capability 7.5\) has no fast bf16"):
        hardware._gpu_precision("bf16", (7, 5))


def test_detect_here_describes_the_machine():
    device = hardware.detect("fp32")
    assert device.precision == "fp32" and not device.uses_grad_scaler
    assert "precision fp32" in device.describe()
    with device.autocast():
        assert torch.ones(1).dtype == torch.float32

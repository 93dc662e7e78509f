import pytest
import torch

from nblib.setup import hardware, params


def test_cpu_auto_uses_bf16_only_with_bf16_instructions():
    assert hardware._cpu_precision("auto", ("avx512f", "amx_bf16")) == "bf16"
    assert hardware._cpu_precision("auto", ("avx512f", "avx512_bf16")) == "bf16"
    assert hardware._cpu_precision("auto", ("avx512f",)) == "fp32"
    assert hardware._cpu_precision("auto", ("avx2",)) == "fp32"
    assert hardware._cpu_precision("fp16", ()) == "fp16"  # the T4's path, slowly: so CI can run it


def test_gpu_auto_is_fp16_on_t4_and_bf16_on_ampere():
    assert hardware._gpu_precision("auto", (7, 5)) == "fp16"
    assert hardware._gpu_precision("auto", (8, 0)) == "bf16"
    with pytest.raises(ValueError, match=r"compute capability 7.5\) has no fast bf16"):
        hardware._gpu_precision("bf16", (7, 5))


def test_detect_here_describes_the_machine():
    device = hardware.detect("fp32")
    assert device.precision == "fp32" and not device.uses_grad_scaler
    assert "precision fp32" in device.describe()


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_autocast_runs_matmuls_in_the_chosen_precision(precision, dtype):
    a = torch.randn(4, 4)
    with hardware.Device(torch.device("cpu"), precision).autocast():
        assert (a @ a).dtype == dtype  # a matmul, which autocast casts (a factory tensor stays float32)


def test_a_gpu_without_kernels_in_this_torch_is_refused_with_the_fix():
    archs = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "compute_90"]
    hardware.check_kernels("Tesla T4", (7, 5), archs)
    hardware.check_kernels("NVIDIA A10G", (8, 6), archs)
    hardware.check_kernels("NVIDIA L4", (8, 9), archs)  # sm_86 cubins run on 8.9
    with pytest.raises(RuntimeError, match=r"no kernels for this GPU \(Tesla P100-PCIE-16GB, compute "
                                           r"capability 6.0.*choose Accelerator: GPU T4"):
        hardware.check_kernels("Tesla P100-PCIE-16GB", (6, 0), archs)


def test_the_gpu_preset_on_a_cpu_is_refused_unless_max_steps_bounds_it(tmp_path):
    cpu = hardware.Device(torch.device("cpu"), "fp32")
    with pytest.raises(ValueError, match=r"meant for a GPU.*360M training tokens would take about 167 "
                                         r"hours.*GPU T4 x2.*preset='cpu-demo'.*set max_steps"):
        hardware.cpu_check(params.resolve({"preset": "kaggle-t4", "output_dir": str(tmp_path)}), cpu)
    bounded = params.resolve({"preset": "kaggle-t4", "output_dir": str(tmp_path), "max_steps": 100})
    assert "WARNING: preset 'kaggle-t4' is meant for a GPU" in hardware.cpu_check(bounded, cpu)
    assert hardware.cpu_check(params.resolve({"preset": "smoke", "output_dir": str(tmp_path)}), cpu) == ""


class FakeT4:
    name, major, minor, total_memory = "Tesla T4", 7, 5, 15 * 2**30


@pytest.mark.parametrize("devices, world_size", [("auto", 2), (1, 1), (2, 2)])
def test_devices_auto_takes_every_gpu_and_a_count_is_checked(monkeypatch, devices, world_size):
    """Kaggle's GPU T4 x2, as torch.cuda would describe it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: FakeT4)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80"])
    device = hardware.detect("auto", devices)
    assert device.world_size == world_size and device.precision == "fp16" and device.is_main
    with pytest.raises(ValueError, match=r"devices=3: this machine has 2 GPU\(s\).*GPU T4 x2"):
        hardware.detect("auto", 3)


def test_on_a_cpu_devices_counts_gloo_processes():
    assert hardware.detect("fp32").world_size == 1
    assert hardware.detect("fp32", devices=2).world_size == 2

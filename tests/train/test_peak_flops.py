"""The bf16 peak that MFU divides by, looked up from the GPU's name."""
import pytest
import torch

from seer.train.metrics import peak_flops


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756.5e12),
                                       ("NVIDIA H100 NVL", 835.5e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                       ("NVIDIA GH200 480GB", 989.4e12), ("Tesla V100-SXM2-32GB", None)])
def test_peak_of_each_board(monkeypatch, name, peak):
    # A PCIe or NVL H100 has a lower peak than the SXM one; both names contain 'H100'.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == peak


def test_no_peak_on_the_cpu():
    assert peak_flops(torch.device("cpu")) is None

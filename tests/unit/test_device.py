"""Which precision `--dtype auto` resolves to: bf16 where the hardware multiplies it natively."""

from __future__ import annotations

import pytest
import torch

from loopserve import device
from trainer.causal_lm import precision_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "want"),
    [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)],
)
def test_auto_serves_bf16_on_a_cpu_with_native_bf16_and_fp32_elsewhere(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, want: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert device.pick_dtype("auto", CPU) == want
    assert device.pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    # a name is what it says, whatever the hardware
    assert device.pick_dtype("float32", CPU) == torch.float32 and device.pick_dtype("bfloat16", CPU) == torch.bfloat16
    # the generator's trainers keep their own rule: bf16 on CUDA only (their bf16 path was measured there)
    assert precision_dtype("auto", CPU) == torch.float32
    assert precision_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert precision_dtype("bf16", CPU) == torch.bfloat16


def test_a_torch_without_the_cpu_probes_serves_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert device.pick_dtype("auto", CPU) == torch.float32


def test_this_machine_reports_what_torch_finds() -> None:
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert device.native_bf16(CPU) == native
    assert device.dtype_name(device.pick_dtype("auto", CPU)) == ("bfloat16" if native else "float32")
    with pytest.raises(ValueError, match="unknown dtype"):
        device.pick_dtype("fp8", CPU)

"""Which precision `--dtype auto` resolves to: bf16 where the hardware multiplies it natively."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loopserve import device
from loopserve.cli.demo.annotation import AnnotationDemo, AnnotationDemoOptions, _annotator_recipe, _policy_flags
from loopserve.cli.demo.generation import GenerationDemo, GenerationDemoOptions
from loopserve.cli.demo.generation import _trainer_flags as _generation_trainer_flags
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


@pytest.mark.parametrize(("native", "want"), [(True, "bfloat16"), (False, "float32")])
def test_the_demos_hand_their_processes_the_hardwares_precision(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, native: bool, want: str
) -> None:
    """`loopserve demo` shows no dtype flag: it resolves auto once and hands the concrete name to the policy
    service, the trainers (eval, train; RL precision) and its offline baselines, so that they agree and an
    AVX2-only CPU never runs the whole demo in emulated bf16 (about 6x slower than fp32 there)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ann = AnnotationDemo(AnnotationDemoOptions(data_dir=tmp_path)).opts
    assert ann.serve_dtype == want
    assert _policy_flags(ann)[_policy_flags(ann).index("--dtype") + 1] == want
    assert _annotator_recipe(ann)["eval_dtype"] == _annotator_recipe(ann)["train_dtype"] == want
    gen = GenerationDemo(GenerationDemoOptions(data_dir=tmp_path)).opts
    assert gen.dtype == want
    objectives = tmp_path / "run"
    objectives.mkdir()
    _generation_trainer_flags(gen, objectives)
    written = json.loads((objectives / "objectives.json").read_text())
    assert written["grpo"]["precision"] == written["ppo"]["precision"] == ("bf16" if native else "fp32")
    # a name asked for is kept
    assert AnnotationDemo(AnnotationDemoOptions(data_dir=tmp_path, serve_dtype="float32")).opts.serve_dtype == "float32"

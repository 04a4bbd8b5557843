"""Options a CPU run would run slower with (bf16 without native bf16, torch.compile) are named before training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from lora_vision import config_checks
from lora_vision.config_checks import read_cpuinfo, warn_slow_options
from lora_vision.train import check_run
from tests.helpers import composed

# Excerpts of /proc/cpuinfo: the first without native bf16, the second with AVX-512 BF16 and AMX.
AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma

processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma
"""
NATIVE_BF16 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""


@pytest.fixture
def cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /proc/cpuinfo, written by each test; CUDA and MPS absent, so `auto` means the CPU."""
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(config_checks, "CPUINFO", path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    return path


def run_config(accelerator: str = "cpu", precision: str = "32-true", compile: object = False) -> DictConfig:
    return OmegaConf.create(
        {"trainer": {"accelerator": accelerator, "precision": precision}, "perf": {"compile": compile}}
    )


def warnings(caplog: pytest.LogCaptureFixture, cfg: DictConfig) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=config_checks.__name__):
        warn_slow_options(cfg)
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def test_cpuinfo_parsed_from_the_first_core(cpuinfo: Path) -> None:
    cpuinfo.write_text(AVX2_ONLY)
    cpu = read_cpuinfo()
    assert cpu is not None
    assert cpu.model == "AMD EPYC 7B13"
    assert {"avx2", "fma"} <= cpu.flags and "avx512_bf16" not in cpu.flags


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "bf16"])
@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_bf16_without_native_bf16_warns(
    cpuinfo: Path, caplog: pytest.LogCaptureFixture, precision: str, accelerator: str
) -> None:
    cpuinfo.write_text(AVX2_ONLY)
    [message] = warnings(caplog, run_config(accelerator, precision))
    assert f"trainer.precision={precision} will be slow on this CPU (AMD EPYC 7B13)" in message
    assert "avx512_bf16 and amx_bf16" in message
    assert "14-38x slower than fp32" in message
    assert message.endswith("Fix: trainer.precision=32-true")


@pytest.mark.parametrize(
    ("text", "precision"),
    [
        pytest.param(NATIVE_BF16, "bf16-mixed", id="native-bf16"),
        pytest.param(NATIVE_BF16.replace(" avx512_bf16", ""), "bf16-mixed", id="amx-only"),
        pytest.param(AVX2_ONLY, "32-true", id="fp32"),
        # ARM lists `Features`, not x86 flags; macOS and Windows have no /proc/cpuinfo: no guess either way.
        pytest.param("processor\t: 0\nFeatures\t: fp asimd\n", "bf16-mixed", id="arm"),
        pytest.param(None, "bf16-mixed", id="no-cpuinfo"),
    ],
)
def test_no_bf16_warning(cpuinfo: Path, caplog: pytest.LogCaptureFixture, text: str | None, precision: str) -> None:
    if text is not None:
        cpuinfo.write_text(text)
    assert warnings(caplog, run_config("cpu", precision)) == []


@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_no_warning_on_a_gpu(
    cpuinfo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, accelerator: str
) -> None:
    cpuinfo.write_text(AVX2_ONLY)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert warnings(caplog, run_config(accelerator, "bf16-mixed", compile=True)) == []


@pytest.mark.parametrize("compile", [True, {"mode": "max-autotune"}])
def test_compile_on_cpu_warns(cpuinfo: Path, caplog: pytest.LogCaptureFixture, compile: object) -> None:
    cpuinfo.write_text(NATIVE_BF16)
    [message] = warnings(caplog, run_config("cpu", compile=compile))
    assert message.startswith("perf.compile on the CPU")
    assert "first steps" in message
    assert message.endswith("Fix: perf.compile=false")


def test_no_compile_warning_without_compile(cpuinfo: Path, caplog: pytest.LogCaptureFixture) -> None:
    cpuinfo.write_text(NATIVE_BF16)
    assert warnings(caplog, run_config("cpu", compile=False)) == []


def test_check_run_warns_before_training(cpuinfo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The real config's keys, through the pre-run checks `run` calls first."""
    cpuinfo.write_text(AVX2_ONLY)
    overrides = ("trainer=cpu", "trainer.precision=bf16-mixed", "perf.compile=true")
    with composed(*overrides, output_dir=tmp_path / "run") as cfg, caplog.at_level(logging.WARNING):
        check_run(cfg)
    messages = [record.getMessage() for record in caplog.records if record.name == config_checks.__name__]
    assert [message.split()[0] for message in messages] == ["trainer.precision=bf16-mixed", "perf.compile"]

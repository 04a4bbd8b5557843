"""Files someone else hands over: loading adapters, PEFT adapters and exports runs no code their records name, and
checkpoints are unpickled as tensors and plain values only.

Each planted record would, if instantiated, write a file and print; the tests check that loading refuses it with a
message and that neither happened.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

import lora_vision.evaluate as evaluate
from lora_vision.adapters import ADAPTER_META, SIDE_META, AdapterFormatError, load_adapted_model, load_adapter
from lora_vision.builders import build_backbone, build_method, build_module
from lora_vision.export import MODEL_META
from lora_vision.export import main as export_main
from lora_vision.methods import LoRA
from lora_vision.resume import AtomicCheckpointIO
from lora_vision.train import save_run_adapter
from tests.helpers import VIT_KWARGS, adapted, composed, rewrite_record, tiny_vit

VIT = "vit_small_patch16_224"
MARKER = "written-by-a-record"
SAID = "printed-by-a-record"
VALID_METHODS = "lora, linear_probe, bitfit, full"


def writes(marker: Path) -> dict:
    """A Hydra record that, instantiated, writes `marker`."""
    path = {"_target_": "pathlib.Path", "_args_": [str(marker)]}
    return {"_target_": "pathlib.Path.write_text", "_args_": [path, "pwned"]}


def prints() -> dict:
    return {"_target_": "builtins.print", "_args_": [SAID]}


def assert_nothing_ran(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert not (tmp_path / MARKER).exists()
    assert SAID not in capsys.readouterr().out


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    adapted(tiny_vit, LoRA(rank=2, targets=["qv"]), tmp_path / "adapter", VIT, VIT_KWARGS)
    return tmp_path / "adapter"


def planted_methods(marker: Path) -> dict[str, tuple[int, dict]]:
    """Method records by case: (format version, record)."""
    return {
        "v1 writes": (1, writes(marker)),
        "v1 prints": (1, prints()),
        "v1 target inside the settings": (1, {"_target_": "lora_vision.methods.LoRA", "rank": prints()}),
        "v2 names a callable": (2, {"name": "builtins.print", "settings": {"_args_": [SAID]}}),
        "v2 holds a target": (2, writes(marker)),
        "v2 target inside the settings": (2, {"name": "lora", "settings": {"targets": [writes(marker)]}}),
    }


@pytest.mark.parametrize("case", list(planted_methods(Path())))
def test_a_method_record_that_names_code_is_refused_without_running_it(
    case: str, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    version, method = planted_methods(tmp_path / MARKER)[case]
    rewrite_record(adapter / ADAPTER_META, format_version=version, method=method)
    torch.manual_seed(0)  # the adapter's own base, so only its method record can be refused
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(adapter, tiny_vit())
    assert str(adapter / ADAPTER_META) in str(err.value)
    assert VALID_METHODS in str(err.value) or "lora_vision.methods.LoRA (lora)" in str(err.value)
    with pytest.raises(AdapterFormatError):
        load_adapted_model(adapter)
    assert_nothing_ran(tmp_path, capsys)


@pytest.mark.parametrize("version", [1, 2])
def test_the_record_beside_a_peft_export_is_refused_alike(
    version: int, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    export_main([str(adapter), "--format", "peft", "--out", str(tmp_path / "peft")])
    capsys.readouterr()
    rewrite_record(tmp_path / "peft" / SIDE_META, format_version=version, method=writes(tmp_path / MARKER))
    with pytest.raises(AdapterFormatError, match=SIDE_META):
        load_adapted_model(tmp_path / "peft")
    torch.manual_seed(0)
    with pytest.raises(AdapterFormatError, match=SIDE_META):
        load_adapter(tmp_path / "peft", tiny_vit())
    assert_nothing_ran(tmp_path, capsys)


def synthetic_data(**entries: object) -> dict:
    return {"_target_": "lora_vision.data.SyntheticDataModule", "image_size": 32, "num_classes": 10, **entries}


@pytest.mark.parametrize("source", ["adapter", "merged"])
@pytest.mark.parametrize("data", ["a callable", "a target inside"])
def test_evaluation_refuses_a_recorded_data_config_that_names_code(
    source: str, data: str, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    directory, record = adapter, adapter / ADAPTER_META
    if source == "merged":
        export_main([str(adapter), "--out", str(tmp_path / "merged")])
        directory, record = tmp_path / "merged", tmp_path / "merged" / MODEL_META
    capsys.readouterr()
    planted = {
        "a callable": {**writes(tmp_path / MARKER), "image_size": 32},
        "a target inside": synthetic_data(seed=prints()),
    }[data]
    rewrite_record(record, data=planted)
    with pytest.raises(SystemExit):
        evaluate.main([str(directory)])
    error = capsys.readouterr().err
    assert f"the data config recorded in {directory}" in error
    assert ("lora_vision.data.SyntheticDataModule" if data == "a callable" else "seed._target_") in error
    assert_nothing_ran(tmp_path, capsys)


class Writes:
    """Unpickled, writes a file: what a checkpoint from someone else might hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return Path.write_text, (self.marker, "pwned")


def planted_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": {}, "payload": Writes(tmp_path / MARKER)}, path)
    return path


def test_the_run_adapter_reads_the_best_checkpoint_as_tensors_only(tmp_path: Path) -> None:
    # After a resume, the checkpoint callback's best path comes from the resumed checkpoint.
    with composed("+exp=smoke", output_dir=tmp_path) as cfg:
        method = build_method(cfg.lora)
        model = build_backbone(cfg.model, 4)
        method.apply(model)
        module = build_module(cfg, model, 4, method)
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            save_run_adapter(cfg, method, module, str(planted_checkpoint(tmp_path)), False, "", 4)
    assert not (tmp_path / MARKER).exists() and not (tmp_path / "adapter").exists()


def test_lightning_reads_a_resumed_checkpoint_as_tensors_only(tmp_path: Path) -> None:
    # The checkpoint IO behind trainer.fit(ckpt_path=...) and trainer.test(ckpt_path=...) in training runs.
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(planted_checkpoint(tmp_path))
    assert not (tmp_path / MARKER).exists()


def test_a_record_that_is_not_json_is_a_format_error(adapter: Path) -> None:
    (adapter / ADAPTER_META).write_bytes(json.dumps({"format": "lora_vision.adapter"}).encode()[:-3])
    with pytest.raises(AdapterFormatError, match="is not a JSON file"):
        load_adapter(adapter, tiny_vit())

"""Evaluation: metrics on a hand-built case, a trained run evaluated again (and its adapter), several adapters on
one backbone, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lora_vision.evaluate as evaluate
from lora_vision.evaluate import evaluate_model, load_source, locate_source, main
from lora_vision.export import main as export_main
from lora_vision.methods import LoRA
from lora_vision.train import run
from tests.helpers import (
    RESNET_KWARGS,
    VIT_KWARGS,
    adapted,
    composed,
    make_vtab1k_layout,
    rewrite_record,
    tiny_resnet,
    tiny_vit,
)


class Recorder(nn.Identity):
    """Passes its input through as logits and remembers whether it ran in train mode."""

    modes: list[bool]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes = [*getattr(self, "modes", []), self.training]
        return x


def test_evaluate_model_on_known_logits() -> None:
    ranked = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    logits = torch.stack([ranked, ranked, ranked, ranked.flip(0)])
    # label 0: top-1; label 4: 5th best, top-5 only; label 5: neither; flipped with label 5: top-1.
    labels = torch.tensor([0, 4, 5, 5])
    loader = DataLoader(TensorDataset(logits, labels), batch_size=3)  # uneven batches must accumulate
    model = Recorder().train()
    scores = evaluate_model(model, loader, num_classes=6)
    log_partition = math.log(sum(math.exp(k) for k in range(6)))
    assert scores["acc1"] == 0.5 and scores["acc5"] == 0.75 and scores["images"] == 4
    assert scores["loss"] == pytest.approx(log_partition - (5 + 1 + 0 + 5) / 4)
    assert model.modes == [False, False] and model.training  # ran in eval mode, mode restored
    first = evaluate_model(model, loader, num_classes=6, limit_batches=1)
    assert first["images"] == 3 and first["acc1"] == pytest.approx(1 / 3) and first["acc5"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke experiment, checkpointing its *worst* epoch, so the best checkpoint is not the final weights."""
    run_dir = tmp_path_factory.mktemp("smoke")
    with composed("+exp=smoke", "objective.mode=min", output_dir=run_dir) as cfg:
        run(cfg)
        (run_dir / ".hydra").mkdir()
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what @hydra.main leaves in a run directory
    return run_dir


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def assert_adapter_holds_the_best_checkpoint(run_dir: Path) -> None:
    record = results(run_dir)
    best = torch.load(record["best_checkpoint"], map_location="cpu", weights_only=False)
    # Training went on after the best checkpoint, so its weights are not the final ones.
    assert best["global_step"] < record["steps"]
    adapter = safetensors.torch.load_file(Path(record["adapter_dir"]) / "adapter.safetensors")
    assert set(adapter) == {key.removeprefix("model.") for key in best["state_dict"]}
    for key, tensor in adapter.items():
        assert torch.equal(tensor, best["state_dict"][f"model.{key}"]), key
    assert record["adapter_bytes"] == (Path(record["adapter_dir"]) / "adapter.safetensors").stat().st_size
    meta = json.loads((Path(record["adapter_dir"]) / "adapter.json").read_text())
    assert meta["base_fingerprint"] == record["base_fingerprint"]


def test_a_run_saves_the_adapter_of_its_best_checkpoint(smoke_run: Path) -> None:
    assert_adapter_holds_the_best_checkpoint(smoke_run)


def test_without_a_test_the_best_checkpoint_is_loaded_for_the_adapter(tmp_path: Path) -> None:
    with composed("+exp=smoke", "objective.mode=min", "test=false", output_dir=tmp_path) as cfg:
        run(cfg)
    assert_adapter_holds_the_best_checkpoint(tmp_path)


def test_cli_reproduces_the_recorded_test_and_validation_accuracy(smoke_run: Path, capsys) -> None:
    record = results(smoke_run)
    test = main([str(smoke_run)])
    assert test["kind"] == "run" and test["data"] == "synthetic" and test["images"] == 128
    assert test["acc1"] == pytest.approx(record["test_acc1"], abs=1e-6)
    assert test["acc5"] == pytest.approx(record["test_acc5"], abs=1e-6)
    assert test["loss"] == pytest.approx(record["test_loss"], rel=1e-4)
    assert json.loads((smoke_run / "eval" / "synthetic_test.json").read_text())["acc1"] == test["acc1"]
    assert "top-1" in capsys.readouterr().out
    val = main([str(smoke_run), "--split", "val"])
    assert val["acc1"] == pytest.approx(record["objective_metric_value"], abs=1e-6)


def test_a_composed_data_option_gives_the_same_data(smoke_run: Path, tmp_path: Path) -> None:
    # data=synthetic starts from the option's own defaults; the model's image size and the run's seed carry over.
    options = ["data=synthetic", "data.num_classes=4", "data.num_samples=256", "data.num_test_samples=128"]
    adapter_file = smoke_run / "adapter" / "adapter.safetensors"
    scores = main([str(adapter_file), *options, "--batch-size", "32", "--out", str(tmp_path / "eval.json")])
    assert scores["kind"] == "adapter" and scores["data_config"]["image_size"] == 32
    assert scores["acc1"] == pytest.approx(results(smoke_run)["test_acc1"], abs=1e-6)
    assert (tmp_path / "eval.json").is_file()


def test_a_merged_export_of_the_run_scores_the_same(smoke_run: Path, tmp_path: Path) -> None:
    export_main([str(smoke_run), "--out", str(tmp_path / "merged")])
    scores = main([str(tmp_path / "merged"), "--limit-batches", "2"])
    assert scores["kind"] == "merged" and scores["images"] == 64
    expected = main([str(smoke_run), "--limit-batches", "2", "--out", str(tmp_path / "run.json")])
    assert scores["acc1"] == expected["acc1"] and scores["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert (tmp_path / "merged" / "eval" / "synthetic_test.json").is_file()


@pytest.fixture
def bare_adapter(tmp_path: Path) -> Path:
    """An adapter saved without a data config."""
    adapted(tiny_vit, LoRA(rank=4, targets=["qv"]), tmp_path / "adapter", "vit_small_patch16_224", VIT_KWARGS)
    return tmp_path / "adapter"


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Input errors must surface before any model is built."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(evaluate, "load_source", refuse)


def cli_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.usefixtures("no_model_loading")
def test_cli_refuses_bad_sources(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expected = "expected a training run directory (with .hydra/ and adapter/), an adapter directory"
    assert "does not exist; " + expected in cli_error(capsys, str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "is not an evaluation source; " + expected in cli_error(capsys, str(tmp_path / "empty"))
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("{}\n")
    assert "has no adapter/" in cli_error(capsys, str(tmp_path / "run"))


@pytest.mark.usefixtures("no_model_loading")
def test_cli_refuses_bad_data_arguments_before_loading(
    smoke_run: Path, bare_adapter: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = str(smoke_run)
    assert "data=nosuch is not a data option; options: cifar10, cifar100," in cli_error(capsys, run_dir, "data=nosuch")
    assert "is not data=NAME or data.KEY=VALUE" in cli_error(capsys, run_dir, "model=resnet18")
    assert "expected data=NAME or data.KEY=VALUE" in cli_error(capsys, run_dir, "data.batch_size=[1,")
    error = cli_error(capsys, run_dir, "data.nosuch=1")
    assert "data.nosuch is not a key of the recorded data config; keys: " in error and "num_samples" in error
    assert "is not a key of data=cifar10" in cli_error(capsys, run_dir, "data=cifar10", "data.nosuch=1")
    assert "recorded no training data config; choose the data with data=NAME" in cli_error(capsys, str(bare_adapter))
    assert "invalid choice: 'train'" in cli_error(capsys, run_dir, "--split", "train")
    assert "expected an integer >= 1, got 0" in cli_error(capsys, run_dir, "--limit-batches", "0")


def test_cli_refuses_data_with_another_class_count(smoke_run: Path, capsys: pytest.CaptureFixture) -> None:
    error = cli_error(capsys, str(smoke_run), "data.num_classes=5")
    assert "the model has 4 classes, data synthetic has 5" in error


def test_load_source_tells_the_kinds_apart(smoke_run: Path, bare_adapter: Path) -> None:
    assert locate_source(smoke_run).kind == "run"
    assert locate_source(bare_adapter / "adapter.json").kind == "adapter"
    loaded = load_source(bare_adapter)
    assert loaded.kind == "adapter" and loaded.num_classes == 10 and loaded.data_cfg is None
    assert loaded.image_size == 32 and not loaded.model.training


def test_a_vtab1k_evaluation_is_named_by_its_task(bare_adapter: Path, tmp_path: Path) -> None:
    root = make_vtab1k_layout(tmp_path / "vtab-1k")
    vtab = ("data=vtab1k", f"data.root={root}", "data.image_size=32", "data.num_workers=0")
    with composed(*vtab, "data.task=eurosat") as cfg:  # eurosat and svhn: 10 classes, as the adapter's head
        rewrite_record(bare_adapter / "adapter.json", data=OmegaConf.to_container(cfg.data, resolve=True))
    recorded = main([str(bare_adapter)])
    assert recorded["data"] == "vtab1k-eurosat" and recorded["images"] == 4
    assert (bare_adapter / "eval" / "vtab1k-eurosat_test.json").is_file()
    chosen = main([str(bare_adapter), *vtab[:2], "data.task=svhn", "data.num_workers=0", "--split", "val"])
    assert chosen["data"] == "vtab1k-svhn"
    assert sorted(p.name for p in (bare_adapter / "eval").iterdir()) == [
        "vtab1k-eurosat_test.json",
        "vtab1k-svhn_val.json",
    ]


@pytest.fixture
def two_adapters(tmp_path: Path) -> dict[str, Path]:
    """Two adapters of one tiny ViT, each with its own head: `woof` records synthetic data (40 test images), `cifar`
    is a PEFT export that records none."""
    woof, cifar = tmp_path / "woof", tmp_path / "cifar"
    adapted(tiny_vit, LoRA(rank=4, targets=["qv"]), woof, "vit_small_patch16_224", VIT_KWARGS)
    with composed("data=synthetic", "data.num_samples=64", "data.num_test_samples=40", "data.batch_size=16") as cfg:
        rewrite_record(woof / "adapter.json", data=OmegaConf.to_container(cfg.data, resolve=True))
    adapted(tiny_vit, LoRA(rank=2, targets=["mlp"], dora=True), cifar, "vit_small_patch16_224", VIT_KWARGS)
    export_main([str(cifar), "--format", "peft", "--out", str(tmp_path / "cifar_peft")])
    return {"woof": woof, "cifar": tmp_path / "cifar_peft"}


# cifar's data: the synthetic option with 24 test images (seed 0); data.noise applies to both adapters.
CIFAR_DATA = ("--data", "cifar:data=synthetic", "--data", "cifar:data.num_test_samples=24")


def test_several_adapters_on_one_backbone_score_as_each_alone(
    two_adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    woof, cifar = (str(path) for path in two_adapters.values())
    together = main([f"woof={woof}", f"cifar={cifar}", *CIFAR_DATA, "data.noise=2.0"])
    summary = capsys.readouterr().out.splitlines()
    cifar_data = ["data=synthetic", "data.num_test_samples=24", "data.noise=2.0"]
    alone = {
        "woof": main([woof, "data.noise=2.0", "--out", str(tmp_path / "woof.json")]),
        "cifar": main([cifar, *cifar_data, "--out", str(tmp_path / "cifar.json")]),
    }
    assert list(together) == ["woof", "cifar"]
    assert (together["woof"]["images"], together["cifar"]["images"]) == (40, 24)  # each on its own data
    for name, record in together.items():
        expected = alone[name]
        assert record["adapter"] == name and record["data_config"] == expected["data_config"]
        assert [record[key] for key in ("acc1", "acc5", "images")] == [
            expected[key] for key in ("acc1", "acc5", "images")
        ]
        assert record["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        written = two_adapters[name] / "eval" / "synthetic_test.json"
        assert json.loads(written.read_text()) == record  # where evaluating it alone writes by default
        line = next(line for line in summary if line.startswith(f"{name} "))
        assert f"{record['acc1']:.2%}" in line and str(written) in line
    # The adapters differ: scoring cifar's data with woof's adapter active would have failed above.
    woof_on_cifar_data = main([woof, *cifar_data, "--out", str(tmp_path / "other.json")])
    assert woof_on_cifar_data["loss"] != pytest.approx(together["cifar"]["loss"], rel=1e-3)


@pytest.fixture
def no_adapters_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Input errors of several adapters must surface before any model is built."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the adapters were loaded before the input was checked")

    monkeypatch.setattr(evaluate, "load_adapters_onto_recorded_base", refuse)


@pytest.mark.usefixtures("no_adapters_loading")
def test_bad_input_for_several_adapters_is_one_message(
    two_adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    woof, cifar = (f"{name}={path}" for name, path in two_adapters.items())
    assert "adapter name 'woof' is given twice" in cli_error(capsys, woof, woof.replace("woof=", "woof=x"))
    error = cli_error(capsys, woof, cifar, "--data", "cifar:data=nosuch")
    assert f"adapter 'cifar' ({two_adapters['cifar']}): data=nosuch is not a data option; options: cifar10" in error
    error = cli_error(capsys, woof, cifar, *CIFAR_DATA, "--data", "woof:data.nosuch=1")
    assert "adapter 'woof' " in error and "data.nosuch is not a key of the recorded data config" in error
    error = cli_error(capsys, woof, cifar)
    assert "adapter 'cifar' " in error and "recorded no training data config; choose the data with data=NAME" in error
    error = cli_error(capsys, woof, cifar, "--data", "dog:data=synthetic")
    assert "no adapter is named 'dog'; adapters: woof, cifar" in error
    assert "expected NAME:data=OPTION or NAME:data.KEY=VALUE" in cli_error(capsys, woof, cifar, "--data", "cifar")
    assert "to evaluate several adapters, name every source" in cli_error(capsys, woof, str(two_adapters["cifar"]))
    error = cli_error(capsys, str(two_adapters["woof"]), "--data", "woof:data=synthetic")
    assert "names an adapter, but" in error and "is one unnamed source" in error
    assert "--out names one result file" in cli_error(capsys, woof, cifar, *CIFAR_DATA, "--out", "x.json")
    export_main([str(two_adapters["woof"]), "--out", str(tmp_path / "merged")])
    error = cli_error(capsys, woof, f"merged={tmp_path / 'merged'}")
    assert "adapter 'merged' " in error and "is a merged export, a whole model of its own" in error


def test_adapters_of_another_base_model_are_refused_naming_the_adapter(
    two_adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    adapted(tiny_resnet, LoRA(rank=2, targets=["conv3x3"]), tmp_path / "resnet", "resnet18", RESNET_KWARGS)
    argv = [f"woof={two_adapters['woof']}", f"resnet={tmp_path / 'resnet'}", "--data", "resnet:data=synthetic"]
    error = cli_error(capsys, *argv)
    assert f"adapter 'resnet' ({tmp_path / 'resnet'}): " in error and "resnet18" in error
    assert len(error.strip().splitlines()) == 1

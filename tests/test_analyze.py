"""The analysis computes exact spectra from the adapter factors and truncates adapters optimally (Eckart-Young)."""

from __future__ import annotations

import copy
import csv
import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_vision.adapters import save_adapter, weights_fingerprint
from lora_vision.analyze import (
    default_ranks,
    effective_rank,
    evaluate_truncations,
    layer_spectra,
    low_rank_svd,
    retained_energy,
    smallest_sufficient_rank,
    truncate_adapters,
    write_spectra,
    write_truncation,
)
from lora_vision.analyze.__main__ import main
from lora_vision.analyze.truncate import TruncationRow
from lora_vision.lora import LoRALayer, LoRALinear, apply_lora, lora_layers
from lora_vision.lora.adapter import QKV_SLOTS
from lora_vision.methods import LoRA
from lora_vision.models import build_model
from tests.helpers import TINY_VIT, randomize_adapters, tiny_resnet, tiny_vit


def grouped_convs() -> nn.Module:
    return nn.Sequential(nn.Conv2d(8, 12, 3, groups=4), nn.Conv2d(12, 12, 3, groups=12)).eval()


def adapted(model: nn.Module, targets: str | list[str], rank: int, **options) -> nn.Module:
    apply_lora(model, targets, rank=rank, alpha=2 * rank, **options)
    randomize_adapters(model)
    return model


MODELS = {
    "vit_qv_mlp": lambda: adapted(tiny_vit(), ["qv", "mlp"], rank=4),
    # Stages 1 and 2 only: dense reference SVDs of stage 4's 512 x 4608 kernels would take most of a minute.
    "resnet_conv3x3": lambda: adapted(tiny_resnet(), "conv3x3", rank=4, blocks=[1, 2]),
    "grouped_conv": lambda: adapted(grouped_convs(), "all_convs", rank=3),
    # PiSSA's update B A - B0 A0 has rank up to 2r; DoRA's low-rank part is the update of the direction.
    "vit_pissa": lambda: adapted(tiny_vit(), "qv", rank=4, init="pissa"),
    "resnet_dora_rslora": lambda: adapted(tiny_resnet(), "conv3x3", rank=4, blocks=[1], dora=True, rslora=True),
}


def dense_update(layer: LoRALayer) -> torch.Tensor:
    """The update of each adapted slot as an (S, out_s, fan_in) matrix, from the layer's own delta_weight()."""
    delta = layer.delta_weight().flatten(1)
    if layer.slot_names == ("all",):
        return delta[None]
    return delta.unflatten(0, (len(QKV_SLOTS), -1))[[QKV_SLOTS.index(s) for s in layer.slot_names]]


@pytest.mark.parametrize("name", MODELS)
def test_singular_values_from_the_factors_equal_those_of_the_dense_update(name: str) -> None:
    model = MODELS[name]()
    layers = lora_layers(model)
    assert layers
    for layer in layers:
        dense = dense_update(layer).double()
        u, s, vh = low_rank_svd(*layer.low_rank_update())
        torch.testing.assert_close(s, torch.linalg.svdvals(dense)[:, : s.shape[-1]], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, dense, rtol=1e-5, atol=1e-6)
    rows = layer_spectra(model)
    assert len(rows) == sum(len(layer.slot_names) for layer in layers)
    assert all(row.singular_values == tuple(sorted(row.singular_values, reverse=True)) for row in rows)


def test_effective_rank_of_hand_computed_spectra() -> None:
    assert effective_rank([3.0, 1.0, 0.0, 0.0], 0.9) == 1  # 9 of 10: exactly on the threshold
    assert effective_rank([3.0, 1.0, 0.0, 0.0], 0.99) == 2
    assert effective_rank([1.0, 1.0, 1.0, 1.0], 0.5) == 2
    assert effective_rank([1.0, 1.0, 1.0, 1.0], 0.9) == 4
    assert effective_rank([1.0, 2.0, 1.0, 1.0, 1.0], 0.6) == 2  # energy 4 + 1 of 8, in any order
    assert effective_rank([0.0, 0.0, 0.0], 0.9) == 0


def linear_with_update(singular_values: list[float]) -> LoRALinear:
    """A rank-len(s) adapter on a 6 -> 5 Linear whose update is diag(s) in its top-left corner."""
    layer = LoRALinear(nn.Linear(6, 5), rank=len(singular_values), alpha=1.0)
    k = len(singular_values)
    B = torch.zeros(1, 5, k)
    B[0, :k, :k] = torch.diag(torch.tensor(singular_values))
    layer.set_low_rank_update(B, torch.eye(k, 6)[None])
    return layer


def test_spectrum_row_of_a_known_update() -> None:
    layer = linear_with_update([3.0, 1.0])
    (row,) = layer_spectra(nn.Sequential(layer))
    assert row.singular_values == pytest.approx((3.0, 1.0))
    assert row.effective_ranks == {0.9: 1, 0.99: 2}
    assert row.update_norm == pytest.approx(math.sqrt(10))
    weight = layer.base.weight.double()
    assert row.relative_norm == pytest.approx(math.sqrt(10) / float(weight.norm()))
    assert row.top_relative == pytest.approx(3.0 / float(torch.linalg.matrix_norm(weight, ord=2)))
    assert (row.layer, row.slot, row.rank, row.out_features, row.fan_in) == ("0", "all", 2, 5, 6)

    zero = linear_with_update([0.0, 0.0])
    (row,) = layer_spectra(nn.Sequential(zero), thresholds=(0.5,))
    assert row.effective_ranks == {0.5: 0} and row.update_norm == 0.0


def test_relative_norm_of_qkv_slots_uses_the_slot_of_the_base_weight() -> None:
    model = MODELS["vit_qv_mlp"]()
    rows = {(r.layer, r.slot): r for r in layer_spectra(model)}
    qkv = model.get_submodule("blocks.1.attn.qkv")
    v_update = qkv.delta_weight().detach().unflatten(0, (3, -1))[2]
    v_base = qkv.base.weight.unflatten(0, (3, -1))[2]
    row = rows["blocks.1.attn.qkv", "v"]
    assert row.relative_norm == pytest.approx(float(v_update.norm() / v_base.norm()), rel=1e-5)
    assert (row.block, row.part) == (1, "blocks.attn.qkv:v")
    assert ("blocks.1.attn.qkv", "k") not in rows


@pytest.mark.parametrize("name", MODELS)
def test_truncation_at_or_above_the_rank_changes_nothing(name: str, images: torch.Tensor) -> None:
    model = MODELS[name]()
    x = torch.randn(2, 8, 16, 16) if name == "grouped_conv" else images
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for k in (4, 7):
        same = truncate_adapters(model, k)
        assert same is not model
        assert torch.equal(same(x), model(x))
        assert all(torch.equal(v, before[key]) for key, v in same.state_dict().items())


@pytest.mark.parametrize("name", MODELS)
def test_truncation_is_the_best_rank_k_approximation(name: str) -> None:
    model = MODELS[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    k = 2
    truncated = truncate_adapters(model, k)
    assert all(torch.equal(v, before[key]) for key, v in model.state_dict().items())
    for original, cut in zip(lora_layers(model), lora_layers(truncated), strict=True):
        dense = dense_update(original).double()
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = u[..., :k] @ torch.diag_embed(s[..., :k]) @ vh[..., :k, :]
        got = dense_update(cut).double()
        torch.testing.assert_close(got, best, rtol=0, atol=1e-5)
        assert torch.linalg.matrix_rank(got.float()).max() <= k
        error = (dense - got).square().sum(dim=(-2, -1))
        torch.testing.assert_close(error, s[..., k:].square().sum(-1), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_truncation_to_zero_gives_the_base_model(init: str, images: torch.Tensor) -> None:
    plain = tiny_vit()
    model = adapted(copy.deepcopy(plain), "qv", rank=4, init=init)
    assert not torch.allclose(model(images), plain(images))
    torch.testing.assert_close(truncate_adapters(model, 0)(images), plain(images))
    with pytest.raises(ValueError, match="truncation rank"):
        truncate_adapters(model, -1)


def test_truncation_of_a_merged_model_keeps_it_merged(images: torch.Tensor) -> None:
    model = MODELS["vit_qv_mlp"]()
    reference = truncate_adapters(model, 1)(images)
    for layer in lora_layers(model):
        layer.merge()
    merged = truncate_adapters(model, 1)
    assert all(layer.merged for layer in lora_layers(merged))
    torch.testing.assert_close(merged(images), reference, rtol=1e-4, atol=1e-5)


def update_rank(model: nn.Module) -> int:
    return max(int(torch.linalg.matrix_rank(dense_update(layer)).max()) for layer in lora_layers(model))


def test_evaluate_truncations_runs_every_rank_once_in_order() -> None:
    model = MODELS["vit_qv_mlp"]()
    spectra = layer_spectra(model)
    seen: list[int] = []

    def evaluate(m: nn.Module) -> dict[str, float]:
        seen.append(update_rank(m))
        return {"acc1": 0.1 * seen[-1], "loss": 1.0}

    rows = evaluate_truncations(model, [2, 1, 16], evaluate, spectra=spectra)
    assert [r.k for r in rows] == [0, 1, 2, 4] and seen == [0, 1, 2, 4]
    assert [r.full for r in rows] == [False, False, False, True]
    assert [r.label for r in rows] == ["no update", "rank 1", "rank 2", "full"]
    assert rows[0].retained_energy == 0.0 and rows[-1].retained_energy == 1.0
    assert rows[1].retained_energy < rows[2].retained_energy < 1.0
    assert smallest_sufficient_rank(rows) == 4
    assert smallest_sufficient_rank(rows, tolerance=0.25) == 2
    assert [r.k for r in evaluate_truncations(model, [1], evaluate, include_zero=False)] == [1, 4]


def test_retained_energy_by_hand() -> None:
    rows = layer_spectra(nn.Sequential(linear_with_update([3.0, 1.0]), linear_with_update([2.0, 2.0, 1.0])))
    total = 10 + 9
    assert retained_energy(rows, 1) == pytest.approx((9 + 4) / total)
    assert retained_energy(rows, 2) == pytest.approx((10 + 8) / total)
    assert retained_energy(rows, 3) == 1.0


def test_default_ranks() -> None:
    assert default_ranks(8) == [1, 2, 4, 8]
    assert default_ranks(6) == [1, 2, 4, 6]
    assert default_ranks(1) == [1]


def test_tables_and_plots_are_written(tmp_path) -> None:
    model = MODELS["resnet_conv3x3"]()
    spectra = layer_spectra(model, thresholds=(0.5, 0.9, 0.995))
    paths = write_spectra(spectra, tmp_path)
    assert [p.name for p in paths] == ["spectra.csv", "spectra.md", "spectra.png"]
    lines = list(csv.DictReader(io.StringIO(paths[0].read_text())))
    assert [line["layer"] for line in lines] == [row.layer for row in spectra]
    assert lines[0]["effective_rank_99.5"] == str(spectra[0].effective_ranks[0.995])
    assert float(lines[0]["s1"]) == spectra[0].singular_values[0]
    assert float(lines[0]["relative_norm"]) == spectra[0].relative_norm
    assert "| layer1.0.conv2 | all | 1 | Conv2d | 4 |" in paths[1].read_text()
    assert paths[2].read_bytes().startswith(b"\x89PNG")

    rows = [TruncationRow(k, k == 4, {"acc1": 0.5 + 0.1 * k, "loss": 1.0}, 0.2 * k) for k in (0, 1, 2, 4)]
    paths = write_truncation(rows, tmp_path)
    lines = list(csv.DictReader(io.StringIO(paths[0].read_text())))
    assert [line["label"] for line in lines] == ["no update", "rank 1", "rank 2", "full"]
    assert float(lines[2]["acc1"]) == pytest.approx(0.7)
    assert "| 4 | full | 80.00 | 90.00 | 1 |" in paths[1].read_text()
    assert paths[2].read_bytes().startswith(b"\x89PNG")


VIT_KWARGS = {key: value for key, value in TINY_VIT.items() if key != "num_classes"}


@pytest.fixture
def saved_adapter(tmp_path) -> tuple[Path, nn.Module]:
    """A rank-4 qv adapter of a tiny ViT, saved as training saves it, and the adapted model itself."""
    # The seed recorded below recreates the random base only if the model is built right after seeding.
    torch.manual_seed(0)
    model = build_model("vit_small_patch16_224", num_classes=10, pretrained=False, kwargs=VIT_KWARGS)
    fingerprint = weights_fingerprint(model)
    method = LoRA(rank=4, alpha=8, targets=["qv"])
    method.apply(model)
    randomize_adapters(model)
    directory = save_adapter(
        model,
        tmp_path / "run" / "adapter",
        model_name="vit_small_patch16_224",
        model_kwargs=VIT_KWARGS,
        num_classes=10,
        method_config=method.config(),
        base_fingerprint=fingerprint,
        base_source={"pretrained": False, "checkpoint": None, "seed": 0},
    )
    return directory, model.eval()


def test_cli_spectra_of_a_saved_adapter(saved_adapter: tuple[Path, nn.Module], capsys) -> None:
    directory, model = saved_adapter
    written = main([str(directory / "adapter.safetensors"), "--no-eval", "--thresholds", "0.5,0.9"])
    out = directory / "analysis"
    assert written == [out / "spectra.csv", out / "spectra.md", out / "spectra.png"]
    assert not (out / "truncation.csv").exists()
    lines = list(csv.DictReader(io.StringIO((out / "spectra.csv").read_text())))
    expected = layer_spectra(model, thresholds=(0.5, 0.9))
    assert [(line["layer"], line["slot"]) for line in lines] == [
        (f"blocks.{i}.attn.qkv", s) for i in range(4) for s in "qv"
    ]
    for line, row in zip(lines, expected, strict=True):
        assert float(line["s1"]) == pytest.approx(row.singular_values[0], rel=1e-6)
        assert int(line["effective_rank_90"]) == row.effective_ranks[0.9]
        assert (line["rank"], line["variant"]) == ("4", "lora")
    printed = capsys.readouterr().out
    assert "blocks.3.attn.qkv" in printed and "r@90%" in printed and str(out / "spectra.png") in printed


def test_cli_truncation_on_synthetic_data(saved_adapter: tuple[Path, nn.Module], tmp_path, capsys) -> None:
    directory, _ = saved_adapter
    args = [str(directory), "data=synthetic", "--ranks", "1,2", "--device", "cpu", "--batch-size", "32"]
    main([*args, "--limit-batches", "2", "--out", str(tmp_path / "analysis")])
    lines = list(csv.DictReader(io.StringIO((tmp_path / "analysis" / "truncation.csv").read_text())))
    assert [(line["k"], line["label"]) for line in lines] == [
        ("0", "no update"),
        ("1", "rank 1"),
        ("2", "rank 2"),
        ("4", "full"),
    ]
    assert all(line["images"] == "64" and 0 <= float(line["acc1"]) <= 1 for line in lines)
    assert float(lines[-1]["retained_energy"]) == 1.0 and float(lines[0]["retained_energy"]) == 0.0
    assert (tmp_path / "analysis" / "truncation.png").read_bytes().startswith(b"\x89PNG")
    assert "smallest k within 0.5 pt" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["{adapter}", "--ranks", "0,2"], ["{adapter}", "--thresholds", "0.9,1.5"], ["{adapter}/missing", "--no-eval"]],
)
def test_cli_refuses_bad_arguments(argv: list[str], saved_adapter: tuple[Path, nn.Module], capsys) -> None:
    directory, _ = saved_adapter
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(adapter=directory) for arg in argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err

"""Adapter files: what they hold, the base fingerprint, and exact round trips onto a freshly built base."""

from __future__ import annotations

import ast
import graphlib
import json
import struct
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

import lora_vision.adapters
from lora_vision.adapters import (
    ADAPTER_META,
    ADAPTER_TENSORS,
    FORMAT_VERSION,
    AdapterMismatchError,
    BaseWeightsMismatchError,
    adapter_state,
    load_adapted_model,
    load_adapter,
    read_adapter_meta,
    save_adapter,
    weights_fingerprint,
)
from lora_vision.lora import LoRALayer, merge_lora, state_dict_key
from lora_vision.methods import BitFit, FullFineTune, LinearProbe, LoRA
from lora_vision.models import build_model
from tests.helpers import (
    RESNET_KWARGS,
    VIT_KWARGS,
    adapted,
    as_version_1,
    perturb_trainable,
    randomize_adapters,
    tiny_resnet,
    tiny_vit,
)

CASES = {
    "vit-qv": (tiny_vit, lambda: LoRA(rank=4, targets=["qv"])),
    "vit-all_linear": (tiny_vit, lambda: LoRA(rank=2, alpha=4.0, targets=["all_linear"])),
    "vit-qv-dora": (tiny_vit, lambda: LoRA(rank=4, targets=["qv"], dora=True)),
    "vit-mlp-pissa": (tiny_vit, lambda: LoRA(rank=4, targets=["mlp"], init="pissa")),
    "vit-head-adapted": (tiny_vit, lambda: LoRA(rank=2, targets=["qv", "classifier"], train_head=False)),
    "resnet-all_convs": (tiny_resnet, lambda: LoRA(rank=2, targets=["all_convs"])),
    "resnet-all_convs-dora": (tiny_resnet, lambda: LoRA(rank=2, targets=["all_convs"], dora=True)),
    "resnet-bitfit": (tiny_resnet, BitFit),
    "vit-linear_probe": (tiny_vit, LinearProbe),
}


@pytest.mark.parametrize("case", CASES)
def test_round_trip_onto_a_fresh_base_gives_identical_logits(case: str, tmp_path: Path, images: torch.Tensor) -> None:
    make, method = CASES[case]
    name, kwargs = ("resnet18", RESNET_KWARGS) if make is tiny_resnet else ("vit_small_patch16_224", VIT_KWARGS)
    trained = adapted(make, method(), tmp_path, name, kwargs)
    torch.manual_seed(0)
    loaded = load_adapter(tmp_path, make())
    assert not loaded.training
    expected = trained(images)
    assert torch.equal(loaded(images), expected)
    # The base alone computes something else: the adapter carries the difference.
    torch.manual_seed(0)
    assert not torch.allclose(make()(images), expected, atol=1e-3)


@pytest.mark.parametrize("case", ["vit-qv-dora", "resnet-bitfit"])
def test_an_adapter_of_format_version_1_loads_with_identical_logits(
    case: str, tmp_path: Path, images: torch.Tensor
) -> None:
    make, method = CASES[case]
    name, kwargs = ("resnet18", RESNET_KWARGS) if make is tiny_resnet else ("vit_small_patch16_224", VIT_KWARGS)
    trained = adapted(make, method(), tmp_path, name, kwargs)
    as_version_1(tmp_path / ADAPTER_META)
    # Read as the current format: the `_target_` record becomes the method's name and settings.
    assert read_adapter_meta(tmp_path)["method"] == method().config()
    model, meta = load_adapted_model(tmp_path)
    assert meta["format_version"] == FORMAT_VERSION
    assert torch.equal(model(images), trained(images))


def test_adapter_modules_import_one_way_at_module_level() -> None:
    package = Path(lora_vision.adapters.__file__).parent
    graph = {}
    for file in sorted(package.glob("*.py")):
        tree = ast.parse(file.read_text())
        functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
        late = [f.name for f in functions for node in ast.walk(f) if isinstance(node, ast.Import | ast.ImportFrom)]
        assert late == [], f"{file.name} imports inside {late}"
        ours = [
            node
            for node in tree.body
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_vision")
        ]
        private = [f"{node.module}.{alias.name}" for node in ours for alias in node.names if alias.name[0] == "_"]
        assert private == [], f"{file.name} imports private names {private}"
        inside = [node.module for node in ours if node.module.startswith("lora_vision.adapters")]
        graph[file.stem] = {module.removeprefix("lora_vision.adapters").lstrip(".") or "__init__" for module in inside}
    assert len(graph) > 4
    list(graphlib.TopologicalSorter(graph).static_order())  # CycleError if two modules import each other


def saved_keys(path: Path) -> set[str]:
    return set(safetensors.torch.load_file(path / ADAPTER_TENSORS))


def test_vit_b16_rank8_qv_adapter_is_the_documented_size(tmp_path: Path) -> None:
    # The README's figure: 294,912 adapter + 76,900 head values in fp32, plus the safetensors header.
    make = partial(timm.create_model, "vit_base_patch16_224", pretrained=False, num_classes=100)
    model = adapted(make, LoRA(rank=8, targets=["qv"]), tmp_path, "vit_base_patch16_224", {})
    head = model.head.weight.numel() + model.head.bias.numel()
    file = tmp_path / ADAPTER_TENSORS
    header = struct.unpack("<Q", file.read_bytes()[:8])[0]
    assert file.stat().st_size == 8 + header + (294_912 + head) * 4 < 2_000_000


def test_file_holds_the_trainable_tensors_only_and_its_size_is_their_bytes(tmp_path: Path) -> None:
    model = adapted(tiny_vit, LoRA(rank=4, targets=["qv"]), tmp_path, "vit_small_patch16_224", VIT_KWARGS)
    trainable = {state_dict_key(name) for name, p in model.named_parameters() if p.requires_grad}
    assert saved_keys(tmp_path) == trainable
    assert trainable == {f"blocks.{i}.attn.qkv.lora_{x}" for i in range(4) for x in "AB"} | {"head.weight", "head.bias"}
    file = tmp_path / ADAPTER_TENSORS
    tensor_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    header = struct.unpack("<Q", file.read_bytes()[:8])[0]
    assert file.stat().st_size == 8 + header + tensor_bytes
    assert header < 100 * len(trainable)
    meta = json.loads((tmp_path / ADAPTER_META).read_text())
    assert meta["tensor_count"] == len(trainable) and meta["tensor_bytes"] == tensor_bytes
    assert [layer["parts"] for layer in meta["layers"]] == ["q,v"] * 4
    assert meta["method"]["name"] == "lora" and meta["method"]["settings"]["rank"] == 4


def test_pissa_adapter_also_holds_the_frozen_initial_factors(tmp_path: Path) -> None:
    model = adapted(tiny_vit, LoRA(rank=4, targets=["qv"], init="pissa"), tmp_path, "vit_small_patch16_224", VIT_KWARGS)
    trainable = {state_dict_key(name) for name, p in model.named_parameters() if p.requires_grad}
    factors = {f"blocks.{i}.attn.qkv.pissa_{x}0" for i in range(4) for x in "AB"}
    assert saved_keys(tmp_path) == trainable | factors
    assert not any(".base." in key for key in saved_keys(tmp_path))


def test_batchnorm_statistics_are_saved_only_where_the_layer_trains(tmp_path: Path) -> None:
    lora = adapted(tiny_resnet, LoRA(rank=2, targets=["conv3x3"]), tmp_path / "lora", "resnet18", RESNET_KWARGS)
    assert not any("running_" in key for key in saved_keys(tmp_path / "lora"))
    bitfit = adapted(tiny_resnet, BitFit(), tmp_path / "bitfit", "resnet18", RESNET_KWARGS)
    stats = {name for name, _ in bitfit.named_buffers() if "bn" in name}
    assert stats and stats <= saved_keys(tmp_path / "bitfit")
    everything = adapter_state(lora, all_batchnorm_stats=True)
    assert {name for name, _ in lora.named_buffers() if "bn" in name} <= set(everything)


def test_full_fine_tuning_saves_every_weight(tmp_path: Path) -> None:
    model = adapted(tiny_vit, FullFineTune(), tmp_path, "vit_small_patch16_224", VIT_KWARGS)
    assert saved_keys(tmp_path) == set(model.state_dict())


def test_fingerprint_of_an_adapted_model_is_that_of_its_base() -> None:
    base = tiny_vit()
    fingerprint = weights_fingerprint(base)
    LoRA(rank=4, targets=["qv", "mlp", "classifier"], train_head=False).apply(base)
    randomize_adapters(base)
    assert weights_fingerprint(base) == fingerprint
    resnet = tiny_resnet()
    fingerprint = weights_fingerprint(resnet)
    LoRA(rank=2, targets=["all_convs"], dora=True).apply(resnet)
    randomize_adapters(resnet)
    assert weights_fingerprint(resnet) == fingerprint


def test_fingerprint_sees_one_changed_backbone_value_but_not_the_head() -> None:
    model = tiny_vit()
    fingerprint = weights_fingerprint(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
        model.head.bias.add_(1.0)
    assert weights_fingerprint(model) == fingerprint
    with torch.no_grad():
        model.blocks[2].mlp.fc1.weight[3, 5] += 1e-6
    assert weights_fingerprint(model) != fingerprint


def test_fingerprint_ignores_the_head_size() -> None:
    model = tiny_vit()
    fingerprint = weights_fingerprint(model)
    model.reset_classifier(100)
    assert weights_fingerprint(model) == fingerprint


def test_fingerprint_refuses_a_merged_model() -> None:
    model = tiny_vit()
    LoRA(rank=4, targets=["qv"]).apply(model)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"):
        weights_fingerprint(model)


@pytest.fixture
def vit_adapter(tmp_path: Path) -> Path:
    adapted(tiny_vit, LoRA(rank=4, targets=["qv"]), tmp_path, "vit_small_patch16_224", VIT_KWARGS)
    return tmp_path


@pytest.mark.parametrize(
    ("make_base", "error", "message"),
    [
        (
            tiny_resnet,
            AdapterMismatchError,
            "adapter was trained on vit_small_patch16_224 with 10 classes, this base is resnet18 with 10 classes",
        ),
        (
            lambda: tiny_vit(num_classes=100),
            AdapterMismatchError,
            "adapter was trained on vit_small_patch16_224 with 10 classes, this base has 100 classes",
        ),
        (lambda: tiny_vit(depth=2), AdapterMismatchError, "names, shapes or dtypes"),
        (lambda: tiny_vit().half(), AdapterMismatchError, "names, shapes or dtypes"),
        (tiny_vit, BaseWeightsMismatchError, "base weights differ from the ones the adapter was trained on"),
    ],
    ids=["architecture", "classes", "kwargs", "dtype", "weights"],
)
def test_loading_onto_another_base_is_refused_before_the_base_changes(
    vit_adapter: Path, make_base: Callable[[], nn.Module], error: type, message: str
) -> None:
    torch.manual_seed(1)  # other weights than the adapter's base (seed 0)
    base = make_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(error) as err:
        load_adapter(vit_adapter, base)
    assert message in str(err.value)
    assert not any(isinstance(m, LoRALayer) for m in base.modules())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_weights_mismatch_names_both_fingerprints(vit_adapter: Path) -> None:
    recorded = json.loads((vit_adapter / ADAPTER_META).read_text())["base_fingerprint"]
    torch.manual_seed(1)
    base = tiny_vit()
    with pytest.raises(BaseWeightsMismatchError) as err:
        load_adapter(vit_adapter, base)
    assert weights_fingerprint(base)[:12] in str(err.value) and recorded[:12] in str(err.value)
    assert "pass the same pretrained weights/checkpoint" in str(err.value)


def test_an_adapted_base_is_refused(vit_adapter: Path) -> None:
    torch.manual_seed(0)
    base = tiny_vit()
    LoRA(rank=4, targets=["qv"]).apply(base)
    with pytest.raises(AdapterMismatchError, match="already carries LoRA layers"):
        load_adapter(vit_adapter / ADAPTER_TENSORS, base)


def test_a_tampered_file_is_refused(vit_adapter: Path) -> None:
    tensors = safetensors.torch.load_file(vit_adapter / ADAPTER_TENSORS)
    del tensors["blocks.0.attn.qkv.lora_A"]
    tensors["blocks.0.attn.qkv.lora_C"] = torch.zeros(1)
    safetensors.torch.save_file(tensors, vit_adapter / ADAPTER_TENSORS)
    torch.manual_seed(0)
    with pytest.raises(AdapterMismatchError, match=r"missing \['blocks.0.attn.qkv.lora_A'\].*lora_C"):
        load_adapter(vit_adapter, tiny_vit())


def save_for(model_source: dict, path: Path, images: torch.Tensor) -> torch.Tensor:
    """Build the tiny ViT from `model_source` (like training does), adapt and save it; return its logits."""
    base = build_model("vit_small_patch16_224", num_classes=10, kwargs=VIT_KWARGS, **model_source)
    fingerprint = weights_fingerprint(base)
    method = LoRA(rank=4, targets=["qv"])
    method.apply(base)
    perturb_trainable(base)
    save_adapter(
        base,
        path,
        model_name="vit_small_patch16_224",
        model_kwargs=VIT_KWARGS,
        num_classes=10,
        method_config=method.config(),
        base_fingerprint=fingerprint,
        base_source={"pretrained": False, "checkpoint": model_source.get("checkpoint"), "seed": 7},
    )
    return base.eval()(images)


def test_load_adapted_model_rebuilds_a_checkpoint_base(tmp_path: Path, images: torch.Tensor) -> None:
    weights = tmp_path / "base.safetensors"
    safetensors.torch.save_file(tiny_vit().state_dict(), weights)
    expected = save_for({"checkpoint": str(weights)}, tmp_path / "adapter", images)
    model, meta = load_adapted_model(tmp_path / "adapter")
    assert torch.equal(model(images), expected)
    assert meta["base_source"]["checkpoint"] == str(weights)


def test_a_missing_recorded_checkpoint_says_how_to_pass_one(tmp_path: Path, images: torch.Tensor) -> None:
    weights = tmp_path / "base.safetensors"
    safetensors.torch.save_file(tiny_vit().state_dict(), weights)
    save_for({"checkpoint": str(weights)}, tmp_path / "adapter", images)
    moved = weights.rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist here; pass the same weights file"):
        load_adapted_model(tmp_path / "adapter")
    model, _ = load_adapted_model(tmp_path / "adapter", checkpoint=moved)
    assert isinstance(model.blocks[0].attn.qkv, LoRALayer)


def test_a_random_init_base_is_rebuilt_from_its_seed(tmp_path: Path, images: torch.Tensor) -> None:
    torch.manual_seed(7)
    expected = save_for({"pretrained": False}, tmp_path, images)
    state = torch.random.get_rng_state()
    model, _ = load_adapted_model(tmp_path)
    assert torch.equal(model(images), expected)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone


def test_a_random_init_base_that_cannot_be_rebuilt_says_so(tmp_path: Path, images: torch.Tensor) -> None:
    torch.manual_seed(8)  # not the recorded seed 7: as if something drew random numbers before the model was built
    save_for({"pretrained": False}, tmp_path, images)
    with pytest.raises(AdapterMismatchError) as err:
        load_adapted_model(tmp_path)
    message = str(err.value)
    assert "base weights differ" in message and "randomly initialised" in message and "--checkpoint" in message

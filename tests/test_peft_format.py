"""PEFT interop: adapters exported here load in PEFT with the same logits, PEFT adapters load here with PEFT's
logits, and ours -> PEFT -> ours is bit-identical."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import safetensors.torch
import timm
import torch
from packaging.specifiers import SpecifierSet
from torch import nn

from lora_vision.adapters import (
    PEFT_CONFIG,
    PEFT_VERSIONS,
    SIDE_META,
    PeftFormatError,
    load_adapted_model,
    load_adapter,
    load_peft_adapted_model,
    save_peft_adapter,
)
from lora_vision.evaluate import load_source
from lora_vision.export import main as export_main
from lora_vision.lora import LoRALayer
from lora_vision.lora.variants import LoraVariant
from lora_vision.lora.variants.base import PeftForm
from lora_vision.methods import LoRA
from tests.helpers import RESNET_KWARGS, VIT_KWARGS, adapted, tiny_resnet, tiny_vit

VIT, RESNET = "vit_small_patch16_224", "resnet18"

# Runs in a fresh interpreter that imports timm and peft only: PEFT's own loading must reproduce our logits. One
# interpreter serves every case (each spec in the list): starting one costs more than the cases together.
PEFT_ONLY = """
import json, sys
import safetensors.torch, timm, torch
from peft import PeftModel
for spec in json.loads(sys.argv[1]):
    model = timm.create_model(spec["name"], pretrained=False, num_classes=10, **spec["kwargs"])
    model.load_state_dict(safetensors.torch.load_file(spec["base"]))
    model = PeftModel.from_pretrained(model, spec["adapter"]).eval()
    with torch.no_grad():
        logits = model(safetensors.torch.load_file(spec["images"])["x"])
    safetensors.torch.save_file({"y": logits.contiguous()}, spec["out"])
assert not [name for name in sys.modules if name.startswith("lora_vision")]
"""

CASES = {
    # q and v slots of the fused qkv, the head through modules_to_save.
    "vit_qv": (VIT, tiny_vit, VIT_KWARGS, {"targets": ["qv"]}),
    # Whole layers with rsLoRA and per-layer ranks and alphas (rank_pattern / alpha_pattern).
    "vit_rslora_patterns": (
        VIT,
        tiny_vit,
        VIT_KWARGS,
        {"targets": ["all_linear"], "rslora": True, "rank_pattern": {"blocks.0.*": 2}, "alpha_pattern": {"*fc2": 3.0}},
    ),
    "vit_qv_dora": (VIT, tiny_vit, VIT_KWARGS, {"targets": ["qv"], "dora": True}),
    "vit_qv_pissa": (VIT, tiny_vit, VIT_KWARGS, {"targets": ["qv"], "init": "pissa"}),
    # 3x3 convs (groups=1) and LoRA on the classifier itself.
    "resnet_conv_dora": (RESNET, tiny_resnet, RESNET_KWARGS, {"targets": ["conv3x3", "classifier"], "dora": True}),
}


def base_weights(make, path: Path) -> Path:
    torch.manual_seed(0)  # as `adapted` draws its base
    safetensors.torch.save_file({k: v.contiguous() for k, v in make().state_dict().items()}, path)
    return path


@dataclass
class Exported:
    model: nn.Module
    ours: torch.Tensor
    peft: Path
    peft_logits: Path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """Every case adapted, exported for PEFT, and loaded by PEFT in one interpreter that imports timm and peft only."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cases, specs = {}, []
    for case, (name, make, kwargs, settings) in CASES.items():
        folder = tmp_path_factory.mktemp(case)
        model = adapted(make, LoRA(rank=4, alpha=8.0, **settings), folder / "ours", name, kwargs)
        with torch.no_grad():
            ours = model(images)
        export_main([str(folder / "ours"), "--format", "peft", "--out", str(folder / "peft")])
        safetensors.torch.save_file({"x": images}, folder / "images.safetensors")
        cases[case] = Exported(model, ours, folder / "peft", folder / "peft_logits.safetensors")
        specs.append(
            {
                "name": name,
                "kwargs": kwargs,
                "base": str(base_weights(make, folder / "base.safetensors")),
                "adapter": str(folder / "peft"),
                "images": str(folder / "images.safetensors"),
                "out": str(folder / "peft_logits.safetensors"),
            }
        )
    done = subprocess.run([sys.executable, "-c", PEFT_ONLY, json.dumps(specs)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return cases


def factors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k or "pissa_" in k}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_adapter_gives_our_logits_in_peft_and_comes_back_bit_identical(
    exported: dict[str, Exported], images: torch.Tensor, case: str
) -> None:
    result = exported[case]
    config = json.loads((result.peft / PEFT_CONFIG).read_text())
    assert config["base_model_name_or_path"] == CASES[case][0] and config["peft_type"] == "LORA"
    logits = safetensors.torch.load_file(result.peft_logits)["y"]
    torch.testing.assert_close(logits, result.ours, atol=1e-5, rtol=1e-5)

    back = load_source(result.peft).model  # as evaluate and analyze read it
    model = result.model
    assert factors(back).keys() == factors(model).keys()
    assert all(torch.equal(factors(back)[k], v) for k, v in factors(model).items())
    with torch.no_grad():
        assert torch.equal(back(images), model(images))


# Runs the load call the export prints (read from stdin) in a fresh interpreter that imports timm and peft only.
PRINTED_CALL = """
import sys
import safetensors.torch, torch
exec(sys.stdin.read())
with torch.no_grad():
    logits = model.eval()(safetensors.torch.load_file(sys.argv[1])["x"])
safetensors.torch.save_file({"y": logits.contiguous()}, sys.argv[2])
assert not [name for name in sys.modules if name.startswith("lora_vision")]
"""


def test_the_export_prints_the_exact_peft_load_call(tmp_path: Path, images: torch.Tensor, capsys) -> None:
    model = adapted(tiny_vit, LoRA(rank=4, alpha=8.0, targets=["qv"], dora=True), tmp_path / "ours", VIT, VIT_KWARGS)
    export_main([str(tmp_path / "ours"), "--format", "peft", "--out", str(tmp_path / "peft")])
    code = textwrap.dedent(capsys.readouterr().out.split("load with:\n", 1)[1])
    assert "num_classes=10, depth=4, embed_dim=64" in code and str((tmp_path / "peft").resolve()) in code
    safetensors.torch.save_file({"x": images}, tmp_path / "images.safetensors")
    out = tmp_path / "logits.safetensors"
    command = [sys.executable, "-c", PRINTED_CALL, str(tmp_path / "images.safetensors"), str(out)]
    done = subprocess.run(command, input=code, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(safetensors.torch.load_file(out)["y"], model(images), atol=1e-5, rtol=1e-5)


class Unmapped(LoraVariant):
    """A variant that defines no PEFT hooks; only this test puts it on a layer."""

    name = "unmapped"
    label = "Unmapped"
    setting = ("init", "unmapped")


def test_a_variant_without_a_peft_mapping_is_refused_by_name(tmp_path: Path) -> None:
    model = adapted(tiny_vit, LoRA(rank=2, targets=["qv"]), tmp_path / "ours", VIT, VIT_KWARGS)
    layer = model.blocks[1].attn.qkv
    layer.variants = (*layer.variants, Unmapped())
    with pytest.raises(PeftFormatError, match=r"blocks\.1\.attn\.qkv: variant unmapped has no PEFT mapping"):
        save_peft_adapter(model, tmp_path / "peft", {"model_name": VIT})
    assert not (tmp_path / "peft").exists()


class Rescaled(Unmapped):
    """A variant whose PEFT hooks leave the form as plain LoRA's although its scale is not alpha / r."""

    name = "rescaled"

    def to_peft(self, layer: LoRALayer, form: PeftForm) -> PeftForm:
        return form

    def from_peft(self, layer: LoRALayer, form: PeftForm) -> PeftForm:
        return form


def test_a_scale_peft_cannot_express_is_refused(tmp_path: Path) -> None:
    model = adapted(tiny_vit, LoRA(rank=2, alpha=4.0, targets=["qv"]), tmp_path / "ours", VIT, VIT_KWARGS)
    layer = model.blocks[0].attn.qkv
    layer.variants = (*layer.variants, Rescaled())
    layer.scale = 3 * layer.scale
    with pytest.raises(PeftFormatError, match=r"blocks\.0\.attn\.qkv: PEFT's scaling .* cannot give this adapter's"):
        save_peft_adapter(model, tmp_path / "peft", {"model_name": VIT})


def test_qv_slots_become_one_block_structured_lora_on_the_whole_qkv(tmp_path: Path) -> None:
    model = adapted(tiny_vit, LoRA(rank=4, alpha=8.0, targets=["qv"]), tmp_path / "ours", VIT, VIT_KWARGS)
    save_peft_adapter(model, tmp_path / "peft", json.loads((tmp_path / "ours" / "adapter.json").read_text()))
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    # Two slots of rank 4: rank 8 on the whole layer, lora_alpha doubled so that lora_alpha / r stays 8 / 4.
    assert (config["r"], config["lora_alpha"], config["modules_to_save"]) == (8, 16.0, ["head"])
    tensors = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    layer = model.blocks[0].attn.qkv
    assert b.shape == (3 * 64, 8)
    assert torch.equal(b[:64, :4], layer.lora_B[0]) and torch.equal(b[128:, 4:], layer.lora_B[1])
    assert not b[64:128].any() and not b[:64, 4:].any() and not b[128:, :4].any()  # k untouched


def test_a_peft_adapter_loads_here_with_peft_logits(tmp_path: Path, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    base = tiny_vit()
    base_file = tmp_path / "base.safetensors"
    safetensors.torch.save_file(base.state_dict(), base_file)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["qkv", "fc1", "proj"],
        modules_to_save=["head"],
        use_dora=True,
        rank_pattern={"blocks.1.mlp.fc1": 2},
        # As PEFT users write them: regular expressions for the end of a module name, the first match wins.
        alpha_pattern={"blocks.0.attn.qkv": 3, "fc1": 5},
    )
    peft_model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in peft_model.named_parameters():
            if "lora_" in key or "modules_to_save" in key:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = peft_model.eval()(images)
    # PEFT leaves base_model_name_or_path empty for a timm model: the model is named here.
    with pytest.raises(PeftFormatError, match="base_model_name_or_path"):
        load_peft_adapted_model(tmp_path / "peft", checkpoint=base_file)
    model, meta = load_peft_adapted_model(
        tmp_path / "peft", checkpoint=base_file, model_name=VIT, model_kwargs=VIT_KWARGS
    )
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}
    # qkv, attn.proj and fc1 in 4 blocks, and the patch embedding's conv (PEFT's "proj" matches it too).
    assert len(layers) == 4 * 3 + 1 and isinstance(layers["patch_embed.proj"].base, nn.Conv2d)
    assert layers["blocks.1.mlp.fc1"].rank == 2 and layers["blocks.0.attn.qkv"].alpha == 3
    assert layers["blocks.2.mlp.fc1"].alpha == 5 and layers["blocks.2.attn.qkv"].alpha == 6
    assert meta["num_classes"] == 10
    # Onto a base built by the caller, as load_adapter does for our own adapters.
    torch.manual_seed(0)
    onto = load_adapter(tmp_path / "peft", tiny_vit())
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(onto(images), model(images))


def test_what_peft_cannot_hold_is_refused_with_the_layer_and_the_reason(tmp_path: Path) -> None:
    def grouped() -> nn.Module:
        return timm.create_model("resnext26ts", pretrained=False, num_classes=10)

    model = adapted(grouped, LoRA(rank=2, targets=["conv3x3"]), tmp_path / "grouped", "resnext26ts", {})
    with pytest.raises(
        PeftFormatError, match=r"stages\.0\.0\.conv2_kxk\.conv: .*groups=2 \(PEFT's conv LoRA needs groups=1\)"
    ):
        save_peft_adapter(model, tmp_path / "out", {})
    bitfit_like = adapted(tiny_vit, LoRA(rank=2, targets=["qv"]), tmp_path / "bias", VIT, VIT_KWARGS)
    bitfit_like.blocks[0].norm1.bias.requires_grad_(True)
    with pytest.raises(PeftFormatError, match=r"blocks\.0\.norm1\.bias"):
        save_peft_adapter(bitfit_like, tmp_path / "out", {})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "IA3"}, "peft_type='IA3'"),
        ({"bias": "all"}, "bias='all'"),
        ({"init_lora_weights": "pissa_niter_4"}, "changed the base weights"),
    ],
)
def test_unsupported_peft_settings_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    adapted(tiny_vit, LoRA(rank=2, targets=["qv"]), tmp_path / "ours", VIT, VIT_KWARGS)
    export_main([str(tmp_path / "ours"), "--format", "peft", "--out", str(tmp_path / "peft")])
    path = tmp_path / "peft" / PEFT_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(PeftFormatError, match=message):
        load_adapted_model(tmp_path / "peft")


def test_slot_adapters_trained_on_in_peft_are_not_forced_back_into_slots(tmp_path: Path) -> None:
    adapted(tiny_vit, LoRA(rank=2, targets=["qv"]), tmp_path / "ours", VIT, VIT_KWARGS)
    export_main([str(tmp_path / "ours"), "--format", "peft", "--out", str(tmp_path / "peft")])
    file = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(file)
    tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"][70, 0] = 0.5  # a k row: PEFT trained the zeros
    safetensors.torch.save_file(tensors, file)
    with pytest.raises(Exception, match="outside the blocks"):
        load_adapted_model(tmp_path / "peft")
    (tmp_path / "peft" / SIDE_META).unlink()
    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    safetensors.torch.save_file(tiny_vit().state_dict(), base)
    model, _ = load_peft_adapted_model(tmp_path / "peft", checkpoint=base, model_kwargs=VIT_KWARGS)
    assert model.blocks[0].attn.qkv.rank == 4 and model.blocks[0].attn.qkv.num_slots == 1


def test_the_installed_peft_is_in_the_range_the_format_targets() -> None:
    assert peft.__version__ in SpecifierSet(PEFT_VERSIONS)
    pinned = [line for line in Path("constraints.txt").read_text().splitlines() if line.startswith("peft==")]
    assert pinned == [f"peft=={peft.__version__}"]

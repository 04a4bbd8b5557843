"""The LightningModule: optimizer groups, schedule, frozen BatchNorm, metrics and slim checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import timm
import torch
from torch import nn

from lora_vision.lora import state_dict_key
from lora_vision.methods import FullFineTune, LinearProbe, LoRA
from lora_vision.module import Classifier, accuracy_metrics, frozen_batchnorms


def tiny_vit() -> nn.Module:
    return timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=4, depth=2, embed_dim=64, num_heads=2, img_size=32,
        patch_size=8,
    )  # fmt: skip


def tiny_resnet() -> nn.Module:
    return timm.create_model("resnet18", pretrained=False, num_classes=4)


def classifier(model: nn.Module, **overrides) -> Classifier:
    options = dict(lr=1e-3, weight_decay=0.05, warmup_epochs=1.0, min_lr=0.0)
    return Classifier(model, num_classes=4, **{**options, **overrides})


def attach_trainer(module: Classifier, total_steps: int, max_epochs: int) -> None:
    # configure_optimizers reads only these two Trainer properties.
    module._trainer = SimpleNamespace(estimated_stepping_batches=total_steps, max_epochs=max_epochs)


@pytest.mark.parametrize(("method", "bn_eval"), [(LinearProbe(), True), (FullFineTune(), False)])
def test_frozen_batchnorm_stays_in_eval_mode(method, bn_eval: bool) -> None:
    model = tiny_resnet()
    method.apply(model)
    module = classifier(model)
    module.train()
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and all(bn.training is not bn_eval for bn in batchnorms)
    assert model.fc.training
    before = model.bn1.running_mean.clone()
    module(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, before) is bn_eval


@pytest.mark.parametrize(("method", "kept"), [(LoRA(rank=2, targets=["conv3x3"]), True), (FullFineTune(), False)])
def test_a_lightning_fit_keeps_frozen_batchnorm_statistics(method, kept: bool, tmp_path) -> None:
    # Through a real Trainer: Lightning does not call train() itself, so a train() override alone is not enough.
    model = tiny_resnet()
    method.apply(model)
    before = {n: b.clone() for n, b in model.named_buffers() if "running_" in n}
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer = L.Trainer(
        max_epochs=2, limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(classifier(model), loader, loader)
    unchanged = [torch.equal(b, before[n]) for n, b in model.named_buffers() if "running_" in n]
    assert all(unchanged) if kept else not any(unchanged)


def test_frozen_batchnorm_option_can_be_turned_off() -> None:
    model = tiny_resnet()
    LinearProbe().apply(model)
    classifier(model, frozen_bn_eval=False).train()
    assert frozen_batchnorms(model) and all(bn.training for bn in frozen_batchnorms(model))


def test_adamw_gets_trainable_params_only_and_no_decay_on_biases_norms_and_embeddings() -> None:
    model = tiny_vit()
    LoRA(rank=2, targets=["qkv"]).apply(model)
    model.norm.requires_grad_(True)
    model.pos_embed.requires_grad_(True)
    module = classifier(model)
    attach_trainer(module, total_steps=100, max_epochs=10)
    optimizer = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*by_decay.values()) == trainable
    assert by_decay[0.05] == {n for n in trainable if "lora_" in n} | {"head.weight"}
    assert {"head.bias", "norm.weight", "norm.bias", "pos_embed"} <= by_decay[0.0]


def test_schedule_warms_up_linearly_then_decays_with_a_cosine() -> None:
    module = classifier(tiny_vit(), lr=1.0, min_lr=0.0, warmup_epochs=1.0)
    attach_trainer(module, total_steps=100, max_epochs=10)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup, decay = lrs[:10], lrs[10:]
    assert warmup == sorted(warmup) and warmup[0] == pytest.approx(1 / 11)
    assert decay[0] == pytest.approx(1.0)
    assert decay == sorted(decay, reverse=True) and decay[-1] < 0.01
    assert decay[45] == pytest.approx(0.5, abs=0.03)


def test_top5_is_capped_at_the_number_of_classes() -> None:
    metrics = accuracy_metrics(num_classes=3)
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    result = metrics(logits, torch.tensor([2, 2]))
    assert result["acc1"] == pytest.approx(0.5)
    assert result["acc5"] == pytest.approx(1.0)


def test_checkpoints_hold_trainable_weights_and_buffers_and_load_strictly() -> None:
    model = tiny_resnet()
    LoRA(rank=2, targets=["conv3x3"], blocks=[4]).apply(model)
    module = classifier(model)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    saved = set(checkpoint["state_dict"])
    trainable = {f"model.{state_dict_key(n)}" for n, p in model.named_parameters() if p.requires_grad}
    buffers = {f"model.{state_dict_key(n)}" for n, _ in model.named_buffers()}
    assert saved == trainable | buffers

    fresh_model = tiny_resnet()
    LoRA(rank=2, targets=["conv3x3"], blocks=[4]).apply(fresh_model)
    fresh = classifier(fresh_model)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    for name in trainable:
        assert torch.equal(fresh.state_dict()[name], module.state_dict()[name])


def test_full_checkpoints_when_asked() -> None:
    model = tiny_resnet()
    LinearProbe().apply(model)
    module = classifier(model, trainable_only_checkpoints=False)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(module.state_dict())

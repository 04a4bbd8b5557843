"""The multi-task model: one frozen backbone holding every task's adapters and a head per task; and the
single-task model each task's adapter file is saved from."""

from __future__ import annotations

import copy
import logging

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from lora_vision.adapters import weights_fingerprint
from lora_vision.builders import build_backbone, build_datamodule
from lora_vision.config_checks import ConfigError
from lora_vision.lora import (
    DEFAULT_ADAPTER,
    AdapterHeads,
    LinearAdapter,
    apply_lora,
    classifier_name,
    freeze_backbone,
    named_lora_layers,
    transfer_adapters,
)
from lora_vision.multitask.config import SHARED, MultiTaskSpec

log = logging.getLogger(__name__)


def build_multitask_model(
    cfg: DictConfig, spec: MultiTaskSpec
) -> tuple[nn.Module, str, dict[str, L.LightningDataModule]]:
    """The backbone with each task's adapter (and the shared one) on it and an `AdapterHeads` of the tasks' heads;
    with the base weights' fingerprint and each task's datamodule.

    Each task's datamodule, head and adapter are built after seeding with the run's seed, in its single-task run's
    order, on a backbone of its own class count,
    exactly as its single-task run draws them (for a random-init base, only when the class counts agree); its
    adapters then move onto the one backbone kept.
    """
    model: nn.Module | None = None
    plain: nn.Module | None = None
    fingerprint = ""
    heads: dict[str, nn.Module] = {}
    datamodules: dict[str, L.LightningDataModule] = {}
    num_classes: dict[str, int] = {}
    for name, task in spec.tasks.items():
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodules[name] = build_datamodule(task.data)
        num_classes[name] = datamodules[name].num_classes
        scratch = build_backbone(cfg.model, num_classes[name])
        if model is None:
            model, fingerprint = scratch, weights_fingerprint(scratch)
            plain = copy.deepcopy(scratch)
        elif weights_fingerprint(scratch) != fingerprint:
            # A random-init base: the head's size shifts the random stream, so a task with another class count
            # draws another backbone. Its head goes onto the one kept, and its single-task run would differ.
            log.warning(
                "task %s: a randomly initialised %s with %d classes draws other backbone weights than with %d; "
                "its head and adapter train on the first task's backbone",
                name,
                cfg.model.name,
                num_classes[name],
                num_classes[next(iter(spec.tasks))],
            )
            head = scratch.get_classifier()
            scratch = copy.deepcopy(plain)
            scratch.set_submodule(classifier_name(scratch), head)
        if task.adapter is not None:
            apply_lora(scratch, task.adapter.settings, adapter_name=name)
        else:
            freeze_backbone(scratch, train_head=True)
        heads[name] = scratch.get_classifier()
        if scratch is not model:
            transfer_adapters(scratch, model, name)
    assert model is not None
    if spec.shared is not None:
        L.seed_everything(cfg.seed, verbose=False)
        apply_lora(model, spec.shared.settings, adapter_name=SHARED)
    head = classifier_name(model)
    if head is None or head in named_lora_layers(model):
        raise ConfigError(
            f"a multi-task run gives each task its own head, so lora.targets may not adapt the classifier ({head}) "
            "and the model must have one"
        )
    model.set_submodule(head, AdapterHeads(heads))
    return model, fingerprint, datamodules


@torch.no_grad()
def single_task_model(model: nn.Module, spec: MultiTaskSpec, task: str) -> nn.Module:
    """A copy of `model` that computes what `task`'s samples go through, as a plain single-adapter model: its
    adapter as the `default` one (the shared and specific parts concatenated into one LoRA of both ranks, scales
    folded into B: the same update) and its head as the classifier."""
    single = copy.deepcopy(model)
    parts_of = spec.adapters_of(task)
    for layer_name, layer in named_lora_layers(single).items():
        parts = [layer.adapters[name] for name in parts_of if name in layer.adapters]
        for name in list(layer.adapters):
            layer.remove_adapter(name)
        if not parts:
            single.set_submodule(layer_name, layer.base)
        elif len(parts) == 1:
            layer.attach_adapter(DEFAULT_ADAPTER, parts[0])
        else:
            first = parts[0]
            rank = sum(part.rank for part in parts)
            dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
            layout = (first.num_slots, first.slots) if isinstance(first, LinearAdapter) else ()
            combined = layer.add_adapter(DEFAULT_ADAPTER, rank, float(rank), dropout, *layout)
            updates = [part.low_rank_update() for part in parts]
            combined.set_low_rank_update(torch.cat([b for b, _ in updates], -1), torch.cat([a for _, a in updates], -2))
            combined.requires_grad_(first.lora_A.requires_grad)
    head = classifier_name(single)
    heads = single.get_submodule(head)
    single.set_submodule(head, heads.heads[task] if isinstance(heads, AdapterHeads) else heads)
    return single

"""The LightningModule: classification training of a (partly frozen) backbone."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lora_vision.lora import ParameterSummary

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test")
# Checkpoint key of the base weights' fingerprint (lora_vision.adapters.weights_fingerprint).
BASE_FINGERPRINT = "base_fingerprint"


def accuracy_metrics(num_classes: int) -> MetricCollection:
    """Top-1 and top-5 accuracy (top-k capped at the number of classes), averaged over samples."""
    return MetricCollection(
        {
            "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "acc5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        }
    )


def frozen_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers none of whose parameters train: their running statistics belong to the backbone."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]


class Classifier(L.LightningModule):
    """Cross-entropy training with AdamW over the trainable parameters and a warmup + cosine schedule.

    Args:
        model: the timm backbone, already prepared by a method (adapters added, backbone frozen).
        num_classes: number of classes of the data (for the accuracy metrics).
        lr, weight_decay, betas: AdamW settings; weight decay skips biases, norms and other 1-d parameters
            (and what the model lists in `no_weight_decay()`, e.g. a ViT's position embedding).
        warmup_epochs: linear warmup length in epochs (fractions allowed); the schedule steps every optimizer
            step and decays with a cosine to `min_lr` at the end of training.
        label_smoothing: cross-entropy label smoothing.
        frozen_bn_eval: keep BatchNorm layers with frozen parameters in eval mode while training, so the
            frozen backbone's running statistics do not drift towards the new data.
        trainable_only_checkpoints: checkpoints hold the trainable parameters and the buffers only; frozen
            weights are rebuilt from the same config. Keeps a rank sweep over ViT-B/16 at megabytes, not
            hundreds of megabytes, per checkpoint.
        lr_ratios: learning-rate multipliers by parameter name (the method's `lr_ratios(model)`, e.g. LoRA+'s for
            every B factor); the schedule scales every group alike.
        param_summary: the method's parameter budget, logged when fitting starts.
        base_fingerprint: `weights_fingerprint` of the base model; checkpoints carry it, and loading one made on
            other base weights fails (a trainable-only checkpoint would otherwise silently pair its adapters with
            the wrong backbone).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        lr: float,
        weight_decay: float,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
        label_smoothing: float = 0.0,
        frozen_bn_eval: bool = True,
        trainable_only_checkpoints: bool = True,
        lr_ratios: Mapping[str, float] | None = None,
        param_summary: ParameterSummary | None = None,
        base_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "param_summary", "base_fingerprint"])
        self.model = model
        self.param_summary = param_summary
        self.base_fingerprint = base_fingerprint
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        metrics = accuracy_metrics(num_classes)
        # ModuleDict keys must not shadow nn.Module attributes such as `train`, hence the suffix.
        self.metrics = nn.ModuleDict({f"{stage}_metrics": metrics.clone(prefix=f"{stage}/") for stage in STAGES})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def train(self, mode: bool = True) -> Classifier:
        # Whoever switches the module to training, frozen BatchNorm stays in eval mode.
        super().train(mode)
        if mode and self.hparams.frozen_bn_eval:
            for bn in frozen_batchnorms(self.model):
                bn.eval()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning 2.x never calls train() while fitting: a module keeps the mode it was built in (train, for
        # every fresh nn.Module) and validation restores each submodule's own flag afterwards. Without this, frozen
        # BatchNorm would normalise with batch statistics and overwrite the backbone's running statistics.
        self.train()

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(logits, labels)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, sync_dist=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_fit_start(self) -> None:
        summary = self.param_summary
        if summary is None:
            return
        log.info("parameter budget:\n%s", summary)
        budget = {
            "params/trainable": summary.trainable,
            "params/total": summary.total,
            "params/trainable_percent": summary.trainable_percent,
            "params/adapter": summary.adapter_params,
        }
        for logger in self.loggers:
            logger.log_hyperparams(budget)

    def _warmup_steps(self, total_steps: int, warmup_epochs: float | None = None) -> int:
        """The warmup of `total_steps` optimizer steps: `warmup_epochs` (default: the module's) of `max_epochs`."""
        warmup_epochs = self.hparams.warmup_epochs if warmup_epochs is None else warmup_epochs
        max_epochs = self.trainer.max_epochs
        if not warmup_epochs or not max_epochs or max_epochs < 1:
            return 0
        return min(round(total_steps * warmup_epochs / max_epochs), total_steps - 1)

    def param_groups(self) -> list[dict[str, Any]]:
        """timm's weight-decay groups, each split further by learning-rate multiplier (`lr_ratios`)."""
        hp = self.hparams
        no_decay = getattr(self.model, "no_weight_decay", set)()
        groups = param_groups_weight_decay(self.model, hp.weight_decay, no_weight_decay_list=no_decay)
        ratios = dict(hp.lr_ratios or {})
        ratio_of = {id(p): ratios.get(name, 1.0) for name, p in self.model.named_parameters()}
        split = []
        for group in groups:
            for ratio in sorted({ratio_of[id(p)] for p in group["params"]}):
                params = [p for p in group["params"] if ratio_of[id(p)] == ratio]
                split.append({**group, "params": params, "lr": hp.lr * ratio})
        return split

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups(), lr=hp.lr, betas=tuple(hp.betas))
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = self._warmup_steps(total_steps)
        cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup, eta_min=hp.min_lr)
        scheduler: LRScheduler = cosine
        if warmup > 0:
            ramp = LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
            scheduler = SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[BASE_FINGERPRINT] = self.base_fingerprint
        if not self.hparams.trainable_only_checkpoints:
            return
        frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(BASE_FINGERPRINT)
        if saved and self.base_fingerprint and saved != self.base_fingerprint:
            raise ValueError(
                f"the checkpoint was trained on base weights {saved}, but this run built {self.base_fingerprint}: "
                "resume with the same model (model.name, model.pretrained, model.checkpoint, and the seed for a "
                "randomly initialised one)"
            )
        # Frozen weights left out of the checkpoint are the ones this module already holds; filling them in
        # keeps loading strict, so a checkpoint from a different configuration still fails loudly.
        checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}

"""The GPU path: the fused LoRA node under fp32, fp16 and bf16 autocast, merge/unmerge/export, DoRA and PiSSA, the
batched resize and short training runs, on CUDA.

Marked `gpu` (`make test-gpu` runs only these) and skipped without CUDA. `LORA_VISION_GPU_TESTS_ON_CPU=1` runs
them on the CPU instead, which checks the tests themselves on a machine without a GPU (CPU autocast in place of
CUDA's).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_vision.data.batched import BatchTransform
from lora_vision.export import export_merged, load_merged
from lora_vision.lora import LoRALayer, LoRALinear, merge_lora, unmerge_lora
from lora_vision.methods import LoRA
from tests.helpers import VIT_KWARGS, composed_forward, launch, perturb_trainable, randomize_adapters, tiny_vit

pytestmark = pytest.mark.gpu

ON_CPU = os.environ.get("LORA_VISION_GPU_TESTS_ON_CPU") == "1"
MODES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# Tolerances against the float32 dense reference: autocast rounds inputs and weights to 8 (bf16) or 11 (fp16)
# significant bits before each matmul.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 4e-2}


@pytest.fixture
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if ON_CPU:
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU (LORA_VISION_GPU_TESTS_ON_CPU=1 runs these tests on the CPU)")


def autocast(device: torch.device, mode: str) -> torch.autocast:
    dtype = MODES[mode]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def dense_forward(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """(W0 + scale * B A) x + b in float32: the definition the fused node must compute."""
    return F.linear(x.float(), layer.base.weight + layer.delta_weight(), layer.base.bias)


def outputs_and_grads(forward, layer: LoRALinear, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    out = forward(x)
    out.float().backward(grad)
    results = [out.detach().float(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    return results


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(("num_slots", "slots"), [(1, None), (3, (0, 2))], ids=["whole layer", "q,v slots"])
@pytest.mark.parametrize("tokens", [8, 400], ids=["few tokens", "many tokens"])
def test_fused_node_matches_the_composed_ops_and_the_dense_update(
    device: torch.device, mode: str, num_slots: int, slots, tokens: int
) -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 192), rank=8, alpha=16.0, num_slots=num_slots, slots=slots).to(device)
    randomize_adapters(layer)
    x = torch.randn(tokens, 64, device=device, requires_grad=True)
    grad = torch.randn(tokens, 192, device=device)
    with autocast(device, mode):
        fused = outputs_and_grads(layer, layer, x, grad)
        composed = outputs_and_grads(lambda t: composed_forward(layer, t), layer, x, grad)
        assert type(layer(x).grad_fn).__name__ == "_LinearWithLowRankBackward"
    dense = outputs_and_grads(lambda t: dense_forward(layer, t), layer, x, grad)
    tolerance = TOLERANCE[mode]
    for name, ours, theirs, reference in zip(("output", "dx", "dA", "dB"), fused, composed, dense, strict=True):
        assert ours.dtype == torch.float32 or mode != "fp32", name
        scale = reference.abs().max().item()
        torch.testing.assert_close(ours, theirs, atol=tolerance * scale, rtol=tolerance, msg=f"{mode} {name}")
        torch.testing.assert_close(ours, reference, atol=tolerance * scale, rtol=tolerance, msg=f"{mode} {name}")


def adapted_vit(device: torch.device, **settings) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_vit()
    LoRA(rank=4, alpha=8.0, targets=["qv", "mlp"], **settings).apply(model)
    perturb_trainable(model)
    return model.to(device).eval()


@pytest.mark.parametrize("variant", [{}, {"dora": True}, {"init": "pissa"}], ids=["lora", "dora", "pissa"])
def test_adapted_model_on_the_device_matches_the_cpu_and_merges_exactly(
    device: torch.device, variant: dict, tmp_path: Path
) -> None:
    model = adapted_vit(device, **variant)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        on_cpu = model.to("cpu")(images)
        model.to(device)
        logits = model(images.to(device))
        torch.testing.assert_close(logits.cpu(), on_cpu, atol=1e-4, rtol=1e-4)
        weights = {name: m.base.weight.clone() for name, m in model.named_modules() if isinstance(m, LoRALayer)}
        merge_lora(model)
        torch.testing.assert_close(model(images.to(device)), logits, atol=1e-4, rtol=1e-4)
        unmerge_lora(model)
        for name, module in model.named_modules():
            if isinstance(module, LoRALayer):
                torch.testing.assert_close(module.base.weight, weights[name], atol=1e-5, rtol=0)
    # Training on the device: finite gradients for every adapter tensor.
    model.train()
    model(images.to(device)).logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    # The merged export, loaded on the CPU, predicts as the adapted model did on the device.
    model.eval()
    export_merged(
        model, tmp_path / "merged", model_name="vit_small_patch16_224", model_kwargs=VIT_KWARGS, num_classes=10
    )
    exported, _ = load_merged(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(exported(images), logits.cpu(), atol=1e-4, rtol=1e-4)


def test_batched_resize_on_the_device_matches_the_cpu(device: torch.device) -> None:
    config = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
              "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # fmt: skip
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    step = BatchTransform(config, (32, 32), is_training=False)
    on_cpu, on_device = step(images), step(images.to(device))
    assert on_device.device.type == device.type and on_device.shape == (8, 3, 224, 224)
    # Normalised units; a uint8 level is ~0.017 of them.
    torch.testing.assert_close(on_device.cpu(), on_cpu, atol=2e-3, rtol=0)


def trainer_args(device: torch.device, precision: str) -> tuple[str, ...]:
    if device.type == "cpu":
        # CPU autocast runs bf16 only; the test's other checks still run.
        return ("trainer=cpu", "trainer.precision=bf16-mixed")
    return ("trainer=gpu", f"trainer.precision={precision}")


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_a_short_run_on_the_device_trains_and_records_everything(
    device: torch.device, precision: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    done = launch(
        tmp_path, "+exp=smoke", *trainer_args(device, precision), "trainer.max_epochs=4", f"hydra.run.dir={run_dir}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed"
    for key in ("best_val_acc1", "test_acc1", "test_acc5", "trainable_params", "wall_time_s", "train_images_per_s"):
        assert record[key] is not None, key
    (metrics,) = run_dir.rglob("metrics.csv")
    losses = [float(row["train/loss_epoch"]) for row in csv.DictReader(metrics.open()) if row.get("train/loss_epoch")]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_the_prefix_cache_refuses_mixed_precision_on_the_device(device: torch.device, tmp_path: Path) -> None:
    args = trainer_args(device, "16-mixed")
    done = launch(
        tmp_path,
        "+exp=smoke",
        *args,
        "perf.cache_prefix=true",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert done.returncode == 2
    precision = args[-1].split("=", 1)[1]
    assert f"perf.cache_prefix=true with trainer.precision={precision}" in done.stderr

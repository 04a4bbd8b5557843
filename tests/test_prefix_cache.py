"""The frozen-prefix cache: exact splits, refusals, cache keys, concurrent writes, and cached runs equal uncached."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import nn

from lora_vision.adapters import weights_fingerprint
from lora_vision.data import SyntheticDataModule
from lora_vision.lora import apply_lora
from lora_vision.methods import LinearProbe
from lora_vision.prefix_cache import (
    FeatureStore,
    PrefixCacheError,
    SuffixClassifier,
    find_split,
    serve_prefix_cache,
)
from lora_vision.prefix_cache.serve import key_parts
from lora_vision.train import run
from tests.helpers import composed, randomize_adapters, tiny_resnet, tiny_vit

CPU = torch.device("cpu")


def tiny_effnet(**kwargs: Any) -> nn.Module:
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10, **kwargs).eval()


def adapted(model: nn.Module, targets: str, blocks: str | None = "-1:") -> nn.Module:
    apply_lora(model, (targets,), rank=4, alpha=8.0, blocks=blocks)
    randomize_adapters(model)
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {
    "vit": lambda: adapted(tiny_vit(), "qv"),
    "vit, adapters in the last two blocks": lambda: adapted(tiny_vit(), "qv", "-2:"),
    "efficientnet": lambda: adapted(tiny_effnet(), "conv1x1"),
    "resnet": lambda: adapted(tiny_resnet(), "conv3x3"),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_suffix_of_prefix_is_the_models_own_forward(name: str, grad_checkpointing: bool, images) -> None:
    model = MODELS[name]()
    model.set_grad_checkpointing(grad_checkpointing)
    split = find_split(model)
    assert 0 < split.depth < len(split.blocks)
    with torch.no_grad():
        assert torch.equal(split.suffix(split.prefix(images)), model(images))


def test_linear_probe_caches_every_block(images) -> None:
    model = tiny_vit()
    LinearProbe().apply(model)
    split = find_split(model)
    assert split.depth == len(split.blocks) == 4
    with torch.no_grad():
        assert torch.equal(split.suffix(split.prefix(images)), model(images))


def test_efficientnet_splits_inside_the_adapted_stage() -> None:
    # lora.blocks counts stages; the split counts their blocks: lite0's last stage is its 16th block.
    split = find_split(MODELS["efficientnet"]())
    assert split.depth == 15 and len(split.blocks) == 16


class OwnForwardViT(timm.models.VisionTransformer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nn.Sequential(nn.Linear(4, 4)), "does not support torch.nn.modules.container.Sequential"),
        (lambda: timm.create_model("convnext_atto"), "does not support .*ConvNeXt: it splits timm VisionTransformer"),
        (lambda: OwnForwardViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2), "OwnForwardViT"),
        (lambda: adapted(tiny_vit(), "qv", blocks=None), r"nothing to cache, its first block \(blocks.0\)"),
        (lambda: adapted(tiny_vit(), "re:patch_embed.proj", None), r"nothing to cache, the stem \(patch_embed\)"),
        (lambda: adapted(tiny_vit(drop_path_rate=0.3), "qv"), r"blocks.1.drop_path1 \(DropPath, drop_prob=0.1"),
        (lambda: adapted(tiny_vit(pos_drop_rate=0.1), "qv"), r"pos_drop \(Dropout, p=0.1\)"),
        (lambda: adapted(tiny_vit(patch_drop_rate=0.25), "qv"), r"patch_drop \(PatchDropout, prob=0.25\)"),
        (lambda: adapted(tiny_vit(attn_drop_rate=0.1), "qv"), r"blocks.0.attn.attn_drop \(Dropout, p=0.1\)"),
    ],
)  # fmt: skip
def test_unsupported_or_changing_splits_are_refused_with_the_reason(make: Callable[[], nn.Module], match: str) -> None:
    with pytest.raises(PrefixCacheError, match=match):
        find_split(make())


def test_batchnorm_that_trains_in_the_prefix_names_the_option() -> None:
    model = MODELS["efficientnet"]()
    assert find_split(model, frozen_bn_eval=True).depth == 15
    with pytest.raises(PrefixCacheError, match=r"module.frozen_bn_eval=false: bn1 "):
        find_split(model, frozen_bn_eval=False)


def synthetic(**options: Any) -> SyntheticDataModule:
    settings = {"num_classes": 4, "num_samples": 96, "num_test_samples": 40, "image_size": 32, "batch_size": 16}
    return SyntheticDataModule(**{"train_augment": False, **settings, **options})


def classifier(model: nn.Module, **options: Any) -> SuffixClassifier:
    return SuffixClassifier(model, 10, lr=1e-3, weight_decay=0.0, **options)


def key_of(data: SyntheticDataModule, *, rank: int = 4, blocks: str = "-1:", perturb: bool = False) -> str:
    torch.manual_seed(0)  # the same random-init base weights every time
    model = tiny_vit()
    if perturb:
        with torch.no_grad():
            model.patch_embed.proj.weight[0, 0, 0, 0] += 1e-3
    identity = {"model": "tiny", "base_fingerprint": weights_fingerprint(model), "data": {"seed": data.seed}}
    apply_lora(model, ("qv",), rank=rank, alpha=8.0, blocks=blocks)
    return FeatureStore("unused", key_parts(find_split(model), data, identity, CPU)).key


def test_cache_key_follows_weights_data_and_depth_but_not_rank_or_batch_size() -> None:
    key = key_of(synthetic())
    assert key_of(synthetic(), rank=16) == key
    assert key_of(synthetic(batch_size=7, num_workers=0)) == key
    changed = {
        "weights": key_of(synthetic(), perturb=True),
        "depth": key_of(synthetic(), blocks="-2:"),
        "items (seed)": key_of(synthetic(seed=1)),
        "items (validation split)": key_of(synthetic(val_fraction=0.25)),
        "input size": key_of(synthetic(data_config={"input_size": (3, 16, 16)})),
        "normalization": key_of(synthetic(data_config={"mean": (0.1, 0.2, 0.3)})),
    }
    assert key not in changed.values() and len(set(changed.values())) == len(changed), changed


def test_augmented_training_data_is_refused(tmp_path: Path) -> None:
    module = classifier(MODELS["vit"]())
    with pytest.raises(PrefixCacheError, match=r"data.train_augment=True"):
        serve_prefix_cache(
            module.model_split, synthetic(train_augment=True), identity={}, cache_dir=tmp_path, device=CPU
        )


@pytest.mark.parametrize("persistent_workers", [False, True])
def test_cached_batches_are_the_image_loaders_batches_in_order(tmp_path: Path, persistent_workers: bool) -> None:
    # The loader's generator also draws a worker seed per iterator: once in all for persistent workers, once per
    # epoch otherwise; three epochs would fall out of step if the cached loader drew differently.
    data = synthetic(num_workers=int(persistent_workers), persistent_workers=persistent_workers)
    module = classifier(MODELS["vit"]())
    data.data_config = {"input_size": (3, 32, 32)}
    cached, record = serve_prefix_cache(module.model_split, data, identity={}, cache_dir=tmp_path, device=CPU)
    assert record["hit"] is False and record["depth"] == 3
    split = module.model_split
    images, features = data.train_dataloader(), cached.train_dataloader()
    with torch.no_grad():
        for _ in range(3):
            for (image_batch, labels), (feature_batch, cached_labels) in zip(images, features, strict=True):
                assert torch.equal(cached_labels, labels)
                assert torch.equal(feature_batch, split.prefix(image_batch))


def fill(store: FeatureStore, barrier: threading.Barrier | None, calls: list[str]) -> Callable[[str], Any]:
    def compute(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(split)
        if barrier is not None:
            barrier.wait(timeout=10)  # both writers are inside compute at once
        return torch.full((3, 2), float(len(split))), torch.arange(3)

    return compute


def concurrently(stores: list[FeatureStore], barrier: threading.Barrier | None) -> tuple[list[bool], list[str]]:
    hits: list[bool] = []
    calls: list[str] = []
    threads = [
        threading.Thread(target=lambda s=s: hits.append(s.ensure(["train"], fill(s, barrier, calls)))) for s in stores
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return hits, calls


def assert_one_valid_entry(root: Path, store: FeatureStore) -> None:
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [store.key]
    features, labels = store.load("train")
    assert torch.equal(features, torch.full((3, 2), 5.0)) and torch.equal(labels, torch.arange(3))
    assert json.loads((store.directory / "key.json").read_text()) == {"what": "same"}


def test_two_jobs_computing_one_key_take_turns_on_the_lock(tmp_path: Path) -> None:
    stores = [FeatureStore(tmp_path, {"what": "same"}) for _ in range(2)]
    hits, calls = concurrently(stores, barrier=None)
    assert sorted(hits) == [False, True] and calls == ["train"]
    assert_one_valid_entry(tmp_path, stores[0])


def test_without_working_locks_the_first_rename_wins_and_the_other_copy_goes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("lora_vision.prefix_cache.store.FileLock", lambda path: nullcontext())
    stores = [FeatureStore(tmp_path, {"what": "same"}) for _ in range(2)]
    hits, calls = concurrently(stores, barrier=threading.Barrier(2))
    assert hits == [False, False] and calls == ["train", "train"]
    assert_one_valid_entry(tmp_path, stores[0])


def test_a_failed_computation_leaves_no_entry(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, {"what": "same"})

    def compute(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        store.ensure(["train"], compute)
    assert [p.name for p in tmp_path.iterdir()] == [f"{store.key}.lock"]


SMOKE = ("+exp=smoke", "lora.blocks=-1:", "data.train_augment=false")


def smoke_run(tmp_path: Path, name: str, *overrides: str) -> dict[str, Any]:
    with composed(*SMOKE, *overrides, f"perf.cache_dir={tmp_path / 'cache'}", output_dir=tmp_path / name) as cfg:
        return run(cfg)


OUTCOME = ("best_val_acc1", "test_acc1", "test_acc5", "test_loss", "epochs", "steps", "trainable_params")


def test_cached_run_equals_the_uncached_run_and_a_second_rank_hits_the_cache(tmp_path: Path) -> None:
    uncached = smoke_run(tmp_path, "uncached")
    cached = smoke_run(tmp_path, "cached", "perf.cache_prefix=true")
    other_rank = smoke_run(tmp_path, "rank8", "perf.cache_prefix=true", "lora.rank=8")
    # Exactly equal, not merely close: the prefix is computed in the same float32 kernels on batches of the same
    # size, and the suffix sees the same batches in the same order.
    assert {k: cached[k] for k in OUTCOME} == {k: uncached[k] for k in OUTCOME}
    adapter = "adapter/adapter.safetensors"
    assert (tmp_path / "cached" / adapter).read_bytes() == (tmp_path / "uncached" / adapter).read_bytes()
    assert uncached["prefix_cache"] is None
    assert cached["prefix_cache"]["hit"] is False and other_rank["prefix_cache"]["hit"] is True
    assert cached["prefix_cache"]["depth"] == other_rank["prefix_cache"]["depth"] == 1
    assert other_rank["prefix_cache"]["key"] == cached["prefix_cache"]["key"]
    assert json.loads((tmp_path / "rank8" / "results.json").read_text())["prefix_cache"]["hit"] is True


@pytest.mark.parametrize(
    ("override", "match"),
    [("trainer.precision=bf16-mixed", "trainer.precision=bf16-mixed"), ("perf.compile=true", "perf.compile=True")],
)
def test_run_settings_that_compute_the_prefix_differently_are_refused(
    tmp_path: Path, override: str, match: str
) -> None:
    with pytest.raises(PrefixCacheError, match=match):
        smoke_run(tmp_path, "run", "perf.cache_prefix=true", override)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and match in record["error"]

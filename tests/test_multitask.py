"""Multi-task runs: several tasks' adapters and heads on one frozen backbone, in one Hydra run."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from safetensors.torch import load_file

from lora_vision.config_checks import ConfigError
from lora_vision.evaluate import main as evaluate_main
from lora_vision.lora import AdapterHeads, apply_lora, set_active_adapters
from lora_vision.multitask.config import read_spec
from lora_vision.multitask.launcher import group_jobs, pack_name
from lora_vision.multitask.model import single_task_model
from lora_vision.multitask.sampling import task_draws
from lora_vision.report.collect import find_results, load_records
from lora_vision.train import run
from tests.helpers import FAST, composed, multirun, randomize_adapters, records, tiny_resnet, tiny_vit

# Eight short training runs: started early, they do not hold the suite's end (conftest.py).
pytestmark = pytest.mark.slow

SYNTHETIC = ",".join(
    [
        "_target_:lora_vision.data.SyntheticDataModule",
        "image_size:32",
        "crop_pct:null",
        "num_workers:0",
        "pin_memory:false",
        "persistent_workers:false",
        "seed:0",
        "val_fraction:0.1",
    ]
)


def task_data(classes: int, samples: int, noise: float) -> str:
    return (
        f"{{{SYNTHETIC},num_classes:{classes},num_samples:{samples},num_test_samples:48,noise:{noise},batch_size:16}}"
    )


# Two tasks of different sizes and difficulty; the same class count, so that a random-init base is the same for both.
TASKS = {"a": task_data(4, 96, 1.0), "b": task_data(4, 64, 0.5)}
RUN = ("+exp=smoke", "logger=csv", "trainer.max_epochs=2", "lora.rank=2", "+trainer.enable_progress_bar=false")


def multitask_overrides(tasks: dict[str, str] = TASKS) -> list[str]:
    return [*RUN, *(f"+multitask.tasks.{name}.data={data}" for name, data in tasks.items())]


def train(out: Path, *overrides: str) -> dict:
    with composed(*overrides, output_dir=out) as cfg:
        return run(cfg)


def single_overrides(task: str) -> list[str]:
    """The single-task run of `task`: the same data as `data=...` keys."""
    keys = TASKS[task].strip("{}").split(",")
    values = dict(key.split(":", 1) for key in keys)
    return [*RUN, *(f"data.{key}={value}" for key, value in values.items() if key != "_target_")]


# The last epoch is tested and saved, so that every step shows in the adapters compared below.
LAST = "objective.select=last"


@pytest.fixture(scope="module")
def independent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("independent")
    train(out, *multitask_overrides(), LAST)
    return out


def test_sampling_rules_draw_each_epoch_as_documented() -> None:
    sizes = {"big": 6, "small": 2}
    proportional = task_draws("proportional", sizes, seed=0, epoch=0)
    assert Counter(proportional) == sizes and proportional != sorted(proportional)
    assert proportional != task_draws("proportional", sizes, seed=0, epoch=1)
    assert task_draws("round_robin", sizes, seed=0, epoch=0) == ["big", "small"] * 4
    hot = Counter(task_draws("temperature", {"big": 900, "small": 100}, seed=0, epoch=0, temperature=1000.0))
    cold = Counter(task_draws("temperature", {"big": 900, "small": 100}, seed=0, epoch=0, temperature=1.0))
    # T -> infinity: equal shares; T = 1: proportional to the sizes.
    assert 400 < hot["small"] < 600 and 50 < cold["small"] < 150
    assert task_draws("temperature", sizes, seed=3, epoch=2) == task_draws("temperature", sizes, seed=3, epoch=2)


def test_independent_tasks_train_exactly_as_their_single_task_runs(independent: Path, tmp_path: Path) -> None:
    summary = json.loads((independent / "results.json").read_text())
    assert summary["status"] == "completed" and set(summary["tasks"]) == {"a", "b"}
    for task in ("a", "b"):
        alone = train(tmp_path / task, *single_overrides(task), LAST)
        mine = json.loads((independent / "tasks" / task / "results.json").read_text())
        assert mine["test_acc1"] == alone["test_acc1"] and mine["test_loss"] == pytest.approx(alone["test_loss"], 1e-6)
        assert mine["best_val_acc1"] == alone["best_val_acc1"]
        trained = load_file(independent / "tasks" / task / "adapter" / "adapter.safetensors")
        reference = load_file(tmp_path / task / "adapter" / "adapter.safetensors")
        assert trained.keys() == reference.keys()
        for key, tensor in reference.items():
            torch.testing.assert_close(trained[key], tensor, atol=1e-6, rtol=0)
    # The report lists the tasks as runs of their own, not the summary.
    records = load_records(find_results([independent]))
    assert sorted(r["experiment"] for r in records) == ["smoke/a", "smoke/b"]


def test_a_finished_multitask_run_is_reported_not_trained_again(independent: Path) -> None:
    before = (independent / "tasks" / "a" / "adapter" / "adapter.safetensors").stat().st_mtime_ns
    again = train(independent, *multitask_overrides(), LAST)
    assert again["status"] == "completed"
    assert (independent / "tasks" / "a" / "adapter" / "adapter.safetensors").stat().st_mtime_ns == before


def test_a_multitask_run_stopped_mid_epoch_repeats_that_epoch_exactly(independent: Path, tmp_path: Path) -> None:
    stop = ["+callbacks.stop._target_=tests.helpers.StopAtStep", "+callbacks.stop.step=13"]
    with pytest.raises(SIGTERMException):
        train(tmp_path, *multitask_overrides(), LAST, *stop, "callbacks.resume_checkpoint.every_n_train_steps=1")
    # The second epoch (steps 10-19) was under way: the run resumes from the end of the first.
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 10
    resumed = train(tmp_path, *multitask_overrides(), LAST)
    uninterrupted = json.loads((independent / "results.json").read_text())
    assert resumed["resumed_from"] and resumed["steps"] == uninterrupted["steps"] == 20
    for task in ("a", "b"):
        done = load_file(independent / "tasks" / task / "adapter" / "adapter.safetensors")
        again = load_file(tmp_path / "tasks" / task / "adapter" / "adapter.safetensors")
        for key, tensor in done.items():
            torch.testing.assert_close(again[key], tensor, atol=1e-6, rtol=0)


def test_shared_and_specific_parts_save_as_one_adapter_that_scores_as_trained(tmp_path: Path) -> None:
    # One class count: a random-init base with another would be another backbone, which no adapter file could name.
    tasks = {"a": task_data(4, 64, 1.0), "b": task_data(4, 80, 0.5)}
    summary = train(
        tmp_path, *multitask_overrides(tasks), "multitask.sharing=shared_specific", "multitask.shared_rank=3"
    )
    for task in tasks:
        adapter = tmp_path / "tasks" / task / "adapter"
        meta = json.loads((adapter / "adapter.json").read_text())
        assert meta["method"]["settings"]["rank"] == 5 and meta["num_classes"] == 4
        # Loaded alone and scored on the task's test split: what the run measured at the task's selected epoch.
        scored = evaluate_main([str(adapter), "data.batch_size=16"])
        assert scored["acc1"] == summary["tasks"][task]["test_acc1"]
        assert scored["loss"] == pytest.approx(summary["tasks"][task]["test_loss"], abs=1e-5)


# A rank-learning-rate sweep of two points over one data stream.
POINTS = {"r1": ("lora.rank=1", "optim.lr=1e-2"), "r4": ("lora.rank=4", "optim.lr=3e-3")}


def pack_overrides(points: dict[str, tuple[str, str]], data: str = TASKS["a"]) -> list[str]:
    overrides = [*RUN, "multitask.sampling=packed", LAST]
    for name, (rank, lr) in points.items():
        overrides += [
            f"+multitask.tasks.{name}.data={data}",
            f"+multitask.tasks.{name}.lora.rank={rank.split('=')[1]}",
            f"+multitask.tasks.{name}.lr={lr.split('=')[1]}",
        ]
    return overrides


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pack")
    train(out, *pack_overrides(POINTS))
    return out


def assert_trained_alike(packed: Path, alone: Path, keys: tuple[str, ...] = ("rank", "lr", "test_acc1")) -> None:
    """The run (or packed point) in `packed` ended as the run in `alone`: the records' `keys` equal, the test loss
    to 1e-6 and every adapter tensor to 1e-6 (one packed step's gradients are checked to 1e-9 in float64 in
    test_bench.py; over a few float32 steps the summed backward's other order of additions stays below 1e-6)."""
    mine, theirs = (json.loads((path / "results.json").read_text()) for path in (packed, alone))
    assert {key: mine[key] for key in keys} == {key: theirs[key] for key in keys}
    assert mine["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-6)
    trained = load_file(packed / "adapter" / "adapter.safetensors")
    for key, tensor in load_file(alone / "adapter" / "adapter.safetensors").items():
        torch.testing.assert_close(trained[key], tensor, atol=1e-6, rtol=0)


def test_a_packed_sweep_trains_each_point_exactly_as_its_own_run(pack: Path, tmp_path: Path) -> None:
    for name, point in POINTS.items():
        train(tmp_path / name, *single_overrides("a"), *point, LAST)
        assert_trained_alike(pack / "tasks" / name, tmp_path / name, ("rank", "lr", "test_acc1", "best_val_acc1"))


def test_a_pack_on_the_prefix_cache_trains_each_point_as_its_own_cached_run(tmp_path: Path) -> None:
    # Both points adapt the last of the two blocks only: the stem and block 0 run once, for the whole pack. The
    # prefix cache needs unaugmented images.
    cached = ("perf.cache_prefix=true", f"perf.cache_dir={tmp_path / 'cache'}", "lora.blocks=-1:")
    still = TASKS["a"].replace("}", ",train_augment:false}")
    summary = train(tmp_path / "pack", *pack_overrides(POINTS, still), *cached)
    assert summary["prefix_cache"]["depth"] == 1 and summary["prefix_cache"]["hit"] is False
    for name, point in POINTS.items():
        alone = train(tmp_path / name, *single_overrides("a"), "data.train_augment=false", *point, LAST, *cached)
        assert alone["prefix_cache"]["depth"] == 1
        assert_trained_alike(tmp_path / "pack" / "tasks" / name, tmp_path / name)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("perf.grad_checkpointing=true", "perf.grad_checkpointing=True is not supported in a multi-task run"),
        ("perf.compile=true", "perf.compile=True is not supported in a multi-task run"),
        ("perf.cache_prefix=true", "perf.cache_prefix=true with multitask.sampling=proportional"),
    ],
)
def test_perf_options_a_multitask_run_cannot_honour_are_refused(override: str, named: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        train(tmp_path, *multitask_overrides(), override)


def test_a_diverging_point_stops_alone_and_the_others_train_on(pack: Path, tmp_path: Path) -> None:
    summary = train(tmp_path, *pack_overrides({**POINTS, "wild": ("lora.rank=4", "optim.lr=1e12")}))
    assert summary["status"] == "completed" and summary["tasks"]["wild"]["status"] == "diverged"
    assert summary["tasks"]["wild"]["test_acc1"] is None
    for name in POINTS:
        assert summary["tasks"][name]["status"] == "completed"
        trained = load_file(tmp_path / "tasks" / name / "adapter" / "adapter.safetensors")
        for key, tensor in load_file(pack / "tasks" / name / "adapter" / "adapter.safetensors").items():
            torch.testing.assert_close(trained[key], tensor, atol=1e-6, rtol=0)


def test_the_packed_launcher_writes_each_point_as_the_sequential_sweep_does(tmp_path: Path) -> None:
    packed = multirun(tmp_path / "packed", "hydra/launcher=packed", "lora.rank=2,4", "optim.lr=1e-2")
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert "Launching 2 jobs: 2 in 1 pack(s), 0 apart" in packed.stdout + packed.stderr
    # The pack's own summary (.pack-0-1/results.json) is no job's record.
    mine = {job: record for job, record in records(tmp_path / "packed").items() if not job.startswith(".")}
    assert sorted(mine) == ["0", "1"]
    for job, rank in (("0", 2), ("1", 4)):
        # What the basic launcher runs for that job: the same config, alone.
        alone = train(tmp_path / "alone" / job, *FAST, f"lora.rank={rank}", "optim.lr=1e-2")
        keys = ("experiment", "rank", "lr", "status", "test_acc1", "best_val_acc1")
        assert {k: mine[job][k] for k in keys} == {k: alone[k] for k in keys}
        trained = load_file(tmp_path / "packed" / job / "adapter" / "adapter.safetensors")
        for key, tensor in load_file(tmp_path / "alone" / job / "adapter" / "adapter.safetensors").items():
            torch.testing.assert_close(trained[key], tensor, atol=1e-6, rtol=0)
        assert (tmp_path / "packed" / job / ".hydra" / "overrides.yaml").is_file()
    report = (tmp_path / "packed" / "report.md").read_text()
    assert report.count("| lora |") == 2
    # The same command again, after job 1's directory was lost: job 0 is reported as it stands (nothing trained,
    # its files untouched), job 1 alone has no pack left and trains as a single run, to the same result.
    kept = {path: path.read_bytes() for path in (tmp_path / "packed" / "0").rglob("*") if path.is_file()}
    shutil.move(tmp_path / "packed" / "1", tmp_path / "lost")
    again = multirun(tmp_path / "packed", "hydra/launcher=packed", "lora.rank=2,4", "optim.lr=1e-2")
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "Launching 2 jobs: 0 in 0 pack(s), 2 apart" in log
    assert "#0 apart (finished before: reported, not trained again)" in log and "holds a finished run" in log
    assert "#1 apart (no other job to pack with)" in log
    assert {path: path.read_bytes() for path in kept} == kept
    assert_trained_alike(tmp_path / "packed" / "1", tmp_path / "lost")


def test_jobs_that_cannot_share_a_pass_are_kept_apart_with_the_reason() -> None:
    configs = []
    for overrides in (["lora.rank=2"], ["lora.rank=4", "optim.lr=1e-3"], ["lora.rank=2", "seed=1"], ["lora=full"]):
        with composed(*FAST, *overrides) as cfg:
            configs.append(cfg)
    packs, apart = group_jobs(configs)
    assert packs == [[0, 1]]
    assert apart == {2: "data.seed, seed differ from the other jobs'", 3: "lora=FullFineTune is not LoRA"}
    # A pack of every job in between is named by its ends; one with gaps (a rerun's unfinished points) also by
    # its members, so that it never meets another pack's run directory.
    assert pack_name([3, 4, 5]) == ".pack-3-5"
    assert pack_name([3, 5]).startswith(".pack-3-5-") and pack_name([3, 5]) != pack_name([3, 4, 5])


@pytest.mark.parametrize("make", [tiny_vit, tiny_resnet], ids=["vit", "resnet"])
def test_a_task_s_single_model_computes_what_its_samples_went_through(make) -> None:
    targets = "qv" if make is tiny_vit else "conv3x3"
    model = make()
    apply_lora(model, targets, rank=2, adapter_name="a")
    apply_lora(model, targets, rank=3, alpha=6.0, adapter_name="shared")
    head = model.get_classifier()
    heads = {"a": head, "b": torch.nn.Linear(head.in_features, head.out_features)}
    model.set_submodule("head" if make is tiny_vit else "fc", AdapterHeads(heads))
    randomize_adapters(model)
    # In float64, so that a wrong concatenation shows far above the rounding of summing the parts in another order.
    model.double().eval()
    with composed(*multitask_overrides(), "multitask.sharing=shared_specific", "multitask.shared_rank=3") as cfg:
        spec = read_spec(cfg)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    set_active_adapters(model, ["shared", "a"])
    with torch.no_grad():
        expected = model(images)
        single = single_task_model(model, spec, "a")
        torch.testing.assert_close(single(images), expected, atol=1e-10, rtol=1e-10)
        set_active_adapters(model, ["a"])
        assert not torch.allclose(model(images), expected, atol=1e-4)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("multitask.sampling=uniform", "multitask.sampling=uniform"),
        ("multitask.temperature=0", "multitask.temperature=0"),
        ("multitask.sharing=all", "multitask.sharing=all"),
        ("multitask.sharing=shared_specific", "multitask.shared_rank"),
        ("lora=full", "lora._target_"),
        ("+multitask.tasks.a.lora.rank=0", "multitask.tasks.a.lora"),
        ("+multitask.tasks.a.epochs=3", "multitask.tasks.a.epochs"),
        ("+multitask.tasks.a.warmup_epochs=-1", "multitask.tasks.a.warmup_epochs=-1"),
        ("multitask.sampling=packed", "multitask.tasks.b.data differs from multitask.tasks.a.data in noise"),
    ],
)
def test_bad_multitask_settings_are_refused_naming_the_key(override: str, named: str) -> None:
    with composed(*multitask_overrides(), override) as cfg, pytest.raises(ConfigError) as err:
        read_spec(cfg)
    assert named in str(err.value)


def test_tasks_of_a_shared_adapter_cannot_have_their_own(tmp_path: Path) -> None:
    overrides = [*multitask_overrides(), "multitask.sharing=shared", "+multitask.tasks.b.lora.rank=4"]
    with (
        composed(*overrides) as cfg,
        pytest.raises(ConfigError, match=r"multitask.tasks.b.lora: with multitask.sharing=shared"),
    ):
        read_spec(cfg)


def test_the_multitask_experiment_composes_two_real_tasks_at_224_px() -> None:
    with composed("+exp=multitask_vit_tiny") as cfg:
        spec = read_spec(cfg)
    assert list(spec.tasks) == ["woof", "cifar"] and spec.sharing == "independent"
    assert spec.tasks["woof"].data.preset == "imagewoof"
    assert [task.data._target_.rsplit(".", 1)[-1] for task in spec.tasks.values()] == [
        "ImageNetSubsetDataModule",
        "CIFAR10DataModule",
    ]
    assert all(task.data.image_size == 224 and task.data.train_subset == 1000 for task in spec.tasks.values())
    assert spec.tasks["woof"].adapter.rank == 8 and spec.tasks["woof"].lr == 3.0e-3

"""The Hydra config tree: every experiment and group option composes, resolves and passes the value checks."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lora_vision.builders import build_datamodule, build_method, instantiate_all
from lora_vision.cli import canonical_overrides
from lora_vision.config_checks import ConfigError, check_config
from lora_vision.data import DatasetNotFoundError
from lora_vision.lora import LoRAConfigError
from lora_vision.lora.config import SETTINGS, LoraConfig
from lora_vision.models import build_model
from tests.helpers import CONF, composed

EXPERIMENTS = sorted(p.stem for p in (CONF / "exp").glob("*.yaml"))
# Groups whose options each select one config (debug options are global overlays, tested separately).
GROUPS = ("model", "lora", "data", "trainer", "logger", "callbacks", "paths", "hydra")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes_resolves_and_passes_checks(exp: str) -> None:
    with composed(f"+exp={exp}") as cfg:
        OmegaConf.resolve(cfg)
        check_config(cfg)
        assert cfg.exp_name == exp
        method = instantiate(cfg.lora)
        assert method.name in ("lora", "linear_probe", "full")


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_group_option_composes(group: str, option: str) -> None:
    with composed(f"{group}={option}") as cfg:
        OmegaConf.resolve(cfg)
        check_config(cfg)


@pytest.mark.parametrize("option", group_options("debug"))
@pytest.mark.parametrize("order", ["exp first", "debug first"])
def test_debug_options_win_over_the_experiment(option: str, order: str) -> None:
    overrides = ["+exp=vit_r8", f"debug={option}"]
    with composed(*(overrides if order == "exp first" else overrides[::-1])) as cfg:
        assert cfg.data.num_workers == 0
        assert cfg.trainer.accelerator == "cpu"  # vit_r8 itself asks for a GPU
        if option == "limit":
            assert cfg.trainer.max_epochs == 2  # vit_r8 itself trains 10 epochs
        check_config(cfg)


@pytest.mark.parametrize("exp", EXPERIMENTS)
@pytest.mark.parametrize("option", group_options("lora"))
def test_every_method_runs_with_every_experiment(exp: str, option: str) -> None:
    # Experiments set lora.rank/targets; a baseline chosen on top of one must still instantiate.
    with composed(f"+exp={exp}", f"lora={option}") as cfg:
        method = instantiate(cfg.lora)
        baselines = {"linear_probe", "full", "bitfit"}
        assert method.name == (option if option in baselines else "lora")
        if option not in baselines:
            # Each variant option keeps the experiment's rank and targets and switches on just its own feature.
            assert method.rank == cfg.lora.rank and method.variant == option


def test_the_lora_group_takes_every_default_from_lora_config() -> None:
    # One source of defaults: the composed `lora` node holds exactly LoraConfig's fields, each at its Python default,
    # so `python -m lora_vision.train lora.rank=8` and `apply_lora(model, "qv", rank=8)` train the same adapters.
    with composed() as cfg:
        node = OmegaConf.to_container(cfg.lora, resolve=True)
        method = instantiate(cfg.lora)
    assert node.pop("_target_") == "lora_vision.methods.LoRA"
    assert node == LoraConfig().settings()
    assert method.settings == LoraConfig()
    with composed("lora.rank=8") as cfg:
        assert instantiate(cfg.lora).settings.describe()["alpha"] == 8.0
    for option in group_options("lora"):
        own = OmegaConf.load(CONF / "lora" / f"{option}.yaml")
        assert set(own) - {"_target_", "defaults"} <= set(SETTINGS), option


@pytest.mark.parametrize("option", group_options("lora"))
def test_methods_instantiate(option: str) -> None:
    with composed(f"lora={option}") as cfg:
        method = instantiate(cfg.lora)
        assert set(method.describe()) >= {"method", "rank", "alpha", "targets", "blocks"}


@pytest.mark.parametrize("option", [o for o in group_options("data") if o not in ("synthetic", "image_folder")])
def test_datamodules_construct_without_touching_disk(option: str, tmp_path: Path) -> None:
    with composed(f"data={option}", f"paths.data_dir={tmp_path}") as cfg:
        datamodule = build_datamodule(cfg.data)
    assert datamodule.num_classes >= 10
    assert list(tmp_path.iterdir()) == []


def test_missing_image_folder_says_which_key_to_set(tmp_path: Path) -> None:
    with composed("data=image_folder", f"paths.data_dir={tmp_path}") as cfg:
        datamodule = build_datamodule(cfg.data)
    with pytest.raises(DatasetNotFoundError, match=r"data\.root="):
        _ = datamodule.num_classes


def test_loggers_and_callbacks_instantiate(tmp_path: Path) -> None:
    with composed("logger=[csv,wandb]", "callbacks=[default,early_stopping]", output_dir=tmp_path) as cfg:
        loggers = instantiate_all(cfg.logger)
        callbacks = instantiate_all(cfg.callbacks)
    assert {type(x).__name__ for x in loggers} == {"CSVLogger", "WandbLogger"}
    assert {type(x).__name__ for x in callbacks} == {
        "ModelCheckpoint",
        "LearningRateMonitor",
        "EarlyStopping",
        "ResumeCheckpoint",
    }


def test_wandb_is_offline_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with composed("logger=wandb") as cfg:
        assert cfg.logger.wandb.mode == "offline"
        assert cfg.logger.wandb.name == cfg.logger.wandb.group == cfg.exp_name
    monkeypatch.setenv("WANDB_MODE", "online")
    with composed("logger=wandb") as cfg:
        assert cfg.logger.wandb.mode == "online"


def test_rank_variants_differ_from_vit_r8_only_in_rank_and_name() -> None:
    def plain(exp: str) -> dict:
        with composed(f"+exp={exp}") as cfg:
            return OmegaConf.to_container(cfg, resolve=True)

    base = plain("vit_r8")
    assert base["model"]["name"] == "vit_base_patch16_224.augreg_in21k"
    assert base["lora"]["rank"] == 8 and base["lora"]["targets"] == ["qv"]
    assert base["data"]["_target_"].endswith("CIFAR100DataModule") and base["data"]["image_size"] == 224
    for rank in (4, 16):
        variant = plain(f"vit_r{rank}")
        assert variant["lora"].pop("rank") == rank
        assert variant.pop("exp_name") == f"vit_r{rank}"
        expected = {k: v for k, v in base.items() if k != "exp_name"}
        expected["lora"] = {k: v for k, v in base["lora"].items() if k != "rank"}
        assert variant == expected


def test_image_size_is_the_single_source_of_the_input_size() -> None:
    with composed("+exp=vit_r8", "data.image_size=384") as cfg:
        assert cfg.model.kwargs.img_size == 384


def test_sweepable_keys_are_plain_overrides() -> None:
    overrides = [
        "lora.rank=2",
        "lora.alpha=4",
        "lora.dropout=0.1",
        "lora.targets=[qkv,mlp]",
        "lora.blocks=-4:",
        "optim.lr=0.01",
        "optim.weight_decay=0.05",
        "trainer.max_epochs=3",
        "data.batch_size=16",
        "data.image_size=64",
        "seed=7",
    ]
    with composed("+exp=vit_r8", *overrides) as cfg:
        check_config(cfg)
        method = instantiate(cfg.lora)
    assert method.describe()["targets"] == ["qkv", "mlp"]
    assert method.describe()["blocks"] == "-4:"


def test_unknown_key_fails_in_composition() -> None:
    with pytest.raises(ConfigCompositionException, match="rnk"), composed("+exp=smoke", "lora.rnk=4"):
        pass


def test_unknown_group_option_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigCompositionException, match="vit_b16"), composed("model=vit_b61"):
        pass


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.lr=-0.1", "optim.lr=-0.1 is invalid: expected a number > 0"),
        ("optim.lr=fast", "optim.lr='fast' is invalid"),
        ("data.image_size=0", "data.image_size=0 is invalid"),
        ("data.batch_size=2.5", "data.batch_size=2.5 is invalid: expected an integer > 0"),
        ("module.label_smoothing=1.5", "module.label_smoothing=1.5 is invalid: expected a number in [0, 1)"),
        ("optim.warmup_epochs=5", "must be shorter than trainer.max_epochs=2"),
        ("seed=-1", "seed=-1 is invalid"),
    ],
)
def test_invalid_values_name_key_value_and_valid_range(override: str, fragment: str) -> None:
    with composed("+exp=smoke", override) as cfg, pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert fragment in str(err.value)


def test_invalid_lora_values_fail_when_the_method_is_built() -> None:
    with composed("+exp=smoke", "lora.rank=0") as cfg, pytest.raises(LoRAConfigError, match="rank must be"):
        build_method(cfg.lora)


def test_configs_hold_no_machine_paths() -> None:
    for path in CONF.rglob("*.yaml"):
        text = path.read_text()
        for forbidden in ("/work/", "/home/", "../shared", "shared/data", "shared/weights"):
            code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
            assert forbidden not in code, f"{path} refers to {forbidden}"


# The experiment each named sweep is meant for (conf/sweep/*.yaml say so in their usage line).
SWEEP_EXPERIMENTS = {
    "rank": "vit_r8",
    "vit_targets": "vit_r8",
    "resnet_targets": "resnet50_conv",
    "study": "vit_r8",
    "budget": "imagewoof_vit_tiny",
    "optuna": "vit_r8",
    "optuna_pareto": "vit_r8",
    "vtab1k": "vtab1k_vit_b16_lora_qv",
}


def sweep_config(exp: str, sweep: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = canonical_overrides([f"+exp={exp}", f"+sweep={sweep}"])
        return compose("train", overrides=overrides, return_hydra_config=True)


def sweep_jobs(exp: str, sweep: str) -> list[list[str]]:
    """The overrides of every job a basic-sweeper multirun of `sweep` launches, expanded by Hydra itself."""
    params = sweep_config(exp, sweep).hydra.sweeper.params
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        overrides = parser.parse_overrides([f"{key}={value}" for key, value in params.items()])
        (jobs,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return jobs


@functools.cache
def shapes_only_model(name: str, num_classes: int, image_size: int) -> torch.nn.Module:
    """The backbone on the meta device: its layers and shapes, all that matching targets and counting adapters read,
    without the seconds a ViT-B/16's random initialisation and each job's copy of it take."""
    kwargs = {"img_size": image_size} if name.startswith("vit") else {}
    with torch.device("meta"):
        return build_model(name, num_classes=num_classes, pretrained=False, kwargs=kwargs)


def test_every_sweep_is_tested_with_its_experiment() -> None:
    assert sorted(SWEEP_EXPERIMENTS) == group_options("sweep")


@pytest.mark.parametrize("sweep", [s for s in SWEEP_EXPERIMENTS if not s.startswith("optuna")])
def test_every_job_of_a_named_sweep_composes_and_applies_to_its_model(sweep: str) -> None:
    exp = SWEEP_EXPERIMENTS[sweep]
    described = []
    for job in sweep_jobs(exp, sweep):
        # In the order of a launched job: the sweeper puts its own overrides before the command line's.
        with composed(*job, f"+exp={exp}", f"+sweep={sweep}") as cfg:
            OmegaConf.resolve(cfg)
            check_config(cfg)
            method = build_method(cfg.lora)
            # The target presets must match layers of the experiment's backbone, not just parse (any head size will do).
            model = copy.deepcopy(shapes_only_model(cfg.model.name, 100, cfg.data.image_size))
            summary = method.apply(model)
            assert summary.trainable > 0
            described.append({**method.describe(), "task": cfg.data.get("task"), "adapter": summary.adapter_params})
    assert len({str(d) for d in described}) == len(described)  # each point once
    if sweep == "budget":  # one adapter budget, spent in four places
        assert len(described) == 4 and len({d["adapter"] for d in described}) == 1
    if sweep == "study":
        methods = [d["method"] for d in described]
        assert methods.count("linear_probe") == methods.count("full") == 1
        assert sorted(d["rank"] for d in described if d["method"] == "lora") == [1, 2, 4, 8, 16, 32]


def run_config(cfg: DictConfig) -> dict:
    """What a composed config makes a job do: everything but Hydra's node, plus the sweep it launches."""
    plain = {key: cfg[key] for key in cfg if key != "hydra"}
    return OmegaConf.to_container(OmegaConf.create({**plain, "sweeper": cfg.hydra.sweeper}))


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_experiment_sweep_and_debug_compose_the_same_in_any_order(exp: str) -> None:
    # The experiment and each named sweep in both orders, and a debug option at either end. A job's key=value
    # overrides win over every config in any order; a job that selects a config (a point of the study) is composed
    # as launched (the sweeper's overrides first) in both orders too, with a rank no experiment sets.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):

        def config(*overrides: str) -> dict:
            return run_config(compose("train", overrides=canonical_overrides(overrides), return_hydra_config=True))

        for sweep in SWEEP_EXPERIMENTS:
            job = ["sweep/study_points@_global_=lora_r2"] if sweep == "study" else []
            first = config(*job, f"+exp={exp}", f"+sweep={sweep}")
            assert config(*job, f"+sweep={sweep}", f"+exp={exp}") == first, sweep
            if job:
                assert first["lora"]["rank"] == 2
        debug_last = config(f"+exp={exp}", "+sweep=study", "debug=limit")
        assert config("debug=limit", "+sweep=study", f"+exp={exp}") == debug_last
        assert debug_last["trainer"]["max_epochs"] == 2 and debug_last["trainer"]["accelerator"] == "cpu"


def test_optuna_sweep_maximises_with_a_seeded_sampler() -> None:
    hydra_cfg = sweep_config("vit_r8", "optuna").hydra
    assert hydra_cfg.sweeper._target_.endswith("OptunaSweeper")
    # The study's direction follows objective.mode (lora_vision.search.sweeper): max, maximised.
    assert hydra_cfg.sweeper.direction is None
    assert hydra_cfg.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert hydra_cfg.sweeper.sampler.seed is not None
    assert set(hydra_cfg.sweeper.params) == {"optim.lr", "lora.rank", "lora.alpha", "lora.targets"}
    # The study is kept in its sweep directory, which is named by the study (not the time) so that the same
    # command continues it, and each trial's run directory is its number.
    raw = OmegaConf.to_container(hydra_cfg, resolve=False)
    assert raw["sweeper"]["storage"] == "sqlite:///${hydra.sweep.dir}/optuna.db"
    assert raw["sweep"]["dir"].endswith("/optuna/${hydra.sweeper.study_name}")
    assert raw["sweep"]["subdir"] == "${trial}"
    assert hydra_cfg.sweeper.pruner is None
    with composed("+exp=vit_r8", "+sweep=optuna") as cfg:
        assert cfg.objective.param_penalty == 0.0 and not cfg.objective.pareto


def test_pareto_search_returns_two_objectives_to_two_directions() -> None:
    hydra_cfg = sweep_config("vit_r8", "optuna_pareto").hydra
    assert hydra_cfg.sweeper.direction is None  # [maximize, minimize], from objective.mode and objective.pareto
    assert hydra_cfg.sweeper.study_name == "vit_r8_pareto"
    with composed("+exp=vit_r8", "+sweep=optuna_pareto") as cfg:
        assert cfg.objective.pareto


def test_slurm_launcher_composes() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["exp=vit_r8", "hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == launcher.tasks_per_node == 1
    assert {"partition", "cpus_per_task", "mem_gb", "timeout_min", "array_parallelism", "signal_delay_s"} <= set(
        launcher
    )

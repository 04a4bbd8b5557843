"""Mistakes in what a run asks for that Hydra would let through or report misleadingly: each is refused with a
message that names the key or option, what is valid, and what to write instead.

The command lines are checked in-process here; tests/test_command_line.py runs some as a user would.
"""

from __future__ import annotations

import shlex

import pytest

from lora_vision.cli import check_command_line
from lora_vision.composition import check_data_keys
from lora_vision.config_checks import ConfigError, check_config
from tests.helpers import CONF, composed

EXPERIMENTS = sorted(p.stem for p in (CONF / "exp").glob("*.yaml"))

# The README's commands and the documented pass-through keys: none may be refused.
VALID = [
    "+exp=vit_r8 lora.rank=4 optim.lr=1e-3",
    "-m +exp=vit_r8 lora.rank=1,2,4,8,16",
    "+exp=vit_r8 lora=linear_probe",
    "+exp=vit_r8 'lora.targets=[qv,mlp]' lora.blocks=-4:",
    "+exp=vit_r8 debug=fast_dev_run",
    "+exp=vit_r8 logger=[csv,wandb] callbacks=[default,early_stopping]",
    "-m +exp=vit_r8 +sweep=rank",
    "-m +exp=vit_r8 +sweep=optuna hydra.sweeper.n_trials=30 objective.param_penalty=0.01",
    "-m +exp=vit_r8 +sweep=optuna hydra/sweeper/pruner=median",
    "-m hydra/launcher=slurm hydra.launcher.partition=gpu +exp=vit_r8 +sweep=study",
    "-m +exp=smoke 'lora.rank=choice(1,2)' 'optim.lr=tag(log,interval(1e-4,1e-2))'",
    "hydra.mode=MULTIRUN +exp=smoke +sweep=rank",
    "+exp=smoke +trainer.profiler=simple +model.kwargs.drop_rate=0.1 hydra.run.dir=elsewhere",
    "+exp=smoke '+callbacks.timer={_target_:lightning.pytorch.callbacks.Timer}'",
    "+exp=smoke data=cifar10 ~data.num_classes ~data.num_samples ~data.num_test_samples",
    "--cfg job +exp=smoke +sweep=rank",
]


@pytest.mark.parametrize("command", VALID)
def test_valid_command_lines_pass(command: str) -> None:
    check_command_line(shlex.split(command))


# (command line, fragments of the message)
REFUSED = {
    "comma list without -m": ("+exp=smoke lora.rank=1,2", ["lora.rank=1,2 is a sweep", "add -m", "lora.rank=[1,2]"]),
    "choice without -m": ("+exp=smoke 'lora.rank=choice(1,2)'", ["is a sweep", "-m +exp=smoke"]),
    "named sweep without -m": ("+sweep=study +exp=vit_r8", ["+sweep=study is a sweep", "-m +sweep=study +exp=vit_r8"]),
    "misspelt key in a sweep": ("-m +exp=smoke lora.rnak=1,2", ["lora has no key 'rnak'", "did you mean lora.rank?"]),
    "misspelt Trainer key": ("+exp=smoke trainer.max_epoch=3", ["did you mean trainer.max_epochs"]),
    "Trainer argument without +": ("+exp=smoke trainer.profiler=simple", ["added with +: +trainer.profiler=simple"]),
    "key without its group": ("lr=0.1", ["no key or config group 'lr'", "did you mean optim.lr?"]),
    "misspelt group": ("lorra=dora", ["did you mean lora"]),
    "existing key with +": ("+lora.rank=4", ["set it without the +: lora.rank=4"]),
    "deleting a missing key": ("'~lora.rnak'", ["nothing to delete", "did you mean lora.rank?"]),
    "option in a list": ("logger=[csv,wandbb]", ["logger has no option 'wandbb'", "did you mean wandb?"]),
    "option in a sweep": ("-m lora=lora,doar", ["did you mean dora?"]),
    "plugin option": ("-m +exp=vit_r8 +sweep=optuna hydra/sweeper/pruner=medain", ["did you mean median?"]),
    "override syntax": ("'lora.rank=[1'", ["'[1'"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_command_line_mistakes_name_what_is_valid(case: str) -> None:
    command, fragments = REFUSED[case]
    with pytest.raises(ConfigError) as err:
        check_command_line(shlex.split(command))
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_sets_only_keys_its_dataset_has(exp: str) -> None:
    with composed(f"+exp={exp}") as cfg:
        check_data_keys(cfg)


def test_keys_of_the_experiments_dataset_name_the_experiment_and_the_fixes() -> None:
    with composed("+exp=smoke", "data=cifar10") as cfg, pytest.raises(ConfigError) as err:
        check_data_keys(cfg)
    message = str(err.value)
    assert message.startswith("data=cifar10 has no keys num_classes, num_samples, num_test_samples")
    for fragment in ("set by +exp=smoke for data=synthetic", "CIFAR10DataModule", "~data.num_test_samples"):
        assert fragment in message
    # Both fixes it names work.
    drop = ("~data.num_classes", "~data.num_samples", "~data.num_test_samples")
    for fixed in (("data=cifar10", *drop), ("data=synthetic",)):
        with composed("+exp=smoke", *fixed) as cfg:
            check_data_keys(cfg)


@pytest.mark.parametrize(
    ("overrides", "max_epochs"),
    [
        (("+exp=smoke", "trainer.max_epochs=1", "optim.warmup_epochs=1"), 1),
        (("+exp=vit_r8", "trainer.max_epochs=1"), 1),  # its 1-epoch warmup
        (("+exp=vtab1k_vit_b16_lora_qv", "trainer.max_epochs=5"), 5),  # its 10-epoch warmup
    ],
)
def test_warmup_as_long_as_training_says_what_to_set(overrides: tuple[str, ...], max_epochs: int) -> None:
    with composed(*overrides) as cfg, pytest.raises(ConfigError) as err:
        check_config(cfg)
    for fragment in ("optim.warmup_epochs=0 (no warmup)", f"a value below {max_epochs}"):
        assert fragment in str(err.value)
    for warmup in (0, max_epochs / 10):
        with composed(*overrides, f"optim.warmup_epochs={warmup}") as cfg:
            check_config(cfg)

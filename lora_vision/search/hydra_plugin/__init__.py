"""Installed as `hydra_plugins.lora_vision_optuna` (see pyproject.toml): Hydra discovers plugins only in the
`hydra_plugins` namespace package and instantiates only sweeper and launcher classes defined there (the Optuna
sweeper, the packed launcher of `lora_vision.multitask.launcher` and the SLURM launcher of `lora_vision.slurm`).
Loading it registers the `hydra/sweeper=optuna` configs and the `lora` group's schema (`lora_vision.schemas`):
Hydra loads every plugin before it composes a config, from `python -m lora_vision.train` and from the compose API
alike."""

from lora_vision.multitask.launcher import PackedLauncher as _PackedLauncher
from lora_vision.schemas import register_schemas
from lora_vision.search.config import register_configs
from lora_vision.search.sweeper import OptunaSweeper as _OptunaSweeper
from lora_vision.slurm import SlurmLauncher as _SlurmLauncher

register_configs()
register_schemas()


class OptunaSweeper(_OptunaSweeper):
    """lora_vision's Optuna sweeper (`lora_vision.search.sweeper`) under the name Hydra accepts."""


class PackedLauncher(_PackedLauncher):
    """lora_vision's packed launcher (`lora_vision.multitask.launcher`) under the name Hydra accepts."""


class SlurmLauncher(_SlurmLauncher):
    """lora_vision's SLURM launcher (`lora_vision.slurm`) under the name Hydra accepts."""

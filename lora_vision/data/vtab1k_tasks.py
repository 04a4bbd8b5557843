"""The 19 tasks of VTAB-1k (Zhai et al. 2019, arXiv:1910.04867): folder name, column label, group, class count.

Folder names are those of the released layout that NOAH's preparation script writes
(github.com/ZhangYuanhan-AI/NOAH, data/vtab-source/get_vtab1k.py) and that later PEFT papers share; class counts
are those of NOAH's dataset code (lib/datasets.py). The order is the column order of the papers' tables.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from lora_vision.data.errors import DataOptionError

NATURAL = "Natural"
SPECIALIZED = "Specialized"
STRUCTURED = "Structured"
GROUPS = (NATURAL, SPECIALIZED, STRUCTURED)


@dataclass(frozen=True)
class VTab1kTask:
    """One task: ``name`` is its folder in the released layout and the value of ``data.task``."""

    name: str
    label: str
    group: str
    num_classes: int


TASKS: tuple[VTab1kTask, ...] = (
    VTab1kTask("cifar", "CIFAR-100", NATURAL, 100),
    VTab1kTask("caltech101", "Caltech101", NATURAL, 102),
    VTab1kTask("dtd", "DTD", NATURAL, 47),
    VTab1kTask("oxford_flowers102", "Flowers102", NATURAL, 102),
    VTab1kTask("oxford_iiit_pet", "Pets", NATURAL, 37),
    VTab1kTask("svhn", "SVHN", NATURAL, 10),
    VTab1kTask("sun397", "Sun397", NATURAL, 397),
    VTab1kTask("patch_camelyon", "Camelyon", SPECIALIZED, 2),
    VTab1kTask("eurosat", "EuroSAT", SPECIALIZED, 10),
    VTab1kTask("resisc45", "Resisc45", SPECIALIZED, 45),
    VTab1kTask("diabetic_retinopathy", "Retinopathy", SPECIALIZED, 5),
    VTab1kTask("clevr_count", "Clevr-count", STRUCTURED, 8),
    VTab1kTask("clevr_dist", "Clevr-dist", STRUCTURED, 6),
    VTab1kTask("dmlab", "DMLab", STRUCTURED, 6),
    VTab1kTask("kitti", "KITTI-dist", STRUCTURED, 4),
    VTab1kTask("dsprites_loc", "dSpr-loc", STRUCTURED, 16),
    VTab1kTask("dsprites_ori", "dSpr-ori", STRUCTURED, 16),
    VTab1kTask("smallnorb_azi", "sNORB-azim", STRUCTURED, 18),
    VTab1kTask("smallnorb_ele", "sNORB-elev", STRUCTURED, 9),
)
TASK_NAMES: tuple[str, ...] = tuple(task.name for task in TASKS)
_BY_NAME = {task.name: task for task in TASKS}


def vtab1k_task(name: str) -> VTab1kTask:
    """The task called ``name``; DataOptionError naming the valid names (and the closest ones) otherwise."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    close = difflib.get_close_matches(str(name), TASK_NAMES, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise DataOptionError(
        f"task={name!r} is not a VTAB-1k task; {hint}valid tasks (folder names of the released layout): "
        f"{', '.join(TASK_NAMES)} (Hydra: data.task=...)"
    )

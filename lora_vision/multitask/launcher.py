"""`hydra/launcher=packed`: the points of a multirun that can share a pass train together, in one process over one
copy of the frozen weights (`multitask.sampling=packed`), and each point still gets its own run directory,
`results.json`, adapter and `.hydra/` config, as the sequential sweep writes them.

Points share a pass when their configs differ only in what a pack trains per point: the LoRA settings (rank, alpha,
targets, blocks, variants...), the learning rate and the warmup. Every other difference (the method, model, data,
batch size, epochs, seed, any other setting), a pack of one, a job that finished before (it is reported, not
trained again) and settings a pack does not run (`perf.compile`, `perf.grad_checkpointing`, several devices) keep a
job apart: it runs as the basic launcher runs it. The grouping, and the key that kept each job apart, are printed
before anything trains. A point whose loss diverges stops alone. `perf.cache_prefix` serves one cache to the whole
pack: the prefix ends below the lowest block any point adapts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from lora_vision.rerun import finished, previous_record, set_aside
from lora_vision.results import RESULTS_FILE, write_json_atomic

log = logging.getLogger(__name__)

# What a pack trains per point; the rest of the config must be the same for every point of a pack.
PER_POINT = ("lora", "optim.lr", "optim.warmup_epochs")
# The `perf` options a pack runs as a single run does; the others (compile, grad_checkpointing) keep a job apart.
PACKED_PERF = ("cache_prefix", "cache_dir", "channels_last")
# Not what a run trains: its directories and names.
NOT_COMPARED = ("hydra", "paths", "exp_name", "trial", "multitask")
PACK_PREFIX = ".pack-"


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _per_point(key: str) -> bool:
    return any(key == prefix or key.startswith(f"{prefix}.") for prefix in PER_POINT)


def shared_settings(cfg: DictConfig) -> dict[str, Any]:
    """Every setting of a job that must match for it to share a pass, by dotted key (the method's class too)."""
    plain: dict[str, Any] = {}
    for key in cfg:
        if key in NOT_COMPARED:
            continue
        node = cfg._get_node(key)
        try:
            plain[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else cfg[key]
        except InterpolationResolutionError:  # a value made from Hydra's runtime (a directory), alike for all
            plain[key] = OmegaConf.to_container(node, resolve=False)
    flat = _flat(plain)
    return {key: value for key, value in flat.items() if not _per_point(key)} | {"lora._target_": cfg.lora._target_}


def job_dir(cfg: DictConfig) -> Path:
    return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def apart_reason(cfg: DictConfig) -> str | None:
    """Why a job cannot join any pack, or None."""
    if not str(cfg.lora._target_).endswith(".LoRA"):
        return f"lora={cfg.lora._target_.rsplit('.', 1)[-1]} is not LoRA"
    if cfg.multitask.tasks:
        return "it is a multi-task run"
    switched = [key for key, value in cfg.perf.items() if value and key not in PACKED_PERF]
    if switched:
        return f"perf.{switched[0]} is on"
    if cfg.trainer.devices not in (1, "1"):
        return f"trainer.devices={cfg.trainer.devices}"
    return None


def finished_jobs(configs: Sequence[DictConfig]) -> dict[int, str]:
    """The jobs whose directory holds a finished run (reported when run again, as the basic launcher's are), with
    the reason they run apart."""
    return {
        index: "finished before: reported, not trained again"
        for index, cfg in enumerate(configs)
        if cfg.resume is not False and finished(previous_record(job_dir(cfg)))
    }


def group_jobs(
    configs: Sequence[DictConfig], apart: Mapping[int, str] | None = None
) -> tuple[list[list[int]], dict[int, str]]:
    """The packs (job indices) and, for every job run apart (those of `apart` among them), why."""
    groups: dict[str, list[int]] = {}
    settings: dict[str, dict[str, Any]] = {}
    reasons: dict[int, str] = dict(apart or {})
    for index, cfg in enumerate(configs):
        reason = reasons.get(index) or apart_reason(cfg)
        if reason is not None:
            reasons[index] = reason
            continue
        shared = shared_settings(cfg)
        key = json.dumps(shared, sort_keys=True, default=str)
        groups.setdefault(key, []).append(index)
        settings.setdefault(key, shared)
    packs = []
    for key, members in groups.items():
        if len(members) > 1:
            packs.append(members)
            continue
        mine = settings[key]
        others = [settings[other] for other in groups if other != key]
        differs = sorted({k for other in others for k in set(other) | set(mine) if other.get(k) != mine.get(k)})
        shown = ", ".join(differs[:3]) + (" ..." if len(differs) > 3 else "")
        reasons[members[0]] = f"{shown} differ from the other jobs'" if differs else "no other job to pack with"
    return packs, reasons


def pack_name(numbers: Sequence[int]) -> str:
    """The directory of the pack of jobs `numbers`: `.pack-<first>-<last>`, plus a digest of the members when they
    are not every job in between (a rerun that packs only the unfinished points must not meet another pack's run)."""
    name = f"{PACK_PREFIX}{numbers[0]}-{numbers[-1]}"
    if list(numbers) == list(range(numbers[0], numbers[-1] + 1)):
        return name
    return f"{name}-{hashlib.sha256(','.join(map(str, numbers)).encode()).hexdigest()[:8]}"


class PackedLauncher(Launcher):
    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _job_config(self, overrides: Sequence[str], index: int) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = index
            cfg.hydra.job.num = index
        return cfg

    def _run(self, cfg: DictConfig) -> JobReturn:
        assert self.hydra_context is not None and self.task_function is not None and self.config is not None
        result = run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=cfg,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return result

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = [self._job_config(o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
        packs, apart = group_jobs(configs, finished_jobs(configs))
        packed = sum(map(len, packs))
        log.info("Launching %d jobs: %d in %d pack(s), %d apart", len(configs), packed, len(packs), len(apart))
        for pack in packs:
            log.info("\tpack of jobs %s", ", ".join(f"#{configs[i].hydra.job.num}" for i in pack))
        for index, reason in sorted(apart.items()):
            overrides = " ".join(filter_overrides(job_overrides[index]))
            log.info("\t#%d apart (%s): %s", configs[index].hydra.job.num, reason, overrides)
        results: dict[int, JobReturn] = {index: self._run(configs[index]) for index in sorted(apart)}
        for pack in packs:
            results.update(zip(pack, self._run_pack([configs[i] for i in pack]), strict=True))
        return [results[index] for index in range(len(configs))]

    def _run_pack(self, configs: Sequence[DictConfig]) -> list[JobReturn]:
        """Train the points together in a `.pack-<first>-<last>` directory of the sweep, then move each point's
        record and adapter into its own job directory."""
        numbers = [int(cfg.hydra.job.num) for cfg in configs]
        names = [f"p{number}" for number in numbers]
        pack = configs[0].copy()
        with open_dict(pack):
            pack.hydra.sweep.subdir = pack_name(numbers)
            pack.multitask.sampling = "packed"
            pack.multitask.sharing = "independent"
            pack.multitask.tasks = {
                name: {
                    "data": OmegaConf.to_container(cfg.data),
                    "lora": {k: v for k, v in OmegaConf.to_container(cfg.lora).items() if k != "_target_"},
                    "lr": cfg.optim.lr,
                    "warmup_epochs": cfg.optim.warmup_epochs,
                }
                for name, cfg in zip(names, configs, strict=True)
            }
        packed = self._run(pack)
        pack_dir = Path(str(pack.hydra.sweep.dir)) / str(pack.hydra.sweep.subdir)
        return [self._point(pack_dir, packed, name, cfg) for name, cfg in zip(names, configs, strict=True)]

    def _point(self, pack_dir: Path, packed: JobReturn, name: str, cfg: DictConfig) -> JobReturn:
        """Move point `name`'s files from the pack into its job directory (an earlier attempt there is kept in
        `previous-<n>/`, as a single run keeps it); its JobReturn."""
        directory = job_dir(cfg)
        (directory / ".hydra").mkdir(parents=True, exist_ok=True)
        source = pack_dir / "tasks" / name
        if source.is_dir():
            set_aside(directory)
            for item in source.iterdir():
                shutil.move(str(item), directory / item.name)
            shutil.rmtree(source)
        plain = cfg.copy()
        with open_dict(plain):
            del plain["hydra"]
        OmegaConf.save(plain, directory / ".hydra" / "config.yaml")
        OmegaConf.save(OmegaConf.create(list(cfg.hydra.overrides.task)), directory / ".hydra" / "overrides.yaml")
        results = directory / RESULTS_FILE
        record: dict[str, Any] = json.loads(results.read_text()) if results.is_file() else {}
        if record:
            record |= {"experiment": cfg.exp_name, "output_dir": str(directory), "packed_in": str(pack_dir)}
            if record.get("adapter_dir"):
                record["adapter_dir"] = str(directory / "adapter")
            write_json_atomic(results, record)
        if packed.status != JobStatus.COMPLETED:
            status, value = packed.status, packed._return_value
        else:
            status, value = JobStatus.COMPLETED, record.get("objective")
        return JobReturn(
            overrides=list(cfg.hydra.overrides.task),
            cfg=plain,
            hydra_cfg=cfg,
            working_dir=str(directory),
            task_name=packed.task_name,
            status=status,
            _return_value=value,
        )

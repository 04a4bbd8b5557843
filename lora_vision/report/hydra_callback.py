"""The report at the end of every multirun: a Hydra callback, registered in `conf/hydra/default.yaml`.

When a sweep ends, `report.md`, `report.csv` and `report.png` are written into its directory. With a W&B logger
configured (`logger=wandb`), the table and the plot also go into a W&B run `<exp_name>-report` (job type
`report`) in the group of the sweep's runs, in the logger's mode (offline unless set otherwise).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lora_vision.report import Report, build_report
from lora_vision.report.table import parse_cell

log = logging.getLogger(__name__)


class SweepReport(Callback):
    """Aggregate the sweep directory's results.json files once all of its jobs have ended."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = build_report([sweep_dir], sweep_dir, title=config.exp_name)
        except FileNotFoundError as err:
            # No job got as far as writing its record (all killed, say); the sweep itself has still ended.
            log.warning("no sweep report: %s", err)
            return
        log.info("sweep report: %s", report.markdown)
        wandb_cfg = OmegaConf.select(config, "logger.wandb")
        if wandb_cfg is not None:
            log_to_wandb(report, wandb_cfg, name=f"{config.exp_name}-report", save_dir=sweep_dir)


def log_to_wandb(report: Report, wandb_cfg: DictConfig, name: str, save_dir: Path) -> None:
    """Log the report's table (`wandb.Table`) and plot (`wandb.Image`) into a new W&B run and finish it."""
    # Imported here: wandb takes seconds to import, and only sweeps with a W&B logger need it.
    import wandb

    with report.csv.open(newline="") as f:
        header, *rows = csv.reader(f)
    run = wandb.init(
        project=wandb_cfg.project,
        entity=wandb_cfg.entity,
        name=name,
        group=wandb_cfg.group,
        job_type="report",
        tags=list(wandb_cfg.tags),
        mode=wandb_cfg.mode,
        dir=str(save_dir),
    )
    try:
        run.log(
            {
                # W&B types table columns from their values; the CSV holds them as text.
                "report/table": wandb.Table(columns=header, data=[[parse_cell(c) for c in row] for row in rows]),
                "report/accuracy_vs_params": wandb.Image(str(report.png)),
            }
        )
    finally:
        run.finish()

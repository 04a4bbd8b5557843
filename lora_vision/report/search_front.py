"""The Pareto front of a two-objective Optuna search (`pareto_front.yaml`, written by lora_vision's sweeper), as
a section of the sweep report: the trials no other trial beats on both validation accuracy and trainable
parameters, with the test accuracy each of them reached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lora_vision.results import PARETO_FILE


@dataclass(frozen=True)
class FrontTrial:
    trial: int
    val_acc1: float
    trainable_params: float
    params: dict[str, Any]
    test_acc1: float | None


def load_search_front(dirs: list[Path], records: list[dict[str, Any]]) -> list[FrontTrial]:
    """The front of every `pareto_front.yaml` in `dirs`, each trial joined with its run's record by number."""
    front = []
    for directory in dirs:
        path = Path(directory) / PARETO_FILE
        if not path.is_file():
            continue
        inside = {r.get("trial"): r for r in records if Path(r["_path"]).is_relative_to(Path(directory))}
        for entry in OmegaConf.to_container(OmegaConf.load(path))["pareto_front"]:
            accuracy, params = entry["values"]
            record = inside.get(entry["trial"], {})
            front.append(FrontTrial(entry["trial"], accuracy, params, entry["params"], record.get("test_acc1")))
    return sorted(front, key=lambda t: t.trainable_params)


def front_markdown(front: list[FrontTrial]) -> str:
    if not front:
        return ""
    lines = [
        "",
        "## Pareto front of the search",
        "",
        "Trials no other trial beats on both objectives, best validation top-1 (up) and trainable parameters "
        f"(down), from {PARETO_FILE}; ringed in the plot at their test accuracy.",
        "",
        "| trial | trainable params | best val acc1 (%) | test acc1 (%) | settings |",
        "|---|---|---|---|---|",
    ]
    for t in front:
        test = "" if t.test_acc1 is None else f"{100 * t.test_acc1:.2f}"
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        lines.append(f"| {t.trial} | {t.trainable_params:,.0f} | {100 * t.val_acc1:.2f} | {test} | {settings} |")
    return "\n".join(lines) + "\n"

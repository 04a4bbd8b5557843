"""An Optuna search in the sweep report, from the results files lora_vision's sweeper writes: how its trials were
drawn (sampler and seed), and the Pareto front of a two-objective search (`pareto_front.yaml`): the trials no other
trial beats on both validation accuracy and trainable parameters, with the test accuracy each of them reached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lora_vision.results import BEST_FILE, PARETO_FILE


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


def search_markdown(paths: list[str | Path]) -> str:
    """A line per search results file in `paths` naming the sampler and the seed its trials were drawn with; empty
    when there is none, or it comes from a release that did not record the seed."""
    lines = []
    for directory in (Path(p) for p in paths if Path(p).is_dir()):
        for path in (directory / BEST_FILE, directory / PARETO_FILE):
            found = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}
            if "seed" not in found:
                continue
            seed = found["seed"]
            drawn = (
                "unseeded"
                if seed is None
                else f"seed {seed}; each trial drew with its own seed, derived from {seed} and its number "
                "(`sampler_seed` in the study)"
            )
            lines.append(f"Optuna search ({path.name}): sampler {found['sampler']}, {drawn}.")
    return "\n".join(["", "## Search", "", *lines]) + "\n" if lines else ""

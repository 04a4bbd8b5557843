"""One mixed-batch pass over every task's test set with a multi-task run's adapters on one backbone.

    python experiments/multitask_vit_tiny_cpu/mixed_batch.py RUN_DIR [--checkpoint BASE_WEIGHTS]
        [--archive TASK=PATH ...] [--batch-size N]

The tasks' adapters (RUN_DIR/tasks/<task>/adapter) load onto one base model (`load_adapters`). Every batch takes
the next images of each task's test loader (each with its own preprocessing), shuffles them together and sends
each image through its own adapter and head in one forward pass (`route`). Prints JSON: per task, the accuracy of
this pass, the run's recorded test accuracy, and whether they are equal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lora_vision.adapters import load_adapters_onto_recorded_base, read_adapter_meta
from lora_vision.builders import build_datamodule
from lora_vision.evaluate import select_data
from lora_vision.lora import route
from lora_vision.models import model_data_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--checkpoint", help="the base weights the run started from")
    parser.add_argument("--archive", action="append", default=[], metavar="TASK=PATH")
    parser.add_argument("--batch-size", type=int, default=32, help="images per task in each mixed batch")
    args = parser.parse_args()
    summary = json.loads((args.run / "results.json").read_text())
    tasks = list(summary["tasks"])
    archives = dict(entry.split("=", 1) for entry in args.archive)
    adapters = {task: args.run / "tasks" / task / "adapter" for task in tasks}
    model = load_adapters_onto_recorded_base(adapters, args.checkpoint)
    datamodules = {}
    for task in tasks:
        overrides = [f"data.archive={archives[task]}"] if task in archives else []
        recorded = OmegaConf.create(read_adapter_meta(adapters[task])["data"])
        _, cfg = select_data(overrides, recorded, None, {"batch_size": args.batch_size, "num_workers": 0})
        datamodules[task] = build_datamodule(cfg)
        datamodules[task].data_config = model_data_config(model, cfg.image_size, cfg.crop_pct)
        datamodules[task].setup("test")
    iterators = {task: iter(dm.test_dataloader()) for task, dm in datamodules.items()}
    correct = dict.fromkeys(tasks, 0)
    seen = dict.fromkeys(tasks, 0)
    generator = torch.Generator().manual_seed(0)
    mixed_batches = 0
    with torch.inference_mode():
        while iterators:
            images, labels, names = [], [], []
            for task in list(iterators):
                batch = next(iterators[task], None)
                if batch is None:
                    del iterators[task]
                    continue
                images.append(datamodules[task].batch_transform(batch[0]))
                labels.append(batch[1])
                names += [task] * len(batch[1])
            if not names:
                break
            order = torch.randperm(len(names), generator=generator)
            x, y = torch.cat(images)[order], torch.cat(labels)[order]
            routing = [names[int(i)] for i in order]
            mixed_batches += len(set(routing)) > 1
            with route(model, routing):
                predicted = model(x).argmax(-1)
            for task in tasks:
                rows = torch.tensor([name == task for name in routing])
                correct[task] += int((predicted[rows] == y[rows]).sum())
                seen[task] += int(rows.sum())
    result = {
        "mixed_batches": mixed_batches,
        "tasks": {
            task: {
                "images": seen[task],
                "acc1_mixed_pass": correct[task] / seen[task],
                "acc1_recorded": summary["tasks"][task]["test_acc1"],
                "equal": round(correct[task] / seen[task], 6) == round(summary["tasks"][task]["test_acc1"], 6),
            }
            for task in tasks
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

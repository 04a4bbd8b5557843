"""Multi-task runs: several tasks' adapters and heads trained together on one frozen backbone.

`config` reads the run config's `multitask` block (tasks, sampling rule, sharing setting); `sampling` draws which
task each step trains; `data` turns the tasks' datamodules into one training stream and per-task evaluation
loaders; `model` builds the backbone with every task's adapters and heads, and the single-task model each task's
adapter is saved from; `module` is the LightningModule; `run` trains, tests and saves (`lora_vision.train` calls
it when `multitask.tasks` is not empty).
"""

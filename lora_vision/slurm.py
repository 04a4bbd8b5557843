"""`hydra/launcher=slurm`: Hydra's submitit launcher, with jobs the cluster cannot place refused up front, as one
message.

A job SLURM can never start (an unknown partition, more CPUs or memory than a node has, GPUs a node lacks) is not
always refused at submission: unless the cluster sets `EnforcePartLimits`, sbatch queues it and it pends for ever
(reason `PartitionConfig`), a night lost. So before submitting, the launcher asks `sbatch --test-only` about the
very script submitit would submit; a refusal, and any sbatch error at submission, becomes one message that quotes
SLURM and names the launcher settings to check, with exit status 2 (`lora_vision.errors`). Nothing is queued.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import OmegaConf

from lora_vision.errors import UserError, user_errors_as_messages

PROG = "slurm launcher"
# The launcher settings that decide where a job can run, named in the message.
PLACEMENT = ("partition", "cpus_per_task", "mem_gb", "gpus_per_node", "tasks_per_node", "nodes", "timeout_min")
# How SLURM words a refusal: sbatch's errors, and the scheduler's answer to --test-only.
REFUSALS = ("sbatch: error:", "allocation failure:")


class SlurmSubmissionError(UserError, RuntimeError):
    """SLURM refused, or would never start, the sweep's jobs; the message quotes it."""


def slurm_words(text: str) -> str | None:
    """SLURM's refusal lines in `text`, joined; None when there are none."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(REFUSALS)]
    return "; ".join(dict.fromkeys(lines)) or None


def executor_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """The launcher's settings as `AutoExecutor.update_parameters` takes them: the names Hydra's submitit launcher
    gives them (its `launch` maps them so; restated here because it does so inline)."""
    common = set(OmegaConf.structured(BaseQueueConf).keys())
    apart = {"submitit_folder", "max_num_timeout"}
    return {key if key in common else f"slurm_{key}": value for key, value in params.items() if key not in apart}


def refusal_of(params: Mapping[str, Any], jobs: int) -> str | None:
    """SLURM's reason why the sweep's job (array) could never start, from `sbatch --test-only` on the script
    submitit writes for it; None when it could."""
    import submitit
    from submitit.slurm.slurm import _make_sbatch_string  # the script submitit itself submits

    if shutil.which("sbatch") is None or shutil.which("srun") is None:  # else submitit raises a bare RuntimeError
        raise SlurmSubmissionError(
            "hydra/launcher=slurm submits with sbatch and srun, which are not on this machine's PATH: run the command "
            "on a SLURM login node, or leave hydra/launcher out to run the jobs here"
        )

    with tempfile.TemporaryDirectory() as folder:
        executor = submitit.AutoExecutor(cluster="slurm", folder=folder)
        executor.update_parameters(**executor_parameters(params))
        array = {"map_count": jobs} if jobs > 1 else {}
        script = Path(folder) / "test_only.sh"
        script.write_text(_make_sbatch_string(command="true", folder=folder, **executor._executor.parameters, **array))
        checked = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
    if checked.returncode == 0:
        return None
    return slurm_words(checked.stderr + checked.stdout) or checked.stderr.strip() or "sbatch --test-only failed"


class SlurmLauncher(SubmititSlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from submitit.core.utils import FailedJobError  # lazy, as the base class imports submitit

        with user_errors_as_messages(PROG):
            refusal = refusal_of(self.params, len(job_overrides))
            if refusal is None:
                try:
                    return super().launch(job_overrides, initial_job_idx)
                except FailedJobError as err:  # sbatch refused at submission, or a queued job failed
                    refusal = slurm_words(str(err))
                    if refusal is None:
                        raise
            asked = ", ".join(f"hydra.launcher.{key}={self.params.get(key)}" for key in PLACEMENT)
            raise SlurmSubmissionError(
                f"SLURM would not run the jobs, nothing was queued: {refusal}. The launcher asked for {asked}; "
                "`sinfo --format='%P %c %m %l %G'` lists each partition's CPUs per node, memory (MB), time limit "
                "and GPUs"
            )

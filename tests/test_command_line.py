"""`python -m lora_vision.train` as a user runs it: a mistake on the command line ends in one message and exit status
2 before Hydra starts a run, and a run prints its own lines without the libraries' noise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_vision.cli import checked_command_line
from tests.helpers import FAST, launch

ERROR = "python -m lora_vision.train: error: "

# (command line, fragments the message must hold): each is refused before Hydra creates a run directory.
REFUSED = {
    "named sweep without -m": (
        ["+exp=smoke", "+sweep=rank"],
        ["+sweep=rank is a sweep", "add -m", "python -m lora_vision.train -m +exp=smoke +sweep=rank"],
    ),
    "misspelt key": (["+exp=smoke", "lora.rnak=4"], ["lora.rnak=4", "did you mean lora.rank?"]),
    "misspelt option": (["+exp=smoke", "lora=doar"], ["lora=doar", "did you mean dora?", "linear_probe"]),
    "misspelt experiment": (["+exp=smok"], ["+exp=smok", "did you mean smoke?"]),
}


def refusal(returncode: int, stdout: str, stderr: str) -> str:
    """The one line a refused command prints, after checking that it is all that it printed."""
    assert returncode == 2, stdout + stderr
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), stderr
    return lines[0]


def check_message(message: str, fragments: list[str]) -> None:
    for fragment in fragments:
        assert fragment in message
    assert "To append to your config use +" not in message  # Hydra's advice, which the run would refuse


@pytest.mark.parametrize("case", REFUSED)
def test_command_line_mistake_is_one_message_and_exit_status_2(case: str, capsys: pytest.CaptureFixture) -> None:
    # What `python -m lora_vision.train` does with its arguments before Hydra starts; the same as a process below.
    args, fragments = REFUSED[case]
    with pytest.raises(SystemExit) as stopped:
        checked_command_line(args)
    check_message(refusal(stopped.value.code, *capsys.readouterr()), fragments)


def test_a_mistake_stops_the_command_before_hydra_makes_a_run_directory(tmp_path: Path) -> None:
    args, fragments = REFUSED["misspelt key"]
    result = launch(tmp_path, *args)
    check_message(refusal(result.returncode, result.stdout, result.stderr), fragments)
    assert not (tmp_path / "outputs").exists()


# Text of the lines Lightning and torch printed on every run, saying nothing about it (lora_vision.quiet drops
# them), and what printed each.
NOISE = {
    "💡 Tip:": "Lightning's advertisement for its cloud logger (litlogger)",
    "The `srun` command is available": "Lightning's hint on any machine with SLURM installed",
    "LeafSpec": "torch's deprecation warning for Lightning's use of its pytree API",
    "`weights_only` was not set": "Lightning's note on every checkpoint saved",
    "TPU available": "Lightning's TPU line",
    "to estimate number of stepping batches": "Lightning's note before the schedule is built",
}


@pytest.mark.slow
def test_a_run_prints_its_own_lines_and_no_library_noise(tmp_path: Path) -> None:
    # A stand-in `srun` on PATH, as on a SLURM login node, which is where Lightning prints its srun hint.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    result = launch(tmp_path, *FAST, f"hydra.run.dir={tmp_path / 'run'}", env={"PATH": path})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for line, source in NOISE.items():
        assert line not in output, source
    # lora_vision's own lines, and Lightning's that say something about the run.
    for kept in ("parameter budget:", "results: ", "GPU available: ", "Test metric"):
        assert kept in output

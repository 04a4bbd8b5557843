"""Peak training memory per side, each measured in a fresh child process.

On CPU the only honest peak is the resident set size, and the kernel keeps its high-water mark
(`ru_maxrss`) for the lifetime of a process; in one process the second side measured would also see the
first's peak, and memory the allocator keeps cached from it. So every side runs in its own child: it builds the
side from the same seed, records `ru_maxrss` (model, batch and runtime are in it by then), runs a few training
steps, and reports by how much the high-water mark rose: activations, gradients and optimizer state, the part
that differs between implementations. On CUDA the child reports `torch.cuda.max_memory_allocated()` above what
was allocated before the first step, which is the same quantity without the process boundary.

Children are forked from a forkserver that has already imported torch, timm and PEFT, so a measurement costs a
model build and a few steps rather than several seconds of imports.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import resource
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import torch

from lora_vision.bench.configs import BenchConfig, Settings
from lora_vision.bench.peft_side import peft_version
from lora_vision.bench.sides import TrainStep, build_base, make_batch, prepare_side

MIB = 2**20
T = TypeVar("T")
# Linux reports ru_maxrss in KiB, macOS in bytes.
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lora_vision.bench.sides", *(["peft"] if peft_version() else [])])
    return context


def max_rss() -> int:
    """The resident-set high-water mark of this process, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT


# glibc's M_MMAP_THRESHOLD (mallopt parameter -3), and the value it starts from. Left alone, glibc raises the
# threshold to the size of each large block freed, so later blocks of that size come from the heap, whose freed
# memory stays resident: the peak RSS then depends on the order in which tensors were freed, which two threads make
# vary from child to child. A fixed threshold keeps every tensor of 128 KiB or more in its own mapping, returned when
# freed, so the peak follows the tensors alive at once (the three children of each side in
# experiments/benchmarks/conv/results.json agree within 0.1 MiB).
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES = -3, 128 * 1024


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold in this process (see above); False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def measure_in_this_process(config: BenchConfig, side: str, settings: Settings) -> float:
    """Peak memory (MiB) that `settings.memory_steps` training steps add to the built side."""
    fix_mmap_threshold()
    spec = settings.model(config)
    model = prepare_side(build_base(spec, settings), config, side, settings)
    step = TrainStep(model, *make_batch(spec, settings), settings)
    cuda, before = memory_baseline(settings, max_rss)
    for _ in range(settings.memory_steps):
        step()
    if cuda:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MIB
    return (max_rss() - before) / MIB


def memory_baseline(settings: Settings, resident: Callable[[], int]) -> tuple[bool, int]:
    """Where memory stands before a measurement, garbage collected: (True, CUDA memory allocated, its peak counter
    reset) on a GPU, (False, `resident()` bytes) on the CPU."""
    gc.collect()
    if torch.device(settings.device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True, torch.cuda.memory_allocated()
    return False, resident()


def in_child(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a fresh child process, whose resident-set high-water mark starts at what it imported."""
    with ProcessPoolExecutor(max_workers=1, mp_context=_context()) as pool:
        return pool.submit(function, *args).result()


def peak_memory_mib(config: BenchConfig, side: str, settings: Settings) -> float:
    """`measure_in_this_process` run in a fresh child process, so no other side's memory is counted."""
    return in_child(measure_in_this_process, config, side, settings)

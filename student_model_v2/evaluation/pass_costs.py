"""What one model pass costs, measured on its own: the bricks of a benchmark's cost model.

A sampler's time should be the sum of its passes (UNet calls, one WriteNet call); comparing the measured
sampling time with that sum shows what a loop adds beyond its passes (host syncs, scheduler work, tensors
built per step). :func:`interleaved_median_seconds` times calls round-robin (device-synchronised, warm-up
first), :func:`count_flops` counts a call's FLOPs once with ``torch.utils.flop_counter.FlopCounterMode``
(outside any timed loop: the counter slows the call down), and :func:`achieved_tflops` relates the two.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose ops finish before they return)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median_seconds(calls: dict[str, Callable[[], object]], device: torch.device, warmup: int = 1,
                               repeats: int = 3) -> dict[str, float]:
    """Median wall seconds of each call over ``repeats`` rounds after ``warmup`` untimed ones. The calls take
    turns (one run of each per round), so a load change on a shared machine hits every call alike instead of
    skewing their ratios; each run is synchronised before and after, so queued device work is neither missed
    nor charged to the next call."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(warmup):
            for call in calls.values():
                call()
        for _ in range(repeats):
            for name, call in calls.items():
                synchronize(device)
                start = time.perf_counter()
                call()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of one ``call()`` as PyTorch's FLOP counter sees them (matmuls and convolutions; elementwise ops
    count zero, so this is the model-FLOP figure used for utilisation estimates)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        call()
    return int(counter.get_total_flops())


def achieved_tflops(flops: int, seconds: float) -> float:
    """TFLOP/s of ``flops`` done in ``seconds``."""
    return flops / seconds / 1e12 if seconds > 0 else float("nan")


"""Timing work on a device that runs asynchronously."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synced_seconds(device: torch.device, work: Callable[[], object]) -> float:
    """Wall seconds of ``work()``, the device's queued work finished before and after.

    A GPU runs what it is given after the call returns: without the synchronisation
    the time would be of the launches, not of the work.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started

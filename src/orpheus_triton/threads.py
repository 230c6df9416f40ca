"""Background threads that run torch with the thread count their process chose."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


def start_torch_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread running ``target`` with the creating thread's torch thread count.

    ``torch.set_num_threads`` binds the thread that calls it. A thread started
    later begins with the OpenMP and MKL defaults (one thread per core); torch
    applies its count there only on the first elementwise-style kernel, so a
    matrix product or convolution that comes first runs on every core (measured
    on 2 cores: 1.7-2x the CPU time, busy-waiting against the other model's
    process). The count is applied as the thread starts.
    """
    threads = torch.get_num_threads()

    def run() -> None:
        torch.set_num_threads(threads)
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread

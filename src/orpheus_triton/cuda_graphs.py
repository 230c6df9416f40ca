"""Capturing one step of work as a CUDA graph, the same way for the decoder and the sampler."""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture(run: Callable[[], torch.Tensor], device: torch.device, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run ``run`` twice on a side stream (warm-up: lazy initialisation, allocator), then capture it.

    The graph and ``run``'s output tensor come back; a replay rewrites that tensor. On ``device``
    whichever thread captures (a thread's current device is cuda:0 until it sets one).
    thread_local: work that other threads of the process put on the GPU meanwhile (a SNAC
    decoder) does not invalidate the capture.
    """
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = run()
    return graph, out

"""Capturing one step of work as a CUDA graph, the same way for the decoder and the sampler."""

from __future__ import annotations

from collections.abc import Callable

import torch


def padded_sizes(largest: int, step: int = 32) -> tuple[int, ...]:
    """The batch sizes work is padded up to, each captured once as a CUDA graph: powers of two below ``step``,
    then multiples of ``step`` up to ``largest``, and ``largest`` itself.

    Multiples rather than powers of two above ``step``: a batch of 216 runs as 224 rows, not 256, and a
    batch's time grows with its rows there (the LLM's decode step; the SNAC decoder's call, about linearly
    above 40 windows on an H100).
    """
    if largest < 1 or step < 1:
        raise ValueError(f"padded sizes need largest and step >= 1, got {largest} and {step}")
    small = [1 << i for i in range(step.bit_length()) if 1 << i < step]
    return tuple(sorted({min(size, largest) for size in [*small, *range(step, largest + step, step)]}))


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


class GraphRefused(RuntimeError):
    """A CUDA graph not kept (``capture_checked``): why, and ``eager``, the output of the eager run."""

    def __init__(self, why: str, eager: torch.Tensor):
        super().__init__(why)
        self.eager = eager


def capture_checked(run: Callable[[], torch.Tensor], device: torch.device, pool,
                    tolerance: Callable[[torch.Tensor], float]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``capture``, kept only if it works: ``run`` once eagerly, then captured and replayed; the graph and its
    output come back if the replay's output is within ``tolerance(eager output)`` of the eager run's, and
    GraphRefused (with the eager output, what the caller answers with instead) if the capture fails or the
    outputs differ by more."""
    eager = run().clone()
    try:
        graph, out = capture(run, device, pool)
        graph.replay()
    except RuntimeError as error:
        raise GraphRefused(f"no CUDA graph ({error})", eager) from None
    difference = (out.float() - eager.float()).abs().max().item()
    if difference > tolerance(eager):
        raise GraphRefused(f"the CUDA graph differs from the eager run by {difference:.3g}", eager)
    return graph, out

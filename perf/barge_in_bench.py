#!/usr/bin/env python3
"""A caller who barges in: how long after hanging up the stream ends, and what the server did for nobody.

A voice agent's caller interrupts; the client leaves the stream (OrpheusClient: the `llm` stage's
`stop`, then the stream read to its end). What that costs: how long the client waits for the end
after hanging up, how many tokens the llm stage generated in all, and how many SNAC windows the
decoder decoded that the caller did not hear (all it decoded for the stream, less the chunks heard
before hanging up: audio nobody hears). The llm stage runs ahead of the decoder
(by far with the demo model set on a CPU), so what it generated before the stop is the decoder's
backlog. Runs one stream at a time through a local server, leaving each after its Nth chunk.

    python perf/barge_in_bench.py                                # demo models, CPU, 3 runs per point
    python perf/barge_in_bench.py --chunks 1,10,30,60 --runs 5 --out perf/results/barge-in

Writes barge_in.json and barge_in.md to --out (default: a new run folder).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

from common import (
    add_model_arguments,
    local_server,
    log,
    machine_and_code,
    machine_info,
    machine_name,
    metric_values,
    model_set,
    run_folder,
    source_state,
    write_result,
)

from orpheus_triton.arguments import DefaultsHelpFormatter, counts, max_tokens, positive
from orpheus_triton.client import END_EARLY_SECONDS, OrpheusClient
from orpheus_triton.constants import SAMPLE_RATE, SAMPLES_PER_FRAME
from orpheus_triton.metrics import DECODER_WINDOWS_METRIC as WINDOWS
from orpheus_triton.metrics import LLM_TOKENS_METRIC as TOKENS


def metric(metrics_url: str, name: str) -> float:
    """A counter's value on the server's /metrics page (its one model's)."""
    return sum(metric_values(metrics_url, name))


def settled(metrics_url: str, name: str) -> float:
    """A counter once the models' metrics threads have published what came before (the engine's every 0.5 s)."""
    time.sleep(1.1)
    return metric(metrics_url, name)


class HungUp(Exception):
    """The caller spoke: the client leaves the stream."""


def barge_in(url: str, metrics_url: str, after_chunks: int, max_tokens: int, seed: int) -> dict:
    """One stream, left after its ``after_chunks``-th chunk."""
    tokens_before, windows_before = settled(metrics_url, TOKENS), metric(metrics_url, WINDOWS)
    heard = {"chunks": 0, "samples": 0}

    def listen(chunk) -> None:
        heard["chunks"] += 1
        heard["samples"] += chunk.size
        if heard["chunks"] == after_chunks:
            heard["at"] = time.perf_counter()
            raise HungUp

    started = time.perf_counter()
    with contextlib.suppress(HungUp):
        OrpheusClient(url, end_wait=END_EARLY_SECONDS).synthesize(  # measured: the stop's whole end
            "A long answer the caller will not wait for.", max_tokens=max_tokens, seed=seed, on_chunk=listen)
    ended = time.perf_counter()
    if "at" not in heard:
        raise RuntimeError(f"the stream ended after {heard['chunks']} chunks, before chunk {after_chunks}: "
                           "raise --max-tokens")
    decoded = settled(metrics_url, WINDOWS) - windows_before  # (the decoder's counters: one window a frame)
    return {"after_chunks": after_chunks, "hung_up_at_s": heard["at"] - started,
            "audio_heard_s": heard["samples"] / SAMPLE_RATE, "wait_for_end_s": ended - heard["at"],
            "tokens_generated": metric(metrics_url, TOKENS) - tokens_before, "windows_decoded": decoded,
            "windows_unheard": decoded - heard["samples"] / SAMPLES_PER_FRAME}


def report(result: dict) -> str:
    lines = [
        f"# Barge-in: streams of {result['max_tokens']} tokens left after their Nth chunk",
        "",
        f"* {machine_and_code(result)}; {result['models']}",
        "* each run: one stream through `OrpheusClient.synthesize`, left by raising in `on_chunk` (the "
        "`llm` stage's `stop`, then the stream read to its end); counters from the server's /metrics",
        "",
        "| left after chunk | runs | hung up at s | caller waited for the end, s (median, max) | tokens generated "
        "(median) | windows decoded, not heard (median, max) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for after, runs in result["summary"].items():
        lines.append(f"| {after} | {runs['runs']} | {runs['hung_up_at_s']:.2f} | {runs['wait_median_s']:.2f}, "
                     f"{runs['wait_max_s']:.2f} | {runs['tokens_median']:.0f} | {runs['windows_unheard_median']:.0f}, "
                     f"{runs['windows_unheard_max']:.0f} |")
    return "\n".join(lines) + "\n"


def summary(runs: list[dict]) -> dict:
    waits = [run["wait_for_end_s"] for run in runs]
    unheard = [run["windows_unheard"] for run in runs]
    return {"runs": len(runs), "hung_up_at_s": statistics.median(run["hung_up_at_s"] for run in runs),
            "wait_median_s": statistics.median(waits), "wait_max_s": max(waits),
            "tokens_median": statistics.median(run["tokens_generated"] for run in runs),
            "windows_unheard_median": statistics.median(unheard), "windows_unheard_max": max(unheard)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--chunks", type=counts, default="1,10,30,60", help="leave each stream after this chunk")
    parser.add_argument("--runs", type=positive, default=3, help="runs per point")
    parser.add_argument("--max-tokens", type=max_tokens, default=1200,
                        help="per stream (the demo LLM never stops early)")
    add_model_arguments(parser)
    args = parser.parse_args()
    models, description = model_set(args.shape, args.models)
    folder = Path(args.out) if args.out else run_folder(f"{machine_name()}-barge-in")
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    runs = []
    with local_server(models, 4, folder / "raw" / "server.log", device=args.device) as server:
        OrpheusClient(server.url).synthesize("Warming up.", max_tokens=70)  # the first stream after start
        for index in range(args.runs):
            for after in args.chunks:
                run = barge_in(server.url, server.metrics_url, after, args.max_tokens, seed=index)
                log(f"left after chunk {after} ({run['hung_up_at_s']:.2f} s): the end came "
                    f"{run['wait_for_end_s']:.2f} s later; {run['tokens_generated']:.0f} tokens generated, "
                    f"{run['windows_unheard']:.0f} windows decoded, not heard")
                runs.append(run)
    result = {"max_tokens": args.max_tokens, "models": description, "machine": machine_info(),
              "source": source_state(), "runs": runs,
              "summary": {str(after): summary([run for run in runs if run["after_chunks"] == after])
                          for after in args.chunks}}
    write_result(folder, "barge_in", result, report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

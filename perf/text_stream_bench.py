#!/usr/bin/env python3
"""Speaking a reply sentence by sentence (AsyncOrpheusClient.stream_text): first audio and the seams.

A voice agent's reply is spoken one request per sentence. What the listener
hears: how soon the first audio comes, and whether playback ever starves, at
the seams between sentences above all (the next sentence starts generating
only once the one before has finished, by default). Runs the reply several
times through a local server, alternating the client's ``concurrency`` values
(sentences generating at once), and reports per run the time to first audio,
the stalls (loadgen.playback's rule) and how long the reply took.

    python perf/text_stream_bench.py                          # demo models, CPU, 5 runs each
    python perf/text_stream_bench.py --concurrency 1,2 --runs 10 --out perf/results/text-stream

Writes text_stream.json and text_stream.md to --out (default: a new run folder).
"""

from __future__ import annotations

import argparse
import asyncio
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
    model_set,
    run_folder,
    source_state,
    write_result,
)

from orpheus_triton.arguments import DefaultsHelpFormatter, counts, max_tokens, positive
from orpheus_triton.client import AsyncOrpheusClient
from orpheus_triton.constants import SAMPLE_RATE
from orpheus_triton.loadgen import playback

REPLY = ("Thanks for calling the clinic. Your appointment is on Tuesday at ten. Please bring your insurance "
         "card. If you need to reschedule, call us back. Have a great day!")


async def speak(url: str, text: str, concurrency: int, max_tokens: int, seed: int) -> dict:
    """One reply through stream_text: its first audio, stalls and times."""
    async with AsyncOrpheusClient(url) as client:
        arrivals, samples = [], []
        started = time.perf_counter()
        async for chunk in client.stream_text(text, concurrency=concurrency, max_tokens=max_tokens, seed=seed):
            arrivals.append(time.perf_counter() - started)
            samples.append(len(chunk))
    if not arrivals:
        raise RuntimeError(f"the reply came back without audio (concurrency {concurrency})")
    heard = playback(arrivals, samples)
    return {"concurrency": concurrency, "first_audio_s": arrivals[0], "stalls": heard.stalls,
            "stall_s": heard.stall_seconds, "audio_s": sum(samples) / SAMPLE_RATE, "total_s": arrivals[-1]}


def summary(runs: list[dict]) -> dict:
    first = [run["first_audio_s"] for run in runs]
    return {"runs": len(runs), "first_audio_median_s": statistics.median(first), "first_audio_min_s": min(first),
            "first_audio_max_s": max(first), "runs_with_stalls": sum(run["stalls"] > 0 for run in runs),
            "stall_s_total": sum(run["stall_s"] for run in runs)}


def report(result: dict) -> str:
    lines = [
        f"# Sentence by sentence: {result['sentences']} sentences, {result['max_tokens']} tokens each at most",
        "",
        f"* {machine_and_code(result)}",
        f"* reply: \"{result['text']}\"",
        "* each run: one reply through `AsyncOrpheusClient.stream_text` on a local server; stalls by the "
        "benchmark's playback rule (a chunk arriving after all audio before it has played)",
        "",
        "| concurrency | runs | first audio median ms | min / max ms | runs with stalls | stall s, all runs |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency, figures in result["summary"].items():
        lines.append(f"| {concurrency} | {figures['runs']} | {figures['first_audio_median_s'] * 1000:.0f} | "
                     f"{figures['first_audio_min_s'] * 1000:.0f} / {figures['first_audio_max_s'] * 1000:.0f} | "
                     f"{figures['runs_with_stalls']} | {figures['stall_s_total']:.3f} |")
    lines += ["", "| run | concurrency | first audio ms | stalls | stall ms | audio s | took s |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for index, run in enumerate(result["runs"], start=1):
        lines.append(f"| {index} | {run['concurrency']} | {run['first_audio_s'] * 1000:.0f} | {run['stalls']} | "
                     f"{run['stall_s'] * 1000:.0f} | {run['audio_s']:.2f} | {run['total_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--concurrency", type=counts, default="1,2", help="stream_text concurrency values, alternated")
    parser.add_argument("--runs", type=positive, default=5, help="runs per value")
    parser.add_argument("--max-tokens", type=max_tokens, default=140,
                        help="per sentence (the demo LLM never stops early)")
    parser.add_argument("--text", default=REPLY)
    add_model_arguments(parser)
    args = parser.parse_args()
    values = args.concurrency
    models, description = model_set(args.shape, args.models)
    folder = Path(args.out) if args.out else run_folder(f"{machine_name()}-text-stream")
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    runs = []
    with local_server(models, 16, folder / "raw" / "server.log", device=args.device) as server:
        asyncio.run(speak(server.url, "Warming up.", 1, args.max_tokens, 0))  # the first stream after start
        for index in range(args.runs):
            for concurrency in values:
                run = asyncio.run(speak(server.url, args.text, concurrency, args.max_tokens, seed=index))
                log(f"concurrency {concurrency}: first audio {run['first_audio_s'] * 1000:.0f} ms, "
                    f"{run['stalls']} stalls ({run['stall_s'] * 1000:.0f} ms), {run['audio_s']:.2f} s of audio "
                    f"in {run['total_s']:.2f} s")
                runs.append(run)
    from orpheus_triton.text_stream import SentenceSplitter  # noqa: PLC0415

    splitter = SentenceSplitter()
    result = {
        "text": args.text, "sentences": len(splitter.push(args.text) + splitter.finish()),
        "max_tokens": args.max_tokens, "models": description, "machine": machine_info(),
        "source": source_state(), "runs": runs,
        "summary": {str(v): summary([run for run in runs if run["concurrency"] == v]) for v in values},
    }
    write_result(folder, "text_stream", result, report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""What the Python backend's round trips to tritonserver cost on this machine, timed inside the stub.

The llm adapter sends a response per SNAC frame of every stream and asks Triton
whether requests were cancelled (triton_calls.CancellationWatch: a pass asks every
stream); the snac_decoder adapter sends a response per window. Each such call
is a round trip from the backend stub to the server. This benchmark holds
``--streams`` requests open on a stand-in model (perf/round_trip_source) and
times, for ``--seconds`` each: sends of a frame's tokens and of a window's
audio, ``is_cancelled``, a whole cancellation pass over every stream, a send and
an ask in turn on one thread (passes on the response thread), sends beside
a second thread that asks (passes on a thread of their own), sends of audio
from 2 and 4 threads at once, each on its own share of the streams, and a
request's own lookups (an input, an optional one it lacks, the outputs it asks
for: the snac_decoder adapter's per request). From those:
what a cancellation pass costs at a given number of streams, how many responses a
second one thread can send, and how many several threads can.

    PYTHONPATH=src python perf/round_trips.py --streams 216 --out perf/results/round-trips
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
from common import PERF, log, machine_info, machine_name, run_folder, serve_repository, source_state

SOURCE = PERF / "round_trip_source"
MODEL = "round_trips"

ROWS = (  # (result key, what it is)
    ("send_tokens", "send a response of one frame's 7 tokens (llm)"),
    ("send_audio", "send a response of one frame's 2048 samples (snac_decoder)"),
    ("is_cancelled", "ask one request whether it was cancelled"),
    ("cancellation_pass", "a cancellation pass: ask every held stream"),
    ("send_then_ask_one_thread", "a send and an ask in turn, one thread"),
    ("send_beside_asking_thread", "a send, while a second thread asks back to back"),
    ("send_beside_pass_thread", "a send, while a second thread runs passes back to back"),
    ("send_audio_2_threads", "sends of a frame's audio from 2 threads at once (a second: theirs together)"),
    ("send_audio_4_threads", "sends of a frame's audio from 4 threads at once (a second: theirs together)"),
    ("input_there", "look up an input the request has (no round trip)"),
    ("input_absent", "look up an optional input the request lacks (no round trip)"),
    ("outputs_asked", "the outputs the request asks for (no round trip)"),
)


def render(out: Path) -> Path:
    shutil.copytree(SOURCE, out / MODEL, ignore=shutil.ignore_patterns("__pycache__"))
    return out


def measure(url: str, streams: int, seconds: float) -> dict:
    """Hold ``streams`` requests open, have the model time its round trips on them, return its result."""
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    from orpheus_triton.client import infer_input  # noqa: PLC0415

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        for _ in range(streams):
            client.async_stream_infer(MODEL, [infer_input("seconds", np.array([0.0], np.float32))],
                                      request_id=str(uuid.uuid4()), enable_empty_final_response=True)
        client.async_stream_infer(MODEL, [infer_input("seconds", np.array([seconds], np.float32))],
                                  request_id="measure", enable_empty_final_response=True)
        finals, result, received = 0, None, 0
        while finals < streams + 1:
            response, error = events.get(timeout=60 + 20 * seconds)
            if error is not None:
                raise RuntimeError(f"round_trips model failed: {error}")
            received += 1
            if response.get_response().id == "measure" and response.as_numpy("result") is not None:
                result = json.loads(response.as_numpy("result").reshape(-1)[0])
            if response.get_response().parameters["triton_final_response"].bool_param:
                finals += 1
    finally:
        client.stop_stream()
        client.close()
    if result is None or "error" in result:
        raise RuntimeError(f"round_trips model gave no timings: {result}")
    result["responses_received"] = received
    return result


def report(result: dict, streams_at: list[int]) -> list[str]:
    machine = result["machine"]
    held = result["runs"][0]["streams"]
    lines = [
        f"# Round trips of the Python backend to tritonserver, {machine['cpu']} ({machine['cores']} cores)", "",
        f"Timed inside the backend stub of tritonserver's Python backend, {held} requests held open, "
        f"{result['seconds']} s per pattern, {len(result['runs'])} runs (each cell: the runs' figures). "
        f"Code: commit {result['source']['commit']}.", "",
        "| pattern | calls a second | p50 us | p99 us |", "|---|---:|---:|---:|",
    ]
    for key, what in ROWS:
        cells = [run[key] for run in result["runs"]]
        lines.append(f"| {what} | " + " | ".join(", ".join(f"{c[field]:,}" for c in cells)
                                               for field in ("per_second", "p50_us", "p99_us")) + " |")
    beside = ", ".join(f"{run['asking_thread_beside_sends']['per_second']:,}" for run in result["runs"])
    passes = ", ".join(f"{run['pass_thread_beside_sends']['per_second']:,}" for run in result["runs"])
    lines += ["", f"The second thread meanwhile: {beside} asks a second; {passes} passes a second.", "",
              "A cancellation pass over N streams at the measured ask (p50 of the runs' medians):", "",
              "| streams | pass ms |", "|---:|---:|"]
    ask_us = float(np.median([run["is_cancelled"]["p50_us"] for run in result["runs"]]))
    lines += [f"| {n} | {n * ask_us / 1000:.1f} |" for n in streams_at]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=216, help="requests held open (the streams)")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per pattern")
    parser.add_argument("--runs", type=int, default=3, help="measurements on one server")
    parser.add_argument("--out", help="run folder (default perf/results/<date>_<machine>-round-trips)")
    args = parser.parse_args(argv)
    if args.streams < 1 or args.seconds <= 0 or args.runs < 1:
        parser.error("--streams and --runs must be >= 1, --seconds > 0")
    out = Path(args.out) if args.out else run_folder(f"{machine_name()}-round-trips")
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with serve_repository(render(Path(tempfile.mkdtemp(prefix="round-trips-"))),
                          out / "raw" / "round_trips_server.log") as server:
        measure(server.url, min(args.streams, 8), 0.2)  # warm-up
        for run in range(args.runs):
            runs.append(measure(server.url, args.streams, args.seconds))
            log(f"run {run + 1}: " + ", ".join(f"{key} {runs[-1][key]['p50_us']} us" for key, _ in ROWS))
    result = {"machine": machine_info(), "source": source_state(), "seconds": args.seconds, "runs": runs}
    (out / "round_trips.json").write_text(json.dumps(result, indent=2))
    lines = report(result, sorted({32, 128, 216, args.streams}))
    (out / "round_trips.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

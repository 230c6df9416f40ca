#!/usr/bin/env python3
"""How many streams the load generator itself can receive: its own ceiling, with no model in the way.

A stand-in `orpheus` model (decoupled Python, the ensemble's inputs and output, perf/loadgen_standin/)
sends each request ``max_tokens // 7`` chunks of one frame (2,048 samples) at ``--speed`` times real time,
its first after one frame's time, all streams paced by one thread as the SNAC decoder's rounds are. A load
generator that keeps up receives every stream with no stall; one that does not shows it as starved streams
and less audio a second than the level asks for, while the stand-in stays idle. Each level runs with one
load generator process and with ``--processes`` of them (loadgen.LoadProcesses), so the report says what one
process can measure on this machine.

    python perf/loadgen_bench.py --concurrency 16,64,128,216 --processes 4 --out perf/results/<folder>
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # perf/: common
from common import log, machine_info, server_cpu_monitor  # noqa: E402
from report import _f, _ms  # noqa: E402 (the reports' figures: "-" where there is none)

from orpheus_triton.arguments import DefaultsHelpFormatter, counts, max_tokens, positive_seconds  # noqa: E402
from orpheus_triton.constants import (  # noqa: E402
    ENSEMBLE_MODEL,
    IN_MAX_TOKENS,
    IN_REPETITION_PENALTY,
    IN_SEED,
    IN_TEMPERATURE,
    IN_TEXT,
    IN_TOP_P,
    IN_VOICE,
    OUT_AUDIO,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
)
from orpheus_triton.loadgen import SweepSettings, load_runner, sweep  # noqa: E402
from orpheus_triton.server import Ports, start_server, stop_server, wait_until_ready  # noqa: E402

STANDIN = Path(__file__).resolve().parent / "loadgen_standin"


def standin_config(speed: float) -> str:
    """The `orpheus` ensemble's inputs and output (names from orpheus_triton.constants), on a Python model."""
    inputs = [(IN_TEXT, "TYPE_STRING", False), (IN_VOICE, "TYPE_STRING", True), (IN_MAX_TOKENS, "TYPE_INT32", True),
              (IN_TEMPERATURE, "TYPE_FP32", True), (IN_TOP_P, "TYPE_FP32", True),
              (IN_REPETITION_PENALTY, "TYPE_FP32", True), (IN_SEED, "TYPE_UINT64", True)]
    declared = ",\n".join(f'  {{ name: "{name}", data_type: {kind}, dims: [ 1 ]'
                          + (", optional: true" if optional else "") + " }" for name, kind, optional in inputs)
    return (f'name: "{ENSEMBLE_MODEL}"\nbackend: "python"\nmax_batch_size: 0\n'
            "model_transaction_policy { decoupled: true }\n"
            f"input [\n{declared}\n]\n"
            f'output [ {{ name: "{OUT_AUDIO}", data_type: TYPE_INT16, dims: [ -1 ] }} ]\n'
            "instance_group [ { kind: KIND_CPU, count: 1 } ]\n"
            f'parameters {{ key: "speed", value: {{ string_value: "{speed}" }} }}\n'
            f'parameters {{ key: "samples_per_chunk", value: {{ string_value: "{SAMPLES_PER_FRAME}" }} }}\n'
            f'parameters {{ key: "sample_rate", value: {{ string_value: "{SAMPLE_RATE}" }} }}\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--concurrency", type=counts, default="16,64,128,216", help="closed-loop levels")
    parser.add_argument("--processes", type=int, default=4, help="load generator processes of the second run")
    parser.add_argument("--speed", type=float, default=1.5, help="the stand-in's pace, times real time")
    parser.add_argument("--max-tokens", type=max_tokens, default=250, help="per stream (250: 35 chunks, 3 s of audio)")
    parser.add_argument("--level-seconds", type=positive_seconds, default=10.0)
    parser.add_argument("--ramp-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, help="folder for loadgen_bench.json and loadgen_bench.md")
    args = parser.parse_args(argv)
    levels = args.concurrency
    if args.processes < 2 or args.speed <= 0:
        parser.error("want --processes >= 2 and --speed > 0")

    work = Path(tempfile.mkdtemp(prefix="loadgen-bench-"))
    model = work / "repository" / ENSEMBLE_MODEL
    shutil.copytree(STANDIN / "1", model / "1")
    (model / "config.pbtxt").write_text(standin_config(args.speed))
    ports = Ports.free()
    with open(work / "server.log", "w") as server_log:
        server = start_server(work / "repository", ports, log_file=server_log)
    rows, url = [], f"localhost:{ports.grpc}"
    try:
        wait_until_ready(server, url, timeout=120)
        for processes in (1, args.processes):
            with load_runner(url, processes) as runner:
                rows += [level_row(runner, url, concurrency, processes, server.pid, args) for concurrency in levels]
    finally:
        stop_server(server)
    result = {"machine": machine_info(), "speed": args.speed, "max_tokens": args.max_tokens, "levels": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "loadgen_bench.json").write_text(json.dumps(result, indent=1))
        (args.out / "loadgen_bench.md").write_text(markdown(result))
    print(markdown(result))
    if failed := [row for row in rows if row["errors"]]:  # a level with failed streams measured nothing it claims
        kept = args.out / "server.log" if args.out else work / "server.log"
        if args.out:
            shutil.copy(work / "server.log", kept)
            shutil.rmtree(work, ignore_errors=True)
        print(f"error: {sum(row['errors'] for row in failed)} streams failed, e.g. "
              f"{(failed[0]['error_examples'] or ['?'])[0]}; the stand-in server's log: {kept}", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


def level_row(runner, url: str, concurrency: int, processes: int, server_pid: int, args) -> dict:
    """One closed-loop level through ``runner``: what the load generator received, and the CPU it and the
    stand-in used (read inside the level, while the load generator's processes run)."""
    settings = SweepSettings(concurrency=[concurrency], streams_per_worker=2, min_streams=4,
                             ramp_seconds=args.ramp_seconds, max_seconds_per_level=args.level_seconds,
                             labels=["short"], max_tokens={"short": args.max_tokens}, processes=processes)
    level = sweep(url, settings, log=lambda line: None, monitor=lambda: server_cpu_monitor(server_pid),
                  runner=runner)["closed_loop"][concurrency]
    usage = level.get("server_cpu", {})
    row = {"processes": processes, "concurrency": concurrency, "streams": level["streams"],
           "errors": level["errors"], "error_examples": level["error_examples"][:3],
           "starved": level["starved_streams"],
           "ttfa_p99": level["ttfa_p99"], "rtf_p50": level["rtf_p50"],
           "audio_per_second": level["realtime_streams_served"],
           "loadgen_cores": usage.get("load generator", {}).get("cores"),
           "standin_cores": usage.get(ENSEMBLE_MODEL, {}).get("cores")}
    log(f"{processes} process(es), {concurrency} streams: {_f(row['audio_per_second'], 1)} s of audio a "
        f"second, failed {row['errors']}, starved {row['starved']}, TTFA p99 {_ms(row['ttfa_p99'])} ms, "
        f"load generator {row['loadgen_cores']} cores, stand-in {row['standin_cores']} cores")
    time.sleep(1.0)  # the stand-in's last streams wind down before the next level
    return row


def markdown(result: dict) -> str:
    lines = [f"Load generator ceiling: stand-in `orpheus` at {result['speed']}x real time, {result['max_tokens']} "
             "tokens a stream; *audio s / s*: seconds of audio received a second (a level of N streams served "
             f"without a stall needs about N x {result['speed']} while they generate).", "",
             "| processes | streams | failed | starved | TTFA p99 ms | RTF p50 | audio s / s | load generator cores | "
             "stand-in cores |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["levels"]:  # starved: of the streams that gave audio; failed ones count apart
        lines.append(f"| {row['processes']} | {row['concurrency']} | {row.get('errors', '-')} | {row['starved']} | "
                     f"{_ms(row['ttfa_p99'])} | {_f(row['rtf_p50'])} | "
                     f"{_f(row['audio_per_second'], 1)} | {row['loadgen_cores']} | "
                     f"{row['standin_cores']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

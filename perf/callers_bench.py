#!/usr/bin/env python3
"""What counting the callers in flight costs a server (orpheus_triton.callers, `serve --max-callers`).

`serve` counts every caller, bounded or not: preprocessing takes a lease (a file) as it admits a stream,
the decoder gives it back before the stream's last audio; on the way the decoder calls ``touch`` with each
answer (a dict lookup and a clock read; a file's time set at most every LEASE_TOUCH_SECONDS) and the llm
stage refreshes its streams' leases every LEASE_TOUCH_SECONDS (a file's time set each). With
``--max-callers`` every admission also counts the live leases under a lock (a stat per lease), so its cost
grows with the callers in flight. This measures each of those operations with N leases held, in a folder
on the file system `serve` uses (the cache folder; ``--folder`` for another), and what they come to at N
streams: the CPU they take a second, as a share of one core.

    python perf/callers_bench.py                           # 1, 64, 216 and 1024 leases held
    python perf/callers_bench.py --held 216 --stream-seconds 3 --out perf/results/<run>

Writes callers_bench.json and callers_bench.md to --out (default: a new run folder).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from common import log, machine_and_code, machine_info, machine_name, run_folder, source_state, write_result

from orpheus_triton.arguments import DefaultsHelpFormatter, counts, positive, positive_seconds
from orpheus_triton.callers import LEASE_TOUCH_SECONDS, CallerLeases
from orpheus_triton.constants import SAMPLE_RATE, SAMPLES_PER_FRAME

# Operations timed, in the order the report gives them.
OPERATIONS = ("admit", "admit_bounded", "end", "touch", "refresh")


def timed(operation: Callable[[], object]) -> float:
    started = time.perf_counter()
    operation()
    return time.perf_counter() - started


def measure(folder: Path, held: int, ops: int) -> dict[str, float]:
    """Median seconds of each operation with ``held`` leases live in ``folder`` (made and emptied here).
    The operations take turns, caller by caller, so that each sees the file system's same moods (on a VM's
    disk, a file's creation took 50 us one second and 600 the next), and each lease taken for the measure
    is given back before the next is taken: ``held`` stays as it is."""
    leases = CallerLeases(folder)
    holders = [f"held-{uuid.uuid4()}" for _ in range(held)]
    for request_id in holders:
        leases.admit(request_id)  # and the first admission counts the leases: the next is due in LEASE_IDLE_SECONDS
    for request_id in holders:
        leases.touch(request_id)  # the decoder has touched its streams: their next touches are its per-answer ones
    bound = held + 1
    took: dict[str, list[float]] = {name: [] for name in OPERATIONS}
    for index in range(ops):
        caller, other = str(uuid.uuid4()), str(uuid.uuid4())
        took["admit"].append(timed(lambda: leases.admit(caller)))  # noqa: B023 (called at once)
        took["end"].append(timed(lambda: leases.end(caller)))  # noqa: B023
        took["admit_bounded"].append(timed(lambda: leases.admit(other, max_callers=bound)))  # noqa: B023
        leases.end(other)
        kept = holders[index % held] if holders else caller
        took["touch"].append(timed(lambda: leases.touch(kept)))  # noqa: B023 (no system call: touched above)
        took["refresh"].append(timed(lambda: leases._set_time(leases._name(kept), time.time())))  # noqa: B023
    for request_id in holders:
        leases.end(request_id)
    if leases.count() != 0:
        raise RuntimeError(f"leases left in {folder} after the run")
    return {name: statistics.median(values) for name, values in took.items()}


def per_second(figures: dict[str, float], streams: int, stream_seconds: float, bounded: bool) -> float:
    """Seconds of CPU a second that counting takes at ``streams`` callers in flight, each stream
    ``stream_seconds`` long (that many admissions and ends a second, streams / stream_seconds), one decoder
    answer per frame of audio, each lease's time set twice every LEASE_TOUCH_SECONDS (the llm stage's
    refresh, the decoder's touch that is due)."""
    arrivals = streams / stream_seconds
    answers = streams * SAMPLE_RATE / SAMPLES_PER_FRAME  # played in real time
    admit = figures["admit_bounded" if bounded else "admit"]
    return (arrivals * (admit + figures["end"]) + answers * figures["touch"]
            + 2 * streams / LEASE_TOUCH_SECONDS * figures["refresh"])


def report(result: dict) -> str:
    seconds = result["stream_seconds"]
    lines = [
        "# Counting the callers in flight: what each lease operation costs",
        "",
        f"* {machine_and_code(result)}",
        f"* folder: {result['folder_kind']}; {result['ops']} operations each, median",
        "* admit: preprocessing's admission (`serve`, no bound); admit bounded: with `--max-callers` above the "
        "leases held (counted by their names; the look at every lease, at most once a second at the bound, is "
        "not timed); end: the decoder's release; touch: the decoder's call per answer (within "
        f"{LEASE_TOUCH_SECONDS:.0f} s of the last: no system call); refresh: a lease's time set (the llm stage's "
        f"refresh and the decoder's due touch, each every {LEASE_TOUCH_SECONDS:.0f} s per stream)",
        f"* share of a core: at N streams of {seconds:g} s each (N / {seconds:g} admissions and ends a second), "
        "one touch per frame of audio, two time sets per stream every "
        f"{LEASE_TOUCH_SECONDS:.0f} s",
        "",
        "| leases held | admit us | admit bounded us | end us | touch us | refresh us | share of a core | "
        "bounded |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["levels"]:
        costs = " | ".join(f"{row[name] * 1e6:.1f}" for name in OPERATIONS)
        lines.append(f"| {row['held']} | {costs} | {row['core_share'] * 100:.3f}% | "
                     f"{row['core_share_bounded'] * 100:.3f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--held", type=counts, default="1,64,216,1024", help="leases held while measuring")
    parser.add_argument("--ops", type=positive, default=500, help="operations timed per kind and level")
    parser.add_argument("--stream-seconds", type=positive_seconds, default=5.0,
                        help="a stream's length, for the share of a core (5 s: a short text's reply)")
    parser.add_argument("--folder", type=Path,
                        help="measure in this folder (made; emptied after) instead of the cache's callers folder")
    parser.add_argument("--out", type=Path, help="folder for the results (default: a new run folder)")
    args = parser.parse_args(argv)
    if args.folder:
        args.folder.mkdir(parents=True, exist_ok=True)
        where, kind = args.folder, str(args.folder)
        release = None
    else:
        from orpheus_triton.demo_models import cache_folder  # noqa: PLC0415
        from orpheus_triton.repository import release_run_folder  # noqa: PLC0415
        from orpheus_triton.repository import run_folder as cache_run_folder

        where = cache_run_folder(cache_folder("callers"), prefix="callers-bench-")
        kind, release = f"the cache's callers folder ({where.parent})", release_run_folder
    levels = []
    try:
        for held in args.held:
            figures = measure(where, held, args.ops)
            row = {"held": held, **figures,
                   "core_share": per_second(figures, held, args.stream_seconds, bounded=False),
                   "core_share_bounded": per_second(figures, held, args.stream_seconds, bounded=True)}
            log(f"{held} leases held: " + ", ".join(f"{name} {figures[name] * 1e6:.1f} us" for name in OPERATIONS)
                + f"; {row['core_share'] * 100:.3f}% of a core ({row['core_share_bounded'] * 100:.3f}% bounded)")
            levels.append(row)
    finally:
        if release is not None:
            release(where)
    folder = args.out or run_folder(f"{machine_name()}-callers")
    folder.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), "source": source_state(), "folder_kind": kind, "ops": args.ops,
              "stream_seconds": args.stream_seconds, "levels": levels}
    text = report(result)
    write_result(folder, "callers_bench", result, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

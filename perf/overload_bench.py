#!/usr/bin/env python3
"""Sustained overload on a CPU: what `serve --max-callers` does for the callers.

The llm stage's limits (--max-streams, --max-queue) count streams generating. On a CPU the LLM runs
far ahead of the SNAC decoder, so a stream's slot frees while its audio is still seconds from being
decoded: under sustained overload such a server admits more callers than its decoder plays in real
time, and every caller stutters. --max-callers N counts each caller from preprocessing's admission to
its last audio and refuses one more at once ("server busy"), for the caller to retry elsewhere.

This runs `orpheus-triton serve --device cpu` (the demo model set) twice, each time fresh: without
--max-callers, and with --max-callers K. Each gets the same Poisson arrivals (--rate a second for
--duration seconds, one seed) of the "medium" text through the load generator
(orpheus_triton.loadgen), and the report compares, per setting: streams offered, admitted (ended
without error), refused as `server busy` and how fast, other errors; among the admitted, the starved
ones (playback stalled, as the load generator replays it), stall seconds, TTFA and RTF; and the
server's own counts (callers in flight, refused, decoder stall seconds) from its /metrics page.

    python perf/overload_bench.py                                  # 2/s for 60 s; --max-callers 3
    python perf/overload_bench.py --rate 1 --duration 8            # a short check

Writes result.json and README.md to --out (default: a new run folder); each server's log to raw/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from common import (
    PERF,
    Readings,
    RunningServer,
    machine_and_code,
    machine_info,
    machine_name,
    metric_values,
    run_folder,
    source_state,
)
from report import _f, _ms

from orpheus_triton.arguments import DefaultsHelpFormatter, positive, positive_seconds, rates
from orpheus_triton.callers import CALLERS_FULL
from orpheus_triton.client import OrpheusClient
from orpheus_triton.constants import SERVER_BUSY, VOICES
from orpheus_triton.interrupts import terminate_as_interrupt
from orpheus_triton.loadgen import (
    MAX_TOKENS,
    StreamRecord,
    load_runner,
    percentile,
    poisson_schedule,
    stop_streams,
    summarize,
    workload,
)
from orpheus_triton.metrics import CALLERS_METRIC, CALLERS_REFUSED_METRIC, STALL_SECONDS_METRIC, STALLS_METRIC
from orpheus_triton.server import Ports, log_tail, popen_with_parent_death_signal, wait_until_ready

TEXT = "medium"
READY_SECONDS = 600.0  # a fresh server loads its models in about 20 s here; much longer on a busy machine
STOP_SECONDS = 60.0  # `serve` drains for its --exit-timeout (10 s) first, then stops tritonserver
SETTLE_SECONDS = 30.0  # after the last stream: how long the server may take to count its callers gone
PROGRESS_SECONDS = 10.0


def say(message: str) -> None:
    """A progress line, on stderr: stdout carries the report's table."""
    print(f"[overload] {message}", file=sys.stderr, flush=True)


def _rate(value: str) -> float:
    """An argparse type: one arrival rate a second, > 0."""
    numbers = rates(value)
    if len(numbers) != 1:
        raise argparse.ArgumentTypeError(f"expected one number > 0, got {value!r}")
    return numbers[0]


# ---- the server ---------------------------------------------------------------------------------------


def _processes_of(repository: str) -> list[int]:
    """The pids of the processes whose command line names ``repository`` (a `serve` run's tritonserver and
    its backend stubs; each run renders a folder of its own)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if repository.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return found


def _repository(log_path: Path) -> str | None:
    """The model repository `serve` rendered, as its log names it (None before it says)."""
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            if "model repository: " in line:
                return line.split("model repository: ", 1)[1].strip()
    return None


@contextlib.contextmanager
def serve(max_callers: int, log_path: Path) -> Iterator[RunningServer]:
    """`orpheus-triton serve --device cpu` (demo model set; ``max_callers`` > 0: --max-callers) on free ports,
    as an operator runs it: through `serve`, which counts the callers in flight (tritonserver started
    directly counts none, and refuses a --max-callers). Stopped with SIGTERM after, as a supervisor stops
    it; whatever of it is still running after STOP_SECONDS is killed, so that nothing is left behind."""
    ports = Ports.free()
    command = [sys.executable, "-m", "orpheus_triton.cli", "serve", "--device", "cpu",
               "--grpc-port", str(ports.grpc), "--http-port", str(ports.http), "--metrics-port", str(ports.metrics)]
    if max_callers:
        command += ["--max-callers", str(max_callers)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:  # a file, not a pipe: the server's processes inherit it
        # Its parent-death signal: a benchmark killed outright (SIGKILL) still stops its server.
        process = popen_with_parent_death_signal(command, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"localhost:{ports.grpc}"
    try:
        started = time.perf_counter()
        say(f"starting `{shlex.join(command[1:])}` (loading the models; log {log_path})")
        try:
            wait_until_ready(process, url, timeout=READY_SECONDS)
        except (RuntimeError, TimeoutError) as error:
            tail = "\n  ".join(log_tail(log_path, 15))
            raise RuntimeError(f"the server did not become ready: {error}; the end of its log ({log_path}):\n"
                               f"  {tail}") from None
        say(f"server ready in {time.perf_counter() - started:.0f} s (gRPC :{ports.grpc}, metrics :{ports.metrics})")
        yield RunningServer(url, f"http://localhost:{ports.metrics}/metrics", process)
    finally:
        _stop(process, _repository(log_path))


def _stop(process: subprocess.Popen, repository: str | None) -> None:
    """SIGTERM to `serve` (it drains, then stops tritonserver), waited for; then SIGKILL for whatever of it
    is left: `serve` itself, and its tritonserver and stubs (in a process group of their own, which a
    `serve` killed cannot stop)."""
    if process.poll() is None:
        say("stopping the server (SIGTERM)")
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            say(f"the server did not stop within {STOP_SECONDS:.0f} s: killing it")
            process.kill()
            process.wait()
    if repository:
        for pid in _processes_of(repository):
            say(f"killing process {pid}, left behind by the server")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def counter(metrics_url: str, name: str) -> float | None:
    """A metric's value summed over its series (instances, models); None where the page cannot be read."""
    try:
        return sum(metric_values(metrics_url, name))
    except (OSError, ValueError):
        return None


def settle(metrics_url: str) -> float | None:
    """Wait (up to SETTLE_SECONDS) until the server counts no caller in flight, so that its counters hold every
    stream's figures; the last count (0 when settled)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while (held := counter(metrics_url, CALLERS_METRIC)) and time.monotonic() < deadline:
        time.sleep(1.0)
    time.sleep(1.5)  # the models publish their counters every 0.5-1 s
    return held


# ---- one setting --------------------------------------------------------------------------------------


def run_setting(name: str, max_callers: int, args, folder: Path) -> dict:
    """One fresh server under the Poisson arrivals: its streams' records and figures, and its own counts."""
    utterances = workload([TEXT], count=len(VOICES))
    schedule = poisson_schedule(args.rate, 10**9, args.duration, args.seed)
    with serve(max_callers, folder / "raw" / f"server-{name.replace(' ', '-')}.log") as server:
        with load_runner(server.url, 1, args.stream_timeout) as runner:
            say("one warm-up stream (a fresh server's first stream is slower)")
            OrpheusClient(server.url).synthesize("Warming up.", max_tokens=70)
            settle(server.metrics_url)
            callers = Readings(lambda: sum(metric_values(server.metrics_url, CALLERS_METRIC)), interval=0.5,
                               lifetime=args.duration + args.stream_timeout + 120)
            done = threading.Event()
            ticker = threading.Thread(target=_progress, args=(name, schedule, args.duration, callers, done),
                                      daemon=True)
            say(f"{name}: {len(schedule)} streams of the {TEXT} text arriving over {args.duration:g} s "
                f"(Poisson, {args.rate:g}/s, seed {args.seed}); then waiting for the last ones to end "
                f"(each at most {args.stream_timeout:g} s)")
            started = time.perf_counter()
            ticker.start()
            try:
                records = runner.run_poisson(args.rate, utterances, len(schedule), args.duration, args.seed)
            finally:
                done.set()
                callers.stop()
            wall = time.perf_counter() - started
        say(f"{name}: every stream ended after {wall:.0f} s; reading the server's counters")
        left = settle(server.metrics_url)
        figures = setting_figures(records, wall)
        in_flight = [value for at, value in callers.readings if started <= at <= started + args.duration]
        figures["server"] = {
            "callers_in_flight_max": max(in_flight, default=None),
            "callers_in_flight_mean": statistics.fmean(in_flight) if in_flight else None,
            "callers_left_in_flight": left,
            "callers_refused": counter(server.metrics_url, CALLERS_REFUSED_METRIC),
            "decoder_stalls": counter(server.metrics_url, STALLS_METRIC),
            "decoder_stall_seconds": counter(server.metrics_url, STALL_SECONDS_METRIC),
        }
    figures |= {"max_callers": max_callers, "streams": [_stream(record) for record in records]}
    say(f"{name}: {_line(figures)}")
    return figures


def _progress(name: str, schedule: list[float], duration: float, callers: Readings, done: threading.Event) -> None:
    """A progress line every PROGRESS_SECONDS while a setting runs: arrivals so far, the server's callers."""
    started = time.perf_counter()
    while not done.wait(PROGRESS_SECONDS):
        elapsed = time.perf_counter() - started
        arrived = sum(offset <= elapsed for offset in schedule)
        phase = "arrivals" if elapsed < duration else "waiting for the last streams to end"
        held = f", {callers.readings[-1][1]:g} callers in flight on the server" if callers.readings else ""
        say(f"{name}: {elapsed:.0f} s ({phase}): {arrived} of {len(schedule)} arrived{held}")


def setting_figures(records: list[StreamRecord], wall_seconds: float) -> dict:
    """What the callers of one setting got: refused, failed, and the admitted streams' playback."""
    refused = [r for r in records if r.error and SERVER_BUSY in r.error]
    failed = [r for r in records if r.error and SERVER_BUSY not in r.error]
    admitted = [r for r in records if r.error is None]
    plays = [r.playback() for r in admitted if r.arrivals]
    level = summarize(admitted, wall_seconds)  # TTFA, RTF, starvation: of the admitted streams
    stalls = [play.stall_seconds for play in plays]
    refusal = [r.total for r in refused]
    return {
        "offered": len(records),
        "admitted": len(admitted),
        "admitted_no_audio": level["no_audio"],
        "refused_busy": len(refused),
        # The refusal --max-callers gives; other `server busy` refusals are the llm stage's (its queue full).
        "refused_by_max_callers": sum(CALLERS_FULL in r.error for r in refused),
        "refusal_seconds_p50": percentile(refusal, 50),
        "refusal_seconds_p99": percentile(refusal, 99),
        "other_errors": len(failed),
        "error_examples": sorted({r.error for r in refused + failed})[:3],
        "starved": level["starved_streams"],
        "played_without_stall": len(plays) - level["starved_streams"],
        "stall_seconds_total": sum(stalls),
        "stall_seconds_mean": statistics.fmean(stalls) if stalls else None,
        "stall_seconds_median": statistics.median(stalls) if stalls else None,
        "ttfa_p50": level["ttfa_p50"],
        "ttfa_p99": level["ttfa_p99"],
        "rtf_p50": level["rtf_p50"],
        "audio_seconds": level["audio_seconds"],
        "wall_seconds": wall_seconds,
    }


def _stream(record: StreamRecord) -> dict:
    """One stream, in brief (its chunk arrivals left out): when it came, what it got."""
    play = record.playback()
    return {"started": round(record.started, 3), "ttfa": None if record.ttfa is None else round(record.ttfa, 3),
            "total": round(record.total, 3), "audio_seconds": round(record.audio_seconds, 3),
            "stalls": play.stalls, "stall_seconds": round(play.stall_seconds, 3), "error": record.error}


def _line(figures: dict) -> str:
    return (f"{figures['offered']} offered, {figures['admitted']} admitted ({figures['starved']} of them starved, "
            f"{figures['stall_seconds_total']:.1f} s of stalls), {figures['refused_busy']} refused busy, "
            f"{figures['other_errors']} other errors; TTFA p50 {_ms(figures['ttfa_p50'])} ms, "
            f"p99 {_ms(figures['ttfa_p99'])} ms")


# ---- the report -----------------------------------------------------------------------------------------


def _count(value) -> str:
    return "-" if value is None else f"{value:g}"


def rows(f: dict) -> list[tuple[str, str]]:
    """The report's rows for one setting's figures: (what, its value as shown)."""
    server = f["server"]
    # Streams that got audio, failed or not: the server's stall counter counts the stalls of every one of them.
    heard = [stream for stream in f["streams"] if stream["audio_seconds"]]
    refused = str(f["refused_busy"])
    if f["refused_busy"]:
        refused += f" ({f['refused_by_max_callers']} by --max-callers)"
    return [
        ("streams offered", str(f["offered"])),
        ("admitted (ended without error)", str(f["admitted"])),
        ("refused `server busy`", refused),
        ("refusal came after, p50 / p99 s", f"{_f(f['refusal_seconds_p50'], 3)} / {_f(f['refusal_seconds_p99'], 3)}"),
        ("other errors", str(f["other_errors"])),
        ("streams that got audio (those that failed later too)", str(len(heard))),
        ("stall seconds, every stream that got audio", _f(sum(stream["stall_seconds"] for stream in heard), 1)),
        ("admitted, starved (playback stalled)", str(f["starved"])),
        ("admitted, played without a stall", str(f["played_without_stall"])),
        ("stall seconds, all admitted streams", _f(f["stall_seconds_total"], 1)),
        ("stall seconds per admitted stream, mean / median",
         f"{_f(f['stall_seconds_mean'])} / {_f(f['stall_seconds_median'])}"),
        ("TTFA p50 / p99, ms", f"{_ms(f['ttfa_p50'])} / {_ms(f['ttfa_p99'])}"),
        ("RTF, median", _f(f["rtf_p50"])),
        ("server: callers in flight during arrivals, max / mean",
         f"{_count(server['callers_in_flight_max'])} / {_f(server['callers_in_flight_mean'], 1)}"),
        ("server: `orpheus_callers_refused_total` (all series)", _count(server["callers_refused"])),
        ("server: `orpheus_decoder_stall_seconds_total`", _f(server["decoder_stall_seconds"], 1)),
        ("last stream ended, s after the arrivals began", _f(f["wall_seconds"], 0)),
    ]


def table(result: dict) -> str:
    settings = result["settings"]
    lines = ["| | " + " | ".join(f"`{name}`" for name in settings) + " |",
             "|---|" + "---:|" * len(settings)]
    columns = [rows(figures) for figures in settings.values()]
    lines += [f"| {column_rows[0][0]} | " + " | ".join(shown for _, shown in column_rows) + " |"
              for column_rows in zip(*columns, strict=True)]
    return "\n".join(lines) + "\n"


def report(result: dict) -> str:
    run = result["run"]
    return "\n".join([
        f"# Sustained overload on {result['machine']['cores']} CPU cores: `serve` with and without --max-callers",
        "",
        f"* {machine_and_code(result)}; demo model set, `orpheus-triton serve --device cpu`, its other options at "
        "their defaults, a fresh server for each setting",
        f"* load: Poisson arrivals, {run['rate']:g} a second for {run['duration']:g} s (seed {run['seed']}, the same "
        f"arrivals for both settings), each the *{TEXT}* text ({MAX_TOKENS[TEXT]} tokens, about "
        f"{MAX_TOKENS[TEXT] / 7 * 2048 / 24000:.1f} s of audio) in one of {len(VOICES)} voices, through "
        f"`orpheus_triton.loadgen` (one gRPC stream each, timeout {run['stream_timeout']:g} s); one short warm-up "
        "stream first",
        f"* rerun: `{run['command']}`",
        "",
        table(result),
        "*Admitted*: the stream ended without error. *Starved*: its playback, replayed from the chunks' arrival "
        "times (it starts at the first chunk, no buffer), ran dry at least once; the stall seconds are how long "
        "it waited for the next chunk then (`orpheus_triton.loadgen.playback`). *Refusal came after*: from the "
        "request to the `server busy` error. TTFA and RTF are the admitted streams'. *Other errors* include "
        "streams that did not end within their timeout. The server's figures are read from its /metrics page "
        "(callers in flight every 0.5 s while the arrivals came; the counters once no caller was left).",
        "",
    ])


# ---- main -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--rate", type=_rate, default=2.0, metavar="R", help="Poisson arrivals a second")
    parser.add_argument("--duration", type=positive_seconds, default=60.0, metavar="S",
                        help="seconds of arrivals per setting")
    parser.add_argument("--max-callers", type=positive, default=3, metavar="K",
                        help="the second setting's `serve --max-callers` (the first has none); 3 is the "
                             "real-time capacity README *Performance* gives for the 2-core VM")
    parser.add_argument("--seed", type=int, default=0, help="the arrivals' seed, the same for both settings")
    parser.add_argument("--stream-timeout", type=positive_seconds, default=120.0, metavar="S",
                        help="seconds a stream may take in all before the load generator leaves it (an error)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="folder for result.json, README.md and raw/ (default: a new run folder, "
                             "perf/results/<date>_<machine>-overload)")
    args = parser.parse_args(argv)
    settings = {"default": 0, f"max-callers {args.max_callers}": args.max_callers}
    command = "python " + shlex.join([str(Path(__file__).resolve().relative_to(PERF.parent)), *sys.argv[1:]])
    try:
        with terminate_as_interrupt():
            if args.out:
                folder = args.out
                (folder / "raw").mkdir(parents=True, exist_ok=True)
            else:
                with contextlib.redirect_stdout(sys.stderr):  # its "results go to" line is progress too
                    folder = run_folder(f"{machine_name()}-overload")
            say(f"results go to {folder}")
            result = {"run": {"rate": args.rate, "duration": args.duration, "seed": args.seed,
                              "stream_timeout": args.stream_timeout, "text": TEXT, "max_tokens": MAX_TOKENS[TEXT],
                              "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                      "machine": machine_info(), "source": source_state(), "settings": {}}
            for number, (name, max_callers) in enumerate(settings.items(), 1):
                say(f"setting {number} of {len(settings)}: {name}")
                result["settings"][name] = run_setting(name, max_callers, args, folder)
    except KeyboardInterrupt:
        stop_streams(log=say)
        say("interrupted")
        return 130
    except Exception as error:  # noqa: BLE001 (said in one line; the server's log has the rest)
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    (folder / "README.md").write_text(report(result))
    say(f"wrote {folder / 'result.json'} and {folder / 'README.md'}")
    print(table(result), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

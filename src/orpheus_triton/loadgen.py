"""Streaming TTS load generator: many concurrent gRPC streams against the `orpheus` ensemble.

What a listener experiences, per stream:

* **time to first audio (TTFA)**: request sent -> first audio chunk received;
* **playback starvation**: playback starts when the first chunk arrives and
  plays the delivered audio at 24 kHz; a chunk that arrives after everything
  delivered before it has finished playing means the listener heard a gap
  (a *stall*). The stall lasts until that chunk arrives, and playback resumes
  from there;
* **headroom**: at each chunk's arrival, how much delivered audio was still
  waiting to be played (negative = a stall of that length);
* **real-time factor**: stream wall time / audio duration (< 1: faster than real time).

Per concurrency level the sweep reports p50/p95/p99 TTFA and how many streams
starved; the **real-time capacity** is the largest level whose p99 TTFA is
under the limit (500 ms by default) with no starved stream and no error.

Two arrival patterns, both bounded in stream count and in time:

* closed loop: N workers, each starts its next utterance when one ends. Only streams
  started once every worker has started (after the ramp) count, and the workers keep
  starting streams until every counted one has ended (the others are cut then): each
  counted stream runs beside N - 1 others from its first response to its last, where
  a level's ramp and tail would otherwise have measured it beside fewer;
* Poisson: streams start at exponential inter-arrival times of rate lambda.

Each stream runs in its own thread on its own gRPC connection
(``orpheus_triton.client.OrpheusClient``, a fresh uuid4 request id per stream);
arrival times are taken in the gRPC callback, so a busy worker thread does not
delay them. Only loopback servers are accepted as targets.

    python -m orpheus_triton.loadgen --url localhost:8001 --concurrency 1,2,4 --out result.json
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

from .arguments import DefaultsHelpFormatter, counts, max_tokens_or_zero, positive, positive_seconds, rates
from .client import require_ready_server
from .constants import DEFAULT_GRPC_URL, ENSEMBLE_MODEL, SAMPLE_RATE, STALL_TOLERANCE, VOICES
from .interrupts import terminate_as_interrupt

DEFAULT_TTFA_LIMIT = 0.5  # seconds, p99

# The benchmark texts, short to long; perf/data/ holds the same texts in perf_analyzer's format.
TEXTS = {
    "short": "Hello! How can I help you today?",
    "medium": (
        "Thanks for calling. Your order shipped this morning and should arrive on Thursday. "
        "<chuckle> Is there anything else I can do for you?"
    ),
    "long": (
        "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker. "
        "Every morning he opened his shop, wound every clock on the wall, and listened as they ticked in unison. "
        "<sigh> One winter night, a traveller knocked on his door, carrying a clock that had stopped at midnight "
        "many years before, and asked whether it could ever be made to run again."
    ),
}
# max_tokens per text: about the audio such a text takes (7 tokens per 85 ms frame).
MAX_TOKENS = {"short": 250, "medium": 600, "long": 1200}


def text_labels(value: str) -> list[str]:
    """An argparse type: comma-separated names of benchmark texts (TEXTS), at least one."""
    labels = [label.strip() for label in value.split(",") if label.strip()]
    if not labels or any(label not in TEXTS for label in labels):
        raise argparse.ArgumentTypeError(f"expected text names from {', '.join(TEXTS)}, comma-separated, "
                                         f"got {value!r}")
    return labels


@dataclass(frozen=True)
class Utterance:
    label: str
    text: str
    voice: str
    max_tokens: int
    seed: int = 0


def workload(labels: Sequence[str] = ("short", "medium", "long"), voices: Sequence[str] = VOICES,
             max_tokens: dict[str, int] | None = None, count: int | None = None) -> list[Utterance]:
    """Utterances cycling through ``labels`` and ``voices`` (``count`` of them, default one per voice)."""
    limits = {**MAX_TOKENS, **(max_tokens or {})}
    count = count or max(len(labels), len(voices))
    return [
        Utterance(labels[i % len(labels)], TEXTS[labels[i % len(labels)]], voices[i % len(voices)],
                  limits[labels[i % len(labels)]], seed=i)
        for i in range(count)
    ]


# ---- per-stream measurements ------------------------------------------------------------------


@dataclass
class Playback:
    starved: bool
    stalls: int
    stall_seconds: float
    gaps: list[float]  # seconds between consecutive chunk arrivals
    headroom: list[float]  # buffered audio (s) when each chunk after the first arrived; < 0 = stall
    buffer_needed: float = 0.0  # start delay (s) after the first chunk that would have avoided every stall


def playback(arrivals: Sequence[float], samples: Sequence[int], sample_rate: int = SAMPLE_RATE,
             start_buffer: float = 0.0) -> Playback:
    """Replay a stream's chunk arrivals through a player that starts at the first chunk.

    ``arrivals`` are chunk arrival times (s, any origin, non-decreasing) and
    ``samples`` each chunk's length. ``start_buffer`` delays the start of
    playback after the first chunk (0: play at once, what TTFA promises).
    """
    if len(arrivals) != len(samples):
        raise ValueError(f"{len(arrivals)} arrival times for {len(samples)} chunks")
    if not arrivals:
        return Playback(False, 0, 0.0, [], [])
    play_end = arrivals[0] + start_buffer + samples[0] / sample_rate
    stalls, stall_seconds, headroom = 0, 0.0, []
    delivered, buffer_needed = 0, 0.0
    for arrived, length in zip(arrivals, samples, strict=True):
        # Without stalls, a chunk is due when the audio before it has played from the first arrival on.
        buffer_needed = max(buffer_needed, arrived - arrivals[0] - delivered / sample_rate)
        delivered += length
    for arrived, length in zip(arrivals[1:], samples[1:], strict=True):
        buffered = play_end - arrived
        headroom.append(buffered)
        if buffered < -STALL_TOLERANCE:
            stalls += 1
            stall_seconds -= buffered
            play_end = arrived + length / sample_rate
        else:
            play_end += length / sample_rate
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return Playback(stalls > 0, stalls, stall_seconds, gaps, headroom, buffer_needed)


@dataclass
class StreamRecord:
    """One stream as the client saw it; times in seconds."""

    label: str
    voice: str
    started: float  # since the start of the run
    arrivals: list[float] = field(default_factory=list)  # since the stream's request was sent
    samples: list[int] = field(default_factory=list)
    total: float = 0.0
    error: str | None = None
    # False: a closed loop's filler stream (the ramp's, or one keeping the load up until the counted streams
    # end), run for the load it puts on the server and left out of the level's figures.
    measured: bool = True

    @property
    def ttfa(self) -> float | None:
        return self.arrivals[0] if self.arrivals else None

    @property
    def audio_seconds(self) -> float:
        return sum(self.samples) / SAMPLE_RATE

    @property
    def real_time_factor(self) -> float | None:
        return self.total / self.audio_seconds if self.audio_seconds else None

    def playback(self, start_buffer: float = 0.0) -> Playback:
        return playback(self.arrivals, self.samples, start_buffer=start_buffer)


# ---- aggregation --------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank: the smallest value that at least q% of the values do
    not exceed; None for no values.

    Nearest rank, not interpolation between ranks: a level's p99 under the TTFA limit must mean that 99%
    of its streams had first audio within it. Of fewer than 100 streams that is every one, so their p99 is
    their maximum; interpolated, a p99 sat below a maximum over the limit (16 streams, one at 550 ms and
    the next at 200 ms: 497.5 ms, and the level passed).
    """
    data = sorted(values)
    if not data:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    return data[max(math.ceil(len(data) * q / 100), 1) - 1]


def summarize(records: Sequence[StreamRecord], wall_seconds: float | None = None) -> dict:
    """Aggregate one load level: TTFA percentiles, starvation, RTF, chunk gaps, throughput.

    The listener figures are the measured streams'; the rates (audio delivered a second, streams open
    at once) are everyone's, fillers too, over the measured streams' span (``window_seconds``: from the
    first one's request to the last one's end). ``wall_seconds``: the whole level's, for the record.
    """
    everyone, records = records, [r for r in records if r.measured]
    failed_fillers = [r for r in everyone if not r.measured and r.error is not None]
    ok = [r for r in records if r.error is None and r.arrivals]
    plays = [r.playback() for r in ok]
    # Neither is None here: an ok record has arrivals, and every arrival brought samples (the client keeps
    # non-empty chunks only).
    ttfa = cast(list[float], [r.ttfa for r in ok])
    rtf = cast(list[float], [r.real_time_factor for r in ok])
    gaps = [g for p in plays for g in p.gaps]
    headroom = [h for p in plays for h in p.headroom]
    first = min((r.started for r in records), default=0.0)
    window = max((r.started + r.total for r in records), default=0.0) - first
    audio = sum(r.audio_seconds for r in ok)
    delivered = sum(samples for r in everyone for arrived, samples in zip(r.arrivals, r.samples, strict=True)
                    if first <= r.started + arrived <= first + window) / SAMPLE_RATE
    held = sum(max(0.0, min(r.started + r.total, first + window) - max(r.started, first)) for r in everyone)
    return {
        "streams": len(records),
        "filler_streams": len(everyone) - len(records),
        "errors": sum(r.error is not None for r in records),
        "no_audio": sum(r.error is None and not r.arrivals for r in records),
        # A filler the server refused or failed: the counted streams did not meet the level's load.
        "filler_errors": len(failed_fillers),
        "error_examples": (sorted({r.error for r in records if r.error})
                           + sorted(cast(set[str], {r.error for r in failed_fillers})  # each has an error
                                    - {r.error for r in records}))[:3],
        "ttfa_p50": percentile(ttfa, 50),
        "ttfa_p95": percentile(ttfa, 95),
        "ttfa_p99": percentile(ttfa, 99),
        "ttfa_max": max(ttfa, default=None),
        "rtf_p50": percentile(rtf, 50),
        "rtf_p95": percentile(rtf, 95),
        "starved_streams": sum(p.starved for p in plays),
        "stalls": sum(p.stalls for p in plays),
        "stall_seconds": sum(p.stall_seconds for p in plays),
        "gap_p50": percentile(gaps, 50),
        "gap_p99": percentile(gaps, 99),
        "gap_max": max(gaps, default=None),
        "headroom_min": min(headroom, default=None),
        "buffer_needed_p50": percentile((p.buffer_needed for p in plays), 50),
        "buffer_needed_p99": percentile((p.buffer_needed for p in plays), 99),
        "audio_seconds": audio,
        "wall_seconds": window if wall_seconds is None else wall_seconds,
        "window_start": first,  # seconds after the level's start
        "window_seconds": window,
        # Audio delivered per second over the window, to every stream: how many listeners the level kept fed.
        "realtime_streams_served": delivered / window if window else None,
        # Streams open at once on average over the window (each from its request to its last response): the
        # load the measured streams met, and what the server's own counts compare with.
        "streams_in_flight_mean": held / window if window else None,
    }


def meets_realtime(level: dict, ttfa_limit: float = DEFAULT_TTFA_LIMIT) -> bool:
    """A level is real-time if every stream produced audio, none starved, p99 TTFA < the limit, and no
    filler stream failed (the counted streams then did not meet the level's load)."""
    return (
        level["streams"] > 0
        and level["errors"] == 0
        and level.get("filler_errors", 0) == 0
        and level["no_audio"] == 0
        and level["starved_streams"] == 0
        and level["ttfa_p99"] is not None
        and level["ttfa_p99"] < ttfa_limit
    )


def realtime_capacity(levels: dict[int, dict], ttfa_limit: float = DEFAULT_TTFA_LIMIT) -> int:
    """Largest concurrency up to which every measured level meets real time (0 if the smallest does not).

    A level that passes above one that failed does not count: a capacity of N says that the levels up to
    N all held, as a reader takes it (such a level is reported as it is, ``passing_above_capacity``).
    """
    capacity = 0
    for concurrency in sorted(levels):
        if not meets_realtime(levels[concurrency], ttfa_limit):
            break
        capacity = concurrency
    return capacity


def passing_above_capacity(levels: dict[int, dict], ttfa_limit: float = DEFAULT_TTFA_LIMIT) -> list[int]:
    """The levels above ``realtime_capacity`` that met real time on their own (a failure below them was
    noise, or the load is not monotone there): listed beside the capacity rather than hidden."""
    capacity = realtime_capacity(levels, ttfa_limit)
    return sorted(c for c, level in levels.items() if c > capacity and meets_realtime(level, ttfa_limit))


def poisson_schedule(rate: float, max_count: int, max_duration: float, seed: int = 0) -> list[float]:
    """Start offsets (s) of a Poisson arrival process of ``rate``/s, cut at ``max_count`` and ``max_duration``."""
    if rate <= 0:
        raise ValueError(f"arrival rate must be > 0, got {rate}")
    if max_count < 0 or max_duration < 0:
        raise ValueError("max_count and max_duration must be >= 0")
    rng = random.Random(seed)
    starts: list[float]
    starts, now = [], 0.0
    while len(starts) < max_count:
        now += rng.expovariate(rate)
        if now >= max_duration:
            break
        starts.append(now)
    return starts


# ---- running streams -------------------------------------------------------------------------------


def check_loopback(url: str) -> str:
    """Refuse any target but this machine: the load generator is for local servers only."""
    address = url.split("://", 1)[-1].split("/", 1)[0]
    if address.startswith("["):
        host = address[1 : address.index("]")]
    elif address.count(":") == 1:
        host = address.split(":", 1)[0]
    else:
        host = address
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise ValueError(f"the load generator targets this machine only (localhost, 127.x, ::1), not {url!r}")
    return url


class LevelOver(Exception):
    """A filler stream cut because the streams its level counts have all ended."""


# Set when the load generator is told to stop (Ctrl-C, SIGTERM): every stream under way ends the clean
# way at its next chunk, with a `stop` (a process that died with its streams cancelled them bare: the
# server's decoder went on decoding their queued audio for nobody, a core for seconds), and no new one
# starts.
STOPPING = threading.Event()
_UNDER_WAY = threading.Condition()  # guards _streams_under_way, notified as each stream ends
_streams_under_way = [0]


def stop_streams(log: Callable[[str], None] = print, timeout: float = 20.0) -> None:
    """Set STOPPING and wait up to ``timeout`` for this process's streams under way to end. Counted, not
    joined: a KeyboardInterrupt inside Thread.join marks the thread stopped in Python 3.11 (bpo-45274's
    fix), and a join after it returns at once."""
    STOPPING.set()
    log("stopping: the streams under way end with a stop each")
    with _UNDER_WAY:
        _UNDER_WAY.wait_for(lambda: _streams_under_way[0] == 0, timeout=timeout)


# What runs one utterance as one stream: (utterance, the run's start, stop) -> its record. ``stop``, where
# given, says when to cut the stream short (a filler's, once its level is over).
StreamFunction = Callable[[Utterance, float, Callable[[], bool] | None], StreamRecord]


def grpc_stream(url: str, timeout: float = 120.0) -> StreamFunction:
    """A function that runs one utterance as one gRPC stream and records what arrived when."""
    from .client import END_EARLY_SECONDS, OrpheusClient  # noqa: PLC0415 (tritonclient import only when streaming)

    check_loopback(url)
    local = threading.local()

    def run(utterance: Utterance, run_start: float, stop: Callable[[], bool] | None = None) -> StreamRecord:
        client = getattr(local, "client", None)
        if client is None:
            # A filler cut at a level's end is ended whole before its worker goes on: the next level's
            # figures must not carry the last one's streams.
            client = local.client = OrpheusClient(url, end_wait=END_EARLY_SECONDS)
        sent = time.perf_counter()
        record = StreamRecord(utterance.label, utterance.voice, sent - run_start)
        received: list[tuple[float, int]] = []  # the chunks as they come, kept should the stream fail or be cut

        def check(chunk) -> None:  # raising here ends the stream the clean way (the client's _EarlyEnd)
            received.append((time.perf_counter() - sent, chunk.size))
            if stop is not None and stop():
                raise LevelOver("cut at its level's end")
            if STOPPING.is_set():
                raise LevelOver("cut: the load generator was stopped")

        with _UNDER_WAY:
            _streams_under_way[0] += 1
        try:
            result = client.synthesize(utterance.text, voice=utterance.voice, max_tokens=utterance.max_tokens,
                                       seed=utterance.seed, timeout=timeout, on_chunk=check)
            # arrival times taken in the gRPC callback: a busy worker thread does not delay them
            record.arrivals = [c.arrived for c in result.chunks]
            record.samples = [len(c.audio) for c in result.chunks]
            record.total = result.total_seconds
        except Exception as error:  # noqa: BLE001 (recorded, counted as an error unless it is the planned cut)
            if not isinstance(error, LevelOver):  # a filler cut at its level's end is no failure
                record.error = _error_text(error)
            record.total = time.perf_counter() - run_start - record.started
            record.arrivals, record.samples = [a for a, _ in received], [n for _, n in received]
        finally:
            with _UNDER_WAY:
                _streams_under_way[0] -= 1
                _UNDER_WAY.notify_all()
        return record

    return run


def _level_line(level: dict) -> str:
    """One level's summary for the log; with the first error's text, so a failing run says why as it goes."""
    fillers = f" (+{level['filler_streams']} fillers)" if level.get("filler_streams") else ""
    planned = level.get("streams_planned")
    short = f" of {planned} planned (the level's time ran out)" if planned and planned > level["streams"] else ""
    line = (f"{level['streams']}{short} streams{fillers}, TTFA p50 {_ms(level['ttfa_p50'])} "
            f"p99 {_ms(level['ttfa_p99'])}, starved {level['starved_streams']}, errors {level['errors']}")
    if level.get("filler_errors"):
        line += f", filler errors {level['filler_errors']}"
    return line + (f" (e.g. {level['error_examples'][0]})" if level["errors"] or level.get("filler_errors") else "")


def _recorded(stream: StreamFunction, utterance: Utterance, start: float,
              stop: Callable[[], bool] | None) -> StreamRecord:
    """``stream``'s record of one utterance, or, should the stream function itself raise, a record of that
    error: a stream is never left out of its level's figures, nor does its worker stop."""
    started = time.perf_counter() - start
    try:
        return stream(utterance, start, stop)
    except Exception as error:  # noqa: BLE001 (recorded, counted as an error)
        return StreamRecord(utterance.label, utterance.voice, started, total=time.perf_counter() - start - started,
                            error=_error_text(error))


def _error_text(error: Exception) -> str:
    """How a stream's failure is recorded: its kind and message, cut to a length a report can show."""
    return f"{type(error).__name__}: {error}"[:300]


def run_closed_loop(stream: StreamFunction, concurrency: int, utterances: Sequence[Utterance], max_streams: int,
                    max_seconds: float, ramp_seconds: float = 0.0, start: float | None = None,
                    workers: Sequence[int] | None = None, outstanding=None) -> list[StreamRecord]:
    """``concurrency`` workers, each starting its next utterance when one ends.

    Worker i starts its first stream ``ramp_seconds * i / concurrency`` into the level:
    0 starts every worker at once (a burst of ``concurrency`` callers), a ramp about as
    long as a stream spreads the starts as a steady stream of callers would. The level
    counts (``measured``) the first ``max_streams`` streams started once the last worker
    has started, within ``max_seconds``; the workers go on starting streams (fillers)
    until every counted stream has ended, and cut the fillers then, so each counted
    stream runs beside ``concurrency - 1`` others throughout. Streams are bounded by the
    stream function's timeout.
    A share of a level run in one of several processes (``LoadProcesses``) names its
    ``workers`` (their numbers among the level's), the level's ``start``
    (``time.perf_counter()``, the same clock in every process) and ``outstanding``, the
    level's counted streams not yet ended, shared by the processes
    (``multiprocessing.Value``, set to the level's count before it starts).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if not 0 <= ramp_seconds < max_seconds:
        raise ValueError(f"ramp_seconds {ramp_seconds} must be >= 0 and below the level's {max_seconds} s bound")
    if outstanding is None:
        import multiprocessing  # noqa: PLC0415

        outstanding = multiprocessing.Value("i", max_streams)
    records: list[StreamRecord] = []
    lock = threading.Lock()
    issued, to_start = [0], [max_streams]  # streams started, counted streams yet to start (this share's)
    start = time.perf_counter() if start is None else start
    steady_from = ramp_seconds * (concurrency - 1) / concurrency  # the last worker's first start

    def count_down(n: int) -> None:
        with outstanding.get_lock():
            outstanding.value -= n

    def level_over() -> bool:
        return outstanding.value <= 0

    def worker(delay: float):
        time.sleep(max(0.0, start + delay - time.perf_counter()))
        while True:
            with lock:
                now = time.perf_counter() - start
                if to_start[0] and now >= max_seconds:  # too late for the rest: the level does not wait for them
                    count_down(to_start[0])
                    to_start[0] = 0
                if (not to_start[0] and level_over()) or STOPPING.is_set():
                    return
                measured = bool(to_start[0]) and now >= steady_from
                if measured:
                    to_start[0] -= 1
                utterance = utterances[issued[0] % len(utterances)]
                issued[0] += 1
            try:
                record = _recorded(stream, utterance, start, None if measured else level_over)
            finally:  # counted as ended whatever happened, or the other workers' fillers would run on for good
                if measured:
                    count_down(1)
            record.measured = measured
            with lock:
                records.append(record)

    threads = [threading.Thread(target=worker, args=(ramp_seconds * i / concurrency,), name=f"loadgen-{i}",
                                daemon=True) for i in (range(concurrency) if workers is None else workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(records, key=lambda r: r.started)


def run_poisson(stream: StreamFunction, rate: float, utterances: Sequence[Utterance],
                max_streams: int, max_seconds: float, seed: int = 0, start: float | None = None,
                share: tuple[int, int] = (0, 1)) -> list[StreamRecord]:
    """Streams started at Poisson arrival times (``rate``/s), at most ``max_streams`` within ``max_seconds``.

    ``share`` (k, n): only arrivals k, k + n, k + 2n, ... of the schedule, from the level's ``start``
    (one of n processes running a level together, ``LoadProcesses``)."""
    schedule = poisson_schedule(rate, max_streams, max_seconds, seed)
    records: list[StreamRecord] = []
    lock = threading.Lock()
    start = time.perf_counter() if start is None else start

    def one(utterance):
        record = _recorded(stream, utterance, start, None)
        with lock:
            records.append(record)

    threads = []
    for i, offset in list(enumerate(schedule))[share[0] :: share[1]]:
        time.sleep(max(0.0, start + offset - time.perf_counter()))
        if STOPPING.is_set():
            break
        thread = threading.Thread(target=one, args=(utterances[i % len(utterances)],), name=f"loadgen-poisson-{i}",
                                  daemon=True)
        thread.start()
        threads.append(thread)
    for t in threads:
        t.join()
    return sorted(records, key=lambda r: r.started)


def closed_loop_shares(concurrency: int, max_streams: int, processes: int) -> list[tuple[list[int], int]]:
    """A closed-loop level dealt out to ``processes``: each one's workers (round robin) and its share of the
    level's streams, stream i going to worker i mod ``concurrency`` as in one process whose streams take
    about as long as each other (a process without workers gets none)."""
    return [(list(range(k, concurrency, processes)),
             sum(1 for i in range(max_streams) if i % concurrency % processes == k)) for k in range(processes)]


class LoadProcesses:
    """Child processes that each run a share of every level's streams, on their own gRPC connections.

    One Python process receiving the chunks of hundreds of streams spends its time in the GIL before a GPU
    server runs out of anything: at high concurrency the load generator would measure itself. Each child
    (spawned: no gRPC state crosses a fork) builds its own stream function (``grpc_stream``); a level's
    workers (closed loop) or arrivals (Poisson) are dealt out round robin, all timed from one start on the
    shared monotonic clock, and the records come back in one list, as from one process.
    """

    def __init__(self, url: str, count: int, timeout: float = 120.0):
        import multiprocessing  # noqa: PLC0415

        if count < 2:
            raise ValueError(f"LoadProcesses needs at least 2 processes, got {count}")
        context = multiprocessing.get_context("spawn")
        self.pipes, self.processes = [], []
        self.outstanding = context.Value("i", 0)  # a closed-loop level's counted streams not yet ended
        self.last_start = 0.0  # the last level's start (time.perf_counter()): its records' times count from it
        for _ in range(count):
            here, there = context.Pipe()
            process = context.Process(target=_load_process, args=(there, url, timeout, self.outstanding), daemon=True)
            process.start()
            self.pipes.append(here)
            self.processes.append(process)
        for here in self.pipes:
            try:
                ready = here.recv()
            except EOFError:
                ready = "it ended while starting"
            if ready != "ready":
                self.close()
                raise RuntimeError(f"a load generator process did not start: {ready}")

    def run_closed_loop(self, concurrency: int, utterances: Sequence[Utterance], max_streams: int,
                        max_seconds: float, ramp_seconds: float = 0.0) -> list[StreamRecord]:
        shares = closed_loop_shares(concurrency, max_streams, len(self.pipes))
        self.outstanding.value = sum(streams for workers, streams in shares if workers and streams)
        return self._run([("closed", {"concurrency": concurrency, "utterances": list(utterances)[k:] +
                                      list(utterances)[:k], "max_streams": streams, "max_seconds": max_seconds,
                                      "ramp_seconds": ramp_seconds, "workers": workers})
                          for k, (workers, streams) in enumerate(shares) if workers and streams])

    def run_poisson(self, rate: float, utterances: Sequence[Utterance], max_streams: int, max_seconds: float,
                    seed: int = 0) -> list[StreamRecord]:
        n = len(self.pipes)
        return self._run([("poisson", {"rate": rate, "utterances": list(utterances), "max_streams": max_streams,
                                       "max_seconds": max_seconds, "seed": seed, "share": (k, n)}) for k in range(n)])

    def _run(self, jobs: list[tuple[str, dict]]) -> list[StreamRecord]:
        start = time.perf_counter() + 0.05  # every process has its job before the level starts
        self.last_start = start  # the level's start: its records' times count from it
        for here, (kind, arguments) in zip(self.pipes, jobs, strict=False):
            here.send((kind, arguments | {"start": start}))
        records: list[StreamRecord] = []
        for here, process in list(zip(self.pipes, self.processes, strict=True))[: len(jobs)]:
            try:
                answer = here.recv()
            except EOFError:
                raise RuntimeError(f"a load generator process ended mid-level (exit code {process.exitcode})") from None
            if isinstance(answer, str):
                raise RuntimeError(f"a load generator process failed: {answer}")
            records += answer
        return sorted(records, key=lambda r: r.started)

    def close(self, interrupted: bool = False) -> None:
        """Tell the children to stop and wait for them. ``interrupted`` (the parent told to stop mid-level):
        SIGTERM first, which ends their streams under way with a stop each (``stop_streams``); a child
        killed with its streams would leave the server decoding their queued audio for nobody."""
        for here in self.pipes:
            with contextlib.suppress(OSError):
                here.send(None)
        if interrupted:
            for process in self.processes:
                process.terminate()
        for process in self.processes:
            process.join(timeout=30 if interrupted else 10)
            if process.is_alive():
                process.kill()

    def __enter__(self) -> LoadProcesses:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(interrupted=kind is not None and issubclass(kind, KeyboardInterrupt))


def _load_process(pipe, url: str, timeout: float, outstanding) -> None:
    """A LoadProcesses child: run the levels' shares it is sent until told to stop (None)."""
    try:
        stream = grpc_stream(url, timeout)
    except Exception as error:  # noqa: BLE001 (told to the parent, which raises it)
        pipe.send(f"{type(error).__name__}: {error}")
        return
    pipe.send("ready")
    with terminate_as_interrupt():  # its parent stopping (a daemon child gets SIGTERM) ends its streams cleanly
        try:
            while (job := pipe.recv()) is not None:
                kind, arguments = job
                try:
                    if kind == "closed":
                        pipe.send(run_closed_loop(stream, **arguments, outstanding=outstanding))
                    else:
                        pipe.send(run_poisson(stream, **arguments))
                except Exception as error:  # noqa: BLE001
                    pipe.send(f"{type(error).__name__}: {error}")
        except (KeyboardInterrupt, EOFError):
            stop_streams(log=lambda line: None)


@dataclass
class SweepSettings:
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4])
    streams_per_worker: int = 2  # closed loop: streams per level = concurrency x this (at least min_streams)
    ramp_seconds: float = 0.0  # closed loop: the workers' first streams start over this long (0: all at once)
    min_streams: int = 4
    max_seconds_per_level: float = 120.0
    poisson_rates: list[float] = field(default_factory=list)
    poisson_streams: int = 8
    poisson_seconds: float = 60.0
    ttfa_limit: float = DEFAULT_TTFA_LIMIT
    stream_timeout: float = 120.0
    labels: list[str] = field(default_factory=lambda: ["short", "medium", "long"])
    max_tokens: dict[str, int] = field(default_factory=dict)
    processes: int = 1  # load generator processes (LoadProcesses when > 1: hundreds of streams on a GPU server)


def record_dict(record: StreamRecord) -> dict:
    out = asdict(record)
    out["ttfa"] = record.ttfa
    return out


def sweep(url: str, settings: SweepSettings, log: Callable[[str], None] = print,
          monitor: Callable[[], Callable[..., dict]] | None = None, runner=None) -> dict:
    """Closed-loop concurrency sweep (+ optional Poisson runs): summaries, capacity and per-stream records.

    ``monitor``, if given, is called as each level starts; what the function it returns
    gives at the level's end (e.g. how busy the machine was), called with the span the level's counted
    streams ran (``time.perf_counter()`` seconds, or None), is added to that level's summary.
    ``runner`` (``load_runner``'s) runs the streams; without it one is made for this sweep, as
    ``settings.processes`` asks. A caller running levels as separate sweeps passes one, so the
    load generator's processes start once, not once a level.
    """
    if runner is not None:
        return _sweep(runner, settings, log, monitor)
    with load_runner(url, settings.processes, settings.stream_timeout) as runner:
        return _sweep(runner, settings, log, monitor)


@contextlib.contextmanager
def load_runner(url: str, processes: int = 1, timeout: float = 120.0):
    """What runs a sweep's streams: threads of this process, or ``processes`` LoadProcesses (stopped after)."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if processes == 1:
        yield _OneProcess(grpc_stream(url, timeout))
        return
    with LoadProcesses(url, processes, timeout) as runner:
        yield runner


@dataclass
class _OneProcess:
    """The levels' streams on threads of this process (LoadProcesses' interface)."""

    stream: StreamFunction
    last_start: float = 0.0  # the last level's start (time.perf_counter()): its records' times count from it

    def run_closed_loop(self, *args, **kwargs) -> list[StreamRecord]:
        self.last_start = time.perf_counter()
        # mypy#6799: a false positive, mypy takes *args of unknown length to reach start
        return run_closed_loop(self.stream, *args, start=self.last_start, **kwargs)  # type: ignore[misc]

    def run_poisson(self, *args, **kwargs) -> list[StreamRecord]:
        self.last_start = time.perf_counter()
        # mypy#6799: a false positive, mypy takes *args of unknown length to reach start
        return run_poisson(self.stream, *args, start=self.last_start, **kwargs)  # type: ignore[misc]


def _sweep(runner, settings: SweepSettings, log: Callable[[str], None],
           monitor: Callable[[], Callable[..., dict]] | None) -> dict:
    utterances = workload(settings.labels, max_tokens=settings.max_tokens,
                          count=max(len(settings.labels) * len(VOICES), 8))
    raw = {}

    def level(name: str, run: Callable[..., list[StreamRecord]], *args) -> dict:
        """One level: its streams (``run(*args)``), their summary and what ``monitor`` saw of their counted span."""
        started, finish = time.perf_counter(), (monitor or _no_monitor)()
        records = run(*args)
        summary = summarize(records, time.perf_counter() - started)
        summary |= finish(_counted_span(runner, summary))
        raw[name] = [record_dict(r) for r in records]
        return summary

    closed = {}
    for concurrency in settings.concurrency:
        count = max(settings.min_streams, concurrency * settings.streams_per_worker)
        closed[concurrency] = level(f"closed_{concurrency}", runner.run_closed_loop, concurrency, utterances, count,
                                    settings.max_seconds_per_level, settings.ramp_seconds)
        # Fewer counted when the level's time ran out first: judged on fewer streams, which the report says.
        closed[concurrency]["streams_planned"] = count
        log(f"closed loop c={concurrency}: {_level_line(closed[concurrency])}")
    poisson = {}
    for rate in settings.poisson_rates:
        poisson[rate] = level(f"poisson_{rate}", runner.run_poisson, rate, utterances, settings.poisson_streams,
                              settings.poisson_seconds)
        log(f"poisson {rate}/s: {_level_line(poisson[rate])}")
    return {
        "settings": asdict(settings),
        "closed_loop": closed,
        "poisson": poisson,
        "realtime_capacity": realtime_capacity(closed, settings.ttfa_limit),
        "passing_above_capacity": passing_above_capacity(closed, settings.ttfa_limit),
        "records": raw,
    }


def _counted_span(runner, level: dict) -> tuple[float, float] | None:
    """The span a level's counted streams ran (from the first one's request to the last one's end), in
    ``time.perf_counter()`` seconds: what a monitor takes the level's rates over."""
    if not level["window_seconds"]:
        return None
    start = runner.last_start + level["window_start"]
    return start, start + level["window_seconds"]


def _no_monitor() -> Callable[[tuple[float, float] | None], dict]:
    return lambda span=None: {}  # type: ignore[misc]  # mypy#12557: a lambda's default defeats its inference


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orpheus_triton.loadgen", description=__doc__,
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_GRPC_URL, help="gRPC endpoint on this machine")
    parser.add_argument("--concurrency", type=counts, default="1,2,4", help="closed-loop levels, comma separated")
    parser.add_argument("--streams-per-worker", type=positive, default=2,
                        help="closed loop: streams a level counts, per worker (filler streams before and "
                             "after them keep the load at the level's concurrency; default 2)")
    parser.add_argument("--min-streams", type=positive, default=4,
                        help="closed loop: streams a level counts at the least, whatever its concurrency, so that "
                             "its percentiles rest on a few streams (default 4)")
    parser.add_argument("--max-tokens", type=max_tokens_or_zero, default=0, metavar="N",
                        help="every stream's max_tokens (default 0: each text's own length, "
                             + ", ".join(f"{label} {tokens}" for label, tokens in MAX_TOKENS.items())
                             + "; the demo model set never ends its speech by itself, so a stream takes all)")
    parser.add_argument("--max-seconds", type=positive_seconds, default=120.0,
                        help="time bound per level: its counted streams start within it, and it ends when they do")
    parser.add_argument("--ramp-seconds", type=float, default=0.0,
                        help="closed loop: start the workers' first streams over this long (0: all at once)")
    parser.add_argument("--poisson-rates", type=rates, default="", help="arrival rates (streams/s), comma separated")
    parser.add_argument("--poisson-streams", type=positive, default=8)
    parser.add_argument("--texts", type=text_labels, default="short,medium,long",
                        help="which benchmark texts: short, medium, long")
    parser.add_argument("--ttfa-limit", type=positive_seconds, default=DEFAULT_TTFA_LIMIT)
    parser.add_argument("--processes", type=positive, default=1,
                        help="load generator processes (a level's streams dealt out among them): for hundreds of "
                             "streams, so that one Python process's GIL does not bound what is measured")
    parser.add_argument("--out", help="write the result JSON here")
    args = parser.parse_args(argv)
    if not 0 <= args.ramp_seconds < args.max_seconds:
        parser.error(f"--ramp-seconds {args.ramp_seconds} must be >= 0 and below --max-seconds {args.max_seconds}")
    try:
        check_loopback(args.url)
        require_ready_server(args.url, ENSEMBLE_MODEL)
    except ValueError as error:
        parser.error(str(error))
    except ConnectionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    settings = SweepSettings(
        concurrency=args.concurrency, streams_per_worker=args.streams_per_worker, min_streams=args.min_streams,
        ramp_seconds=args.ramp_seconds, max_seconds_per_level=args.max_seconds,
        poisson_rates=args.poisson_rates, poisson_streams=args.poisson_streams,
        poisson_seconds=args.max_seconds, ttfa_limit=args.ttfa_limit, labels=args.texts,
        max_tokens={label: args.max_tokens for label in args.texts} if args.max_tokens else {},
        processes=args.processes,
    )
    with terminate_as_interrupt():
        try:
            result = sweep(args.url, settings)
        except KeyboardInterrupt:
            stop_streams()
            return 130
    print(f"real-time capacity: {result['realtime_capacity']} streams "
          f"(p99 TTFA < {settings.ttfa_limit * 1000:.0f} ms, no starved stream)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    failed = [level for level in [*result["closed_loop"].values(), *result["poisson"].values()] if level["errors"]]
    if failed:
        print(f"error: {sum(level['errors'] for level in failed)} streams failed, e.g. "
              f"{failed[0]['error_examples'][0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


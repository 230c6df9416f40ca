"""Triton custom metrics (served on the server's Prometheus endpoint) for the Python models."""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .constants import DECODER_MODEL, SAMPLE_RATE, SAMPLES_PER_FRAME

# What listeners hear, as the server can tell (DecoderMetrics); read back by ListenerFigures.
FIRST_AUDIO_METRIC = "orpheus_time_to_first_audio_seconds"
STALLS_METRIC = "orpheus_decoder_stalls_total"
STALL_SECONDS_METRIC = "orpheus_decoder_stall_seconds_total"
DECODER_BUSY_METRIC = "orpheus_decoder_busy_seconds_total"
# Where a server's time goes, beside them (ListenerFigures.load): the LLM engine's steps and tokens, the
# decoder's SNAC calls and windows.
DECODER_WINDOWS_METRIC = "orpheus_decoder_windows_total"
DECODER_CALLS_METRIC = "orpheus_decoder_calls_total"
LLM_TOKENS_METRIC = "orpheus_llm_generated_tokens_total"
LLM_STEPS_METRIC = "orpheus_llm_steps_total"
LLM_BUSY_METRIC = "orpheus_llm_busy_seconds_total"
LLM_STREAM_SECONDS_METRIC = "orpheus_llm_stream_seconds_total"
LLM_QUEUED_SECONDS_METRIC = "orpheus_llm_queued_seconds_total"
LLM_ACTIVE_STREAMS_METRIC = "orpheus_llm_active_streams"
LLM_QUEUED_METRIC = "orpheus_llm_queued_requests"
RELAYED_STREAMS_METRIC = "orpheus_llm_relayed_streams"
DECODER_QUEUED_METRIC = "orpheus_decoder_queued_windows"
# The llm stage's streams still generating or waiting for a slot (the torch engine's, or the relay's in front
# of TensorRT-LLM): with the decoder's queued windows, what a draining server waits for (server.Drain).
LLM_STREAM_METRICS = (LLM_ACTIVE_STREAMS_METRIC, LLM_QUEUED_METRIC, RELAYED_STREAMS_METRIC)
LOAD_METRICS = (DECODER_BUSY_METRIC, DECODER_WINDOWS_METRIC, DECODER_CALLS_METRIC, LLM_TOKENS_METRIC,
                LLM_STEPS_METRIC, LLM_BUSY_METRIC, LLM_STREAM_SECONDS_METRIC, LLM_QUEUED_SECONDS_METRIC)
# Buckets (seconds) of the time-to-first-audio histogram: around the 200 ms a voice agent aims for, up to
# the 500 ms of the benchmark's real-time capacity and beyond.
# Up to 30 s: without --max-queue-seconds a caller may wait minutes for a slot, and a quantile past the
# last bucket reads as that bucket's bound.
FIRST_AUDIO_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
# How often the decoder's metrics thread sends Triton what changed (DecoderMetrics).
PUBLISH_SECONDS = 0.1
# Callers in flight (callers.CallerLeases: a look at every lease) are counted at most this often.
CALLERS_COUNT_SECONDS = 1.0
CALLERS_METRIC = "orpheus_callers_in_flight"
CALLERS_REFUSED_METRIC = "orpheus_callers_refused_total"

log = logging.getLogger(__name__)


# The label telling a model's instances apart (``MetricSet``).
INSTANCE_LABEL = "model_instance"


class MetricSet:
    """Gauges, counters and histograms of one model, labelled ``model=<name>``.

    Triton requires each MetricFamily to outlive its Metrics, so the set keeps
    the families it creates.
    """

    def __init__(self, pb_utils, model: str, instance: str | None = None):
        self.kinds = pb_utils.MetricFamily
        self.model = model
        # A model of several instances labels each one's metrics with it: instances that set a metric of the
        # same labels share it in tritonserver, which frees it when the first of them unloads while the
        # others still set it (heap corruption, the server aborting; triton-inference-server/server#8663).
        # Not "instance": Prometheus gives every scraped series that label (the target) and renames a
        # series' own to exported_instance.
        self.labels = {"model": model} | ({INSTANCE_LABEL: instance} if instance else {})
        self.families: list[Any] = []
        self.metric_types: set[type] = set()

    def gauge(self, name: str, text: str):
        return self._metric(name, text, self.kinds.GAUGE)

    def counter(self, name: str, text: str):
        return self._metric(name, text, self.kinds.COUNTER)

    def histogram(self, name: str, text: str, buckets: tuple[float, ...]):
        return self._metric(name, text, self.kinds.HISTOGRAM, buckets=list(buckets))

    def _metric(self, name: str, text: str, kind, **options):
        family = self.kinds(name=name, description=text, kind=kind)
        self.families.append(family)
        metric = family.Metric(labels=self.labels, **options)
        self.metric_types.add(type(metric))
        return metric


def release(owner) -> None:
    """Let go of ``owner``'s metrics (its attributes), then of their families, while the stub still runs.

    Left to the interpreter's teardown, a family is destroyed after the stub's shared memory is
    gone and the stub crashes on its way out (a segfault in ``Metric::SaveToSharedMemory`` under
    ``~MetricFamily``, seen with tritonserver 2.51). Call it from the model's ``finalize()``, once
    nothing updates the metrics any more; ``owner.metrics`` is its MetricSet.
    """
    metric_set: MetricSet = owner.metrics
    kinds = tuple(metric_set.metric_types)

    def holds_metrics(value) -> bool:  # a metric, or a dict of them
        values = value.values() if isinstance(value, dict) else (value,)
        return bool(kinds) and any(isinstance(v, kinds) for v in values)

    for name in [name for name, value in vars(owner).items() if holds_metrics(value)]:
        delattr(owner, name)  # (no loop variable may keep the last one alive past the families)
    metric_set.families.clear()


class PublishedMetrics:
    """A model's metrics sent to Triton by a thread of their own, every ``interval`` seconds.

    Subclasses define ``publish``: send Triton what changed since the last one. The
    thread is the only one that talks to Triton about the model's metrics: when several
    threads updated them at once, tritonserver 2.51 crashed in libtriton_python. A
    failed publish is logged and the thread goes on. ``interval=None``: no thread, the
    caller publishes.
    """

    metrics: MetricSet

    def _start_publishing(self, interval: float | None, thread_name: str) -> None:
        self._stop = threading.Event()
        self._thread = None
        if interval is not None:
            self._thread = threading.Thread(target=self._run, args=(interval,), name=thread_name, daemon=True)
            self._thread.start()

    def publish(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the publishing thread, publish what is left, then release the metrics (``release``: before the
        interpreter's teardown). Call it once nothing records any more."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                return
        try:
            self.publish()
        finally:  # released even if that publish failed: left to the interpreter's teardown, the stub crashes
            release(self)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.publish()
            except Exception as failure:  # noqa: BLE001 (a failed update never stops the metrics)
                log.warning("%s: publishing failed: %s", threading.current_thread().name, failure)


class RelayMetrics(PublishedMetrics):
    """The streams the relay in front of TensorRT-LLM carries (generating there or waiting for its slots),
    read from ``streams`` every ``interval`` seconds: TensorRT-LLM's own figures are not the llm stage's."""

    def __init__(self, pb_utils, model: str, instance: str, streams: Callable[[], int],
                 interval: float | None = 0.5):
        self.metrics = MetricSet(pb_utils, model, instance)
        self.relayed = self.metrics.gauge(RELAYED_STREAMS_METRIC, "Streams the relay carries to the engine model "
                                          "(generating there, or waiting for its slots)")
        self.streams = streams
        self._start_publishing(interval, "relay-metrics")

    def publish(self) -> None:
        self.relayed.set(self.streams())


class DecoderMetrics(PublishedMetrics):
    """What the SNAC decoder does: the stage that bounds real-time capacity on small machines.

    ``orpheus_decoder_audio_seconds_total`` grows by the audio produced, so its
    rate is the audio delivered per second for all streams together (real time
    for N streams needs N). What listeners hear, as the server can tell
    (decode_rounds.Delivery: playback from the first audio sent, no network delay):
    ``orpheus_time_to_first_audio_seconds``, from preprocessing taking the request
    to its first audio sent, and gaps, ``orpheus_decoder_stalls_total`` and
    ``orpheus_decoder_stall_seconds_total`` (0 while every stream keeps real time).

    Every metric update is a round trip from the backend stub to the server, as a
    response send is, and a round updated eight: with rounds of a few windows (a
    fast decoder at a hundred streams) as many round trips as the answers
    themselves (perf/silent_snac). So the ``record_*`` calls only add to figures
    held here (any thread may make them), and the publishing thread
    (``PublishedMetrics``) sends what changed every ``interval`` seconds.
    """

    def __init__(self, pb_utils, model: str = DECODER_MODEL, interval: float | None = PUBLISH_SECONDS,
                 callers: Callable[[], int | None] | None = None):
        metrics = MetricSet(pb_utils, model)
        self.metrics = metrics
        self.gauges = {
            "streams": metrics.gauge("orpheus_decoder_streams", "Streams whose tokens are still arriving at the "
                                     "decoder (their audio may go on for seconds after: queued_windows)"),
            "call_windows": metrics.gauge("orpheus_decoder_call_windows", "Windows in the last SNAC call"),
            "call_seconds": metrics.gauge("orpheus_decoder_call_seconds", "Duration of the last SNAC call (kept "
                                          "while idle; the mean: busy_seconds over calls, as rates)"),
            "queued": metrics.gauge(DECODER_QUEUED_METRIC, "Windows waiting for a decoder round"),
        }
        # ``callers``: how many callers are in flight (callers.CallerLeases.count: None where it cannot tell), where
        # the server counts them.
        self._callers, self._callers_due = callers, 0.0
        if callers is not None:
            self.gauges["callers"] = metrics.gauge(CALLERS_METRIC, "Callers in flight, from preprocessing taking "
                                                   "their request to their last audio (serve --max-callers "
                                                   "bounds them)")
        self.counters = {
            "busy_seconds": metrics.counter(DECODER_BUSY_METRIC, "Seconds the decoder spent on its rounds (SNAC "
                                            "and answering): its rate is the share of time it is busy "
                                            "(1 = saturated)"),
            "windows": metrics.counter(DECODER_WINDOWS_METRIC, "Windows decoded"),
            "calls": metrics.counter(DECODER_CALLS_METRIC, "SNAC calls (windows per call: the decoder's batching)"),
            "audio_seconds": metrics.counter("orpheus_decoder_audio_seconds_total", "Seconds of audio decoded"),
            "stalls": metrics.counter(STALLS_METRIC, "Chunks sent after their listener had played all audio sent "
                                      "before"),
            "stall_seconds": metrics.counter(STALL_SECONDS_METRIC, "Seconds listeners waited in those gaps"),
            "stopped_streams": metrics.counter("orpheus_decoder_stopped_streams_total", "Streams a stop (or, "
                                               "calling the decoder alone, a cancellation) ended with audio "
                                               "still to decode or to come (callers who hung up mid-stream; "
                                               "once each)"),
            "dropped_tokens": metrics.counter("orpheus_decoder_dropped_tokens_total", "Token ids that gave no "
                                              "audio: not audio tokens (end-of-speech aside), or audio tokens in "
                                              "the wrong frame slot (none from the LLM with its audio guard on)"),
        }
        self.first_audio = metrics.histogram(FIRST_AUDIO_METRIC, "From preprocessing taking a request to its "
                                             "first audio sent", FIRST_AUDIO_BUCKETS)
        self._lock = threading.Lock()
        self._gauge_values: dict[str, float] = {}  # latest value of each gauge set since it was published
        self._published_gauges: dict[str, float] = {}
        self._growth = dict.fromkeys(self.counters, 0.0)  # counter growth since the last publish
        self._first_audio_seconds: list[float] = []
        self._start_publishing(interval, "decoder-metrics")

    def record_call(self, windows: int, seconds: float) -> None:
        if not windows:
            return
        with self._lock:
            self._gauge_values.update(call_windows=windows, call_seconds=seconds)
            self._grow(windows=windows, calls=1, audio_seconds=windows * SAMPLES_PER_FRAME / SAMPLE_RATE)

    def record_busy(self, seconds: float) -> None:
        """A round's whole time, from composing its SNAC call to its last answer (failed ones too)."""
        with self._lock:
            self._grow(busy_seconds=seconds)

    def record_dropped_tokens(self, count: int) -> None:
        if count:
            with self._lock:
                self._grow(dropped_tokens=count)

    def record_stopped(self) -> None:
        with self._lock:
            self._grow(stopped_streams=1)

    def record_streams(self, streams: int) -> None:
        self.record_gauge("streams", streams)

    def record_queued(self, windows: int) -> None:
        self.record_gauge("queued", windows)

    def record_gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._gauge_values[name] = value

    def record_delivery(self, delivery, request_start: float | None, now: float) -> None:
        """A request's answer (decode_rounds.Delivery); ``request_start`` and ``now`` in seconds since the epoch."""
        timed = delivery.first_audio and request_start is not None
        if not timed and not delivery.stall > 0:
            return  # most answers: nothing to record, no lock taken
        with self._lock:
            if timed and request_start is not None:  # (timed says it is)
                self._first_audio_seconds.append(max(0.0, now - request_start))
            if delivery.stall > 0:
                self._grow(stalls=1, stall_seconds=delivery.stall)

    def publish(self) -> None:
        """Send Triton what changed since the last publish: gauges with a new value, counters' growth, and
        the first-audio times observed meanwhile."""
        if self._callers is not None and time.monotonic() >= self._callers_due:
            self._callers_due = time.monotonic() + CALLERS_COUNT_SECONDS
            if (held := self._callers()) is not None:
                self.record_gauge("callers", held)
        with self._lock:
            gauges = {name: value for name, value in self._gauge_values.items()
                      if self._published_gauges.get(name) != value}
            self._gauge_values = {}
            growth, self._growth = self._growth, dict.fromkeys(self.counters, 0.0)
            first_audio, self._first_audio_seconds = self._first_audio_seconds, []
        # Each update on its own: what a failed one was to send goes back for the next publish (a gauge's
        # last value, else never sent again once the decoder idles; a counter's growth; a histogram's times).
        failures: list[Exception] = []

        def sent(update: Callable[[], None]) -> bool:
            try:
                update()
            except Exception as failure:  # noqa: BLE001 (kept for the next publish, raised below)
                failures.append(failure)
                return False
            return True

        unsent_gauges = {}
        for name, value in gauges.items():
            if sent(functools.partial(self.gauges[name].set, value)):
                self._published_gauges[name] = value
            else:
                unsent_gauges[name] = value
        unsent_growth = {name: value for name, value in growth.items()
                         if value and not sent(functools.partial(self.counters[name].increment, value))}
        unsent_times = [seconds for seconds in first_audio
                        if not sent(functools.partial(self.first_audio.observe, seconds))]
        if failures:
            with self._lock:
                self._gauge_values = unsent_gauges | self._gauge_values  # a newer value wins
                self._grow(**unsent_growth)
                self._first_audio_seconds = unsent_times + self._first_audio_seconds
            raise failures[0]

    def _grow(self, **growth: float) -> None:
        for name, value in growth.items():
            self._growth[name] += value


def family_totals(page: str, names: Iterable[str]) -> dict[str, float]:
    """Each of ``names``' metric families on a /metrics page (Prometheus text), summed over its label sets
    (models, instances); a family the page lacks is left out."""
    wanted, totals = set(names), dict[str, float]()
    for line in page.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


@dataclass(frozen=True)
class ListenerFigures:
    """The listener metrics of a /metrics page (Prometheus text), or the difference of two pages, and
    beside them the counters that say where the server's time went (``LOAD_METRICS``: the decoder's busy
    seconds, what bounds a small machine; the LLM engine's steps and busy seconds on a GPU)."""

    first_audio_buckets: dict[float, float]  # upper bound (s) -> requests with first audio within it
    stalls: float = 0.0
    stall_seconds: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)  # LOAD_METRICS name -> value (summed over models)

    @classmethod
    def parse(cls, text: str) -> ListenerFigures:
        buckets, values = {}, {}
        for line in text.splitlines():
            name, _, rest = line.partition("{")
            if name == FIRST_AUDIO_METRIC + "_bucket":
                bound = rest.split('le="', 1)[1].split('"', 1)[0]
                buckets[math.inf if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
            elif name in (STALLS_METRIC, STALL_SECONDS_METRIC):
                values[name] = float(line.rsplit(" ", 1)[1])
        return cls(buckets, values.get(STALLS_METRIC, 0.0), values.get(STALL_SECONDS_METRIC, 0.0),
                   family_totals(text, LOAD_METRICS))

    def __sub__(self, before: ListenerFigures) -> ListenerFigures:
        return ListenerFigures({bound: count - before.first_audio_buckets.get(bound, 0.0)
                                for bound, count in self.first_audio_buckets.items()},
                               self.stalls - before.stalls, self.stall_seconds - before.stall_seconds,
                               {name: value - before.counters.get(name, 0.0) for name, value in self.counters.items()})

    @property
    def decoder_busy_seconds(self) -> float:
        return self.counters.get(DECODER_BUSY_METRIC, 0.0)

    def load(self, seconds: float) -> dict[str, float]:
        """Where the time of a level of ``seconds`` went (this object: the difference of its two pages), as
        rates: the decoder's and the LLM engine's busy shares (1 = saturated), SNAC windows a second and per
        call, engine steps a second, their mean length and tokens per step, and the mean number of streams
        holding an engine slot and of requests waiting for one (set beside the client's streams in flight,
        where the others are: before the engine or after it). A figure whose counters the server lacks is left out
        (the TensorRT-LLM repository has no engine counters of ours)."""
        c, seconds = self.counters, max(seconds, 1e-9)
        figures = {"decoder_busy": c.get(DECODER_BUSY_METRIC), "llm_busy": c.get(LLM_BUSY_METRIC),
                   "decoder_windows_per_s": c.get(DECODER_WINDOWS_METRIC), "llm_steps_per_s": c.get(LLM_STEPS_METRIC),
                   "llm_tokens_per_s": c.get(LLM_TOKENS_METRIC), "llm_streams": c.get(LLM_STREAM_SECONDS_METRIC),
                   "llm_queued": c.get(LLM_QUEUED_SECONDS_METRIC)}
        out = {name: round(value / seconds, 3) for name, value in figures.items() if value is not None}
        if c.get(DECODER_CALLS_METRIC):
            out["decoder_windows_per_call"] = round(c.get(DECODER_WINDOWS_METRIC, 0.0) / c[DECODER_CALLS_METRIC], 2)
        if c.get(LLM_STEPS_METRIC):
            out["llm_tokens_per_step"] = round(c.get(LLM_TOKENS_METRIC, 0.0) / c[LLM_STEPS_METRIC], 2)
            if c.get(LLM_BUSY_METRIC) is not None:  # a served step's length, beside the engine bench's alone
                out["llm_step_ms"] = round(1000 * c[LLM_BUSY_METRIC] / c[LLM_STEPS_METRIC], 3)
        return out

    @property
    def first_audio_count(self) -> int:
        return int(self.first_audio_buckets.get(math.inf, 0.0))

    def first_audio_quantile(self, q: float) -> float | None:
        """The q-quantile of time to first audio, interpolated within its bucket as Prometheus'
        histogram_quantile does (None without observations; the largest finite bound beyond it)."""
        total = self.first_audio_count
        if not total:
            return None
        lower, below = 0.0, 0.0
        for bound in sorted(self.first_audio_buckets):
            count = self.first_audio_buckets[bound]
            if count >= q * total:
                if math.isinf(bound):
                    return lower
                return lower + (bound - lower) * (q * total - below) / max(count - below, 1e-12)
            lower, below = bound, count
        return lower

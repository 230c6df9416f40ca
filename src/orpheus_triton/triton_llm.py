"""Building the torch LLM engine from a model config's parameters, and its Prometheus metrics."""

from __future__ import annotations

import logging
import os
import time

import torch

from .constants import LLM_MODEL
from .engine import InflightEngine, default_max_streams
from .llama import load_llama
from .metrics import (
    LLM_ACTIVE_STREAMS_METRIC,
    LLM_BUSY_METRIC,
    LLM_QUEUED_METRIC,
    LLM_QUEUED_SECONDS_METRIC,
    LLM_STEPS_METRIC,
    LLM_STREAM_SECONDS_METRIC,
    LLM_TOKENS_METRIC,
    MetricSet,
    PublishedMetrics,
)
from .repository import parse_cpu_threads

log = logging.getLogger(__name__)


def pick_device(name: str) -> str:
    """'auto' -> cuda when a GPU is visible, else cpu; anything else is used as given."""
    if name in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def set_cpu_threads(params: dict[str, str], device: str) -> int:
    """Apply a model's ``cpu_threads`` parameter; return the intra-op thread count now in use.

    Each Python model runs in its own process with its own thread pool. With a
    thread per core in both the LLM and the SNAC decoder, the two oversubscribe
    the cores and their busy-waiting threads stall each other: on 2 cores that
    alone made streams stutter. "auto" (the default) gives each half the cores
    on CPU and leaves torch's default on GPU; a number sets it.
    """
    threads = parse_cpu_threads(params.get("cpu_threads", "auto"))
    if threads is None:
        if device != "cpu":
            return torch.get_num_threads()
        threads = max(1, len(os.sched_getaffinity(0)) // 2)
    torch.set_num_threads(threads)
    return threads


def overlap_setting(value: str) -> bool | None:
    """The llm model's ``overlap`` parameter: None for auto (the engine's default: on a GPU), or on or off."""
    value = (value or "auto").strip().lower()
    if value not in ("auto", "true", "false"):
        raise ValueError(f"overlap must be auto, true or false, got {value!r}")
    return None if value == "auto" else value == "true"


def build_engine(params: dict[str, str]) -> InflightEngine:
    device = pick_device(params.get("device", "auto"))
    threads = set_cpu_threads(params, device)
    overlap = overlap_setting(params.get("overlap", "auto"))  # a wrong value says so before the weights load
    model = load_llama(params["llm_dir"], device=device)
    max_seq_len = int(params.get("max_seq_len", 2048))
    engine = InflightEngine(
        model,
        # 0: by device, fewer where its memory holds fewer (engine.default_max_streams)
        max_streams=int(params.get("max_streams", 0)) or default_max_streams(model, max_seq_len),
        max_seq_len=max_seq_len,
        max_queue=int(params.get("max_queue", 256)),
        prefill_chunk=int(params.get("prefill_chunk", 0)) or None,  # 0: the engine's default for its device
        graph_sampling=params.get("graph_sampling", "true").strip().lower() == "true",
        overlap=overlap,
        max_queue_seconds=float(params.get("max_queue_seconds", 0)),
    )
    log.info("torch LLM engine on %s: %d streams x %d positions, prefill %d tokens a step, %d CPU threads, "
             "graph sampling %s, overlap %s", device, engine.max_streams, engine.max_seq_len, engine.prefill_chunk,
             threads, "on" if engine.sampler is not None else "off", "on" if engine.overlap else "off")
    if engine.decoder is not None:
        log.info("decode attention: %s", "per-row key lengths (FlashAttention varlen)" if engine.decoder.varlen
                 else "masked, keys up to the longest row")
    started = time.perf_counter()
    graphs = engine.capture_graphs()
    if graphs:
        log.info("captured %d CUDA graphs (decode steps, short prompts' prefills, sampling) in %.1f s", graphs,
                 time.perf_counter() - started)
    return engine


class EngineMetrics(PublishedMetrics):
    """Engine gauges and counters as Triton custom metrics (served on the server's /metrics), read from the
    engine's stats and published every ``interval`` seconds by thread ``llm-metrics``."""

    def __init__(self, pb_utils, engine: InflightEngine, active, interval: float | None = 0.5):
        metrics = MetricSet(pb_utils, LLM_MODEL)
        self.metrics = metrics
        gauge = metrics.gauge
        self.engine = engine
        self.active = active
        self.active_streams = gauge(LLM_ACTIVE_STREAMS_METRIC, "Streams holding a KV-cache slot")
        self.queued = gauge(LLM_QUEUED_METRIC, "Requests waiting for a free slot")
        # One step of hundreds a second, and kept while idle: averages are the counters' rates.
        self.step_seconds = gauge("orpheus_llm_step_seconds", "Duration of the last engine step (for the mean: "
                                  "rate of orpheus_llm_busy_seconds_total / rate of orpheus_llm_steps_total)")
        self.batch_size = gauge("orpheus_llm_decode_batch_size", "Streams in the last batched decode")
        self.tokens_per_second = gauge("orpheus_llm_tokens_per_second", "Tokens generated per second, all streams")
        # Engine counters (EngineStats fields) and the metric each one's growth is added to.
        self.counters = {
            "tokens_generated": metrics.counter(LLM_TOKENS_METRIC, "Tokens generated"),
            "steps": metrics.counter(LLM_STEPS_METRIC, "Engine steps (tokens per step: the batching achieved)"),
            "busy_seconds": metrics.counter(LLM_BUSY_METRIC, "Seconds the engine loop spent in steps: its rate is "
                                            "the share of time it is busy (1 = saturated)"),
            "stream_seconds": metrics.counter(LLM_STREAM_SECONDS_METRIC, "Streams holding a slot, integrated over "
                                              "time: its rate is the mean number of streams in the engine"),
            "queued_seconds": metrics.counter(LLM_QUEUED_SECONDS_METRIC, "Requests waiting for a slot, integrated "
                                              "over time: its rate is the mean number waiting"),
            "cancelled": metrics.counter("orpheus_llm_cancelled_requests_total", "Streams whose generation "
                                         "ended early: by a stop, or by the client cancelling its llm request "
                                         "(an ensemble's cancellation does not reach it)"),
            "timed_out": metrics.counter("orpheus_llm_timed_out_requests_total", "Requests refused after "
                                         "waiting max_queue_seconds for a stream slot"),
            "queue_full": metrics.counter("orpheus_llm_queue_full_requests_total", "Requests refused at once "
                                          "(server busy): max_queue requests were already waiting for a slot"),
            "capped": metrics.counter("orpheus_llm_capped_requests_total", "Streams cut off at max_tokens before "
                                      "end of speech (their last words are missing)"),
        }
        self._reported = dict.fromkeys(self.counters, 0)
        self._rated = (0, time.monotonic())  # tokens generated, and when, at the last rate sent
        self._start_publishing(interval, "llm-metrics")

    def publish(self) -> None:
        """The gauges as the engine's stats have them, each counter's growth since the last publish, and the
        tokens a second over that time."""
        stats = self.engine.stats
        # Tokens a second since the last rate sent (a failed update leaves its tokens and time to the next).
        tokens, now = stats.tokens_generated, time.monotonic()
        self.tokens_per_second.set((tokens - self._rated[0]) / max(now - self._rated[1], 1e-9))
        self._rated = (tokens, now)
        self.active_streams.set(stats.active_streams)
        self.queued.set(stats.queued_requests)
        self.step_seconds.set(stats.last_step_seconds)
        self.batch_size.set(stats.last_batch_size)
        for field, counter in self.counters.items():
            growth = getattr(stats, field) - self._reported[field]
            if growth:
                counter.increment(growth)
            self._reported[field] += growth  # only once sent: a failed increment's growth goes next time

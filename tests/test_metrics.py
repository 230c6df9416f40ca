"""Metric objects are let go in finalize(), metrics before their families (metrics.release)."""

from __future__ import annotations

import gc
import math

import pytest

from orpheus_triton.metrics import DecoderMetrics, release


class FakePbUtils:
    """MetricFamily/Metric stand-ins that record the order they are destroyed in."""

    destroyed: list[str] = []

    class MetricFamily:
        GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels, buckets=None):  # noqa: N802 (Triton's name)
            return FakePbUtils.Metric(self.name)

        def __del__(self):
            FakePbUtils.destroyed.append(f"family {self.name}")

    class Metric:
        def __init__(self, name):
            self.name = name
            self.values = []

        def observe(self, value):
            self.values.append(value)

        def increment(self, value):
            self.values.append(value)

        def set(self, value):
            self.values.append(value)

        def __del__(self):
            FakePbUtils.destroyed.append(f"metric {self.name}")


def test_release_drops_every_metric_before_any_family():
    FakePbUtils.destroyed = []
    metrics = DecoderMetrics(FakePbUtils, interval=None)
    release(metrics)
    gc.collect()
    kinds = [entry.split()[0] for entry in FakePbUtils.destroyed]
    assert kinds == ["metric"] * 13 + ["family"] * 13
    assert not hasattr(metrics, "gauges") and metrics.metrics.families == []


def test_a_stop_that_drops_a_stream_is_counted_once():
    metrics = DecoderMetrics(FakePbUtils, interval=None)
    metrics.record_stopped()
    metrics.publish()
    metrics.publish()  # nothing new: nothing more sent
    assert sum(metrics.counters["stopped_streams"].values) == 1
    release(metrics)


def test_engine_counters_report_their_growth_and_are_released_before_their_families():
    import time
    from types import SimpleNamespace

    from orpheus_triton.engine import EngineStats
    from orpheus_triton.triton_llm import EngineMetrics

    FakePbUtils.destroyed = []
    engine = SimpleNamespace(stats=EngineStats())
    metrics = EngineMetrics(FakePbUtils, engine, active=None, interval=0.01)
    capped, tokens = metrics.counters["capped"].values, metrics.counters["tokens_generated"].values
    busy = metrics.counters["busy_seconds"].values
    held, waiting = metrics.counters["stream_seconds"].values, metrics.counters["queued_seconds"].values
    engine.stats.capped, engine.stats.tokens_generated, engine.stats.busy_seconds = 2, 70, 0.5
    engine.stats.stream_seconds, engine.stats.queued_seconds = 12.25, 0.75
    deadline = time.monotonic() + 5
    while sum(capped) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert metrics._thread.name == "llm-metrics"
    engine.stats.capped = 3
    metrics.stop()  # what the thread had not sent yet goes out before the metrics are released
    assert sum(capped) == 3 and sum(tokens) == 70  # each counter grew by its field's growth, once
    assert sum(busy) == 0.5 and sum(held) == 12.25 and sum(waiting) == 0.75  # seconds, not only whole numbers
    gc.collect()
    assert FakePbUtils.destroyed.index("metric orpheus_llm_capped_requests_total") < FakePbUtils.destroyed.index(
        "family orpheus_llm_capped_requests_total")
    kinds = [entry.split()[0] for entry in FakePbUtils.destroyed]
    assert kinds == sorted(kinds, key=lambda kind: kind == "family")  # every metric before any family
    assert not hasattr(metrics, "counters")


def test_deliveries_feed_first_audio_and_stall_metrics():
    from orpheus_triton.decode_rounds import Delivery

    metrics = DecoderMetrics(FakePbUtils, interval=None)
    metrics.record_delivery(Delivery(first_audio=True), request_start=100.0, now=100.25)
    metrics.record_delivery(Delivery(first_audio=True), request_start=None, now=101.0)  # no start given
    metrics.record_delivery(Delivery(), request_start=100.0, now=101.0)
    metrics.record_delivery(Delivery(stall=0.04), request_start=100.0, now=102.0)
    assert metrics.first_audio.values == []  # held until published
    metrics.publish()
    assert metrics.first_audio.values == [0.25]
    assert metrics.counters["stalls"].values == [1] and metrics.counters["stall_seconds"].values == [0.04]


def test_decoder_metrics_send_triton_only_what_changed_since_the_last_publish():
    """Each update is a round trip to the server: a round's eight became one publish every 0.1 s at most."""
    metrics = DecoderMetrics(FakePbUtils, interval=None)
    for round_windows in (3, 5):
        metrics.record_call(round_windows, 0.01)
        metrics.record_busy(0.02)
        metrics.record_queued(0)
        metrics.record_streams(4)
    metrics.publish()
    calls, windows = metrics.counters["calls"].values, metrics.counters["windows"].values
    assert calls == [2] and windows == [8] and metrics.counters["busy_seconds"].values == [0.04]
    assert metrics.gauges["call_windows"].values == [5] and metrics.gauges["streams"].values == [4]
    metrics.record_streams(4)  # the same value again: nothing to send
    metrics.record_queued(2)
    metrics.publish()
    metrics.publish()  # nothing changed: no round trip at all
    assert metrics.gauges["streams"].values == [4] and metrics.gauges["queued"].values == [0, 2]
    assert calls == [2] and metrics.counters["stalls"].values == []


def test_decoder_metrics_thread_publishes_and_stop_publishes_the_rest():
    import time

    metrics = DecoderMetrics(FakePbUtils, interval=0.01)
    windows = metrics.counters["windows"].values
    metrics.record_call(7, 0.01)
    deadline = time.monotonic() + 5
    while not windows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert windows == [7] and metrics._thread.name == "decoder-metrics"
    metrics.record_call(2, 0.01)
    metrics.stop()  # whatever the thread had not sent yet goes out before the metrics are released
    assert sum(windows) == 9 and not hasattr(metrics, "counters")


def test_a_failed_publish_is_logged_and_the_thread_goes_on(caplog):
    import time

    metrics = DecoderMetrics(FakePbUtils, interval=0.01)
    windows = metrics.counters["windows"].values
    failures = [RuntimeError("metric update refused")]
    publish = metrics.publish

    def failing_once():
        if failures:
            raise failures.pop()
        publish()

    metrics.publish = failing_once
    metrics.record_call(3, 0.01)
    deadline = time.monotonic() + 5
    while not windows and time.monotonic() < deadline:
        time.sleep(0.01)
    metrics.stop()
    assert windows == [3]
    assert "decoder-metrics: publishing failed: metric update refused" in caplog.text


def refusing(metric, times: int = 1):
    """Make ``metric``'s next ``times`` updates fail, as a refused round trip to the server would."""
    left = [times]
    for name in ("set", "increment", "observe"):
        update = getattr(metric, name)

        def failing(value, update=update):
            if left[0] > 0:
                left[0] -= 1
                raise RuntimeError("update refused")
            update(value)

        setattr(metric, name, failing)


def test_a_failed_update_leaves_what_it_was_to_send_for_the_next_publish():
    """A publish took everything pending before sending any of it: a failed update lost the rest (counters'
    growth, first-audio times, a gauge's last value, never sent again once the decoder idled)."""
    from orpheus_triton.decode_rounds import Delivery

    metrics = DecoderMetrics(FakePbUtils, interval=None)
    metrics.record_call(5, 0.01)
    metrics.record_streams(4)
    metrics.record_delivery(Delivery(first_audio=True), request_start=1.0, now=1.25)
    refusing(metrics.counters["calls"])
    refusing(metrics.gauges["streams"])
    with pytest.raises(RuntimeError, match="update refused"):
        metrics.publish()
    metrics.record_streams(0)  # a newer value than the one refused: it is the one sent
    metrics.publish()
    assert metrics.counters["calls"].values == [1] and metrics.counters["windows"].values == [5]
    assert metrics.first_audio.values == [0.25] and metrics.gauges["streams"].values == [0]
    metrics.stop()  # released even when its last publish fails
    assert not hasattr(metrics, "counters")
    failing = DecoderMetrics(FakePbUtils, interval=None)
    failing.record_call(1, 0.01)
    refusing(failing.counters["windows"])
    with pytest.raises(RuntimeError):
        failing.stop()
    assert not hasattr(failing, "counters")


def test_a_failed_engine_counter_update_is_sent_next_time_and_the_token_rate_stays_right():
    import time
    from types import SimpleNamespace

    from orpheus_triton.engine import EngineStats
    from orpheus_triton.triton_llm import EngineMetrics

    engine = SimpleNamespace(stats=EngineStats())
    metrics = EngineMetrics(FakePbUtils, engine, active=None, interval=None)
    metrics._rated = (0, time.monotonic() - 1.0)  # the last rate one second ago
    engine.stats.steps, engine.stats.tokens_generated = 10, 100
    refusing(metrics.counters["steps"])
    with pytest.raises(RuntimeError):
        metrics.publish()
    engine.stats.steps, engine.stats.tokens_generated = 20, 200
    metrics._rated = (metrics._rated[0], metrics._rated[1] - 1.0)  # a second later
    metrics.publish()
    assert sum(metrics.counters["steps"].values) == 20 and sum(metrics.counters["tokens_generated"].values) == 200
    assert all(rate == pytest.approx(100, rel=0.05) for rate in metrics.tokens_per_second.values)
    release(metrics)


PAGE = """# TYPE orpheus_time_to_first_audio_seconds histogram
orpheus_time_to_first_audio_seconds_count{model="snac_decoder"} 10
orpheus_time_to_first_audio_seconds_bucket{model="snac_decoder",le="0.1"} 2
orpheus_time_to_first_audio_seconds_bucket{model="snac_decoder",le="0.2"} 8
orpheus_time_to_first_audio_seconds_bucket{model="snac_decoder",le="0.5"} 10
orpheus_time_to_first_audio_seconds_bucket{model="snac_decoder",le="+Inf"} 10
orpheus_decoder_stalls_total{model="snac_decoder"} 3
orpheus_decoder_stall_seconds_total{model="snac_decoder"} 0.25
orpheus_decoder_busy_seconds_total{model="snac_decoder"} 4.5
orpheus_decoder_windows_total{model="snac_decoder"} 300
orpheus_decoder_calls_total{model="snac_decoder"} 60
orpheus_llm_generated_tokens_total{model="llm"} 4000
orpheus_llm_steps_total{model="llm"} 500
orpheus_llm_busy_seconds_total{model="llm"} 8
orpheus_llm_stream_seconds_total{model="llm"} 90
orpheus_llm_queued_seconds_total{model="llm"} 12
"""


def test_listener_figures_from_the_metrics_page_and_their_difference():
    from orpheus_triton.metrics import ListenerFigures

    page = ListenerFigures.parse(PAGE)
    assert page.first_audio_count == 10 and page.stalls == 3 and page.stall_seconds == 0.25
    assert page.decoder_busy_seconds == 4.5
    assert page.first_audio_quantile(0.5) == pytest.approx(0.1 + 0.1 * (5 - 2) / 6)  # within (0.1, 0.2]
    assert page.first_audio_quantile(0.1) == pytest.approx(0.05)  # within (0, 0.1]
    assert page.first_audio_quantile(1.0) == pytest.approx(0.5)
    earlier = ListenerFigures.parse(PAGE.replace("} 8", "} 6").replace("} 10", "} 6").replace("} 3", "} 1")
                                    .replace("} 4.5", "} 1.5"))
    level = page - earlier  # what one benchmark level added: 4 requests, 2 in (0.1, 0.2], 2 in (0.2, 0.5]
    assert level.first_audio_count == 4 and level.stalls == 2 and level.decoder_busy_seconds == 3.0
    assert level.first_audio_quantile(0.5) == pytest.approx(0.2)
    assert level.first_audio_quantile(0.75) == pytest.approx(0.2 + 0.3 * (3 - 2) / 2)
    assert ListenerFigures.parse("").first_audio_quantile(0.5) is None
    # where a level's time went: the difference of two pages, over the level's seconds
    earlier = ListenerFigures.parse(PAGE.replace("} 300", "} 100").replace("} 60", "} 20").replace("} 4000", "} 2000")
                                    .replace("} 500", "} 250").replace("} 8\n", "} 3\n").replace("} 4.5", "} 2.5")
                                    .replace("} 90", "} 10").replace("} 12", "} 7"))
    assert (page - earlier).load(10.0) == {
        "decoder_busy": 0.2, "llm_busy": 0.5, "decoder_windows_per_s": 20.0, "llm_steps_per_s": 25.0,
        "llm_tokens_per_s": 200.0, "decoder_windows_per_call": 5.0, "llm_tokens_per_step": 8.0,
        "llm_streams": 8.0, "llm_queued": 0.5,  # mean streams in the engine's slots and waiting for one
        "llm_step_ms": 20.0}  # 5 busy seconds over 250 steps
    assert ListenerFigures.parse(PAGE.split("orpheus_llm")[0]).load(1.0).keys() == {  # no engine counters
        "decoder_busy", "decoder_windows_per_s", "decoder_windows_per_call"}
    # beyond the last finite bound: that bound, as Prometheus gives
    late = ListenerFigures({0.5: 1.0, math.inf: 4.0})
    assert late.first_audio_quantile(0.99) == 0.5


def test_the_callers_in_flight_are_counted_at_most_once_a_second_and_only_where_counted(monkeypatch):
    from orpheus_triton import metrics as metrics_module

    assert "callers" not in DecoderMetrics(FakePbUtils, interval=None).gauges  # a server counting none
    counts = iter([3, 2, 0])
    metrics = DecoderMetrics(FakePbUtils, interval=None, callers=lambda: next(counts))
    now = [100.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: now[0])
    metrics.publish()
    metrics.publish()  # within the second: not counted again
    now[0] += metrics_module.CALLERS_COUNT_SECONDS
    metrics.publish()
    assert metrics.gauges["callers"].values == [3, 2]

    def gone():
        return None  # the leases' folder cannot be read (CallerLeases.count says so in the log)

    failing = DecoderMetrics(FakePbUtils, interval=None, callers=gone)
    failing.record_streams(4)
    failing.publish()  # the other figures still go out
    assert failing.gauges["streams"].values == [4] and failing.gauges["callers"].values == []
    release(metrics)
    release(failing)

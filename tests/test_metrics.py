"""Metric objects are let go in finalize(), metrics before their families (metrics.release)."""

from __future__ import annotations

import gc

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

        def __del__(self):
            FakePbUtils.destroyed.append(f"metric {self.name}")


def test_release_drops_every_metric_before_any_family():
    FakePbUtils.destroyed = []
    metrics = DecoderMetrics(FakePbUtils)
    release(metrics)
    gc.collect()
    kinds = [entry.split()[0] for entry in FakePbUtils.destroyed]
    assert kinds == ["metric"] * 9 + ["family"] * 9
    assert not hasattr(metrics, "streams") and metrics.metrics.families == []


def test_deliveries_feed_first_audio_and_stall_metrics():
    from orpheus_triton.serving import Delivery

    metrics = DecoderMetrics(FakePbUtils)
    metrics.record_delivery(Delivery(first_audio=True), request_start=100.0, now=100.25)
    metrics.record_delivery(Delivery(first_audio=True), request_start=None, now=101.0)  # no start given
    metrics.record_delivery(Delivery(), request_start=100.0, now=101.0)
    metrics.record_delivery(Delivery(stall=0.04), request_start=100.0, now=102.0)
    assert metrics.first_audio.values == [0.25]
    assert metrics.stalls.values == [1] and metrics.stall_seconds.values == [0.04]

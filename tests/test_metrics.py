"""Metric objects are let go in finalize(), metrics before their families (metrics.release)."""

from __future__ import annotations

import gc

from orpheus_triton.metrics import DecoderMetrics, release


class FakePbUtils:
    """MetricFamily/Metric stand-ins that record the order they are destroyed in."""

    destroyed: list[str] = []

    class MetricFamily:
        GAUGE, COUNTER = "gauge", "counter"

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels):  # noqa: N802 (Triton's name)
            return FakePbUtils.Metric(self.name)

        def __del__(self):
            FakePbUtils.destroyed.append(f"family {self.name}")

    class Metric:
        def __init__(self, name):
            self.name = name

        def __del__(self):
            FakePbUtils.destroyed.append(f"metric {self.name}")


def test_release_drops_every_metric_before_any_family():
    FakePbUtils.destroyed = []
    metrics = DecoderMetrics(FakePbUtils)
    release(metrics)
    gc.collect()
    kinds = [entry.split()[0] for entry in FakePbUtils.destroyed]
    assert kinds == ["metric"] * 6 + ["family"] * 6
    assert not hasattr(metrics, "streams") and metrics.metrics.families == []

"""Shared fixtures: a tiny random model set in upstream formats, and a real tritonserver serving it."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from orpheus_triton.demo_models import ModelSet, write_model_set

TINY_LLM = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128}


@pytest.fixture(scope="session")
def model_set(tmp_path_factory) -> ModelSet:
    return write_model_set(tmp_path_factory.mktemp("models"), llm_shape=TINY_LLM, seed=1)


def server_settings(model_set, **overrides):
    """The repository settings of the test servers: the tiny model set on CPU, 4 streams of up to 8,192
    positions (room for test_server's LONG_STREAM_TOKENS)."""
    from orpheus_triton.repository import RepositorySettings

    return RepositorySettings(**{
        "llm_dir": str(model_set.llm), "snac_dir": str(model_set.snac), "device": "cpu", "max_streams": 4,
        "max_seq_len": 8192, "preprocessing_instances": 1,
        # As on GPU, the decoder's answers on two lanes (each stream's on one of them); the serve-command
        # tests run them inline.
        "llm_response_thread": "true", "decoder_response_thread": "2",
    } | overrides)


def metrics_page(server) -> str:
    """A ``running_server``'s /metrics page."""
    import urllib.request

    return urllib.request.urlopen(f"http://localhost:{server.ports.metrics}/metrics", timeout=10).read().decode()


def server_metrics(server, *names: str) -> list[float]:
    """The values of metrics ``names`` (each its first line), read from one look at a ``running_server``'s
    /metrics page."""
    lines = metrics_page(server).splitlines()
    return [float(next(line for line in lines if line.startswith(name)).split()[-1]) for name in names]


def metric_series(server, name: str) -> list[float]:
    """The values of every series of metric ``name`` (one per model instance, say)."""
    return [float(line.split()[-1]) for line in metrics_page(server).splitlines() if line.startswith(name + "{")]


def server_metric(server, name: str) -> float:
    """The value of metric ``name`` (its first line) on a ``running_server``'s /metrics page."""
    return server_metrics(server, name)[0]


def wait_for_metric(server, name: str, predicate, timeout: float = 30.0) -> float:
    """Metric ``name`` once ``predicate`` holds for it, looked at every 0.1 s (the decoder publishes its
    metrics that often, the engine every 0.5 s); fails with its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate(value := server_metric(server, name)):
        assert time.monotonic() < deadline, f"{name} is still {value} after {timeout:g} s"
        time.sleep(0.1)
    return value


def settled_server_metric(server, name: str) -> float:
    """A metric after the models' metrics threads (the engine's every 0.5 s, the decoder's every 0.1 s) have
    reported earlier events."""
    time.sleep(1.1)
    return server_metric(server, name)


@contextlib.contextmanager
def running_server(repository: Path, work: Path, extra: list[str] | None = None,
                   environment: dict[str, str] | None = None):
    """A real tritonserver on free ports serving ``repository`` (``extra``: more tritonserver options,
    ``environment``: more of its environment); yields the process (``.ports``, ``.log_path``)."""
    from orpheus_triton.server import Ports, start_server, stop_server, wait_until_ready

    ports = Ports.free()
    log_path = work / "server.log"
    with open(log_path, "w") as log:
        process = start_server(repository, ports, log_file=log, extra=extra, environment=environment)
        process.started = time.time()
        try:
            wait_until_ready(process, f"localhost:{ports.grpc}", timeout=180)
        except Exception:
            process.kill()
            raise RuntimeError(f"server did not start:\n{Path(log_path).read_text()[-4000:]}") from None
        process.ports = ports
        process.log_path = log_path
        try:
            yield process
        finally:  # a failing test must not leave its server running
            stop_server(process, timeout=30)


@pytest.fixture(scope="session")
def server(model_set, tmp_path_factory):
    """A real tritonserver with the rendered repository, counting its callers in flight as `serve` has it
    do (``.callers``: their leases); yields the process."""
    from orpheus_triton.callers import CallerLeases
    from orpheus_triton.constants import CALLERS_DIR_ENV
    from orpheus_triton.repository import render

    work = tmp_path_factory.mktemp("server")
    os.environ.setdefault("ORPHEUS_TRITON_CACHE", str(work / "cache"))
    callers = {CALLERS_DIR_ENV: str(work / "callers")}
    with running_server(render(server_settings(model_set), work / "repository"), work, environment=callers) as process:
        process.callers = CallerLeases(work / "callers")
        yield process


@pytest.fixture
def flash_reference(monkeypatch):
    """The engine's FlashAttention call (CUDA only) answered by a plain-torch reference of what it computes."""
    from flash_reference import flash_attention_forward

    from orpheus_triton import llama

    monkeypatch.setattr(llama, "_flash_attention", flash_attention_forward)


@pytest.fixture
def grpc_url(server) -> str:
    return f"localhost:{server.ports.grpc}"

"""perf/gpu/check_gpu.py, the first thing a lent GPU runs, run here on the CPU with its stand-ins,
so that its own faults show before it spends GPU time."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_check_gpu():
    spec = importlib.util.spec_from_file_location("check_gpu", ROOT / "perf" / "gpu" / "check_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_runs_every_check_on_a_cpu(tmp_path, capsys):
    check_gpu = load_check_gpu()
    assert check_gpu.main(["--device", "cpu", "--shape", "tiny", "--snac-round", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "check_gpu.json").read_text())
    checks = result["checks"]
    assert result["failed"] == [] and set(checks) == {"decode_attention", "cuda_graphs", "device_vs_cpu",
                                                      "engine_run", "overlap", "prefill_graphs", "overlap_waits",
                                                      "sampling", "graph_sampling", "snac", "calibration",
                                                      "new_shapes", "served_stream"}
    cuda_only = {"decode_attention", "overlap_waits"}
    assert all(checks[name]["ok"] == check_gpu.NOT_APPLICABLE for name in cuda_only)
    assert all(checks[name]["ok"] is True for name in checks if name not in cuda_only)
    assert checks["served_stream"]["audio_seconds"] > 0 and checks["served_stream"]["first_audio_ms"] > 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    # the served check's server log and its stages stay where a step's time limit cannot take them
    assert "served_stream: server ready after" in out
    assert "successfully loaded 'orpheus'" in (tmp_path / "served_stream_server.log").read_text()


def test_the_prefill_graph_check_reports_refused_graphs_instead_of_failing(tmp_path, monkeypatch):
    """With the prefill graphs refused (bucket() None) the check's timing unpacked None: a TypeError was all
    it reported, in the one case it exists to diagnose. Now it says the graphs are not in use, and compares."""
    from orpheus_triton.demo_models import write_random_llama
    from orpheus_triton.llama import BucketedPrefill, load_llama

    check_gpu = load_check_gpu()
    write_random_llama(tmp_path, check_gpu.SHAPES["tiny"], seed=1)
    monkeypatch.setattr(BucketedPrefill, "bucket", lambda self, rows, width: None)
    result = check_gpu.check_prefill_graphs(torch.device("cpu"), load_llama(tmp_path))
    assert result["graphs_in_use"] is False and result["same_streams"] == "8 of 8"
    assert "prefill_2x40_ms" not in result


def test_a_gpu_check_run_cut_short_keeps_the_checks_it_did(tmp_path, monkeypatch):
    """A lent GPU's step limit can end the script mid-way: check_gpu.json is written after every check."""
    check_gpu = load_check_gpu()

    def cut_short(*args):
        raise KeyboardInterrupt("the step's time is up")

    monkeypatch.setattr(check_gpu, "check_snac", cut_short)
    with pytest.raises(KeyboardInterrupt):
        check_gpu.main(["--device", "cpu", "--shape", "tiny", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "check_gpu.json").read_text())
    assert list(result["checks"])[-1] == "graph_sampling" and result["failed"] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_refuses_cuda_where_there_is_none(tmp_path, capsys):
    assert load_check_gpu().main(["--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_step_profiler_runs_on_a_cpu(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "perf"))
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "perf" / "gpu" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--shape", "demo", "--device", "cpu", "--streams", "1,2", "--steps", "2",
                        "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    assert set(result["profiles"]) == {"1", "2"}
    for profiled in result["profiles"].values():
        assert profiled["step_ms"] > 0 and profiled["top_host"]  # no device here: host operators only
        assert profiled["kernels_per_step"] == 0
    assert "## 2 streams" in (tmp_path / "profile.md").read_text()


def test_the_overlap_wait_check_counts_waits_and_not_the_sync_debug_modes_notice():
    """torch warns once that CUDA's sync debug mode is a prototype; its text names synchronizing operations,
    and the check counted it as a wait (an H200 run's overlap_waits failed on that notice alone)."""
    import warnings

    check_gpu = load_check_gpu()

    def warning(text: str) -> warnings.WarningMessage:
        return warnings.WarningMessage(UserWarning(text), UserWarning, "/torch/cuda/__init__.py", 1270)

    notice = warning("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing "
                     "operations (Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:206.)")
    wait = warning("called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.h:148.)")
    assert check_gpu.sync_waits([notice]) == []
    assert check_gpu.sync_waits([notice, wait, warning("an unrelated warning")]) == [
        "__init__.py:1270: called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.h:148.)"]


def test_the_overlap_check_compares_an_engine_without_overlap_against_one_with_it(tmp_path, monkeypatch):
    """Overlap is the engine's default on a GPU: the check's plain run must turn it off by name, or on a GPU
    it compares overlap with overlap and passes whatever overlap does to the tokens."""
    from orpheus_triton.demo_models import write_random_llama
    from orpheus_triton.llama import load_llama

    check_gpu = load_check_gpu()
    asked = []

    class Recording(check_gpu.InflightEngine):
        def __init__(self, *args, overlap=None, **kwargs):
            asked.append(overlap)
            super().__init__(*args, overlap=overlap, **kwargs)

    monkeypatch.setattr(check_gpu, "InflightEngine", Recording)
    write_random_llama(tmp_path, check_gpu.SHAPES["tiny"], seed=1)
    assert check_gpu.check_overlap(torch.device("cpu"), load_llama(tmp_path))["ok"] is True
    assert asked == [False, True]

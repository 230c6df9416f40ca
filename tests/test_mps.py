"""serve --mps: an MPS control daemon for the server's life, run here with a stand-in
nvidia-cuda-mps-control that records what it is told (no GPU or MPS on this machine)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orpheus_triton import mps, server
from orpheus_triton.cli import main
from orpheus_triton.mps import MpsUnavailable, mps_daemon

ROOT = Path(__file__).resolve().parents[1]


def stand_in_control(folder: Path, start_status: int = 0, start_seconds: float = 0, quit_status: int = 0) -> Path:
    """An nvidia-cuda-mps-control in ``folder``/bin that logs `-d` (with its pipe folder) and the commands it
    reads; its start takes ``start_seconds`` and ends with ``start_status``, a command with ``quit_status``."""
    bin_folder = folder / "bin"
    bin_folder.mkdir()
    control = bin_folder / "nvidia-cuda-mps-control"
    control.write_text(f"""#!/bin/sh
if [ "$1" = "-d" ]; then
  echo "start $CUDA_MPS_PIPE_DIRECTORY${{CUDA_VISIBLE_DEVICES:+ devices $CUDA_VISIBLE_DEVICES}}" >> {folder}/control.log
  sleep {start_seconds}
  [ {start_status} = 0 ] || echo "An instance of this daemon is already running" >&2
  exit {start_status}
fi
while read -r line; do echo "$line" >> {folder}/control.log; done
exit {quit_status}
""")
    control.chmod(0o755)
    return folder / "control.log"


def test_without_nvidia_cuda_mps_control_it_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MpsUnavailable, match="no nvidia-cuda-mps-control on PATH"), mps_daemon():
        pytest.fail("the block ran without a daemon")


def test_a_daemon_that_does_not_start_is_named_with_its_reason(monkeypatch, tmp_path):
    stand_in_control(tmp_path, start_status=1)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    with pytest.raises(MpsUnavailable, match="did not start .exit 1: An instance of this daemon is already"), \
            mps_daemon():
        pytest.fail("the block ran without a daemon")


def test_the_daemon_runs_for_the_block_and_is_told_to_quit_however_it_ends(monkeypatch, tmp_path):
    control_log = stand_in_control(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    said = []
    with pytest.raises(KeyboardInterrupt), mps_daemon(said.append) as environment:
        pipes = Path(environment["CUDA_MPS_PIPE_DIRECTORY"])
        assert pipes.is_dir() and Path(environment["CUDA_MPS_LOG_DIRECTORY"]).is_dir()
        assert control_log.read_text().splitlines() == [f"start {pipes}"]
        raise KeyboardInterrupt  # Ctrl-C while serving
    assert control_log.read_text().splitlines() == [f"start {pipes}", "quit"]
    assert not pipes.parent.exists() and "MPS control daemon started" in said[0]


def test_the_server_process_gets_the_daemons_environment(monkeypatch, tmp_path):
    """start_server's ``environment`` reaches tritonserver (here a stand-in that writes what it sees)."""
    seen = tmp_path / "seen"
    monkeypatch.setattr(server, "server_command",
                        lambda repository, ports, extra: ["sh", "-c", f'echo "$CUDA_MPS_PIPE_DIRECTORY" > {seen}'])
    process = server.start_server(tmp_path, server.Ports(1, 2, 3),
                                  environment={"CUDA_MPS_PIPE_DIRECTORY": "/run/mps-pipes"})
    assert process.wait(timeout=30) == 0 and seen.read_text().strip() == "/run/mps-pipes"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["serve", "demo"])
def test_mps_without_a_gpu_is_refused_before_any_model_loads(command, capsys):
    ports = server.Ports.free()
    where = ["--grpc-port", str(ports.grpc), "--http-port", str(ports.http), "--metrics-port", str(ports.metrics)]
    args = [command, "--mps", *(where if command == "serve" else [])]
    assert main([*args, "--device", "cpu"]) == 2
    assert "--mps shares a GPU between the server's processes: not with --device cpu" in capsys.readouterr().err
    assert main(args) == 2  # auto, and this machine has no GPU
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_a_daemon_whose_start_hangs_is_named_told_to_quit_and_leaves_nothing(monkeypatch, tmp_path):
    control_log = stand_in_control(tmp_path, start_seconds=5)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr(mps, "START_SECONDS", 0.5)
    monkeypatch.setattr(mps.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(MpsUnavailable, match=r"did not start \(no answer within 0.5 s\)"), mps_daemon():
        pytest.fail("the block ran without a daemon")
    assert control_log.read_text().splitlines()[-1] == "quit" and not any((tmp_path / "tmp").iterdir())


def test_a_daemon_that_refuses_quit_keeps_its_folder_and_says_where(monkeypatch, tmp_path):
    stand_in_control(tmp_path, quit_status=1)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr(mps.tempfile, "tempdir", str(tmp_path))  # the kept folder goes with the test's
    said = []
    with mps_daemon(said.append) as environment:
        folder = Path(environment["CUDA_MPS_PIPE_DIRECTORY"]).parent
    assert folder.is_dir()
    assert f"did not take 'quit' (exit 1); it may still run: its folder {folder} is kept" in said[-1]


def test_a_step_limit_ends_a_benchmark_server_and_then_its_daemon(tmp_path):
    """A GPU run's step ends by `timeout` (SIGTERM, SIGKILL 20 s later): perf's serve_repository stops the
    server, one that does not stop on its own within seconds too, and tells the MPS daemon to quit in time (by
    default SIGTERM ended Python at once and left the daemon running)."""
    control_log = stand_in_control(tmp_path)
    seen = tmp_path / "seen"
    script = tmp_path / "serve.py"
    script.write_text(f"""
import sys, time
sys.path[:0] = [{str(ROOT / 'src')!r}, {str(ROOT / 'perf')!r}]
from pathlib import Path
import common
from orpheus_triton import server
# tritonserver's stand-in: ignores Triton's graceful stop (SIGINT), then says what MPS pipes it was given
server.server_command = lambda repository, ports, extra: [
    "sh", "-c", 'trap "" INT; echo "$CUDA_MPS_PIPE_DIRECTORY" > {seen}; exec sleep 60']
server.wait_until_ready = lambda *args, **kwargs: None
with common.serve_repository(Path({str(tmp_path / 'repository')!r}), Path({str(tmp_path / 'server.log')!r}),
                             mps=True):
    print("ready", flush=True)
    time.sleep(60)
""")
    (tmp_path / "repository").mkdir()
    run = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    assert "ready" in [run.stdout.readline().strip() for _ in range(3)]  # after the perf log's lines
    deadline = time.monotonic() + 30
    while not (seen.is_file() and seen.read_text().endswith("\n")):  # the stand-in server has said what it saw
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.05)
    started = time.monotonic()
    run.send_signal(signal.SIGTERM)
    run.wait(timeout=30)
    assert time.monotonic() - started < 15 and "KeyboardInterrupt: SIGTERM" in run.stderr.read()
    pipes = seen.read_text().strip()
    assert control_log.read_text().splitlines() == [f"start {pipes}", "quit"]  # the server was the daemon's
    assert not (tmp_path / "repository").exists()  # the repository went with the server


def test_serve_mps_runs_the_server_under_its_daemon_and_cuda_visible_devices_goes_to_the_daemon_alone(
        model_set, monkeypatch, tmp_path):
    """`serve --mps` end to end with stand-ins for the daemon and tritonserver: the server gets the daemon's
    pipes and not CUDA_VISIBLE_DEVICES (its clients see the daemon's devices renumbered from 0), the daemon gets
    it, and is told to quit when the server ends."""
    control_log = stand_in_control(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setenv("ORPHEUS_TRITON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = tmp_path / "seen"
    monkeypatch.setattr(server, "server_command", lambda repository, ports, extra: [
        "sh", "-c", f'echo "$CUDA_MPS_PIPE_DIRECTORY ${{CUDA_VISIBLE_DEVICES-unset}}" > {seen}'])
    ports = server.Ports.free()
    assert main(["serve", "--mps", "--models", str(model_set.root), "--grpc-port", str(ports.grpc),
                 "--http-port", str(ports.http), "--metrics-port", str(ports.metrics)]) == 0
    pipes, devices = seen.read_text().split()
    assert devices == "unset" and control_log.read_text().splitlines() == [f"start {pipes} devices 1", "quit"]
    assert not Path(pipes).exists()


def test_mps_without_nvidia_cuda_mps_control_is_refused_before_any_model_loads(monkeypatch, tmp_path):
    """On a GPU machine without MPS: named before the repository is rendered (demo left it behind)."""
    from argparse import Namespace

    from orpheus_triton.cli import _check_mps

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match="--mps: no nvidia-cuda-mps-control on PATH"):
        _check_mps(Namespace(mps=True, device="cuda"))
    _check_mps(Namespace(mps=False, device="cuda"))  # without --mps nothing is asked

"""serve --mps: an MPS control daemon for the server's life, run here with a stand-in
nvidia-cuda-mps-control that records what it is told (no GPU or MPS on this machine)."""

import os
from pathlib import Path

import pytest

from orpheus_triton import server
from orpheus_triton.cli import main
from orpheus_triton.mps import MpsUnavailable, mps_daemon


def stand_in_control(folder: Path, start_status: int = 0) -> Path:
    """An nvidia-cuda-mps-control on PATH that logs `-d` (with its pipe folder) and the commands it reads."""
    bin_folder = folder / "bin"
    bin_folder.mkdir()
    control = bin_folder / "nvidia-cuda-mps-control"
    control.write_text(f"""#!/bin/sh
if [ "$1" = "-d" ]; then
  echo "start $CUDA_MPS_PIPE_DIRECTORY" >> {folder}/control.log
  [ {start_status} = 0 ] || echo "An instance of this daemon is already running" >&2
  exit {start_status}
fi
while read -r line; do echo "$line" >> {folder}/control.log; done
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


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_mps_without_a_gpu_is_refused_before_any_model_loads(command, capsys):
    ports = server.Ports.free()
    where = ["--grpc-port", str(ports.grpc), "--http-port", str(ports.http), "--metrics-port", str(ports.metrics)]
    args = [command, "--mps", *(where if command == "serve" else [])]
    assert main([*args, "--device", "cpu"]) == 2
    assert "--mps shares a GPU between the server's processes: not with --device cpu" in capsys.readouterr().err
    assert main(args) == 2  # auto, and this machine has no GPU
    assert "sees no CUDA GPU" in capsys.readouterr().err

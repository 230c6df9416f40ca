"""perf/gpu/with_mps.sh, which a lent GPU's short run wraps a served sweep in: run here with a stand-in
nvidia-cuda-mps-control that records what it is told, so that its faults show before it spends GPU time."""

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WITH_MPS = ROOT / "perf" / "gpu" / "with_mps.sh"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def stand_in_control(tmp_path: Path, start_status: int = 0) -> Path:
    """A folder holding an nvidia-cuda-mps-control that logs its arguments and its stdin's commands."""
    folder = tmp_path / "bin"
    folder.mkdir()
    control = folder / "nvidia-cuda-mps-control"
    control.write_text(f"""#!/bin/sh
if [ "$1" = "-d" ]; then echo "start $CUDA_MPS_PIPE_DIRECTORY" >> {tmp_path}/control.log; exit {start_status}; fi
while read -r line; do echo "$line" >> {tmp_path}/control.log; done
""")
    control.chmod(0o755)
    return folder


def run(tmp_path: Path, *command: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(WITH_MPS), *command], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": path, "TMPDIR": str(tmp_path)})


def test_without_mps_on_the_machine_it_says_so_and_runs_nothing(tmp_path):
    done = run(tmp_path, "touch", str(tmp_path / "ran"), path=SYSTEM_PATH)
    assert done.returncode == 3 and "no nvidia-cuda-mps-control" in done.stderr
    assert not (tmp_path / "ran").exists()


def test_a_daemon_that_fails_to_start_runs_nothing(tmp_path):
    folder = stand_in_control(tmp_path, start_status=1)
    done = run(tmp_path, "touch", str(tmp_path / "ran"), path=f"{folder}:{SYSTEM_PATH}")
    assert done.returncode == 3 and "did not start" in done.stderr
    assert not (tmp_path / "ran").exists()


def test_the_command_runs_under_the_daemon_which_stops_after_it_whatever_its_status(tmp_path):
    folder = stand_in_control(tmp_path)
    script = f'echo "$CUDA_MPS_PIPE_DIRECTORY" > {tmp_path}/seen; test -d "$CUDA_MPS_PIPE_DIRECTORY" && exit 5'
    done = run(tmp_path, "sh", "-c", script, path=f"{folder}:{SYSTEM_PATH}")
    assert done.returncode == 5, done.stderr
    pipes = (tmp_path / "seen").read_text().strip()
    assert pipes.startswith(str(tmp_path)) and (tmp_path / "control.log").read_text().splitlines() == [
        f"start {pipes}", "quit"]
    assert not Path(pipes).exists()  # the daemon's folders go with it


def test_a_step_limit_ends_the_command_and_then_the_daemon(tmp_path):
    """The short run's steps end by `timeout` (SIGTERM): the command ends, and the daemon is told to quit."""
    folder = stand_in_control(tmp_path)
    wrapper = subprocess.Popen(["bash", str(WITH_MPS), "sleep", "30"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PATH": f"{folder}:{SYSTEM_PATH}", "TMPDIR": str(tmp_path)})
    log = tmp_path / "control.log"
    deadline = time.monotonic() + 10
    while not (log.exists() and log.read_text().startswith("start")):
        assert time.monotonic() < deadline, "the daemon never started"
        time.sleep(0.05)
    time.sleep(0.3)  # the command running
    started = time.monotonic()
    wrapper.send_signal(signal.SIGTERM)
    assert wrapper.wait(timeout=10) == 143 and time.monotonic() - started < 5  # not the sleep's 30 s
    assert log.read_text().splitlines()[-1] == "quit"
    assert "stopped" in wrapper.stderr.read()

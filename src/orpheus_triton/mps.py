"""NVIDIA MPS for the server's processes: the LLM stage and the SNAC decoder on one GPU at once.

Without MPS a GPU runs one process's kernels at a time: the ``llm`` and ``snac_decoder`` backend stubs
take turns (time slices), so a decoder round waits while an engine step runs. Under an MPS control
daemon their kernels share the GPU. On an H200 at 128 streams (perf/results/2026-11-27_h200, one run
each way, on two machines): 31 of 256 streams heard a gap instead of 53, the decoder busy 86% of the
time instead of 99%.

``mps_daemon`` starts a daemon of the server's own, its pipe and log folders in a temporary folder
that tritonserver (and the stubs it starts) learns through CUDA_MPS_PIPE_DIRECTORY and
CUDA_MPS_LOG_DIRECTORY, and stops it when the server is done. Nothing of the GPU's settings changes
(compute mode, MIG). A launcher killed outright (SIGKILL) leaves the daemon running, idle.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

MPS_CONTROL = "nvidia-cuda-mps-control"  # comes with NVIDIA's driver
START_SECONDS = 30.0  # for `nvidia-cuda-mps-control -d` to return
QUIT_SECONDS = 30.0  # for the daemon to take `quit`


class MpsUnavailable(RuntimeError):
    """No MPS control daemon could be started here (and why)."""


def _control_log(folder: Path, lines: int = 5) -> str:
    path = folder / "control.log"
    if not path.is_file():
        return ""
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def _quit(control: str, env: dict[str, str]) -> str | None:
    """Tell the daemon to quit; None when it took the command, else why not."""
    try:
        done = subprocess.run([control], input="quit\n", text=True, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=QUIT_SECONDS)
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    return None if done.returncode == 0 else f"exit {done.returncode}"


@contextlib.contextmanager
def mps_daemon(log: Callable[[str], None] = lambda message: None) -> Iterator[dict[str, str]]:
    """Run an MPS control daemon while the block runs; yield the environment variables that put a
    process (tritonserver, its backend stubs) under it. Raises MpsUnavailable, naming why, where
    there is no ``nvidia-cuda-mps-control`` or the daemon does not start.

    The daemon's output goes to a file, not a pipe: a daemon that kept a pipe open would hold its
    starter for good. A daemon that does not take ``quit`` keeps its folder (its log is there), and the
    log says where."""
    control = shutil.which(MPS_CONTROL)
    if control is None:
        raise MpsUnavailable(f"no {MPS_CONTROL} on PATH: MPS comes with NVIDIA's driver (serve without --mps)")
    folder = Path(tempfile.mkdtemp(prefix="orpheus-mps-"))
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for path in env.values():
        Path(path).mkdir()
    daemon_env = {**os.environ, **env}
    started_log = folder / "start.log"
    try:
        with open(started_log, "w") as output:
            started = subprocess.run([control, "-d"], env=daemon_env, stdin=subprocess.DEVNULL, stdout=output,
                                     stderr=subprocess.STDOUT, timeout=START_SECONDS)
        failure = None if started.returncode == 0 else f"exit {started.returncode}"
    except subprocess.TimeoutExpired:
        failure = f"no answer within {START_SECONDS:g} s"
        _quit(control, daemon_env)  # in case it started and then hung
    except (OSError, subprocess.SubprocessError) as error:
        failure = str(error)
    if failure is not None:
        why = started_log.read_text(errors="replace").strip() or _control_log(folder / "log")
        shutil.rmtree(folder, ignore_errors=True)
        raise MpsUnavailable(f"the MPS control daemon did not start ({failure}{': ' + why if why else ''})")
    log(f"MPS control daemon started (pipes in {env['CUDA_MPS_PIPE_DIRECTORY']})")
    try:
        yield env
    finally:
        refused = _quit(control, daemon_env)
        if refused is None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            tail = _control_log(folder / "log")
            log(f"the MPS control daemon did not take 'quit' ({refused}); it may still run: its folder "
                f"{folder} is kept{' (its log: ' + tail + ')' if tail else ''}")


def mps_if(wanted: bool, log: Callable[[str], None] = lambda message: None
           ) -> contextlib.AbstractContextManager[dict[str, str]]:
    """``mps_daemon(log)`` if ``wanted`` (a server's --mps), else no daemon and no environment to add."""
    return mps_daemon(log) if wanted else contextlib.nullcontext({})

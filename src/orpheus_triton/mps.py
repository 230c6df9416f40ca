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


def control_program() -> str:
    """Where ``nvidia-cuda-mps-control`` is; MpsUnavailable, naming it, where it is not on PATH."""
    control = shutil.which(MPS_CONTROL)
    if control is None:
        raise MpsUnavailable(f"no {MPS_CONTROL} on PATH: MPS comes with NVIDIA's driver (run without --mps)")
    return control


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
def mps_daemon(log: Callable[[str], None] = lambda message: None) -> Iterator[dict[str, str | None]]:
    """Run an MPS control daemon while the block runs; yield the changes to a process's environment
    (tritonserver's, which its backend stubs inherit) that put it under the daemon: the daemon's folders,
    and None for CUDA_VISIBLE_DEVICES (to be removed: the daemon takes it, and its clients see the
    daemon's devices renumbered from 0, where the same variable again would name others or none).
    Raises MpsUnavailable, naming why, where there is no ``nvidia-cuda-mps-control`` or the daemon
    does not start.

    The daemon's output goes to a file, not a pipe: a daemon that kept a pipe open would hold its
    starter for good. It starts in a session of its own, out of reach of a terminal's Ctrl-C while its
    clients still run. Interrupted while starting or stopping (Ctrl-C, or a SIGTERM made one), it is told
    to quit, or its folder is kept, and the interruption goes on. A daemon that does not take ``quit``
    keeps its folder (its log is there), and the log says where."""
    control = control_program()
    folder = Path(tempfile.mkdtemp(prefix="orpheus-mps-"))
    env: dict[str, str | None] = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"),
                                  "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for name in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        Path(str(env[name])).mkdir()
    daemon_env = {**os.environ, **{name: str(value) for name, value in env.items()}}
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = None
        log(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} goes to the MPS daemon alone: the "
            "server sees the daemon's devices")
    started_log = folder / "start.log"
    try:
        with open(started_log, "w") as output:
            started = subprocess.run([control, "-d"], env=daemon_env, stdin=subprocess.DEVNULL, stdout=output,
                                     stderr=subprocess.STDOUT, timeout=START_SECONDS, start_new_session=True)
        failure = None if started.returncode == 0 else f"exit {started.returncode}"
    except subprocess.TimeoutExpired:
        failure = f"no answer within {START_SECONDS:g} s"
        _quit(control, daemon_env)  # in case it started and then hung
    except (OSError, subprocess.SubprocessError) as error:
        failure = str(error)
    except BaseException:  # interrupted while it starts: no daemon left behind
        _quit(control, daemon_env)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if failure is not None:
        why = started_log.read_text(errors="replace").strip() or _control_log(folder / "log")
        shutil.rmtree(folder, ignore_errors=True)
        raise MpsUnavailable(f"the MPS control daemon did not start ({failure}{': ' + why if why else ''})")
    log(f"MPS control daemon started (pipes in {env['CUDA_MPS_PIPE_DIRECTORY']})")
    try:
        yield env
    finally:
        refused: str | None = "interrupted"
        try:
            refused = _quit(control, daemon_env)
        finally:  # also when interrupted while it quits
            tail = _control_log(folder / "log")
            if refused is None:
                log(f"MPS control daemon stopped{' (its log: ' + tail + ')' if tail else ''}")
                shutil.rmtree(folder, ignore_errors=True)
            else:
                log(f"the MPS control daemon did not take 'quit' ({refused}); it may still run: its folder "
                    f"{folder} is kept{' (its log: ' + tail + ')' if tail else ''}")


def mps_if(wanted: bool, log: Callable[[str], None] = lambda message: None
           ) -> contextlib.AbstractContextManager[dict[str, str | None]]:
    """``mps_daemon(log)`` if ``wanted`` (a server's --mps), else no daemon and no environment to add."""
    return mps_daemon(log) if wanted else contextlib.nullcontext({})

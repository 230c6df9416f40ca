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


class MpsUnavailable(RuntimeError):
    """No MPS control daemon could be started here (and why)."""


def _control_log(folder: Path, lines: int = 5) -> str:
    path = folder / "control.log"
    if not path.is_file():
        return ""
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


@contextlib.contextmanager
def mps_daemon(log: Callable[[str], None] = lambda message: None) -> Iterator[dict[str, str]]:
    """Run an MPS control daemon while the block runs; yield the environment variables that put a
    process (tritonserver, its backend stubs) under it. Raises MpsUnavailable, naming why, where
    there is no ``nvidia-cuda-mps-control`` or the daemon does not start."""
    control = shutil.which(MPS_CONTROL)
    if control is None:
        raise MpsUnavailable(f"no {MPS_CONTROL} on PATH: MPS comes with NVIDIA's driver (serve without --mps)")
    folder = Path(tempfile.mkdtemp(prefix="orpheus-mps-"))
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for path in env.values():
        Path(path).mkdir()
    daemon_env = {**os.environ, **env}
    started = subprocess.run([control, "-d"], env=daemon_env, capture_output=True, text=True, timeout=30)
    if started.returncode != 0:
        why = (started.stderr or started.stdout).strip() or _control_log(folder / "log")
        shutil.rmtree(folder, ignore_errors=True)
        raise MpsUnavailable(f"the MPS control daemon did not start (exit {started.returncode}"
                             f"{': ' + why if why else ''})")
    log(f"MPS control daemon started (pipes in {env['CUDA_MPS_PIPE_DIRECTORY']})")
    try:
        yield env
    finally:
        try:
            stopped = subprocess.run([control], input="quit\n", env=daemon_env, capture_output=True, text=True,
                                     timeout=30)
            if stopped.returncode != 0:
                log(f"the MPS control daemon did not take 'quit' (exit {stopped.returncode})")
        except (OSError, subprocess.TimeoutExpired) as error:
            log(f"the MPS control daemon did not take 'quit' ({error})")
        shutil.rmtree(folder, ignore_errors=True)

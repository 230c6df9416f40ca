"""Shared pieces of the benchmark scripts: the machine's name, run folders, a local server."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PERF = Path(__file__).resolve().parent
RESULTS = PERF / "results"


def log(message: str) -> None:
    print(f"[perf] {message}", flush=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def gpu_name() -> str | None:
    try:
        import torch  # noqa: PLC0415

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (e.g. "AMD EPYC"), else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or ""


def cpu_family(model: str) -> str:
    """The vendor and family of a CPU model name, for run folders: "Intel(R) Xeon(R) Platinum 8480+" ->
    "intel-xeon", "AMD EPYC 9654" -> "amd-epyc"; "" when unknown.

    Two VMs both called "2 cores" can differ a lot: the SNAC decoder's batching gain, for one, is
    decided by how fast one window's matrix products already run, which differs between CPU families.
    """
    words = re.sub(r"\((R|TM|tm)\)", "", model).split()[:2]
    return _slug(" ".join(words))


def machine_name() -> str:
    """Short name for run folders: the GPU model, else cpu-<cores>core-<CPU family>."""
    gpu = gpu_name()
    if gpu:
        return _slug(gpu.replace("NVIDIA", ""))
    family = cpu_family(cpu_model())
    return f"cpu-{os.cpu_count()}core" + (f"-{family}" if family else "")


def machine_info() -> dict:
    cpu = cpu_model()
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    import torch  # noqa: PLC0415

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
    }


def source_state() -> dict:
    """The commit measured, and the files of the server code that differ from it (uncommitted edits)."""
    import subprocess  # noqa: PLC0415

    def git(*args):
        done = subprocess.run(["git", *args], cwd=PERF.parent, capture_output=True, text=True)
        return done.stdout.rstrip() if done.returncode == 0 else ""  # porcelain lines begin with a space

    changed = git("status", "--porcelain", "--", "src", "model_repository")
    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "uncommitted": [line[3:] for line in changed.splitlines()]}


def source_line(source) -> str:
    """``source_state``'s record in words: the commit measured, and what in the server code differed from it."""
    if not isinstance(source, dict):
        return str(source)
    changed = source.get("uncommitted") or []
    return f"{source.get('commit')}" + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def machine_and_code(result: dict) -> str:
    """A result's ``machine_info`` and ``source_state`` records in one report line's words."""
    machine = result["machine"]
    return f"machine: {machine['cpu']}, {machine['cores']} cores; code {source_line(result['source'])}"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def busy_cores(seconds: float = 5.0) -> float | None:
    """Cores' worth of CPU time the whole machine spent busy over the next ``seconds`` (None off Linux)."""

    try:
        start = _machine_jiffies()
        time.sleep(seconds)
        end = _machine_jiffies()
    except (OSError, ValueError, IndexError):
        return None
    return _cores_busy(start, end) if end[0] > start[0] else 0.0


def tree_jiffies(root: int) -> int:
    """CPU time (clock ticks) used so far by process ``root`` and all its descendants: the live ones, and
    those ended and waited for (a level's perf_analyzer, a stack sampler), whose time their parent holds."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = sum(int(field) for field in fields[11:15])  # utime, stime, cutime, cstime
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total


def _thread_ticks(pid: int) -> dict[int, int]:
    """CPU time (clock ticks) of each live thread of process ``pid``."""
    ticks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[int(task.name)] = int(fields[11]) + int(fields[12])
    return ticks


def server_processes(root: int) -> dict[int, str]:
    """pid -> label for tritonserver ``root`` and the processes it started: its Python backend stubs by
    their model's name (several instances of one model share it), anything else as "other"."""
    from orpheus_triton.server import stub_model  # noqa: PLC0415

    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    labels, todo = {root: "tritonserver"}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        labels[pid] = stub_model(args) or "other"
    return labels


class Readings:
    """A reading now and then every ``interval`` seconds, on a thread, until ``stop``: so that a level's
    rates can be taken over the span its load generator counted, not its ramp and tail as well.

    ``read`` returns a value or raises OSError (no reading this time); readings are timed with
    ``time.perf_counter``, the load generator's clock. The thread stops by itself after ``lifetime``
    seconds: a level that fails never calls ``stop``.
    """

    def __init__(self, read, interval: float = 0.5, lifetime: float = 1800.0):
        self.read, self.interval = read, interval
        self._until = time.perf_counter() + lifetime
        self.readings: list[tuple[float, object]] = []
        self._stopped = threading.Event()
        self._take()
        self._thread = threading.Thread(target=self._run, name="level-readings", daemon=True)
        self._thread.start()

    def _take(self) -> None:
        with contextlib.suppress(OSError):
            self.readings.append((time.perf_counter(), self.read()))

    def _run(self) -> None:
        while not self._stopped.wait(self.interval) and time.perf_counter() < self._until:
            self._take()

    def stop(self) -> None:
        """The last reading, then no more."""
        self._stopped.set()
        self._thread.join(timeout=10)
        self._take()

    def pair(self, span: tuple[float, float] | None = None) -> tuple[tuple[float, object], tuple[float, object]] | None:
        """The readings to take a level's rates between: the first at or after ``span``'s start and the
        last at or before its end, where they lie at least an interval apart; else (no span, or one too
        short for two readings) the first and the last. None with fewer than two readings."""
        if len(self.readings) < 2:
            return None
        if span is not None:
            inside = [r for r in self.readings if span[0] <= r[0] <= span[1]]
            if len(inside) >= 2 and inside[-1][0] - inside[0][0] >= self.interval:
                return inside[0], inside[-1]
        return self.readings[0], self.readings[-1]


def server_cpu_monitor(root: int | None, interval: float = 0.5):
    """Start measuring; the returned function gives the cores' worth of CPU each server process used meanwhile
    (``server_processes`` labels, instances of a model together), with its busiest thread's share: a process
    whose busiest thread is near 1 core is bound by that thread (a Python model's by its GIL, often), however
    idle the machine. The load generator (this process and its other children) is listed too. Given the
    span the load generator counted (perf_counter seconds), the figures are that span's (``Readings``)."""
    if root is None:
        return lambda span=None: {}

    def snapshot() -> tuple[dict[str, dict[tuple[int, int], int]], int]:
        by_label: dict[str, dict[tuple[int, int], int]] = {}
        for pid, label in server_processes(root).items():
            try:
                threads = _thread_ticks(pid)
            except OSError:
                continue
            by_label.setdefault(label, {}).update({(pid, tid): ticks for tid, ticks in threads.items()})
        return by_label, tree_jiffies(os.getpid())

    readings = Readings(snapshot, interval)
    tick = os.sysconf("SC_CLK_TCK")

    def finish(span: tuple[float, float] | None = None) -> dict:
        readings.stop()
        pair = readings.pair(span)
        if pair is None:
            return {}
        (t0, start), (t1, end) = pair
        seconds = max(t1 - t0, 1e-9) * tick
        out, server_ticks = {}, 0
        for label, threads in end[0].items():
            before = start[0].get(label, {})
            used = {key: ticks - before.get(key, 0) for key, ticks in threads.items()}
            server_ticks += sum(used.values())
            out[label] = {"cores": round(sum(used.values()) / seconds, 2),
                          "busiest_thread": round(max(used.values(), default=0) / seconds, 2)}
        out["load generator"] = {"cores": round(max(0, end[1] - start[1] - server_ticks) / seconds, 2)}
        return {"server_cpu": out}

    return finish


def _machine_jiffies() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


def _cores_busy(start: tuple[int, int], end: tuple[int, int]) -> float:
    """Cores' worth of busy CPU between two ``_machine_jiffies`` readings (``end`` strictly later)."""
    elapsed = end[0] - start[0]
    return (os.cpu_count() or 1) * (elapsed - (end[1] - start[1])) / elapsed


def other_load_monitor():
    """Start measuring; the returned function gives the cores' worth of CPU that processes outside
    this benchmark (this process and its children, the server among them) used meanwhile."""
    try:
        start = _machine_jiffies()
        ours0 = tree_jiffies(os.getpid())
    except (OSError, ValueError, IndexError):
        return lambda: {}

    def finish() -> dict:
        end = _machine_jiffies()
        ours = tree_jiffies(os.getpid()) - ours0
        elapsed = end[0] - start[0]
        if elapsed <= 0:
            return {}
        busy = _cores_busy(start, end)
        ours_cores = ours * (os.cpu_count() or 1) / elapsed
        return {"cores_busy": round(busy, 2), "cores_other": round(max(0.0, busy - ours_cores), 2)}

    return finish


def wait_quiet(max_seconds: float, below: float = 0.3) -> float | None:
    """Wait (up to ``max_seconds``) until other work uses less than ``below`` cores; returns the last reading."""
    deadline = time.monotonic() + max_seconds
    busy = busy_cores()
    while busy is not None and busy >= below and time.monotonic() < deadline:
        log(f"waiting for a quiet machine: {busy:.1f} cores busy")
        busy = busy_cores()
    return busy


def run_folder(machine: str | None = None, root: Path = RESULTS) -> Path:
    """A folder for this run's results, <date>_<machine>: with -2, -3, ... when that one already
    holds anything (a run, or other results kept there), which is never overwritten or mixed
    into: the README may quote it."""
    base = f"{dt.date.today().isoformat()}_{machine or machine_name()}"
    folder, number = root / base, 1
    while folder.exists() and any(path.name != "raw" for path in folder.iterdir()):
        number += 1
        folder = root / f"{base}-{number}"
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    log(f"results go to {folder}")
    return folder


def write_result(folder: Path, name: str, result: dict, markdown: str) -> None:
    """A benchmark's result as ``name``.json and its report as ``name``.md in ``folder``, logged."""
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2))
    (folder / f"{name}.md").write_text(markdown)
    log(f"wrote {folder / f'{name}.md'}")


@dataclass
class RunningServer:
    url: str  # gRPC host:port
    metrics_url: str | None
    process: subprocess.Popen | None = None


def metrics_page(metrics_url: str) -> str:
    """The server's /metrics page (Prometheus text)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:  # noqa: S310 (localhost only)
        return response.read().decode()


def metric_values(metrics_url: str, name: str) -> list[float]:
    """Values of one Prometheus metric family on the server's /metrics page."""
    text = metrics_page(metrics_url)
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]


def server_listener_monitor(metrics_url: str | None, server_pid: int | None = None):
    """A ``monitor`` for loadgen.sweep: each level's figures from the server's own metrics
    (metrics.ListenerFigures): its time-to-first-audio quantiles, from its histogram's buckets, the
    gaps it saw, beside what the load generator measured at the client (over the whole level); where the
    level's time went (the decoder's and the LLM engine's busy shares, windows and steps a second,
    ListenerFigures.load) over the span the load generator counted, when it gives it (``Readings``: the
    ramp and the tail, with fewer streams, left out; ``server_load_seconds`` says over how long); with
    ``server_pid``, the CPU each server process used over the same span (``server_cpu_monitor``)."""
    from orpheus_triton.metrics import ListenerFigures  # noqa: PLC0415

    def page() -> ListenerFigures:
        try:
            return ListenerFigures.parse(metrics_page(metrics_url))
        except ValueError as error:
            raise OSError(f"unreadable metrics page: {error}") from error

    def start():
        readings = Readings(page) if metrics_url else None
        cpu = server_cpu_monitor(server_pid)

        def finish(span: tuple[float, float] | None = None) -> dict:
            if readings is None:
                return cpu(span)
            readings.stop()
            whole, counted = readings.pair(), readings.pair(span)
            if whole is None:
                return cpu(span)
            level = whole[1][1] - whole[0][1]
            (t0, before), (t1, after) = counted
            load = (after - before).load(t1 - t0)
            return {"server_first_audio": level.first_audio_count,
                    "server_ttfa_p50": level.first_audio_quantile(0.5),
                    "server_ttfa_p99": level.first_audio_quantile(0.99),
                    "server_stalls": int(level.stalls), "server_stall_seconds": round(level.stall_seconds, 4),
                    "server_decoder_busy": load.pop("decoder_busy", None), "server_load": load,
                    "server_load_seconds": round(t1 - t0, 2)} | cpu(span)

        return finish

    return start


def wait_idle(server: RunningServer, timeout: float = 120.0) -> bool:
    """Wait until the LLM engine holds no stream and queues no request (True), or ``timeout`` passes."""
    if not server.metrics_url:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            busy = sum(metric_values(server.metrics_url, "orpheus_llm_active_streams")) + sum(
                metric_values(server.metrics_url, "orpheus_llm_queued_requests"))
        except OSError:
            return False
        if busy == 0:
            time.sleep(1.0)  # the gauges are sampled every 0.5 s
            return True
        time.sleep(0.5)
    return False


# Random-weight model sets the benchmarks can serve: their LLM shapes (the SNAC decoder is always the full 24 kHz one).
SHAPES = ("demo", "orpheus-3b")


def model_set(shape: str, models: str | None):
    """The models to serve (a ModelSet: ``models``, else random weights of ``shape``) and a line describing them."""
    import torch  # noqa: PLC0415

    from orpheus_triton.demo_models import (  # noqa: PLC0415
        ORPHEUS_3B_SHAPE,
        ModelSet,
        cache_dir,
        demo_model_set,
        write_random_llama,
        write_random_snac,
        write_tokenizer,
    )

    if models:
        chosen = ModelSet(Path(models).expanduser().resolve())
        chosen.check()
        return chosen, f"model set {chosen.root}"
    if shape == "demo":
        return demo_model_set(log=log), "demo model set (Llama hidden 128 x 2 layers, full SNAC 24 kHz)"
    if shape != "orpheus-3b":
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(SHAPES)}")
    root = cache_dir() / f"random-{shape}"
    chosen = ModelSet(root)
    if not (root / ".complete").is_file():
        log(f"writing a random-weight {shape} model set to {root} (bf16; takes a minute or two) ...")
        write_random_llama(chosen.llm, ORPHEUS_3B_SHAPE, dtype=torch.bfloat16)
        write_tokenizer(chosen.llm)
        write_random_snac(chosen.snac)
        (root / ".complete").write_text(shape)
    return chosen, (f"random-weight {shape} model set (Llama hidden {ORPHEUS_3B_SHAPE['hidden_size']} x "
                    f"{ORPHEUS_3B_SHAPE['num_hidden_layers']} layers, full SNAC 24 kHz)")


def add_model_arguments(parser) -> None:
    """A benchmark's options for the server it starts and where its results go: --shape, --models
    (``model_set``), --device, --out (default: a new run folder)."""
    parser.add_argument("--shape", default="demo")
    parser.add_argument("--models", help="a real model set directory instead")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="folder for the results (default: a new run folder)")


@contextlib.contextmanager
def local_server(models, max_streams: int, log_path: Path, device: str = "auto",
                 max_seq_len: int = 2048, graph_sampling: bool = True,
                 overlap: bool | None = None, prefill_tokens: int = 0, lead_in: bool = True,
                 settings_overrides: dict | None = None, paced_llm: float = 0.0,
                 silent_snac: bool = False, mps: bool = False) -> Iterator[RunningServer]:
    """Render the repository for ``models`` (a ModelSet), run tritonserver on free ports, stop it after.
    ``settings_overrides``: further RepositorySettings fields, by name. ``paced_llm`` > 0: the llm
    stage's engine is the stand-in of perf/paced_llm (that many tokens a second a stream, no model);
    ``silent_snac``: the snac_decoder's SNAC is perf/silent_snac's stand-in (silence, no model); ``mps``: the
    server runs under an MPS control daemon of its own (orpheus_triton.mps, GPU)."""
    from orpheus_triton.repository import RepositorySettings, render  # noqa: PLC0415

    repository = Path(tempfile.mkdtemp(prefix="perf-repository-"))
    settings = RepositorySettings(llm_dir=str(models.llm), snac_dir=str(models.snac), device=device,
                                  max_streams=max_streams, max_seq_len=max_seq_len,
                                  llm_graph_sampling=graph_sampling,
                                  llm_overlap="auto" if overlap is None else overlap,
                                  prefill_chunk=prefill_tokens, decoder_lead_in=lead_in,
                                  **(settings_overrides or {}))
    render(settings, repository)
    if paced_llm > 0:
        use_paced_llm(repository, paced_llm)
    if silent_snac:
        use_silent_snac(repository)
    with serve_repository(repository, log_path, mps) as server:
        yield server


def use_paced_llm(repository: Path, tokens_per_second: float) -> None:
    """Give a rendered repository's llm model the paced stand-in engine (perf/paced_llm/paced_engine.py,
    appended to its model.py, whose ``build_engine`` it replaces), its pace a model parameter."""
    from orpheus_triton.constants import LLM_MODEL  # noqa: PLC0415

    _append_stand_in(repository / LLM_MODEL, "paced_llm/paced_engine.py", {"build_engine": "build_paced_engine"})
    pace = f'{{ key: "paced_tokens_per_second", value: {{ string_value: "{tokens_per_second}" }} }}'
    with open(repository / LLM_MODEL / "config.pbtxt", "a") as config:
        config.write(f"parameters {pace}\n")


def use_silent_snac(repository: Path) -> None:
    """Give a rendered repository's snac_decoder model the silent stand-in decoder
    (perf/silent_snac/silent_decoder.py, appended to its model.py, whose ``load_window_decoder`` and
    ``warm_up`` it replaces)."""
    from orpheus_triton.constants import DECODER_MODEL  # noqa: PLC0415

    _append_stand_in(repository / DECODER_MODEL, "silent_snac/silent_decoder.py",
                     {"load_window_decoder": "load_silent_decoder", "warm_up": "warm_up_silent"})


def _append_stand_in(model_folder: Path, source: str, replaces: dict[str, str]) -> None:
    """Append perf/``source`` to the model's 1/model.py and rebind each name of ``replaces`` to its stand-in:
    the adapter above stays as rendered and calls the stand-in where it called the real thing."""
    model = model_folder / "1" / "model.py"
    rebind = "".join(f"{name} = {stand_in}\n" for name, stand_in in replaces.items())
    model.write_text(f"{model.read_text()}\n\n# perf/{source} (perf/common.py):\n"
                     f"{(PERF / source).read_text()}\n\n{rebind}")


# How long a benchmark server interrupted by a signal (Ctrl-C, a step's time limit) may take to stop before
# it is killed: its streams' results are of no use then.
STOP_ON_SIGNAL_SECONDS = 5.0


@contextlib.contextmanager
def serve_repository(repository: Path, log_path: Path, mps: bool = False) -> Iterator[RunningServer]:
    """Run tritonserver on ``repository`` on free ports (``mps``: under an MPS control daemon of its own);
    stop it and remove the repository after, also when a step's time limit (SIGTERM) ends the run: then
    with STOP_ON_SIGNAL_SECONDS for the server's stop, so that the stop and the daemon's quit come before
    the limit's SIGKILL (run_on_gpu.sh: 20 s later). Its stages count the callers in flight in a folder of
    the run's, as `serve`'s do (``counted_callers``): what is measured is what `serve` runs, leases and all,
    and a repository rendered with a ``max_callers`` loads."""
    from orpheus_triton.interrupts import terminate_as_interrupt  # noqa: PLC0415
    from orpheus_triton.mps import mps_if  # noqa: PLC0415
    from orpheus_triton.server import (  # noqa: PLC0415
        Ports,
        counted_callers,
        start_server,
        stop_server,
        wait_until_ready,
    )

    ports = Ports.free()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with (terminate_as_interrupt(), mps_if(mps, log) as environment, counted_callers(log) as callers,
              open(log_path, "w") as log_file):
            started = time.perf_counter()
            process = start_server(repository, ports, log_file=log_file, extra=["--exit-timeout-secs=15"],
                                   environment={**environment, **callers})
            stop_seconds = 60.0
            try:
                wait_until_ready(process, f"localhost:{ports.grpc}", timeout=900)
                log(f"tritonserver ready in {time.perf_counter() - started:.1f} s (gRPC :{ports.grpc}, "
                    f"log {log_path})")
                yield RunningServer(f"localhost:{ports.grpc}", f"http://localhost:{ports.metrics}/metrics", process)
            except KeyboardInterrupt:
                stop_seconds = STOP_ON_SIGNAL_SECONDS
                raise
            finally:
                stop_server(process, timeout=stop_seconds)
    finally:  # also when no server started (MPS unavailable) or a second signal cut the stop short
        shutil.rmtree(repository, ignore_errors=True)

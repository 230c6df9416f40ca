"""Running the real tritonserver: from the NGC image if present, else from the nvidia-pytriton wheel.

The wheel bundles tritonserver 2.51, its Python backend and a backend stub per
Python version. The stub embeds Python and must import this environment's
packages (numpy, torch, orpheus_triton), so the launcher sets the server's
environment up for this interpreter (see ``server_environment``); it works
the same from an activated venv, a bare `.venv/bin/orpheus-triton`, or a
container.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .constants import CALLERS_DIR_ENV, DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT, DRAIN_FILE_ENV
from .demo_models import cache_dir
from .metrics import DECODER_QUEUED_METRIC, LLM_STREAM_METRICS, family_totals


@dataclass(frozen=True)
class Ports:
    grpc: int = DEFAULT_GRPC_PORT
    http: int = DEFAULT_HTTP_PORT
    metrics: int = DEFAULT_METRICS_PORT

    @classmethod
    def free(cls) -> Ports:
        """Three different ports nothing listens on now (for servers beside others: tests, benchmarks, checks).
        All three are held while chosen: a port let go at once can be handed out again for the next."""
        with contextlib.ExitStack() as held:
            sockets = [held.enter_context(socket.socket()) for _ in range(3)]
            for probe in sockets:
                probe.bind(("0.0.0.0", 0))  # where tritonserver binds
            return cls(*(probe.getsockname()[1] for probe in sockets))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _pytriton_dist() -> tuple[Path, Path]:
    """(tritonserver folder, bundled shared libraries) of the nvidia-pytriton wheel."""
    # Found, not imported: only the bundled server is used, so pytriton's own dependencies need not be installed.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.origin:
        raise RuntimeError("tritonserver not found: install nvidia-pytriton or run inside the Triton NGC image")
    root = Path(spec.origin).parent
    return root / "tritonserver", root.parent / "nvidia_pytriton.libs"


def check_stub_numpy(numpy_version: str) -> None:
    """Refuse numpy 2 for the bundled server's stub, which would otherwise crash on the first request.

    The Python backend stub of tritonserver 2.51 (the nvidia-pytriton wheel) was
    built against numpy 1: under numpy 2 it reads a string (BYTES) input's
    buffer wrongly, `deserialize_bytes_tensor` raises inside the stub, the stub
    aborts and every request waits for Triton's stub health timeout. nvidia-pytriton
    itself requires numpy < 2; images that ship numpy 2 install over that.
    """
    if int(numpy_version.split(".")[0]) >= 2:
        raise RuntimeError(
            f"numpy {numpy_version} is installed, but the bundled tritonserver 2.51's Python backend stub needs "
            "numpy < 2 (under numpy 2 it crashes on string inputs): pip install 'numpy<2'"
        )


def backend_directory() -> Path:
    """A backends/ folder whose Python backend uses the stub built for this interpreter's version."""
    dist, _ = _pytriton_dist()
    check_stub_numpy(importlib.metadata.version("numpy"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    target = cache_dir() / "tritonserver" / f"py{version}" / "backends"
    if any(ch.isspace() for ch in str(target)):
        # The Python backend starts its stub through a shell without quoting: it would fail, the server hang.
        raise RuntimeError(f"the cache folder {cache_dir()} has a space in its path, which tritonserver's Python "
                           "backend cannot start its stubs from: set ORPHEUS_TRITON_CACHE to a path without one")
    python = target / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in (dist / "backends/python/libtriton_python.so",
                   dist / "backends/python/triton_python_backend_utils.py", stub):
        link = python / source.name
        if link.resolve() == source.resolve():
            continue
        # Made aside and moved into place: two launchers starting at once on a fresh cache both get there.
        temporary = python / f".{source.name}.{os.getpid()}"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(source)
        os.replace(temporary, link)
    return target


def is_system_library_dir(path: str) -> bool:
    """Whether the dynamic linker searches ``path`` without being told: /lib, /usr/lib, their lib64 and
    multiarch (e.g. x86_64-linux-gnu) folders."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    trusted = {f"{root}{suffix}" for root in ("/lib", "/usr/lib") for suffix in ("", "64", f"/{multiarch}")}
    return os.path.normpath(path) in trusted if path else False


def server_environment() -> dict[str, str]:
    """Environment for tritonserver whose Python backend stubs import from *this* interpreter.

    The stub embeds libpython and ignores PYTHONPATH; like any embedded Python it
    finds its prefix from the first ``python3`` on PATH, and a virtual
    environment through that interpreter's pyvenv.cfg. So this interpreter's
    bin folder goes first on PATH (what activating a venv does), and its
    libpython first on LD_LIBRARY_PATH so stdlib and extension modules match,
    unless it lies in a folder the dynamic linker searches anyway (a system
    Python's): first on LD_LIBRARY_PATH that folder would also put the driver
    library the container runtime mounts there (libcuda) ahead of a CUDA image's
    forward-compatibility one, which LD_LIBRARY_PATH names. (A libpython of the
    same name in a folder LD_LIBRARY_PATH already names then comes first.)
    """
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p)
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = [] if is_system_library_dir(libdir) else [libdir]
    if not shutil.which("tritonserver"):
        libs.append(str(_pytriton_dist()[1]))
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return env


def server_command(repository: Path, ports: Ports, extra: list[str] | None = None) -> list[str]:
    installed = shutil.which("tritonserver")
    if installed:
        binary, backends = installed, None
    else:
        binary, backends = str(_pytriton_dist()[0] / "bin" / "tritonserver"), backend_directory()
    command = [
        binary,
        f"--model-repository={repository}",
        f"--grpc-port={ports.grpc}",
        f"--http-port={ports.http}",
        f"--metrics-port={ports.metrics}",
        "--allow-metrics=true",
        "--log-verbose=0",
    ]
    if backends:
        command.append(f"--backend-directory={backends}")
    return command + list(extra or [])


def log_tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a tritonserver log worth reading when something failed: without blank
    lines and the start-up tables of models and options."""
    text = Path(path).read_text(errors="replace")
    return [line for line in text.splitlines() if line.strip() and line[0] not in "|+"][-lines:]


def start_server(repository: Path, ports: Ports, log_file=None, extra: list[str] | None = None,
                 environment: dict[str, str | None] | None = None) -> subprocess.Popen:
    """Start tritonserver in the background, in its own process group (its backend stubs join it), so
    ``stop_server`` can end them all and a terminal's Ctrl-C reaches it only through its launcher.
    ``environment``: changes to its environment (``mps.mps_daemon``'s), None for a variable to remove.

    Call it from the thread that lives as long as the server should: on Linux the server gets SIGTERM
    (Triton's graceful stop) when that thread's process or the thread itself ends, also when the
    launcher is killed with SIGKILL and cannot stop it (see ``popen_with_parent_death_signal``).
    """
    env = server_environment()
    for name, value in (environment or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    prefix = f"orpheus_triton_{os.getpid()}_{secrets.token_hex(4)}_"
    shm = [f"--backend-config=python,shm-region-prefix-name={prefix}"]
    process = popen_with_parent_death_signal(
        server_command(repository, ports, [*(extra or []), *shm]), env=env,
        stdout=log_file, stderr=subprocess.STDOUT if log_file else None, start_new_session=True,
    )
    _SHM_PREFIXES[process.pid] = prefix
    return process


# The prefix of each started server's Python backend shared memory regions (files in /dev/shm, 1 MiB and up
# a stub), by the server's pid: Triton removes them as it stops, but not those of stubs killed outright (a
# server killed after its exit timeout, a second Ctrl-C), which held that memory until the next reboot.
_SHM_PREFIXES: dict[int, str] = {}
SHM_FOLDER = Path("/dev/shm")


# Run by a fresh Python in the child's place: set the parent-death signal, then become the command. The
# pipe (argv[2], a descriptor) closes at the exec: its parent waits for that, so the signal is set before
# the thread that started it may end; a command that cannot run writes its errno and strerror there.
_PARENT_DEATH_SIGNAL = """\
import ctypes, os, signal, sys
parent, pipe, command = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != parent:  # the parent ended before the call
    os.kill(os.getpid(), signal.SIGTERM)
for name in ("SIGPIPE", "SIGXFSZ"):  # Python ignores them, an exec keeps that: as subprocess leaves them
    signal.signal(getattr(signal, name), signal.SIG_DFL)
os.set_inheritable(pipe, False)
try:
    os.execvp(command[0], command)
except OSError as error:
    os.write(pipe, f"{error.errno}\\0{error.strerror}".encode())
    os._exit(127)
"""


def popen_with_parent_death_signal(command: list[str], **options) -> subprocess.Popen:
    """``subprocess.Popen(command, **options)``, the child getting SIGTERM when the thread that started it
    ends (on Linux; elsewhere a plain Popen).

    A server in a session of its own outlives a launcher that dies without stopping it (SIGKILL, the OOM
    killer), holding its ports and memory. The kernel's parent-death signal (prctl PR_SET_PDEATHSIG) ends
    it then; it survives the exec into the command, and the process keeps its pid. A short Python sets it
    and execs, not a ``preexec_fn``: that hook makes ``subprocess`` fork where it would vfork, and in a
    process with gRPC channels open (a client, a benchmark) grpcio's fork handlers start a poller in the
    child whose descriptor ``close_fds`` then closes, so the child can die before its exec (grpcio 1.81 and
    later, grpc/grpc#43055). This returns once the child has exec'd (the signal set), as Popen does, and
    raises as Popen does where the command cannot run (FileNotFoundError for a missing one).
    """
    if not sys.platform.startswith("linux"):
        return subprocess.Popen(command, **options)
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _PARENT_DEATH_SIGNAL, str(os.getpid()), str(write_end), *command],
            pass_fds=(write_end,), **options)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        failure = pipe.read()  # until the exec closes it (or the wrapper ends)
    if failure:
        process.wait()
        number, _, message = failure.decode(errors="replace").partition("\0")
        raise OSError(int(number), message, command[0])
    return process


def stop_server(process: subprocess.Popen, timeout: float = 60.0) -> int:
    """Graceful stop (SIGINT: finish in-flight requests, unload models), then kill what is left."""
    try:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout)
    finally:  # also when interrupted while waiting (a second Ctrl-C): nothing of the server stays behind
        kill_server_group(process)
        if process.poll() is None:
            process.kill()
    return process.wait()


def kill_server_group(process: subprocess.Popen) -> None:
    """SIGKILL a ``start_server`` process's group: the server and its backend stubs, also when the
    server itself is already gone (a crashed or hastily exited server leaves its stubs running); and
    remove the shared memory regions its stubs left (``_SHM_PREFIXES``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if prefix := _SHM_PREFIXES.pop(process.pid, None):  # what its stubs' shared memory left (none after a clean stop)
        for region in SHM_FOLDER.glob(f"{prefix}*"):
            with contextlib.suppress(OSError):
                region.unlink()


PYTHON_STUB = "triton_python_backend_stub"


def stub_model(arguments: list[bytes]) -> str | None:
    """The model a process runs if its command line (``arguments``) is a Python backend stub's: the stub,
    then <repository>/<model>/1/model.py. None for any other process."""
    if len(arguments) < 2 or not arguments[0].endswith(PYTHON_STUB.encode()):
        return None
    return Path(arguments[1].decode(errors="replace")).parent.parent.name


class StubWatch:
    """Notices a Python backend stub of a tritonserver that died while the server runs.

    tritonserver 2.51 does not restart a stub that died (the OOM killer, a crash in native code):
    every request to its model then fails ("Stub process ... is not healthy") while the server still
    reports itself ready, so a load balancer keeps sending it traffic. ``died`` names the models
    whose stub was seen running and is gone (or a zombie) now. While the models load, stubs come and
    go: ``look`` notes the models that have one, and ``start`` (once loaded) names those left with none,
    whose stub died between the last look and the start (a stub killed right after the server was
    ready went unnoticed for good).
    """

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.seen: dict[int, str] = {}
        self.models: set[str] = set()  # every model a stub was seen running for while loading

    def look(self) -> None:
        self.models |= set(self.stubs().values())

    def start(self) -> list[str]:
        """Watch the stubs running now; the models seen while loading that have none."""
        self.seen = self.stubs()
        return sorted(self.models - set(self.seen.values()))

    def died(self) -> list[str]:
        running = self.stubs()
        gone = sorted({model for pid, model in self.seen.items() if pid not in running})
        self.seen = running
        return gone

    def stubs(self) -> dict[int, str]:
        """pid -> model of the server's live stubs (the server's children; a zombie is no longer live)."""
        stubs = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                if int(parent) != self.server_pid or state == "Z":
                    continue
                model = stub_model((entry / "cmdline").read_bytes().split(b"\0"))
            except (OSError, ValueError):
                continue
            if model is not None:
                stubs[int(entry.name)] = model
        return stubs


def wait_until_ready(process: subprocess.Popen, url: str, timeout: float = 300.0) -> None:
    """Block until every model is loaded; raise with the reason if the server exits or times out."""
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tritonserver exited with code {process.returncode} while loading models")
        try:
            if client.is_server_ready():
                return
        except Exception:  # noqa: BLE001 (not listening yet)
            pass
        time.sleep(0.5)
    raise TimeoutError(f"tritonserver at {url} not ready after {timeout:.0f} s")


# This machine's own server, asked directly: an http_proxy in the environment (a container's) must not
# take the question elsewhere.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ready(port: int) -> bool:
    """Whether the tritonserver on this machine's HTTP ``port`` has loaded every model."""
    try:
        with _LOCAL.open(f"http://localhost:{port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except Exception:  # noqa: BLE001 (refused, cut short, garbled: not ready)
        return False


# `serve`'s exit status for a tritonserver that ended on its own before its models were ready: a model that
# failed to load, a port in use. Told apart from 1 (a backend stub died once serving) so that a supervisor
# may leave a server that cannot start stopped (systemd's RestartPreventExitStatus=2 3).
NEVER_READY_STATUS = 3
# How long past its own exit timeout a stopping tritonserver may take before it is killed:
# tritonserver 2.51 can hang after "Exit timeout expired. Exiting immediately" while an
# ensemble stream is still counted in flight.
STOP_GRACE_SECONDS = 5.0
CUT_OFF_GRACE_SECONDS = 1.0  # after its exit timeout, for a tritonserver known to hold a stream it cannot finish
# tritonserver's own exit timeout behind a Drain: the drain has let the streams finish; what is left in
# flight is their last answers (milliseconds), or ensemble requests a bare cancellation left behind,
# which never finish.
DRAINED_EXIT_SECONDS = 5
# A drain's looks at the server's metrics: this far apart (longer than the llm stage's 0.5 s between
# publishes), and this many in a row with nothing in flight before the server is stopped: three span two
# publishes, so that a stream taken just before the drain began shows though one publish came late.
DRAIN_LOOK_SECONDS = 0.6
DRAIN_QUIET_LOOKS = 3


def streams_in_flight(metrics_port: int, decoding: bool = True) -> int | None:
    """What the server on this machine still works on, by its own metrics: the llm stage's streams and
    queued requests (the torch engine's, or the streams the relay in front of TensorRT-LLM carries) and
    (``decoding``) the windows the decoder has still to decode. None if the page cannot be read or has no
    llm stage's figures (models still loading, a repository of another kind): not known to be idle."""
    try:
        with _LOCAL.open(f"http://localhost:{metrics_port}/metrics", timeout=1) as response:
            values = family_totals(response.read().decode(), (*LLM_STREAM_METRICS, DECODER_QUEUED_METRIC))
    except Exception:  # noqa: BLE001 (unreadable, cut short, unparsable: not known)
        return None
    if not any(name in values for name in LLM_STREAM_METRICS):
        return None
    counted = (*LLM_STREAM_METRICS, DECODER_QUEUED_METRIC) if decoding else LLM_STREAM_METRICS
    return int(sum(values.get(name, 0.0) for name in counted))


@dataclass
class Drain:
    """Lets a server's streams finish before it stops, refusing new ones meanwhile.

    A stopping tritonserver refuses every new request, also an ensemble's next step into a
    composing model: every stream through the `orpheus` ensemble stops where it is, and is cut
    off at the exit timeout. So on the first stop signal the launcher raises this flag (a file
    named in the server's environment, ``DRAIN_FILE_ENV``), which preprocessing reads to refuse
    new streams (`server shutting down`, UNAVAILABLE), waits until the server's metrics show
    nothing in flight (``streams_in_flight``) or ``--exit-timeout`` has passed, and only then
    stops tritonserver.
    """

    flag: Path
    metrics_port: int

    @classmethod
    def for_server(cls, metrics_port: int) -> Drain:
        """A drain whose flag is new to this run: a flag a killed launcher left (its finally never ran) must
        not turn the next server's every stream away. Its folder, named at random (no other user can make it
        first), is made only by ``start``: a launcher killed outright before any stop leaves nothing behind."""
        folder = Path(tempfile.gettempdir()) / f"orpheus-drain-{secrets.token_hex(8)}"
        return cls(folder / "draining", metrics_port)

    def environment(self) -> dict[str, str]:
        return {DRAIN_FILE_ENV: str(self.flag)}

    def start(self) -> None:
        self.flag.parent.mkdir(mode=0o700, exist_ok=True)
        self.flag.touch()

    def idle(self) -> bool:
        return streams_in_flight(self.metrics_port) == 0

    def generating(self) -> int | None:
        """How many streams are still generating (or waiting to), None if not known: such a stream cannot
        finish once tritonserver stops (its next step is refused), though its count still falls to 0."""
        return streams_in_flight(self.metrics_port, decoding=False)

    def close(self) -> None:
        shutil.rmtree(self.flag.parent, ignore_errors=True)


class _QuietLooks:
    """A drain's looks at the server's metrics (``idle``), one every DRAIN_LOOK_SECONDS: ``seen`` once
    DRAIN_QUIET_LOOKS in a row found nothing in flight."""

    def __init__(self, idle: Callable[[], bool]) -> None:
        self.idle, self.quiet, self.next_look = idle, 0, time.monotonic()

    def seen(self) -> bool:
        if time.monotonic() >= self.next_look:
            self.next_look = time.monotonic() + DRAIN_LOOK_SECONDS
            self.quiet = self.quiet + 1 if self.idle() else 0
        return self.quiet >= DRAIN_QUIET_LOOKS


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _raised(drain: Drain, log: Callable[[str], None]) -> bool:
    """Raise the drain's flag; False (and said) where it cannot be written: the server is stopped at once."""
    try:
        drain.start()
    except OSError as error:
        log(f"cannot drain ({error}): stopping at once")
        return False
    return True


@contextlib.contextmanager
def counted_callers(log: Callable[[str], None]) -> Iterator[dict[str, str]]:
    """A new folder where the server's stages count its callers in flight (callers.CallerLeases), for one
    run of tritonserver: yields the environment that names it, and removes it after. A lease a killed run
    left must not count against the next one. The folder is a run folder in the cache
    (``repository.run_folder``), as a rendered repository is: one a killed launcher left behind goes with
    the next launcher's start. Where none can be made, nothing (said): the server then counts no callers,
    and a ``--max-callers`` fails to load."""
    from .demo_models import cache_folder  # noqa: PLC0415
    from .repository import release_run_folder, run_folder  # noqa: PLC0415

    try:
        folder = run_folder(cache_folder("callers"), prefix="callers-")
        folder.chmod(0o700)  # the leases are this server's alone
    except (OSError, ValueError) as error:
        log(f"warning: callers in flight are not counted ({error})")
        yield {}
        return
    try:
        yield {CALLERS_DIR_ENV: str(folder)}
    finally:
        release_run_folder(folder)


def serve_until_stopped(repository: Path, ports: Ports, exit_timeout: int, log: Callable[[str], None],
                        ready: Callable[[], bool] | None = None,
                        environment: dict[str, str | None] | None = None) -> int:
    """Run tritonserver with ``repository`` in the foreground until a signal stops it, its streams drained
    first (``Drain``); ``run_in_foreground`` returns its exit status. ``ready``: as there (default: the
    HTTP endpoint's readiness); ``environment``: as ``start_server``'s."""
    try:
        drain = Drain.for_server(ports.metrics)
    except OSError as error:  # no writable temporary folder: served, stopped without a drain
        log(f"warning: no drain at a stop ({error}): streams in flight will be cut off then")
        drain = None
    try:
        with counted_callers(log) as callers:
            process = start_server(repository, ports,
                                   extra=[f"--exit-timeout-secs={min(exit_timeout, DRAINED_EXIT_SECONDS)}"],
                                   environment={**(environment or {}), **callers,
                                                **(drain.environment() if drain else {})})
            return run_in_foreground(process, exit_timeout, ready=ready or (lambda: http_ready(ports.http)),
                                     log=log, drain=drain)
    finally:
        if drain is not None:
            drain.close()


def run_in_foreground(process: subprocess.Popen, exit_timeout: int, ready: Callable[[], bool] | None = None,
                      log: Callable[[str], None] = _to_stderr, drain: Drain | None = None) -> int:
    """Wait for tritonserver (in its own process group), passing SIGINT and SIGTERM on to it (SIGHUP, a
    closed terminal, as SIGTERM: the server is in a session of its own and would not get it).

    This process forwards them because it may be the only one that gets them: `docker stop`
    signals the container's first process, and a first process without a handler ignores
    SIGTERM. The first signal asks for Triton's stop: it refuses new requests and waits up
    to ``exit_timeout`` for those in flight. A stream through the `orpheus` ensemble cannot
    finish then (its next step is a new request to a composing model, which a stopping
    Triton refuses), so it is cut off when that time is up. If the server is still there
    STOP_GRACE_SECONDS later, or at a second signal, it is killed with its backend stubs.
    With a ``drain`` (``serve_until_stopped``'s), the first signal lets the streams in flight finish first,
    new ones refused, for up to ``exit_timeout``; tritonserver (started with DRAINED_EXIT_SECONDS as
    its own exit timeout) is stopped once they have.
    Once ``ready`` says the models are loaded, a backend stub that dies (``StubWatch``: tritonserver 2.51 neither
    restarts it nor stops reporting ready) stops the server the same way, with exit status 1, so that
    whatever supervises `serve` (compose's restart policy, systemd) starts a whole one again.
    Returns 0 for a stop asked for by a signal that ended in time, 128 + that signal's number for one that
    cut requests in flight off (the exit timeout expired; tritonserver exits 1 then, or hangs and is
    killed: neither is a failure to restart for), 1 for a dead stub, NEVER_READY_STATUS for a server that
    ended on its own before ``ready`` said its models were loaded, else the server's own exit status.
    """
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _frame: received.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    deadline, killed, failed = None, False, False
    stubs, next_look, watching = StubWatch(process.pid), time.monotonic(), False
    looked_after = 0  # how many signals had come when the last ready look was taken
    draining_until, quiet, drained, watch_stop, cut_off = None, None, False, False, False
    server_timeout = exit_timeout if drain is None else min(exit_timeout, DRAINED_EXIT_SECONDS)  # tritonserver's

    def stop_server_now(reason: str, grace: float = STOP_GRACE_SECONDS) -> float:
        log(reason)
        process.send_signal(signal.SIGINT if received[0] == signal.SIGINT else signal.SIGTERM)
        return time.monotonic() + server_timeout + grace

    try:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                status = process.wait(timeout=0.2)
                break
            if killed:
                continue
            # A signal before the models were seen ready is decided on a look taken after it: a stream may be
            # under way already (the ready look comes once a second, and one answered just before the signal
            # is stale), and stopping as if loading would cut it off.
            if deadline is None and ready is not None and (time.monotonic() >= next_look
                                                           or (not watching and len(received) > looked_after)):
                next_look = time.monotonic() + 1.0
                died = []
                if not watching:  # watched once every model has loaded: while loading, stubs come and go
                    stubs.look()
                    looked_after = len(received)
                    if ready():
                        watching = True
                        died = stubs.start()  # the stubs running now are the ones watched
                else:
                    died = stubs.died()
                if died:
                    log(f"error: the backend stub of {', '.join(map(repr, died))} died (out of memory?) and "
                         "tritonserver does not restart it: every request to it would fail; stopping the server")
                    failed = True
                    if not received:
                        received.append(signal.SIGTERM)
                    elif draining_until is None:  # a stop asked for in this same pass: stopped at once, gracefully
                        deadline = stop_server_now("stopping tritonserver")
                    else:  # the streams still going through the other models end as a stop would end them
                        deadline = stop_server_now("stopping tritonserver: the drain cannot finish")
            name = signal.Signals(received[0]).name if received else ""
            if received and deadline is None and draining_until is None and len(received) == 1 \
                    and (watching or ready is None or looked_after == len(received)):
                # Nothing to drain before the models are ready (nor before the first look, without ``ready``).
                if drain is not None and not failed and exit_timeout > 0 and (watching or ready is None) \
                        and _raised(drain, log):
                    log(f"{name}: draining: new streams are refused (retry them on another server) while those in "
                        f"flight get up to {exit_timeout:g} s to finish (--exit-timeout); Ctrl-C again stops at once")
                    draining_until, quiet = time.monotonic() + exit_timeout, _QuietLooks(drain.idle)
                elif not watching and ready is not None:
                    deadline = stop_server_now(f"{name}: stopping (the models are still loading)")
                else:
                    deadline = stop_server_now(f"{name}: stopping; streams in flight get up to {server_timeout:g} s "
                                               "(--exit-timeout); Ctrl-C again stops at once")
            elif draining_until is not None and deadline is None and len(received) == 1:
                assert quiet is not None and drain is not None  # draining_until is set only with a drain and quiet
                if quiet.seen():
                    drained = True
                    deadline = stop_server_now("drained: every stream has finished; stopping tritonserver")
                elif time.monotonic() >= draining_until:
                    # Watched on only if no stream is still generating: the rest is the decoder's to finish.
                    generating = drain.generating()
                    watch_stop, cut_off, quiet = generating == 0, bool(generating), _QuietLooks(drain.idle)
                    # A stream cut off stays in flight through tritonserver's own timeout, after which 2.51 may
                    # hang rather than exit: killed a moment later, not STOP_GRACE_SECONDS.
                    deadline = stop_server_now(f"streams still in flight after {exit_timeout:g} s (--exit-timeout): "
                                               f"stopping tritonserver; those it cannot finish in its own "
                                               f"{server_timeout:g} s are cut off",
                                               grace=CUT_OFF_GRACE_SECONDS if cut_off else STOP_GRACE_SECONDS)
            elif len(received) > 1 or (deadline is not None and time.monotonic() > deadline):
                log("stopping at once" if len(received) > 1 else "tritonserver did not exit in time: killing it")
                kill_server_group(process)
                killed = True
            elif watch_stop and not drained:
                assert quiet is not None  # watch_stop is set only with a new quiet
                # Stopping, tritonserver still answers what it had taken (a stream whose generation had ended
                # has its audio's decoding queued already) and its metrics: a stream cut off is one still
                # in flight when it exits.
                drained = quiet.seen()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    kill_server_group(process)  # backend stubs a server that exited in haste left behind
    if failed:
        return 1
    if received:
        # drained: what tritonserver still held in flight (exiting 1, or hanging) had nobody to answer
        if (status == 0 and not cut_off) or (drained and (status == 1 or killed)):
            log("stopped: every stream had finished" if drained else "stopped")
            return 0
        if not watching and status == -received[0]:  # stopped before its models had loaded: nothing streamed
            log("stopped while the models were loading")
            return 0
        log(f"stopped; requests in flight were cut off (tritonserver {'was killed' if killed else f'exited {status}'})")
        return 128 + received[0]
    if status < 0:  # nobody here asked for it
        name = signal.Signals(-status).name if -status in signal.valid_signals() else f"signal {-status}"
        log(f"error: tritonserver was killed by {name}"
            + (" (the kernel's out-of-memory killer sends it, as does `kill -9`)" if -status == signal.SIGKILL else ""))
        return 128 - status
    if status > 0 and not watching and ready is not None:
        log(f"error: tritonserver exited with status {status} before its models were ready (a model that failed "
            "to load, a port in use): its log above says why")
        return NEVER_READY_STATUS
    if status != 0:
        log(f"error: tritonserver exited with status {status}: its log above says why")
    return status

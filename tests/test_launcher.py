"""The tritonserver launcher's environment checks (no server started)."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from orpheus_triton import server


def test_numpy_2_is_refused_for_the_bundled_stub_with_the_fix_named(monkeypatch):
    server.check_stub_numpy("1.26.4")
    with pytest.raises(RuntimeError, match=r"numpy 2\.5\.2 .*pip install 'numpy<2'"):
        server.check_stub_numpy("2.5.2")
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "2.0.0" if name == "numpy" else real_version(name))
    with pytest.raises(RuntimeError, match="numpy < 2"):
        server.backend_directory()


def test_bundled_server_is_found_without_importing_pytriton(monkeypatch):
    monkeypatch.delitem(sys.modules, "pytriton", raising=False)
    binary_dir, libs = server._pytriton_dist()
    assert (binary_dir / "bin" / "tritonserver").is_file() and libs.is_dir()
    assert "pytriton" not in sys.modules


def test_backends_folder_links_are_replaced_in_place_and_a_cache_path_with_a_space_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ORPHEUS_TRITON_CACHE", str(tmp_path / "cache"))
    backends = server.backend_directory()
    python = backends / "python"
    stub = next(python.glob("triton_python_backend_stub"))
    target = stub.resolve()
    stub.unlink()
    stub.symlink_to(tmp_path / "elsewhere")  # a stale link (another wheel's): replaced, not a FileExistsError
    assert server.backend_directory() == backends and stub.resolve() == target
    assert sorted(p.name for p in python.iterdir()) == sorted(
        ["libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"])  # no leftovers
    # The Python backend starts its stubs through an unquoting shell: the server would hang loading models.
    monkeypatch.setenv("ORPHEUS_TRITON_CACHE", str(tmp_path / "my cache"))
    with pytest.raises(RuntimeError, match="has a space in its path.*ORPHEUS_TRITON_CACHE"):
        server.backend_directory()


def test_free_ports_are_three_different_ones():
    """Each was let go before the next was chosen, so the same port could come twice (2 in 30,000)."""
    for _ in range(300):
        ports = server.Ports.free()
        assert len({ports.grpc, ports.http, ports.metrics}) == 3


@pytest.mark.parametrize(("libdir", "first"), [
    ("/usr/lib/x86_64-linux-gnu", "/usr/local/cuda/compat/lib"),  # a system Python: searched anyway
    ("/usr/lib", "/usr/local/cuda/compat/lib"),
    ("/root/.pyenv/versions/3.11.9/lib", "/root/.pyenv/versions/3.11.9/lib"),  # found nowhere else
])
def test_a_system_pythons_library_folder_does_not_shadow_the_cuda_compat_libraries(monkeypatch, libdir, first):
    """Put first on LD_LIBRARY_PATH, the system library folder (where the container runtime mounts the host's
    libcuda) came before a CUDA image's forward-compatibility libcuda, which that variable names."""
    import sysconfig

    config = {"LIBDIR": libdir, "MULTIARCH": "x86_64-linux-gnu"}
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: config.get(name))
    monkeypatch.setattr(server.shutil, "which", lambda name: "/opt/tritonserver/bin/tritonserver")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/usr/local/cuda/compat/lib:/usr/local/nvidia/lib64")
    paths = server.server_environment()["LD_LIBRARY_PATH"].split(":")
    assert paths[0] == first and "/usr/local/cuda/compat/lib" in paths


def test_a_stub_that_dies_between_loading_and_the_watchs_start_is_noticed():
    """serve watches the backend stubs once the models have loaded; a stub killed in the second before (as
    the server turned ready) went unnoticed for good: the server ran on with that model failing every request."""
    from orpheus_triton.server import StubWatch

    class Watch(StubWatch):
        def stubs(self):
            return running[0]

    watch = Watch(server_pid=1)
    running = [{10: "preprocessing"}]
    watch.look()  # loading: the models' stubs come up
    running = [{10: "preprocessing", 11: "preprocessing", 12: "llm", 13: "snac_decoder"}]
    watch.look()
    running = [{11: "preprocessing", 12: "llm"}]  # one preprocessing stub was the loader's; the decoder's died
    assert watch.start() == ["snac_decoder"]
    assert watch.died() == []
    running = [{12: "llm"}]
    assert watch.died() == ["preprocessing"]


def test_a_drain_reads_what_is_in_flight_from_the_servers_metrics():
    """The llm stage's streams and queue (or the relay's, in front of TensorRT-LLM) and the decoder's queued
    windows; not the streams the decoder still frames, which a bare cancellation leaves for 10 minutes. A
    page without the llm stage's figures, or none, is not known to be idle."""
    import http.server
    import threading

    from orpheus_triton.server import Drain, free_port, streams_in_flight

    page = [""]

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(page[0].encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("localhost", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        def torch_engine(active: int, queued: int, windows: int) -> str:
            llm, decoder = '{model="llm",version="1"}', '{model="snac_decoder",version="1"}'
            return (f"# HELP orpheus_llm_active_streams Streams\norpheus_llm_active_streams{llm} {active}\n"
                    f"orpheus_llm_queued_requests{llm} {queued}\norpheus_decoder_streams{decoder} 3\n"
                    f"orpheus_decoder_queued_windows{decoder} {windows}\n")

        page[0] = torch_engine(1, 2, 5)
        assert streams_in_flight(port) == 8  # the decoder's 3 streams (a bare cancellation's, say) aside
        assert streams_in_flight(port, decoding=False) == 3  # still generating, or waiting to
        page[0] = torch_engine(0, 0, 0)
        assert streams_in_flight(port) == 0 and Drain(Path("/nonexistent"), port).idle()
        page[0] = 'orpheus_llm_relayed_streams{model="llm",version="1"} 2\n'  # the relay's repository
        assert streams_in_flight(port) == 2
        page[0] = 'orpheus_decoder_streams{model="snac_decoder",version="1"} 2\n'  # the llm stage still loading
        assert streams_in_flight(port) is None
        page[0] = "orpheus_llm_active_streams{model=llm} not-a-number\n"
        assert streams_in_flight(port) is None
    finally:
        server.shutdown()
    assert streams_in_flight(free_port()) is None and not Drain(Path("/nonexistent"), free_port()).idle()


def test_a_drains_folder_exists_only_while_it_is_raised(tmp_path, monkeypatch):
    """A launcher killed outright (SIGKILL, the OOM killer) never runs its cleanup: a folder made at the
    start of every run was left behind by each such kill."""
    import tempfile  # noqa: PLC0415

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first, second = server.Drain.for_server(0), server.Drain.for_server(0)
    assert first.flag.parent.parent == tmp_path and first.flag != second.flag
    assert list(tmp_path.iterdir()) == []  # nothing made before a stop
    first.start()
    assert first.flag.is_file() and (first.flag.parent.stat().st_mode & 0o777) == 0o700
    assert first.environment() == {server.DRAIN_FILE_ENV: str(first.flag)}
    first.close()
    second.close()  # never raised: nothing to remove, no error
    assert list(tmp_path.iterdir()) == []


class _FakeDrain:
    """A Drain whose server is idle after ``busy_looks`` looks; ``start`` fails with ``refuse``."""

    def __init__(self, busy_looks: int = 0, refuse: OSError | None = None):
        self.busy_looks, self.refuse, self.started = busy_looks, refuse, False

    def start(self) -> None:
        if self.refuse:
            raise self.refuse
        self.started = True

    def idle(self) -> bool:
        self.busy_looks -= 1
        return self.busy_looks < 0

    def generating(self) -> int:
        return 0


def _stand_in_server(handler: bool = True, linger: float = 0.0, status: int = 1):
    """A process in a session of its own that, like tritonserver with a request a bare cancellation left in
    flight, exits 1 on SIGTERM or SIGINT (``linger`` seconds later, as tritonserver finishing what it holds);
    without ``handler``, as tritonserver while its models load, it is killed by them."""
    import subprocess

    trap = f'trap "sleep {linger}; exit {status}" TERM INT; ' if handler else ""
    return subprocess.Popen(["sh", "-c", f"{trap}while :; do sleep 0.05; done"], start_new_session=True)


def _signal_soon(delay: float = 0.3):
    """SIGTERM to this process ``delay`` s from now, once run_in_foreground's handler is in place: sent
    before it (a slow start on a loaded machine), it would end the whole test run."""
    import os
    import signal
    import threading
    import time

    def send() -> None:
        due = time.monotonic() + delay
        while signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) and time.monotonic() < due + 10:
            time.sleep(0.01)
        time.sleep(max(0.0, due - time.monotonic()))
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send, daemon=True).start()


@pytest.mark.parametrize("case", ["drained", "not ready", "flag unwritable"])
def test_the_drain_runs_only_once_the_models_are_ready_and_its_flag_is_up(case):
    """A stop while the models still load waited out the whole exit timeout for metrics that were not
    there yet; a drain whose flag could not be written ended the launcher with a traceback; a drain that
    saw every stream end reported the requests a bare cancellation left in flight as streams cut off."""
    import signal
    import time

    from orpheus_triton.server import run_in_foreground

    drain = _FakeDrain(busy_looks=1, refuse=PermissionError(13, "Permission denied") if case == "flag unwritable"
                       else None)
    said = []
    process = _stand_in_server()
    _signal_soon()
    started = time.monotonic()
    status = run_in_foreground(process, exit_timeout=30, ready=lambda: case != "not ready", log=said.append,
                               drain=drain)
    took = time.monotonic() - started
    if case == "drained":
        assert drain.started and any("drained: every stream has finished" in line for line in said)
        assert status == 0 and took < 5, said
    else:
        assert not drain.started and any("SIGTERM: stopping" in line for line in said), said
        assert status == 128 + signal.SIGTERM and took < 3  # tritonserver exited 1: cut off, said as such
    if case == "flag unwritable":
        assert any("cannot drain ([Errno 13] Permission denied): stopping at once" in line for line in said)


def test_a_stop_while_the_models_load_is_said_as_such_and_is_no_failure():
    """tritonserver has no signal handler until its models have loaded: SIGTERM kills it. That was reported
    as streams in flight cut off, exit 143, with nothing streaming yet."""
    from orpheus_triton.server import run_in_foreground

    said = []
    process = _stand_in_server(handler=False)
    _signal_soon()
    assert run_in_foreground(process, exit_timeout=30, ready=lambda: False, log=said.append,
                             drain=_FakeDrain()) == 0
    assert said[-1] == "stopped while the models were loading", said


@pytest.mark.parametrize("finished,generating,exit_status", [(True, False, 1), (False, False, 1), (True, True, 1),
                                                            (True, True, 0)])
def test_streams_that_finish_while_tritonserver_stops_are_not_reported_cut_off(finished, generating, exit_status):
    """A drain that ran out of time stops tritonserver, which still finishes the streams whose audio it
    holds (their generation over, their decoding queued) within its own exit timeout, then exits 1 for
    its models' unloading: every stream had ended whole, and `serve` said they were cut off, exit 143.
    A stream still generating at the stop is cut off (its next step refused), though its count falls to 0."""
    import signal
    import time

    from orpheus_triton.server import run_in_foreground

    class SlowDrain(_FakeDrain):  # busy past the exit timeout, idle while the server stops (or never)
        def idle(self) -> bool:
            return finished and time.monotonic() > busy_until

        def generating(self) -> int:
            return int(generating)

    said = []
    busy_until = time.monotonic() + 1.8
    process = _stand_in_server(linger=3.0, status=exit_status)  # 0 or 1: one still generating is cut off
    _signal_soon()
    status = run_in_foreground(process, exit_timeout=1, ready=lambda: True, log=said.append, drain=SlowDrain())
    assert any("streams still in flight after 1 s (--exit-timeout): stopping tritonserver" in line for line in said)
    if finished and not generating:
        assert status == 0 and said[-1] == "stopped: every stream had finished", said
    else:
        assert status == 128 + signal.SIGTERM and said[-1].startswith("stopped; requests in flight were cut off")


def test_a_tritonserver_that_dies_on_its_own_is_said_to_have_died():
    """`serve` exited 137 without a word when tritonserver itself was killed (the OOM killer, `kill -9`)."""
    import os
    import signal
    import threading

    from orpheus_triton.server import run_in_foreground

    said = []
    process = _stand_in_server()
    threading.Timer(0.3, os.kill, (process.pid, signal.SIGKILL)).start()
    assert run_in_foreground(process, exit_timeout=30, ready=lambda: True, log=said.append) == 128 + signal.SIGKILL
    assert said[-1].startswith("error: tritonserver was killed by SIGKILL (the kernel's out-of-memory killer"), said


def test_a_stop_just_after_the_models_became_ready_drains():
    """Readiness is looked at once a second: a stream could be under way already when a stop came before
    the next look, which took the server for one still loading, stopped it at once and cut the stream off
    (seen as a flaky `serve` test: killed, exit 129, where it should have drained)."""
    import time

    from orpheus_triton.server import run_in_foreground

    ready_at = time.monotonic() + 0.35  # after the first look (0.2 s in), well before the next (1.2 s)
    said, drain = [], _FakeDrain()
    process = _stand_in_server()
    _signal_soon(0.6)
    status = run_in_foreground(process, exit_timeout=30, ready=lambda: time.monotonic() >= ready_at,
                               log=said.append, drain=drain)
    assert drain.started and any("SIGTERM: draining" in line for line in said), said
    assert status == 0 and said[-1] == "stopped: every stream had finished", said


@pytest.mark.parametrize("loaded", [False, True])
def test_a_server_that_never_became_ready_exits_3_not_as_a_dead_stub(loaded):
    """tritonserver exits 1 when a model fails to load, as `serve` exits 1 for a backend stub that died while
    serving: a supervisor could not leave a server that cannot start stopped while restarting a crashed one."""
    import subprocess
    import time

    from orpheus_triton.server import NEVER_READY_STATUS, run_in_foreground

    said = []
    process = subprocess.Popen(["sh", "-c", "sleep 0.5; exit 1"], start_new_session=True)
    started = time.monotonic()
    status = run_in_foreground(process, exit_timeout=30, ready=lambda: loaded, log=said.append, drain=_FakeDrain())
    assert time.monotonic() - started < 5
    if loaded:
        assert status == 1 and said[-1] == "error: tritonserver exited with status 1: its log above says why", said
    else:
        assert status == NEVER_READY_STATUS == 3, said
        assert said[-1].startswith("error: tritonserver exited with status 1 before its models were ready"), said


def test_a_stop_during_a_readiness_look_is_decided_on_a_look_after_it():
    """A look asked before the models were ready but answered after a stop signal came is stale: the
    stop was taken for one while loading, cutting off a stream already under way."""
    import os
    import signal

    from orpheus_triton.server import run_in_foreground

    looks = []

    def ready() -> bool:
        looks.append(len(looks))
        if len(looks) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while this look is under way
            return False
        return True

    said, drain = [], _FakeDrain()
    status = run_in_foreground(_stand_in_server(), exit_timeout=30, ready=ready, log=said.append, drain=drain)
    assert len(looks) >= 2 and drain.started and any("SIGTERM: draining" in line for line in said), said
    assert status == 0, said


def test_a_server_holding_a_stream_cut_off_is_killed_soon_after_its_own_exit_timeout():
    """tritonserver 2.51 may hang after its exit timeout with a stream it cannot finish: `serve` waited
    STOP_GRACE_SECONDS more each time (5 s), where such a stop is known to end so."""
    import signal
    import time

    from orpheus_triton.server import CUT_OFF_GRACE_SECONDS, run_in_foreground

    class Generating(_FakeDrain):
        def idle(self) -> bool:
            return False

        def generating(self) -> int:
            return 1

    said = []
    process = _stand_in_server(linger=30.0)  # hangs on SIGTERM
    _signal_soon()
    started = time.monotonic()
    status = run_in_foreground(process, exit_timeout=1, ready=lambda: True, log=said.append, drain=Generating())
    took = time.monotonic() - started
    assert status == 128 + signal.SIGTERM and "tritonserver did not exit in time: killing it" in said, said
    assert took < 0.3 + 1 + 1 + CUT_OFF_GRACE_SECONDS + 1.5, (took, said)  # drain, tritonserver's 1 s, grace


def test_a_stream_whose_figures_show_a_publish_late_is_still_drained():
    """The llm stage publishes its figures every 0.5 s, from a thread a busy machine may run late: two
    quiet looks 0.6 s apart stopped a server whose stream, taken just before the drain, had not shown yet."""
    import time

    from orpheus_triton.server import run_in_foreground

    class LatePublish(_FakeDrain):  # the stream shows 0.7 s after the signal and runs until 3 s after it
        def idle(self) -> bool:
            self.started_at = getattr(self, "started_at", time.monotonic())
            return not 0.7 <= time.monotonic() - self.started_at < 3.0

    said, drain = [], LatePublish()
    _signal_soon()
    status = run_in_foreground(_stand_in_server(), exit_timeout=30, ready=lambda: True, log=said.append,
                               drain=drain)
    assert status == 0 and any("drained: every stream has finished" in line for line in said), said
    assert time.monotonic() - drain.started_at >= 3.0  # drained after the stream ended, not before it showed


PRINT_PARENT_DEATH_SIGNAL = (
    "import ctypes, os; value = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(value));"  # PR_GET_PDEATHSIG
    " print(os.getpid(), value.value)"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_command_run_with_the_parent_death_signal_is_the_child_itself_and_gets_sigterm():
    """The command becomes the child (its pid, the one a launcher signals) with SIGTERM as its
    parent-death signal, set without a ``preexec_fn`` (which made the child fork where gRPC's fork handlers
    can kill it before its exec), and SIGPIPE and SIGXFSZ not ignored (Python's own, kept by an exec); a
    command that cannot run raises as Popen does."""
    import signal
    import subprocess

    process = server.popen_with_parent_death_signal([sys.executable, "-c", PRINT_PARENT_DEATH_SIGNAL],
                                                    stdout=subprocess.PIPE, text=True)
    pid, death_signal = process.communicate(timeout=30)[0].split()
    assert int(pid) == process.pid and int(death_signal) == signal.SIGTERM
    status = server.popen_with_parent_death_signal(["cat", "/proc/self/status"], stdout=subprocess.PIPE, text=True)
    ignored = next(line.split()[1] for line in status.communicate(timeout=30)[0].splitlines()
                   if line.startswith("SigIgn:"))  # cat's own: not a Python's, which ignores both itself
    assert not int(ignored, 16) & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)), ignored
    with pytest.raises(FileNotFoundError, match=r"No such file or directory: '/nonexistent/tritonserver'"):
        server.popen_with_parent_death_signal(["/nonexistent/tritonserver", "--help"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_thread_that_ends_at_once_after_starting_a_command_still_ends_it():
    """The parent-death signal is set before the start returns: a thread that ended right after starting
    the command left it running (the signal was set by the child tens of milliseconds later)."""
    import subprocess
    import threading

    started = []
    thread = threading.Thread(target=lambda: started.append(server.popen_with_parent_death_signal(
        [sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.DEVNULL)))
    thread.start()
    thread.join()
    try:
        assert started[0].wait(timeout=10) == -15  # SIGTERM as the thread ended
    finally:
        started[0].kill()

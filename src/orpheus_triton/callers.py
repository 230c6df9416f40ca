"""Callers in flight across the ensemble's processes: admitting them end to end (``serve --max-callers``).

The llm stage's limits (``--max-streams``, ``--max-queue``) count streams generating, and a stream's slot
frees when its last token is generated, while its audio may still be decoding seconds behind: generation
runs ahead of real time, and on a CPU the decoder is the bottleneck. A server admitting by those alone
takes more callers than it can play in real time, and then every caller stutters at once.

So a caller counts from preprocessing's admission until the decoder hands over its stream's last audio,
or until its stream ends before its end reaches the decoder (stopped, cancelled, refused or failed in the
llm stage). The stages are processes of their own (Python backend stubs), so the count is kept as files:
a lease per caller in a folder the launcher makes for the server's run and names in its environment
(``CALLERS_DIR_ENV``), named by a hash of the request id (any string, not a file name; not written down
either: anyone with a stream's id can stop it). The llm stage touches the leases of its streams (waiting
for a slot or generating) and the decoder those of the streams whose audio leaves; a
lease untouched for ``LEASE_IDLE_SECONDS`` no longer counts, so a caller lost where no stage sees its end
(a bare gRPC cancellation through the ensemble, a closed HTTP connection, a stub that crashed) frees its
place then (at the bound, up to ``EXACT_COUNT_SECONDS`` later: a bounded admission counts the leases by
their names and looks for expired ones only where the names reach the bound).

The lease is also the id's: preprocessing refuses a second caller with the id of one in flight, where
the llm stage alone let one in as soon as the first stream's generation ended, its audio still decoding.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .constants import CALLERS_DIR_ENV, SERVER_BUSY, shown
from .serving import IdleSweep, StreamIdError

log = logging.getLogger(__name__)

# A lease no stage touched for this long no longer counts: the longest a caller still there goes untouched
# is its way from preprocessing into the llm stage, and from the llm stage's end of its stream to the
# decoder's next answer of it, a round or a few (seconds on an overloaded CPU).
LEASE_IDLE_SECONDS = 30.0
# A stage touches a stream's lease at most this often (a file's time set: a system call).
LEASE_TOUCH_SECONDS = 5.0
# A bounded admission that finds as many leases as its bound by their names looks for expired ones among
# them at most this often: a lost caller's place is free at most this long after its lease expired.
EXACT_COUNT_SECONDS = 1.0
# Named so that no request id's lease can take it (those are hex digits).
_ADMISSION_LOCK = ".admission.lock"
# What a refusal at the bound says after `server busy: K in flight, ` (read by perf/overload_bench.py).
CALLERS_FULL = "as many callers as this server takes"
# A folder that cannot be written (gone, and not to be made again) is said at most this often.
_WARN_SECONDS = 60.0


class CallersFull(RuntimeError):
    """As many callers are in flight as the server takes (``--max-callers``): retry on another server."""


class CallerLeases:
    """The leases of the callers in flight, in ``folder`` (shared by the server's processes).

    ``admit`` (preprocessing) takes a lease; ``keep_alive`` (the llm stage, for its streams) and ``touch``
    (the decoder, as a stream's audio leaves) keep it alive; ``end`` (the decoder
    before a stream's last audio, the llm stage where a stream ends before its end reaches the decoder)
    gives it back. Thread-safe; any number of processes may share a folder.
    """

    def __init__(self, folder: Path | str, idle_seconds: float = LEASE_IDLE_SECONDS,
                 touch_seconds: float = LEASE_TOUCH_SECONDS, clock: Callable[[], float] = time.time):
        self.folder = Path(folder)
        self.idle_seconds, self.touch_seconds, self.clock = idle_seconds, touch_seconds, clock
        self._touched: dict[str, float] = {}  # lease -> when this process last touched it
        self._sweep = IdleSweep(idle_seconds, clock())
        self._next_removal = clock()  # when admission next removes expired leases, bounded or not
        self._next_exact = self._next_removal  # the earliest a bounded admission at its bound next does
        self._lock = threading.Lock()  # an flock is per open file: the threads of a process take turns first
        self._closed = threading.Event()
        self._warned = -_WARN_SECONDS

    @classmethod
    def from_environment(cls) -> CallerLeases | None:
        """The server's leases (the folder ``CALLERS_DIR_ENV`` names, made here if missing), or None where
        the server was started without one (tritonserver run directly: callers are not counted)."""
        folder = os.environ.get(CALLERS_DIR_ENV, "")
        if not folder:
            return None
        Path(folder).mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(folder)

    def admit(self, request_id: str, max_callers: int = 0) -> None:
        """Take a lease for ``request_id``'s caller. Raises CallersFull where ``max_callers`` (> 0) leases
        are held already (live ones, or for up to EXACT_COUNT_SECONDS leases that expired meanwhile),
        StreamIdError where a live one is the id's own (a caller in flight with it).
        A folder that cannot be written is made again; where that fails too, the caller is let in
        uncounted (said in the log) unless the server is bounded, which then raises the OSError."""
        path = self._path(request_id)
        try:
            with self._admission():
                now, own = self.clock(), path.exists()
                if own and not self._expired(path, now):
                    raise StreamIdError(f"request id {shown(request_id)} is already streaming (a caller with it is "
                                        "still in flight); every concurrent stream needs its own id")
                # Bounded, the leases are counted by their names (expired ones too: never fewer than live
                # ones; the caller's own, expired, would be taken again); expired leases go every
                # idle_seconds, bounded or not, and at most every EXACT_COUNT_SECONDS where the names reach
                # the bound, which then counts live leases only.
                due, held = _due(now, self._next_removal, self.idle_seconds), 0
                if max_callers > 0 and not due:
                    held = self._named() - own
                    due = held >= max_callers and _due(now, self._next_exact, EXACT_COUNT_SECONDS)
                if due:
                    self._next_removal, self._next_exact = now + self.idle_seconds, now + EXACT_COUNT_SECONDS
                    held = self._count(now, remove_expired=True)
                if max_callers > 0 and held >= max_callers:
                    raise CallersFull(f"{SERVER_BUSY}: {held} in flight, {CALLERS_FULL} "
                                      f"(--max-callers {max_callers}); retry on another server or later")
                path.touch()
                os.utime(path, (now, now))
        except OSError as error:
            if max_callers > 0:
                raise
            self._warn(f"callers in flight are not counted ({error})")

    def touch(self, request_id: str) -> None:
        """The caller is still there (a stage saw its stream): at most once per ``touch_seconds`` per
        process. A lease that is gone stays gone (its stream ended; the id may be a new caller's soon)."""
        name, now = self._name(request_id), self.clock()
        with self._lock:
            if now - self._touched.get(name, -self.touch_seconds) < self.touch_seconds:
                return
            self._touched[name] = now
            self._sweep(self._touched, lambda touched: touched, now)
        self._set_time(name, now)

    def keep_alive(self, request_ids: Callable[[], Iterable[str]]) -> None:
        """Touch the leases of ``request_ids()`` every ``touch_seconds``, on a thread of its own, until
        ``close``: the llm stage's streams, waiting for a slot or generating, whose tokens may not reach
        the decoder for a while."""
        def run() -> None:
            while not self._closed.wait(self.touch_seconds):
                try:
                    now = self.clock()
                    for request_id in request_ids():
                        self._set_time(self._name(request_id), now)
                except Exception:  # noqa: BLE001 (the thread must outlive a bad pass; its callers expire at worst)
                    log.exception("touching the leases of the callers in flight failed")

        threading.Thread(target=run, name="caller-leases", daemon=True).start()

    def close(self) -> None:
        self._closed.set()

    def end(self, request_id: str) -> None:
        """The caller's stream ended: its place is free (for a new caller with its id too)."""
        name = self._name(request_id)
        with self._lock:
            self._touched.pop(name, None)
        try:
            (self.folder / name).unlink(missing_ok=True)
        except OSError as error:  # the folder unreadable: nothing to free there
            self._warn(f"could not end a caller's lease ({error})")

    def count(self) -> int | None:
        """Callers in flight (live leases); None where the folder cannot be read (said in the log)."""
        try:
            return self._count(self.clock())
        except OSError as error:
            self._warn(f"could not count the callers in flight ({error})")
            return None

    def _count(self, now: float, remove_expired: bool = False) -> int:
        """Live leases; with ``remove_expired`` (only under the admission's lock, where no lease of the same
        name is being taken meanwhile), the expired ones are removed."""
        live = 0
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                with contextlib.suppress(FileNotFoundError):  # ended meanwhile
                    if now - entry.stat().st_mtime <= self.idle_seconds:
                        live += 1
                    elif remove_expired:
                        os.unlink(entry.path)
        return live

    def _named(self) -> int:
        """At least as many as the live leases, from the folder's listing alone (expired leases too): at
        hundreds of callers in flight, looking at each lease took a bounded admission a millisecond, under
        the admission's lock."""
        return sum(not name.startswith(".") for name in os.listdir(self.folder))

    def _set_time(self, name: str, now: float) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.folder / name, (now, now))

    def _expired(self, path: Path, now: float) -> bool:
        try:
            return now - path.stat().st_mtime > self.idle_seconds
        except FileNotFoundError:
            return True

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned >= _WARN_SECONDS:
            self._warned = now
            log.warning("%s", message)

    @contextlib.contextmanager
    def _admission(self) -> Iterator[None]:
        """Counting and taking a lease as one step, across the server's processes (an flock). The folder is
        made again if it went (a cache cleaned while serving)."""
        with self._lock:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(self.folder / _ADMISSION_LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield

    def _path(self, request_id: str) -> Path:
        return self.folder / self._name(request_id)

    @staticmethod
    def _name(request_id: str) -> str:
        return hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _due(now: float, at: float, interval: float) -> bool:
    """Whether a step planned for ``at`` (``interval`` after it last ran) is due ``now``: also where the
    clock went back since (``at`` more than ``interval`` ahead), which would otherwise put it off that long."""
    return now >= at or at - now > interval


def _nobody(request_id: str) -> None:
    """Where the server counts no callers, a stream's end frees no place."""


def ended_by(leases: CallerLeases | None) -> Callable[[str], None]:
    """The llm stage's ``caller_gone`` (serving.ActiveStreams): ``leases.end``, or nothing without leases."""
    return leases.end if leases is not None else _nobody


def admission_check(leases: CallerLeases | None, max_callers: int) -> None:
    """Refuse (ValueError, as the preprocessing model loads) a ``max_callers`` that cannot be kept: negative,
    or on a server whose stages count no callers."""
    if max_callers < 0:
        raise ValueError(f"max_callers must be >= 0 (0: no bound beyond the llm stage's), got {max_callers}")
    if max_callers and leases is None:
        raise ValueError(f"max_callers {max_callers} needs the folder where the server's stages count callers in "
                         f"flight, named by the environment variable {CALLERS_DIR_ENV}, which `orpheus-triton "
                         "serve` (and `render_gpu_repository.py --serve`) sets: start tritonserver through it, or "
                         "set it to a new folder for each start")

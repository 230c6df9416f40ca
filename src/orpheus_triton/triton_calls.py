"""Calls to Triton kept off the stages' hot loops: response sends and cancellation questions.

In Triton's Python backend every response send and every ``is_cancelled`` is a round
trip from the backend stub to the server (perf/round_trips.py: tens to hundreds of
microseconds each on 2 CPU cores). The engine loop and the decoder's worker make
hundreds of them a second at a few hundred streams, so here they go out from threads
of their own: ``ResponseQueue`` sends in order, ``CancellationWatch`` asks about every
stream in passes, and the loops only queue a call or read a flag.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable

from .constants import CANCEL_CHECK_DUTY, MAX_RESPONSE_THREADS

log = logging.getLogger(__name__)

Lost = Callable[[Exception], None]  # told that one send failed (ResponseQueue.put)


class ResponseQueue:
    """Talks to Triton for a model on one thread of its own: response sends, and other calls, in order.

    A response send is a round trip from the backend stub to the server (about 100 us
    measured on 2 CPU cores): the engine loop only queues it and goes on with the next
    step. A send that fails (the stream's client went away) is reported to ``on_error``
    with the stream's key, and that stream's later responses are dropped, up to the one
    queued with ``last``; ``before_last`` is called with a stream's key before that one is
    made (``CancellationWatch.settle``: no request may be asked anything after its final
    response went out).

    ``threaded=False`` makes each call where it is put, in order, as the engine loop did
    before: on a CPU-only machine the extra thread's work competes with the SNAC
    decoder for the cores (2 cores, 3 streams: more stalled streams), while the round
    trips it saves are small beside a CPU step.
    """

    def __init__(self, on_error: Callable[[str, Exception], None], threaded: bool = True,
                 before_last: Callable[[str], None] | None = None, name: str = "triton-responses"):
        self.on_error = on_error
        self.before_last = before_last  # called with a stream's key before its last call is made
        self._queue: deque[tuple[str | None, Callable[[], None], bool, Lost | None, bool] | None] = deque()
        self._ready = threading.Condition()
        self._failed: set[str] = set()
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def put(self, key: str | None, send: Callable[[], None], last: bool = False, lost: Lost | None = None,
            alone: bool = False) -> None:
        """Queue ``send`` for stream ``key`` (None: a call for no stream); ``last``: the stream's
        final response (the key may be reused after it). ``lost``: told of this send's failure instead
        of ``on_error``, by the stream that made it (which knows whether the key is still its own).
        ``alone``: the one and final answer of a request that only shares the key (a refusal of a new
        stream with the id of one still ending): made even where the key's stream failed, leaving that
        stream's calls to be dropped up to its own last one. Unthreaded, it runs here and now."""
        if self._thread is None:
            with self._ready:  # the engine thread and execute() may both be sending
                self._deliver(key, send, last, lost, alone)
            return
        with self._ready:
            self._queue.append((key, send, last, lost, alone))
            self._ready.notify()

    def wait_for_room(self, most: int) -> None:
        """Wait while more than ``most`` calls are queued (threaded; unthreaded none ever is): a producer
        faster than the sends then keeps a bounded backlog, its streams' latency with it, instead of
        running ahead without end."""
        if self._thread is None:
            return
        with self._ready:
            self._ready.wait_for(lambda: len(self._queue) <= most)

    def close(self) -> None:
        """Send what is queued, then stop."""
        if self._thread is None:
            return
        with self._ready:
            self._queue.append(None)
            self._ready.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._queue)
                entry = self._queue.popleft()
                self._ready.notify_all()  # room for a producer in wait_for_room
            if entry is None:
                return
            try:
                self._deliver(*entry)
            except Exception:  # noqa: BLE001 (a failing callback must not end the thread: every later call would wait)
                log.exception("a call on the response thread failed")

    def _deliver(self, key: str | None, send: Callable[[], None], last: bool, lost: Lost | None = None,
                 alone: bool = False) -> None:
        if (last or alone) and key is not None and self.before_last is not None:
            self.before_last(key)
        if alone or key not in self._failed:
            try:
                send()
            except Exception as error:  # noqa: BLE001 (reported; the stream is dropped)
                if key is None:
                    log.exception("call on the response thread failed")
                    return
                if not alone:  # an alone call answers a request of its own: the key's stream is not dropped
                    self._failed.add(key)
                if lost is not None:
                    lost(error)
                else:
                    self.on_error(key, error)
        if last:
            self._failed.discard(key)


class ResponseLanes:
    """``ResponseQueue``'s calls spread over ``lanes`` threads, each stream's calls always on the same one.

    A send's round trip mostly waits on the server, which takes the stub's messages on a
    thread pool: where one thread cannot send all a model's responses (about 2,500 a
    second for 216 real-time streams at the decoder), several may. A stream's calls stay
    in order on its lane (Triton refuses two sends to one request at once: "response
    output count mismatch", perf/round_trips.py); calls for no stream go on the first.
    ``on_error`` and ``before_last`` may then be called from any lane's thread.
    """

    def __init__(self, on_error: Callable[[str, Exception], None], lanes: int,
                 before_last: Callable[[str], None] | None = None, name: str = "triton-responses"):
        if lanes < 2:
            raise ValueError(f"response lanes are for 2 threads or more, got {lanes}")
        self._lanes = [ResponseQueue(on_error, threaded=True, before_last=before_last, name=f"{name}-{i}")
                       for i in range(lanes)]

    def lane_of(self, key: str | None) -> int:
        return 0 if key is None else zlib.crc32(key.encode()) % len(self._lanes)

    def put(self, key: str | None, send: Callable[[], None], last: bool = False, lost: Lost | None = None,
            alone: bool = False) -> None:
        self._lanes[self.lane_of(key)].put(key, send, last, lost, alone)

    def wait_for_room(self, most: int) -> None:
        """Wait until no lane holds more than its share of ``most`` queued calls."""
        share = max(1, most // len(self._lanes))
        for lane in self._lanes:
            lane.wait_for_room(share)

    def close(self) -> None:
        for lane in self._lanes:
            lane.close()


def response_queue(on_error: Callable[[str, Exception], None], threads: int,
                   before_last: Callable[[str], None] | None = None) -> ResponseQueue | ResponseLanes:
    """Where a model's responses leave from: where they are put (0), one thread (1) or ``threads`` lanes."""
    if threads < 0:
        raise ValueError(f"response threads must be >= 0, got {threads}")
    if threads > 1:
        return ResponseLanes(on_error, threads, before_last=before_last)
    return ResponseQueue(on_error, threaded=threads == 1, before_last=before_last)


def response_threads(params: dict[str, str], device_type: str, on_gpu: int = 1) -> int:
    """The llm and snac_decoder models' ``response_thread`` parameter as a number of threads: auto (``on_gpu``
    on a GPU, none on a CPU), true (one), false (none: each response is sent where it is made) or a count."""
    value = params.get("response_thread", "auto").strip().lower()
    if value == "auto":
        return on_gpu if device_type == "cuda" else 0
    if value in ("true", "false"):
        return int(value == "true")
    if value.isdigit() and int(value) <= MAX_RESPONSE_THREADS:
        return int(value)
    raise ValueError(f"response_thread must be auto, true, false or a number of threads up to "
                     f"{MAX_RESPONSE_THREADS}, got {value!r}")


def response_thread_setting(value: str) -> str:
    """``value`` if it is a valid ``response_thread`` parameter (for command lines); ValueError otherwise."""
    response_threads({"response_thread": value}, "cpu")
    return value.strip().lower()


class CancellationWatch:
    """Which requests were cancelled, asked of Triton off the engine loop.

    In Triton's Python backend ``request.is_cancelled()`` is a round trip to the server
    (perf/round_trips.py: 34-53 us each on 2 CPU cores, a pass over 216 streams 7.2-7.6 ms):
    asked by the engine for every stream at every step, that is milliseconds a step at a
    few hundred streams, serial with the forward. Here the engine's check (``watch``'s
    return value) only reads a flag and asks for a pass; a pass asks Triton about every
    watched request. With ``threaded``, passes run on a thread of their own, so that no
    response waits behind one (they did when passes ran on the response thread: on 2 cores
    a send and an ask in turn went at 4,500-5,500 a second against 5,800-13,400 sends alone).
    At most one pass is asked for or running at a time, so there are no more round trips
    than the engine made itself. A cancellation lands at the first step after the pass that saw it.
    Passes start ``min_interval`` apart at least, and after each the next waits until
    passes have taken no more than ``duty`` of the time (a pass of d seconds, then a rest
    of d (1 - duty) / duty): with few streams a pass every step, with hundreds as often as
    that share allows, so the questions never crowd the responses out of the server.

    A request must never be asked anything after its final response went out (the server
    may have freed it: asking crashed tritonserver 2.51). So ``forget`` comes before a
    stream's final response is queued, after which no pass starts asking it, and the
    thread that sends that response calls ``settle`` first, which waits out an ask of
    it already in flight (``ResponseQueue(before_last=...)``).
    Without ``threaded`` or ``run``, the check asks Triton itself, there and then.
    ``run`` (tests) takes each pass instead of a thread: it runs when the caller says.
    """

    def __init__(self, threaded: bool = False, min_interval: float = 0.0, duty: float = CANCEL_CHECK_DUTY,
                 run: Callable[[Callable[[], None]], None] | None = None):
        if not 0 < duty <= 1:
            raise ValueError(f"the cancellation passes' duty must be in (0, 1], got {duty}")
        self.min_interval = min_interval  # passes start at least this far apart
        self.duty = duty  # and take at most this share of the time: a pass of d seconds rests d (1 - duty) / duty
        self._passes = None
        if threaded and run is None:
            passes = self._passes = ResponseQueue(on_error=lambda key, error: None, name="triton-cancellations")
            run = lambda call: passes.put(None, call)  # noqa: E731
        self.run = run
        self._watched: dict[str, tuple[Callable[[], bool], threading.Event]] = {}
        self._lock = threading.Lock()
        self._asked = threading.Condition(self._lock)  # an ask has returned
        self._asking: str | None = None  # the key a pass is asking Triton about right now
        self._pass_waiting = False  # a pass was asked for and has not ended yet
        self._next_pass = 0.0

    def watch(self, key: str, is_cancelled: Callable[[], bool]) -> Callable[[], bool]:
        """Start watching; returns the engine's check (no round trip: a flag, and a pass asked for)."""
        if self.run is None:
            return is_cancelled
        flag = threading.Event()
        with self._lock:
            self._watched[key] = (is_cancelled, flag)

        def check() -> bool:
            now = time.monotonic()
            with self._lock:
                ask = not self._pass_waiting and now >= self._next_pass
                if ask:
                    self._pass_waiting, self._next_pass = True, now + self.min_interval
            if ask:
                assert self.run is not None  # check is made only where self.run is set (see above)
                self.run(self._pass)
            return flag.is_set()

        return check

    def forget(self, key: str) -> None:
        """Stop asking about ``key``: call it before its request's final response is queued."""
        with self._lock:
            self._watched.pop(key, None)

    def settle(self, key: str) -> None:
        """Return once no pass is asking about ``key`` (forgotten: none will again). The sender of its
        final response calls this first."""
        with self._lock:
            self._asked.wait_for(lambda: self._asking != key)

    def close(self) -> None:
        if self._passes is not None:
            self._passes.close()

    def _pass(self) -> None:
        started = time.monotonic()
        try:
            self._ask_all()
        finally:
            ended = time.monotonic()
            with self._lock:  # the next pass may be asked for from now on, once its rest is over
                self._pass_waiting = False
                self._next_pass = max(self._next_pass, ended + (ended - started) * (1 - self.duty) / self.duty)

    def _ask_all(self) -> None:
        with self._lock:
            watched = list(self._watched.items())
        for key, entry in watched:
            is_cancelled, flag = entry
            with self._lock:
                # Forgotten meanwhile (its final response may be queued or sent), or watched again for a
                # new stream with its id: the old request must not be asked any more.
                if self._watched.get(key) is not entry:
                    continue
                self._asking = key
            try:
                cancelled = is_cancelled()
            except Exception:  # noqa: BLE001 (cannot be asked: nobody is listening any more)
                log.exception("could not ask whether request %r was cancelled", key)
                cancelled = True
            finally:
                with self._lock:
                    self._asking = None
                    self._asked.notify_all()
            if cancelled:
                flag.set()
                with self._lock:  # the new stream with this id, if one came meanwhile, stays watched
                    if self._watched.get(key) is entry:
                        del self._watched[key]

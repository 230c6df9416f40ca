"""Triton-independent logic of the LLM and decoder stages (the model.py files only adapt tensors).

Stream identity: Triton hands every composing model of the ensemble the
client's request id, and nothing else can travel from the preprocessor to the
decoder (a step after a decoupled model may only take that model's outputs).
So the request id *is* the stream key, and both stages guard it:

* the LLM stage refuses a request with no id, or with the id of a stream it is
  still generating, so two live streams can never share a key;
* the LLM stage always ends a stream with ``end_id`` (appended when the stream
  stops at ``max_tokens``), and the decoder drops a stream's state when it sees
  it, so a later request may reuse the id and starts clean;
* the decoder refuses chunks with no id.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .constants import (
    CANCEL_CHECK_SECONDS,
    END_OF_SPEECH,
    LLM_AUDIO_GUARD,
    LLM_END_ID,
    LLM_INPUT_IDS,
    LLM_INPUT_LENGTHS,
    LLM_OUTPUT_IDS,
    LLM_REPETITION_PENALTY,
    LLM_REQUEST_OUTPUT_LEN,
    LLM_SEED,
    LLM_SEQUENCE_LENGTH,
    LLM_STOP,
    LLM_TEMPERATURE,
    LLM_TOP_K,
    LLM_TOP_P,
    NEWCOMER_ROUND_HORIZON,
    REQUEST_START,
    STALL_TOLERANCE,
    STREAM_STATE_SECONDS,
    TOKENS_PER_FRAME,
)
from .frames import StreamFramer, Window

log = logging.getLogger(__name__)


class TritonLogHandler(logging.Handler):
    """This package's log records in tritonserver's own log, through the Python backend's ``pb_utils.Logger``."""

    def __init__(self, triton_logger):
        super().__init__()
        self.triton_logger = triton_logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                self.triton_logger.log_error(message)
            elif record.levelno >= logging.WARNING:
                self.triton_logger.log_warn(message)
            elif record.levelno >= logging.INFO:
                self.triton_logger.log_info(message)
            else:
                self.triton_logger.log_verbose(message)
        except Exception:  # noqa: BLE001 (logging must never take a request down)
            self.handleError(record)


def log_to_triton(pb_utils, level: int = logging.INFO) -> None:
    """Send this package's logging (what the engine runs on, CUDA graph captures, warm-up, warnings) to
    tritonserver's log. A Python model's stub process configures no logging, so without this its INFO
    records went nowhere and its warnings reached stderr without Triton's timestamps. Once per process."""
    package = logging.getLogger(__name__.split(".")[0])
    if any(isinstance(h, TritonLogHandler | logging.StreamHandler) for h in package.handlers):
        return
    triton_logger = getattr(pb_utils, "Logger", None)
    handler = TritonLogHandler(triton_logger) if triton_logger is not None else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    package.addHandler(handler)
    package.setLevel(level)

GetInput = Callable[[str], "np.ndarray | None"]


def send_error(pb_utils, sender, stage: str, message) -> None:
    """End a decoupled request with a Triton error that names the stage and the problem."""
    error = pb_utils.TritonError(f"orpheus {stage}: {message}")
    sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


# respond(sender, tokens, tokens sent so far, final) and refuse(sender, message) talk to Triton.
Respond = Callable[[Any, list[int], int, bool], None]
Refuse = Callable[[Any, str], None]


@dataclass(frozen=True)
class Reply:
    """A decoupled request's response sender, with the outputs its caller asked for.

    Triton's Python backend drops the outputs a caller did not ask for (the ensemble takes
    only ``output_ids`` from the llm stage) inside ``send()``, after it has released the GIL.
    Freeing them there crashes the stub on Python 3.12, whose allocator needs the calling
    thread's state (a segfault in ``_PyObject_Free`` under ``PbTensor::~PbTensor``, seen with
    tritonserver 2.51); 3.11 happens to survive it. So only what was asked for is sent.
    ``request_start``: when the request started (REQUEST_START), handed on with every response.
    """

    sender: Any
    outputs: frozenset[str]  # empty: the caller named none, and gets them all
    request_start: float  # seconds since the epoch

    @classmethod
    def of(cls, request, request_start: float) -> Reply:
        return cls(request.get_response_sender(), frozenset(request.requested_output_names()), request_start)

    def wants(self, name: str) -> bool:
        return not self.outputs or name in self.outputs

    def send(self, *args, **kwargs) -> None:
        self.sender.send(*args, **kwargs)


def llm_responders(pb_utils) -> tuple[Respond, Refuse]:
    """The llm stage's ``respond(reply, tokens, tokens sent so far, final)`` and ``refuse(reply,
    message)``, in TensorRT-LLM's tensors: the torch engine's adapter and the relay answer alike.
    A response carries only the outputs its ``Reply`` asked for."""
    final_flag = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

    def respond(reply: Reply, tokens: list[int], sent: int, final: bool) -> None:
        values = {LLM_OUTPUT_IDS: lambda: np.array([[tokens]], dtype=np.int32),
                  LLM_SEQUENCE_LENGTH: lambda: np.array([sent], dtype=np.int32),
                  REQUEST_START: lambda: np.array([[reply.request_start]], dtype=np.float64)}
        outputs = [pb_utils.Tensor(name, value()) for name, value in values.items() if reply.wants(name)]
        reply.send(pb_utils.InferenceResponse(outputs), flags=final_flag if final else 0)

    def refuse(sender, message) -> None:
        send_error(pb_utils, sender, "llm", message)

    return respond, refuse


def serve_llm_requests(pb_utils, requests, start: Callable[[str, dict, Any, Callable[[], bool]], None],
                       stop: Callable[[str], None]) -> None:
    """The llm stage's execute(), for the torch engine's adapter and the relay alike: a `stop` request
    ends the stream with its id (``stop``) and is answered at once; any other starts a stream with
    ``start(request_id, inputs by name, reply, is_cancelled)`` (``Reply``), and one it refuses (ValueError,
    StreamIdError) hears why. The request's REQUEST_START input (when preprocessing took it; now if
    absent) is not among the inputs: it goes with the reply, to every response."""
    for request in requests:
        arrived = time.time()
        request_id = request.request_id()
        inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        start_time = inputs.pop(REQUEST_START, None)
        sender = Reply.of(request, arrived if start_time is None else float(np.asarray(start_time).reshape(-1)[0]))
        if is_stop_request(inputs.get):
            stop(request_id)
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            continue
        try:
            start(request_id, inputs, sender, request.is_cancelled)
        except ValueError as error:  # StreamIdError among them
            send_error(pb_utils, sender, "llm", error)


def stop_request_inputs() -> dict[str, np.ndarray]:
    """A `stop` control request's tensors: the flag, and the required inputs riding along
    (ignored by a stop request), as TensorRT-LLM expects."""
    return {LLM_INPUT_IDS: np.zeros((1, 1), np.int32), LLM_INPUT_LENGTHS: np.ones((1, 1), np.int32),
            LLM_REQUEST_OUTPUT_LEN: np.ones((1, 1), np.int32), LLM_STOP: np.ones((1, 1), np.bool_)}


def model_parameters(args: dict) -> dict[str, str]:
    """The ``parameters`` of a Python model's config.pbtxt, from the args Triton passes to initialize()."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


class StreamIdError(ValueError):
    """The request's id cannot serve as a stream key."""


def require_stream_id(request_id: str) -> str:
    if not request_id:
        raise StreamIdError(
            "this request has no id: set a unique request id for every stream (tritonclient: "
            "async_stream_infer(..., request_id=str(uuid.uuid4())))"
        )
    return request_id


def _scalar(get: GetInput, name: str, default, cast):
    value = get(name)
    if value is None or value.size == 0:
        return default
    return cast(value.reshape(-1)[0])


def is_stop_request(get: GetInput) -> bool:
    """A TensorRT-LLM-style control request: `stop` = true asks to end the stream with the same id."""
    return bool(_scalar(get, LLM_STOP, False, bool))


def generation_settings(get: GetInput) -> dict:
    """An LLM-stage request's tensors (TensorRT-LLM names) -> GenerationRequest keyword arguments.

    Optional tensors left out take the engine's defaults; bad values raise ValueError with the reason.
    """
    ids = get(LLM_INPUT_IDS)
    if ids is None:
        raise ValueError(f"missing input {LLM_INPUT_IDS!r}")
    ids = ids.reshape(-1)
    length = _scalar(get, LLM_INPUT_LENGTHS, ids.size, int)
    if not 0 < length <= ids.size:
        raise ValueError(f"{LLM_INPUT_LENGTHS}={length} does not fit {ids.size} input ids")
    max_new = _scalar(get, LLM_REQUEST_OUTPUT_LEN, None, int)
    if max_new is None:
        raise ValueError(f"missing input {LLM_REQUEST_OUTPUT_LEN!r}")
    optional = {
        "end_id": (LLM_END_ID, int), "temperature": (LLM_TEMPERATURE, float), "top_p": (LLM_TOP_P, float),
        "top_k": (LLM_TOP_K, int), "repetition_penalty": (LLM_REPETITION_PENALTY, float), "seed": (LLM_SEED, int),
        "audio_guard": (LLM_AUDIO_GUARD, bool),
    }
    settings = {"prompt": [int(t) for t in ids[:length]], "max_new_tokens": max_new}
    for field_name, (tensor, cast) in optional.items():
        value = _scalar(get, tensor, None, cast)
        if value is not None:
            settings[field_name] = value
    return settings


# Idle states are looked for at most this often: a scan per request would cost O(streams) each.
STALE_SWEEP_SECONDS = 1.0


def llm_stream_options(params: dict[str, str]) -> dict:
    """The llm adapters' (torch engine's and relay's) stream options from their model parameters."""
    cancel_check = float(params.get("cancel_check_seconds", CANCEL_CHECK_SECONDS))
    if not cancel_check >= 0:
        raise ValueError(f"cancel_check_seconds must be >= 0, got {cancel_check}")
    return {"tokens_per_response": int(params.get("tokens_per_response", TOKENS_PER_FRAME)),
            "hold_seconds": stream_idle_seconds(params), "cancel_check_seconds": cancel_check}


def stream_idle_seconds(params: dict[str, str]) -> float:
    """A model's ``stream_idle_seconds`` parameter (the llm's id hold and the decoder's idle eviction)."""
    return float(params.get("stream_idle_seconds", STREAM_STATE_SECONDS))


class IdleSweep:
    """Drops per-stream entries idle for over ``idle_seconds``, scanning at most once per STALE_SWEEP_SECONDS."""

    def __init__(self, idle_seconds: float, now: float):
        self.idle_seconds = idle_seconds
        self._next = now + STALE_SWEEP_SECONDS

    def __call__(self, entries: dict, last_seen: Callable[[Any], float], now: float) -> None:
        if now < self._next:
            return
        self._next = now + STALE_SWEEP_SECONDS
        for key in [k for k, entry in entries.items() if now - last_seen(entry) > self.idle_seconds]:
            del entries[key]


class ActiveStreams:
    """Ids of the streams the LLM stage is generating, and of those that ended without end_id.

    A second live stream with one id is refused. So is, for ``hold_seconds``, the
    id of a stream that was cancelled or failed: its end_id never reached the
    decoder, whose state for that id would otherwise carry into the new stream.
    ``hold_seconds`` matches the decoder's idle eviction (StreamDecoderState).
    """

    def __init__(self, hold_seconds: float = STREAM_STATE_SECONDS):
        self._ids: set[str] = set()
        self._unfinished: dict[str, float] = {}  # id -> when its stream ended without end_id
        self.hold_seconds = hold_seconds
        self._lock = threading.Lock()

    def claim(self, request_id: str) -> None:
        require_stream_id(request_id)
        now = time.monotonic()
        with self._lock:
            self._unfinished = {k: t for k, t in self._unfinished.items() if now - t < self.hold_seconds}
            if request_id in self._ids:
                raise StreamIdError(
                    f"request id {request_id!r} is already streaming; every concurrent stream needs its own id"
                )
            if request_id in self._unfinished:
                raise StreamIdError(
                    f"request id {request_id!r} belonged to a stream that was cancelled or failed less than "
                    f"{self.hold_seconds:.0f} s ago; use a new id for every stream"
                )
            self._ids.add(request_id)

    def release(self, request_id: str, completed: bool = True) -> None:
        """The stream left the engine; ``completed`` = it ended with end_id (downstream saw its end)."""
        with self._lock:
            self._ids.discard(request_id)
            if not completed:
                self._unfinished[request_id] = time.monotonic()

    def __len__(self) -> int:
        return len(self._ids)


class FrameChunker:
    """Groups a stream's tokens into responses of ``size`` tokens (one SNAC frame by default).

    The decoder can do nothing with less than a frame, so sending every token
    through the ensemble on its own only multiplies per-response overhead by 7
    without bringing audio sooner. ``size=1`` streams token by token, as
    TensorRT-LLM does.
    """

    def __init__(self, size: int = TOKENS_PER_FRAME):
        if size < 1:
            raise ValueError(f"tokens per response must be >= 1, got {size}")
        self.size = size
        self.pending: list[int] = []
        self.sent = 0

    def add(self, tokens: Sequence[int], finished: bool) -> list[int] | None:
        """Tokens to send now, or None to wait; everything goes out when ``finished``."""
        self.pending += tokens
        if not finished and len(self.pending) < self.size:
            return None
        ready, self.pending = self.pending, []
        self.sent += len(ready)
        return ready


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
        self._queue: deque[tuple[str | None, Callable[[], None], bool] | None] = deque()
        self._ready = threading.Condition()
        self._failed: set[str] = set()
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def put(self, key: str | None, send: Callable[[], None], last: bool = False) -> None:
        """Queue ``send`` for stream ``key`` (None: a call for no stream); ``last``: the stream's
        final response (the key may be reused after it). Unthreaded, it runs here and now."""
        if self._thread is None:
            with self._ready:  # the engine thread and execute() may both be sending
                self._deliver(key, send, last)
            return
        with self._ready:
            self._queue.append((key, send, last))
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
            self._deliver(*entry)

    def _deliver(self, key: str | None, send: Callable[[], None], last: bool) -> None:
        if last and key is not None and self.before_last is not None:
            self.before_last(key)
        if key not in self._failed:
            try:
                send()
            except Exception as error:  # noqa: BLE001 (reported; the stream is dropped)
                if key is None:
                    log.exception("call on the response thread failed")
                    return
                self._failed.add(key)
                self.on_error(key, error)
        if last:
            self._failed.discard(key)


def response_thread(params: dict[str, str], device_type: str) -> bool:
    """The llm and snac_decoder models' ``response_thread`` parameter: auto (on GPU only), true or false."""
    value = params.get("response_thread", "auto").strip().lower()
    if value not in ("auto", "true", "false"):
        raise ValueError(f"response_thread must be auto, true or false, got {value!r}")
    return device_type == "cuda" if value == "auto" else value == "true"


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
    At most one pass waits at a time, so there are no more round trips than the engine
    made itself. A cancellation lands at the first step after the pass that saw it.

    A request must never be asked anything after its final response went out (the server
    may have freed it: asking crashed tritonserver 2.51). So ``forget`` comes before a
    stream's final response is queued, after which no pass starts asking it, and the
    thread that sends that response calls ``settle`` first, which waits out an ask of
    it already in flight (``ResponseQueue(before_last=...)``).
    Without ``threaded`` or ``run``, the check asks Triton itself, there and then.
    ``run`` (tests) takes each pass instead of a thread: it runs when the caller says.
    """

    def __init__(self, threaded: bool = False, min_interval: float = 0.0,
                 run: Callable[[Callable[[], None]], None] | None = None):
        self.min_interval = min_interval  # passes start at least this far apart
        self._passes = None
        if threaded and run is None:
            self._passes = ResponseQueue(on_error=lambda key, error: None, name="triton-cancellations")
            run = lambda call: self._passes.put(None, call)  # noqa: E731
        self.run = run
        self._watched: dict[str, tuple[Callable[[], bool], threading.Event]] = {}
        self._lock = threading.Lock()
        self._asked = threading.Condition(self._lock)  # an ask has returned
        self._asking: str | None = None  # the key a pass is asking Triton about right now
        self._pass_waiting = False
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
        with self._lock:
            self._pass_waiting = False
            watched = list(self._watched.items())
        for key, (is_cancelled, flag) in watched:
            with self._lock:
                if key not in self._watched:  # forgotten meanwhile: its final response may be queued
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
                self.forget(key)


@dataclass
class DecodeItem:
    """One decoder request: the windows its tokens completed, and what answers it (the adapter's business)."""

    stream_id: str
    windows: list[Window]
    reply: Any
    last: bool = False  # it carried the stream's end_id
    arrived: float = field(default_factory=time.monotonic)
    request_start: float | None = None  # its stream's REQUEST_START, where the request carried one


@dataclass(frozen=True)
class Delivery:
    """What answering one request meant for its stream's listener, as far as the server can tell:
    playback starting when the stream's first audio was sent, with no network delay in between (the
    load generator measures the client's side of the same rule, loadgen.playback)."""

    first_audio: bool = False  # this answer carried the stream's first audio
    stall: float = 0.0  # seconds its listener waited for it, everything sent before having played


class DecodeScheduler:
    """What the SNAC decoder decodes next, one round at a time, from everything that has arrived.

    The adapter hands over requests as they come (``add``) and a worker takes
    rounds (``next_round``): the oldest waiting request of every stream, in one
    SNAC call. A stream's requests are answered in the order they came. Because
    each round is composed when the decoder is free, a newcomer's chunk joins
    the very next round instead of waiting behind the queued chunks of streams
    the LLM ran ahead of (with rounds fixed per Triton batch, the second chunk
    of a newcomer came 100-110 ms after its first at 3 streams on 2 CPU cores:
    its listener heard a gap).

    When a round is full (``max_windows``), the most urgent streams go first:
    newcomers (nothing played yet: first audio is due now) by arrival, then
    streams by when their listener's audio runs out (``delivered`` keeps each
    stream's playback clock: audio sent since its first audio, restarted after
    a gap). And while a newcomer waits, streams with more than ``defer_horizon``
    of audio still to play sit the round out: the newcomer's first audio comes
    from a small round (on a CPU a lone window decodes in well under half the
    time of four), at the cost of audio those listeners have in hand.
    """

    def __init__(self, max_windows: int, idle_seconds: float = STREAM_STATE_SECONDS,
                 clock: Callable[[], float] = time.monotonic, defer_horizon: float = NEWCOMER_ROUND_HORIZON):
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        self.max_windows = max_windows
        self.defer_horizon = defer_horizon
        self.clock = clock
        self._sweep = IdleSweep(idle_seconds, clock())
        self._queues: dict[str, deque[DecodeItem]] = {}
        self._playback: dict[str, tuple[float, float]] = {}  # id -> (when its audio sent so far ends, last sent)
        self._ready = threading.Condition()
        self._closed = False

    def add(self, items: Sequence[DecodeItem]) -> None:
        with self._ready:
            for item in items:
                self._queues.setdefault(item.stream_id, deque()).append(item)
            self._ready.notify()

    def queued_windows(self) -> int:
        with self._ready:
            return sum(len(item.windows) for queue in self._queues.values() for item in queue)

    def next_round(self, timeout: float | None = None) -> tuple[list[DecodeItem], list[DecodeItem]] | None:
        """(requests to answer in this order without decoding, requests to decode together), oldest first per stream.

        Requests that completed no window are passed through as soon as they reach
        their stream's head, so they never take a round. Waits up to ``timeout`` for
        work (([], []) when none came) and returns None once closed.
        """
        with self._ready:
            if not self._ready.wait_for(lambda: self._queues or self._closed, timeout):
                return [], []
            if self._closed:
                return None
            answer, heads, windows = [], [], 0
            deferrable = self._deferrable()
            for stream_id in sorted(self._queues, key=self._urgency):
                queue = self._queues[stream_id]
                while queue and not queue[0].windows:
                    answer.append(queue.popleft())
                if queue and stream_id not in deferrable and (
                        not heads or windows + len(queue[0].windows) <= self.max_windows):
                    heads.append(queue.popleft())
                    windows += len(heads[-1].windows)
                if not queue:
                    del self._queues[stream_id]
            return answer, heads

    def delivered(self, item: DecodeItem, audio_seconds: float) -> Delivery:
        """``item`` was answered with ``audio_seconds`` of audio: advance its stream's playback clock, and
        say whether that was its first audio or came after its listener ran out."""
        now = self.clock()
        with self._ready:
            play_end = self._playback.get(item.stream_id, (None, now))[0]
            delivery = Delivery()
            if audio_seconds > 0:
                if play_end is None:
                    delivery, play_end = Delivery(first_audio=True), now
                elif now - play_end > STALL_TOLERANCE:  # a gap: playback resumes with this chunk
                    delivery, play_end = Delivery(stall=now - play_end), now
                play_end += audio_seconds
            if item.last:
                self._playback.pop(item.stream_id, None)
            elif play_end is not None:
                self._playback[item.stream_id] = (play_end, now)
            # Streams whose end never came (a vanished client).
            self._sweep(self._playback, lambda playback: playback[1], now)
        return delivery

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _deferrable(self) -> set[str]:
        """Streams whose next window may wait a round: while a newcomer waits for its first audio, a
        round takes only newcomers and the streams whose listeners' audio runs out within
        ``defer_horizon``, so first audio comes from a small round rather than behind everyone's."""
        # A newcomer's first requests may complete no window yet (its first window needs 21 tokens): it
        # waits for first audio as soon as any of its queued requests holds one.
        if self.defer_horizon <= 0 or not any(s not in self._playback and any(item.windows for item in queue)
                                              for s, queue in self._queues.items()):
            return set()
        soon = self.clock() + self.defer_horizon
        return {s for s in self._queues if s in self._playback and self._playback[s][0] > soon}

    def _urgency(self, stream_id: str) -> tuple[int, float]:
        playback = self._playback.get(stream_id)
        if playback is None:
            return 0, self._queues[stream_id][0].arrived
        return 1, playback[0]


@dataclass
class _DecoderStream:
    framer: StreamFramer = field(default_factory=StreamFramer)
    last_seen: float = field(default_factory=time.monotonic)
    request_start: float | None = None


class StreamDecoderState:
    """Per-stream framing for the SNAC decoder, keyed by request id.

    ``items_for`` turns token chunks (one per request, in arrival order) into
    ``DecodeItem``s: the windows each request completed. A stream's state goes
    when its ``end_id`` arrives, or after ``idle_seconds`` without tokens (a
    client that vanished mid-stream). ``lead_in``, ``lead_out``: streams start with
    the lead-in frame, and end with the lead-out frames, given with the end_id's request
    (frames.StreamFramer).
    """

    def __init__(self, end_id: int = END_OF_SPEECH, idle_seconds: float = STREAM_STATE_SECONDS,
                 clock: Callable[[], float] = time.monotonic, lead_in: bool = True, lead_out: bool = True):
        self.end_id = end_id
        self.lead_in, self.lead_out = lead_in, lead_out
        self.clock = clock
        self.streams: dict[str, _DecoderStream] = {}
        self._sweep = IdleSweep(idle_seconds, clock())

    def items_for(self, chunks: Sequence[tuple]) -> list[DecodeItem]:
        """One item per (stream id, token ids, reply[, request start]) chunk; a stream keeps the first
        request start it is given (REQUEST_START)."""
        now = self.clock()
        result = []
        for request_id, tokens, reply, *start in chunks:
            stream = self.streams.get(request_id)
            if stream is None:
                framer = StreamFramer(lead_in=self.lead_in, lead_out=self.lead_out)
                stream = self.streams[request_id] = _DecoderStream(framer, now)
            stream.last_seen = now
            if stream.request_start is None and start and start[0] is not None:
                stream.request_start = float(start[0])
            flat = np.asarray(tokens).reshape(-1)
            last = bool((flat == self.end_id).any())
            windows = stream.framer.push(flat) + (stream.framer.finish() if last else [])
            result.append(DecodeItem(request_id, windows, reply, last, now, stream.request_start))
            if last:
                del self.streams[request_id]
        self._sweep(self.streams, lambda stream: stream.last_seen, now)
        return result

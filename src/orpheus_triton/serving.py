"""Triton-independent logic of the LLM and decoder stages (the model.py files only adapt tensors): requests'
inputs and errors, stream ids, and the llm's responses (the decoder's rounds are in decode_rounds, the calls
kept off the stages' loops in triton_calls).

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
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .constants import (
    CANCEL_CHECK_SECONDS,
    DECODER_MODEL,
    DECODER_STOP,
    DECODER_TOKENS,
    DRAIN_FILE_ENV,
    LLM_AUDIO_GUARD,
    LLM_END_ID,
    LLM_FINISH_REASON,
    LLM_INPUT_IDS,
    LLM_INPUT_LENGTHS,
    LLM_OUTPUT_IDS,
    LLM_REPETITION_PENALTY,
    LLM_REQUEST_OUTPUT_LEN,
    LLM_SEED,
    LLM_SEQUENCE_LENGTH,
    LLM_STOP,
    LLM_STREAMING,
    LLM_TEMPERATURE,
    LLM_TOP_K,
    LLM_TOP_P,
    REQUEST_START,
    SERVER_SHUTTING_DOWN,
    STREAM_STATE_SECONDS,
    TOKENS_PER_FRAME,
    shown,
)

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


SHUTTING_DOWN = f"{SERVER_SHUTTING_DOWN}: it takes no new streams while those in flight finish; retry on another server"


def draining() -> bool:
    """Whether the server is stopping and takes no new streams: the file its environment names
    (``DRAIN_FILE_ENV``, raised by ``server.Drain``) exists."""
    flag = os.environ.get(DRAIN_FILE_ENV, "")
    return bool(flag) and os.path.exists(flag)


def finish_reason_tensor(finish: str) -> np.ndarray:
    """A stream's finish reason (FINISH_*) as the llm stage and the decoder send it: BYTES [1, 1] (a batch of
    one)."""
    return np.array([[finish.encode()]], dtype=np.object_)


def finish_reason_of(value: np.ndarray | None) -> str | None:
    """The finish reason a request or response carries (``finish_reason_tensor``), None where it has none."""
    if value is None or value.size != 1:
        return None
    item = value.reshape(-1)[0]
    return item.decode(errors="replace") if isinstance(item, bytes) else str(item)


def send_error(pb_utils, sender, stage: str, message) -> None:
    """End a decoupled request with a Triton error that names the stage and the problem."""
    error = pb_utils.TritonError(f"orpheus {stage}: {message}")
    sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


# respond(sender, tokens, tokens sent so far, finish) and refuse(sender, message) talk to Triton; finish:
# None mid-stream, why the stream ended (FINISH_*) on its final response.
Respond = Callable[[Any, list[int], int, str | None], None]
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
    """The llm stage's ``respond(reply, tokens, tokens sent so far, finish)`` and ``refuse(reply,
    message)``, in TensorRT-LLM's tensors: the torch engine's adapter and the relay answer alike.
    A response carries only the outputs its ``Reply`` asked for; the final one (``finish``: why the
    stream ended) also LLM_FINISH_REASON."""
    final_flag = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

    def respond(reply: Reply, tokens: list[int], sent: int, finish: str | None) -> None:
        values = {LLM_OUTPUT_IDS: lambda: np.array([[tokens]], dtype=np.int32),
                  LLM_SEQUENCE_LENGTH: lambda: np.array([sent], dtype=np.int32),
                  REQUEST_START: lambda: np.array([[reply.request_start]], dtype=np.float64)}
        if finish is not None:
            values[LLM_FINISH_REASON] = lambda: finish_reason_tensor(finish)
        outputs = [pb_utils.Tensor(name, value()) for name, value in values.items() if reply.wants(name)]
        reply.send(pb_utils.InferenceResponse(outputs), flags=0 if finish is None else final_flag)

    def refuse(sender, message) -> None:
        send_error(pb_utils, sender, "llm", message)

    return respond, refuse


def serve_llm_requests(pb_utils, requests, start: Callable[[str, dict, Any, Callable[[], bool]], None],
                       stop: Callable[[str], None], stops_decoding: bool = True) -> None:
    """The llm stage's execute(), for the torch engine's adapter and the relay alike: a `stop` request
    ends the stream with its id (``stop``) and is answered at once (one without an id is refused; one for
    an id no stream holds is answered the same, as TensorRT-LLM does: the stream may just have ended,
    or be held by another relay instance); any other starts a stream with
    ``start(request_id, inputs by name, reply, is_cancelled)`` (``Reply``), and one it refuses (ValueError,
    StreamIdError) hears why; one whose start fails otherwise hears that it did, and the batch goes on.
    The request's REQUEST_START input (when preprocessing took it; now if absent) is not among the
    inputs: it goes with the reply, to every response. ``stops_decoding``: a stop is passed on to the
    SNAC decoder too (``stop_decoding``); not by an engine behind the relay, which passes it on itself."""
    for request in requests:
        arrived = time.time()
        request_id = request.request_id()
        inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        start_time = inputs.pop(REQUEST_START, None)
        sender = Reply.of(request, request_start_of(start_time, arrived))
        stopping = is_stop_request(inputs.get)
        try:
            if stopping:
                stop(require_stream_id(request_id))  # without an id it could stop nothing
                if stops_decoding:
                    stop_decoding(pb_utils, request_id)
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                start(request_id, inputs, sender, request.is_cancelled)
        except ValueError as error:  # StreamIdError among them
            send_error(pb_utils, sender, "llm", error)
        except Exception as error:  # noqa: BLE001 (a fault: this request hears it, the batch's others go on)
            what = "stopping" if stopping else "starting"
            log.exception("%s stream %r failed", what, request_id)
            try:
                send_error(pb_utils, sender, "llm", f"internal error {what} the stream ({error}); see server log")
            except Exception:  # noqa: BLE001 (its sender is closed: nobody listens)
                log.debug("could not tell request %r", request_id)


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
            "async_stream_infer(..., request_id=str(uuid.uuid4())); HTTP: the JSON body's \"id\")"
        )
    return request_id


def _scalar(get: GetInput, name: str, default, cast):
    value = get(name)
    if value is None or value.size == 0:
        return default
    if value.size > 1:  # a batch of requests in one: only the first would be served, the rest dropped unsaid
        raise ValueError(f"input {name!r} holds {value.size} values: send one stream per request (batch size 1)")
    return cast(value.reshape(-1)[0])


# How far from now a REQUEST_START may lie: a start outside it is not this request's (a clock in other
# units, a stray value), and would throw the time-to-first-audio histogram's sum off for good.
REQUEST_START_RANGE_SECONDS = 3600.0


_Default = TypeVar("_Default", float, None)


def request_start_of(value: np.ndarray | None, default: _Default, now: float | None = None) -> float | _Default:
    """A request's REQUEST_START input (epoch seconds), or ``default`` where it is absent, empty or not a
    time of the last hour (nor of the future, beyond a minute's clock skew)."""
    if value is None or value.size == 0:
        return default
    start = float(np.asarray(value).reshape(-1)[0])
    now = time.time() if now is None else now
    if not math.isfinite(start) or not now - REQUEST_START_RANGE_SECONDS <= start <= now + 60:
        return default
    return start


def is_stop_request(get: GetInput, name: str = LLM_STOP) -> bool:
    """A TensorRT-LLM-style control request: `stop` = true asks to end the stream with the same id
    (the SNAC decoder's input ``name`` DECODER_STOP means the same there)."""
    return bool(_scalar(get, name, False, bool))


DECODER_STOP_TIMEOUT_US = 1_000_000  # the decoder answers a stop at once, from its execute


def stop_decoding(pb_utils, request_id: str) -> None:
    """Pass an `llm` stage's `stop` on to the SNAC decoder, which then decodes nothing more of the stream
    (decode_rounds.DecodeScheduler.drop): the llm stage runs ahead of the decoder, and what it generated
    before the stop would be decoded for nobody. A decoder that cannot take it (a stand-in without the
    input, a failure) is logged: the stream then ends once its audio is decoded."""
    inputs = {DECODER_TOKENS: np.zeros((1, 1, 1), np.int32), DECODER_STOP: np.ones((1, 1), np.bool_)}
    # Called from the llm stage's execute: a decoder that does not answer must not hold up its admissions.
    request = pb_utils.InferenceRequest(model_name=DECODER_MODEL, requested_output_names=[], request_id=request_id,
                                        inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
                                        timeout=DECODER_STOP_TIMEOUT_US)
    try:
        for response in request.exec(decoupled=True):
            if response.has_error():
                log.warning("the decoder refused the stop of stream %r: %s", request_id, response.error().message())
    except Exception as error:  # noqa: BLE001 (the llm stage's own stop went through; this one only saves work)
        log.warning("could not pass the stop of stream %r on to the decoder: %s", request_id, error)


def generation_settings(get: GetInput) -> dict:
    """An LLM-stage request's tensors (TensorRT-LLM names) -> GenerationRequest keyword arguments.

    Optional tensors left out take the engine's defaults; bad values raise ValueError with the reason.
    """
    ids = get(LLM_INPUT_IDS)
    if ids is None:
        raise ValueError(f"missing input {LLM_INPUT_IDS!r}")
    if ids.ndim > 1 and ids.size != ids.shape[-1]:
        raise ValueError(f"input {LLM_INPUT_IDS!r} has shape {list(ids.shape)}: send one stream per request "
                         "(one row of prompt ids)")
    ids = ids.reshape(-1)
    if not _scalar(get, LLM_STREAMING, True, bool):
        raise ValueError(f"{LLM_STREAMING}=false is not served: this stage streams its tokens, a response per "
                         "frame; send streaming=true or leave it out")
    length = _scalar(get, LLM_INPUT_LENGTHS, ids.size, int)
    if not 0 < length <= ids.size:
        raise ValueError(f"{LLM_INPUT_LENGTHS}={length} does not fit {ids.size} input ids")
    max_new = _scalar(get, LLM_REQUEST_OUTPUT_LEN, None, int)
    if max_new is None:
        raise ValueError(f"missing input {LLM_REQUEST_OUTPUT_LEN!r}")
    if max_new < 1:
        raise ValueError(f"{LLM_REQUEST_OUTPUT_LEN} (max_tokens) must be >= 1, got {max_new}")
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
# The llm stage holds a vanished stream's id this much longer than the decoder keeps its state: the
# decoder's idle clock starts when the stream's last chunk reached it, which can come after the llm let
# the stream go (Triton's queue in between), and a new stream with the id must find that state gone.
ID_HOLD_MARGIN_SECONDS = 10.0


def llm_stream_options(params: dict[str, str]) -> dict:
    """The llm adapters' (torch engine's and relay's) stream options from their model parameters."""
    cancel_check = float(params.get("cancel_check_seconds", CANCEL_CHECK_SECONDS))
    if not cancel_check >= 0:
        raise ValueError(f"cancel_check_seconds must be >= 0, got {cancel_check}")
    return {"tokens_per_response": int(params.get("tokens_per_response", TOKENS_PER_FRAME)),
            "hold_seconds": stream_idle_seconds(params) + ID_HOLD_MARGIN_SECONDS, "cancel_check_seconds": cancel_check}


def stream_idle_seconds(params: dict[str, str]) -> float:
    """A model's ``stream_idle_seconds`` parameter (the llm's id hold and the decoder's idle eviction)."""
    return float(params.get("stream_idle_seconds", STREAM_STATE_SECONDS))


class IdleSweep:
    """Drops per-stream entries idle for over ``idle_seconds``, scanning at most once per STALE_SWEEP_SECONDS.

    A scan runs only when traffic comes, so an entry may outlive ``idle_seconds`` (on a quiet server, for
    good): whoever looks an entry up by its stream id asks ``expired`` first, so that a new stream with
    the id of one that vanished starts afresh instead of inheriting its state.
    """

    def __init__(self, idle_seconds: float, now: float):
        self.idle_seconds = idle_seconds
        self._next = now + STALE_SWEEP_SECONDS

    def expired(self, last_seen: float, now: float) -> bool:
        return now - last_seen > self.idle_seconds

    def __call__(self, entries: dict, last_seen: Callable[[Any], float], now: float) -> None:
        if now < self._next:
            return
        self._next = now + STALE_SWEEP_SECONDS
        for key in [k for k, entry in entries.items() if self.expired(last_seen(entry), now)]:
            del entries[key]


class ActiveStreams:
    """Ids of the streams the LLM stage is generating, and of those that ended without end_id.

    A second live stream with one id is refused. So is, for ``hold_seconds``, the
    id of a stream that was stopped, cancelled or failed: its end_id may never have reached the
    decoder, whose state for that id would otherwise carry into the new stream.
    ``hold_seconds`` outlasts the decoder's idle eviction (StreamDecoderState; ID_HOLD_MARGIN_SECONDS).

    ``caller_gone(request_id)`` is told of a claimed stream whose end will not reach the decoder (and of a
    request refused for a retired id): its caller has left (callers.CallerLeases.end). Not of a request
    refused before its claim: its id may be another caller's, in flight.
    """

    def __init__(self, hold_seconds: float = STREAM_STATE_SECONDS,
                 caller_gone: Callable[[str], None] = lambda request_id: None):
        self._ids: set[str] = set()
        self._unfinished: dict[str, float] = {}  # id -> when its stream ended without end_id
        self._ended = RecentIds(EARLY_STOP_SECONDS)  # the streams that ended with end_id lately
        self.hold_seconds = hold_seconds
        # Told of a stream that ended where its end never reaches the decoder (callers.CallerLeases.end).
        self.caller_gone = caller_gone
        self._lock = threading.Lock()

    def claim(self, request_id: str) -> None:
        require_stream_id(request_id)
        now = time.monotonic()
        with self._lock:
            self._unfinished = {k: t for k, t in self._unfinished.items() if now - t < self.hold_seconds}
            if request_id in self._ids:
                raise StreamIdError(
                    f"request id {shown(request_id)} is already streaming; every concurrent stream needs its own id"
                )
            retired = request_id in self._unfinished
            if not retired:
                self._ids.add(request_id)
        if retired:
            self.caller_gone(request_id)
            raise StreamIdError(
                f"request id {shown(request_id)} belonged to a stream that was stopped, cancelled or failed "
                f"less than {self.hold_seconds:.0f} s (about {self.hold_seconds / 60:.0f} minutes) ago; use a new "
                f"id for every stream"
            )

    def retire(self, request_id: str) -> None:
        """A stream let go of as completed lost its end after all (its final response could not be sent):
        hold its id as unfinished, unless a new stream has claimed it meanwhile."""
        with self._lock:
            retired = request_id not in self._ids
            if retired:
                self._unfinished[request_id] = time.monotonic()
        if retired:
            self.caller_gone(request_id)

    def release(self, request_id: str, completed: bool = True) -> None:
        """The stream left the engine; ``completed`` = it ended with end_id (downstream saw its end)."""
        with self._lock:
            self._ids.discard(request_id)
            if not completed:
                self._unfinished[request_id] = time.monotonic()
            else:
                self._ended.note(request_id)
        if not completed:
            self.caller_gone(request_id)

    def drop(self, request_id: str) -> None:
        """A claimed stream ended before any of it streamed (refused: server busy; a fault as it started):
        the decoder holds nothing for its id, which is free at once; its caller is gone."""
        with self._lock:
            self._ids.discard(request_id)
        self.caller_gone(request_id)

    def ended_lately(self, request_id: str) -> bool:
        """Whether a stream with this id ended with its end_id within EARLY_STOP_SECONDS: a `stop` for it
        that finds no stream came late, not early, and must not stop the id's next stream."""
        with self._lock:
            return request_id in self._ended

    def ids(self) -> list[str]:
        """The ids of the streams claimed now (waiting for a slot or generating)."""
        with self._lock:
            return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


# How long a stop for an id no stream holds yet waits for its stream (the request it overtook), and how
# long after a stream's end a stop for its id is taken as late, for that stream.
EARLY_STOP_SECONDS = 10.0


class RecentIds:
    """Ids noted within the last ``seconds``, in the order noted: the oldest are let go first, as more come.

    The llm stage's stops that came before their streams (a `stop` sent right after its request can
    reach the llm stage first: the request goes through preprocessing, the stop straight there), and the
    streams that ended lately (``ActiveStreams.ended_lately``). Not thread-safe: its owner holds a lock."""

    def __init__(self, seconds: float = EARLY_STOP_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self._kept: dict[str, float] = {}  # id -> when it was noted

    def note(self, request_id: str) -> None:
        now = self.clock()
        self._kept.pop(request_id, None)
        self._kept[request_id] = now
        while now - next(iter(self._kept.values())) >= self.seconds:
            del self._kept[next(iter(self._kept))]

    def take(self, request_id: str) -> bool:
        """Whether ``request_id`` was noted within ``seconds`` (it is let go)."""
        noted = self._kept.pop(request_id, None)
        return noted is not None and self.clock() - noted < self.seconds

    def __contains__(self, request_id: str) -> bool:
        noted = self._kept.get(request_id)
        return noted is not None and self.clock() - noted < self.seconds

    def __len__(self) -> int:
        return len(self._kept)


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

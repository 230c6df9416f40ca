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
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .constants import (
    END_OF_SPEECH,
    LLM_AUDIO_GUARD,
    LLM_END_ID,
    LLM_INPUT_IDS,
    LLM_INPUT_LENGTHS,
    LLM_REPETITION_PENALTY,
    LLM_REQUEST_OUTPUT_LEN,
    LLM_SEED,
    LLM_STOP,
    LLM_TEMPERATURE,
    LLM_TOP_K,
    LLM_TOP_P,
    TOKENS_PER_FRAME,
)
from .frames import StreamFramer, Window

GetInput = Callable[[str], "np.ndarray | None"]


def send_error(pb_utils, sender, stage: str, message) -> None:
    """End a decoupled request with a Triton error that names the stage and the problem."""
    error = pb_utils.TritonError(f"orpheus {stage}: {message}")
    sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


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


# How long a mid-stream decoder state lives without tokens (a client that vanished), and so how
# long the id of a stream that ended without end_id stays refused: the two must be the same.
STREAM_STATE_SECONDS = 600.0


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


def decode_rounds(stream_ids: Sequence[str]) -> list[list[int]]:
    """A decoder batch's requests (given by stream id, in arrival order) as rounds of request indices.

    Round r holds the r-th request of every stream in the batch. A stream the LLM
    ran ahead of can have many requests queued in one batch; decoding them all in
    one call would hold its next chunk back until the whole batch is done, and its
    listener would hear a gap. Decoding round by round, and answering after each
    round, sends each stream's chunks as soon as they exist, in order, while every
    round still batches across streams.
    """
    rounds: list[list[int]] = []
    count: dict[str, int] = {}
    for index, stream_id in enumerate(stream_ids):
        position = count.get(stream_id, 0)
        count[stream_id] = position + 1
        if position == len(rounds):
            rounds.append([])
        rounds[position].append(index)
    return rounds


@dataclass
class _DecoderStream:
    framer: StreamFramer = field(default_factory=StreamFramer)
    last_seen: float = field(default_factory=time.monotonic)


class StreamDecoderState:
    """Per-stream framing for the SNAC decoder, keyed by request id.

    ``windows_for`` turns one batch of token chunks (one per request, in
    arrival order) into the windows to decode and which request each belongs
    to. A stream's state goes when its ``end_id`` arrives, or after
    ``idle_seconds`` without tokens (a client that vanished mid-stream).
    """

    def __init__(self, end_id: int = END_OF_SPEECH, idle_seconds: float = STREAM_STATE_SECONDS):
        self.end_id = end_id
        self.idle_seconds = idle_seconds
        self.streams: dict[str, _DecoderStream] = {}

    def windows_for(self, chunks: Sequence[tuple[str, np.ndarray]]) -> list[list[Window]]:
        now = time.monotonic()
        result = []
        for request_id, tokens in chunks:
            stream = self.streams.get(request_id)
            if stream is None:
                stream = self.streams[request_id] = _DecoderStream()
            stream.last_seen = now
            flat = np.asarray(tokens).reshape(-1)
            result.append(stream.framer.push(flat))
            if (flat == self.end_id).any():
                del self.streams[request_id]
        self._evict(now)
        return result

    def _evict(self, now: float) -> None:
        stale = [k for k, s in self.streams.items() if now - s.last_seen > self.idle_seconds]
        for key in stale:
            del self.streams[key]

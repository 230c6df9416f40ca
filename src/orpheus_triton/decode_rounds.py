"""The SNAC decoder stage's streams and rounds: what it decodes next, and for whom.

``StreamDecoderState`` turns each stream's token chunks into SNAC windows (one
request per LLM response, keyed by the client's request id: serving's module
docstring says why), and ``DecodeScheduler`` composes the decoder's rounds from
everything that has arrived, newcomers first. Nothing here calls Triton: the
snac_decoder model.py adapts tensors and answers.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .constants import (
    DECODER_TOKENS,
    END_OF_SPEECH,
    FINISH_STOPPED,
    NEWCOMER_ROUND_HORIZON,
    STALL_TOLERANCE,
    STREAM_STATE_SECONDS,
    TOKENS_PER_FRAME,
)
from .frames import StreamFramer, Window
from .serving import IdleSweep


@dataclass
class DecodeItem:
    """One decoder request: the windows its tokens completed, and what answers it (the adapter's business)."""

    stream_id: str
    windows: list[Window]
    reply: Any
    last: bool = False  # it carried the stream's end_id
    arrived: float = field(default_factory=time.monotonic)
    request_start: float | None = None  # its stream's REQUEST_START, where the request carried one
    dropped_tokens: int = 0  # its token ids that gave no audio: not audio tokens, or in the wrong frame slot
    finish_reason: str | None = None  # why its stream ended (FINISH_*), on its last request: said with its answer


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

    A stream whose client went away (``drop``: the llm stage's `stop`) is not
    decoded further: its queued requests, and those still to come up to its end,
    are answered without audio. The llm stage runs ahead of the decoder, so
    without it every abandoned stream cost seconds of decoding nobody heard
    (2-3 s on 2 CPU cores for a stream left after 1-2 s of audio).
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
        # id -> (when its audio sent so far ends, last sent, its request start)
        self._playback: dict[str, tuple[float, float, float | None]] = {}
        # id -> (the dropped stream's request start, when it was dropped): its requests until its end
        self._dropped: dict[str, tuple[float | None, float]] = {}
        self._drop_sweep = IdleSweep(idle_seconds, clock())
        self._ready = threading.Condition()
        self._closed = False

    def add(self, items: Sequence[DecodeItem]) -> None:
        now = self.clock()
        with self._ready:
            for item in items:
                self._playback_of(item, now)  # the ranking must not read a vanished stream's clock
                self._skip_if_dropped(item, now)
                self._queues.setdefault(item.stream_id, deque()).append(item)
            self._drop_sweep(self._dropped, lambda dropped: dropped[1], now)  # ends that never came
            self._ready.notify()

    def drop(self, stream_id: str, still_open: bool, request_start: float | None = None) -> bool:
        """Decode nothing more of the stream with this id: its queued requests are answered without audio,
        in order, and, if its end has not arrived yet (``still_open``: StreamDecoderState still frames it,
        under ``request_start``), so are those still to come up to its end. Requests of it already taken
        into a round are decoded. A stream whose audio this cuts short ends saying it was stopped (its last
        request's finish reason, where it has one), whatever ended its generation: the llm stage runs ahead
        of the decoder, so a stop often comes once generation has ended. Returns whether this drop ended
        anything not dropped before: windows still to decode, or a stream not yet marked (a stop sent
        again counts once)."""
        now = self.clock()
        with self._ready:
            queue = self._queues.get(stream_id, ())
            unheard = any(item.windows for item in queue)
            for item in queue:
                item.windows = []
            if unheard:
                _say_stopped(queue)
            marked = still_open and self._dropped.get(stream_id, (object(),))[0] != request_start
            if still_open:
                self._dropped[stream_id] = (request_start, now)
            self._ready.notify()
            return unheard or marked

    def _skip_if_dropped(self, item: DecodeItem, now: float) -> None:
        dropped = self._dropped.get(item.stream_id)
        if dropped is None:
            return
        if self._drop_sweep.expired(dropped[1], now) or _another(dropped[0], item.request_start):
            del self._dropped[item.stream_id]  # a new stream with the id
            return
        item.windows = []
        if item.last:
            del self._dropped[item.stream_id]
            _say_stopped([item])

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
            answer: list[DecodeItem] = []
            heads: list[DecodeItem] = []
            windows = 0
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
            play_end = (self._playback_of(item, now) or (None,))[0]
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
                self._playback[item.stream_id] = (play_end, now, item.request_start)
            # Streams whose end never came (a vanished client).
            self._sweep(self._playback, lambda playback: playback[1], now)
        return delivery

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _playback_of(self, item: DecodeItem, now: float) -> tuple[float, float, float | None] | None:
        """The item's stream's playback clock; None, and forgotten, if it is an earlier stream's with this id
        that vanished: over ``idle_seconds`` ago (the sweep runs only with traffic), or of another request."""
        playback = self._playback.get(item.stream_id)
        if playback is not None and (self._sweep.expired(playback[1], now)
                                     or _another(playback[2], item.request_start)):
            del self._playback[item.stream_id]
            return None
        return playback

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


def split_cancelled(items: Sequence[DecodeItem], is_cancelled: Callable[[DecodeItem], bool],
                    ) -> tuple[list[DecodeItem], list[DecodeItem]]:
    """A round's requests as (those to decode, those whose caller cancelled them).

    Only requests without a request start are asked: a caller of the decoder alone, whose
    queued windows would otherwise be decoded for nobody, ahead of every other stream's.
    Tritonserver passes no cancellation on to a model inside an ensemble (the README's
    *Cancellation*), so asking for the ensemble's requests, a round trip to the server each,
    would find none. A request that cannot be asked counts as not cancelled.
    """
    keep: list[DecodeItem] = []
    cancelled: list[DecodeItem] = []
    for item in items:
        try:
            gone = item.request_start is None and is_cancelled(item)
        except Exception:  # noqa: BLE001 (one request that cannot be asked must not fail the round)
            gone = False
        (cancelled if gone else keep).append(item)
    return keep, cancelled


def _another(known: float | None, start: float | None) -> bool:
    """Whether a request start marks another request than the one a stream's state is for.

    No start (None) is a start too: a caller of the decoder alone sends none, every request through the
    ensemble one (preprocessing's), so state left under an id by one is never taken for the other's.
    """
    return start != known


@dataclass
class _DecoderStream:
    framer: StreamFramer = field(default_factory=StreamFramer)
    last_seen: float = field(default_factory=time.monotonic)
    request_start: float | None = None


# The most frames one decoder request may carry: the llm stage sends one a response.
MAX_REQUEST_FRAMES = 32


def request_size_refusal(tokens: int, max_windows: int) -> str | None:
    """Why a decoder request of ``tokens`` token ids is refused, or None. A request's windows are decoded
    in one SNAC call: one holding a whole long stream would take the decoder's memory (2.3 MB a window
    on a CPU) and every other stream's time with it (a call of 255 windows, on 2 CPU cores, held up the
    other streams for seconds). The llm stage sends a frame at a time; a client of the decoder alone
    sends a long stream over several requests with the same id."""
    most = min(max_windows, MAX_REQUEST_FRAMES) * TOKENS_PER_FRAME
    if tokens <= most:
        return None
    return (f"{DECODER_TOKENS} holds {tokens} token ids; send at most {most} a request "
            f"({most // TOKENS_PER_FRAME} frames): "
            "a stream's tokens may come in several requests with the same id")


def _say_stopped(items: Iterable[DecodeItem]) -> None:
    """The stream of ``items`` (in order, maybe followed by a later stream's under its id) was cut short by a
    stop: its last request, if among them, says so where it says why the stream ended."""
    for item in items:
        if item.last:
            if item.finish_reason is not None:
                item.finish_reason = FINISH_STOPPED
            return


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
        self._forgotten: deque[tuple[str, float]] = deque()  # (id, as of): appended by any thread

    def forget(self, request_id: str) -> None:
        """Drop the state of the stream with this id (its caller cancelled it), unless tokens come for it from
        now on (a new stream under the id): a next stream starts afresh, not inside the cancelled one's
        frames. Called from another thread than ``items_for``: done there, before its next chunks."""
        self._forgotten.append((request_id, self.clock()))

    def open_stream(self, request_id: str) -> tuple[bool, float | None]:
        """Whether a stream with this id is being framed (its end not arrived yet, not vanished), and its
        request start: what DecodeScheduler.drop needs to know to answer its requests still to come."""
        stream = self.streams.get(request_id)
        if stream is None or self._sweep.expired(stream.last_seen, self.clock()):
            return False, None
        return True, stream.request_start

    def items_for(self, chunks: Sequence[tuple]) -> list[DecodeItem]:
        """One item per (stream id, token ids, reply[, request start[, finish reason]]) chunk; a chunk whose
        request start (REQUEST_START, or none) is not its stream's starts a new stream (``_another``). A finish
        reason is kept by the stream's last item (the chunk with its end_id)."""
        now = self.clock()
        while self._forgotten:
            request_id, as_of = self._forgotten.popleft()
            if (stream := self.streams.get(request_id)) is not None and stream.last_seen <= as_of:
                del self.streams[request_id]
        result = []
        for request_id, tokens, reply, *extra in chunks:
            start, finish = (*extra, None, None)[:2]
            start = None if start is None else float(start)
            stream = self.streams.get(request_id)
            if stream is None or self._sweep.expired(stream.last_seen, now) or _another(stream.request_start, start):
                # A vanished stream's state goes: idle too long, or its id now starts another request (a
                # cancelled ensemble request's end never reaches the decoder: tritonserver 2.51 does not
                # pass the cancellation on, so the llm stage finished it and freed its id).
                framer = StreamFramer(lead_in=self.lead_in, lead_out=self.lead_out)
                stream = self.streams[request_id] = _DecoderStream(framer, now)
            stream.last_seen = now
            stream.request_start = start
            flat = np.asarray(tokens).reshape(-1)
            last = bool((flat == self.end_id).any())
            framer, dropped = stream.framer, stream.framer.dropped
            windows = framer.push(flat) + (framer.finish() if last else [])
            result.append(DecodeItem(request_id, windows, reply, last, now, stream.request_start,
                                     dropped_tokens=framer.dropped - dropped, finish_reason=finish if last else None))
            if last:
                del self.streams[request_id]
        self._sweep(self.streams, lambda stream: stream.last_seen, now)
        return result

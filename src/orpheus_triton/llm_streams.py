"""The torch `llm` model's streams between Triton and the engine, without Triton's types.

The model.py adapter parses a request and hands it here with its response
sender; this class keeps the rules that make streams safe to serve:

* a stream's id is claimed before it reaches the engine and released before its
  final response is queued (a client may reuse it the moment that response
  arrives); the id of a stream whose end never reached the decoder stays retired;
* responses leave in order through a ``ResponseQueue`` (on its own thread on GPU, or a stream's
  lane of several: ``response_threads``),
  and a request is never asked whether it was cancelled after its final response;
  on GPU it is asked at most every ``CANCEL_CHECK_SECONDS``, all streams in one pass on a thread
  of its own, the passes taking at most ``CANCEL_CHECK_DUTY`` of its time;
* a send that fails drops the stream at the engine's next step;
* ``stop`` (TensorRT-LLM's control request) ends a stream normally; one that comes before its stream
  (sent right after the request, it can overtake it on the way through preprocessing) is kept for
  ``EARLY_STOP_SECONDS`` and stops the stream as it arrives;
* a request refused before it streamed anything (server busy: no slot came free in time) leaves its
  id free: a client's retry with it is not refused as a stopped stream's.

How a response is built and sent is the adapter's business (``respond``,
``refuse``): here they are plain callables, so all of this is unit tested.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from .constants import CANCEL_CHECK_SECONDS
from .engine import CapacityError, GenerationRequest, InflightEngine
from .serving import ActiveStreams, FrameChunker, RecentIds, Refuse, Respond
from .triton_calls import CancellationWatch, response_queue

log = logging.getLogger(__name__)


class LlmStreams:
    def __init__(self, engine: InflightEngine, respond: Respond, refuse: Refuse, *, response_threads: int,
                 tokens_per_response: int, hold_seconds: float, cancel_check_seconds: float = CANCEL_CHECK_SECONDS,
                 caller_gone: Callable[[str], None] = lambda request_id: None):
        self.engine = engine
        self.respond, self.refuse = respond, refuse
        self.tokens_per_response = tokens_per_response
        self.active = ActiveStreams(hold_seconds=hold_seconds, caller_gone=caller_gone)
        # Threaded (GPU): one pass over every stream at most every cancel_check_seconds and within the passes'
        # duty, on a thread of its own; else the engine asks each stream's request itself at every step (a few
        # streams, on a CPU).
        self.cancellations = CancellationWatch(threaded=response_threads > 0, min_interval=cancel_check_seconds)
        self.responses = response_queue(self._undeliverable, response_threads, before_last=self.cancellations.settle)
        # A stream's end against a failed send of it (_emitter). Taken before the engine's lock (stop_stream),
        # never under it: the engine calls emit outside its lock.
        self._ends = threading.Lock()
        # Stops that came before their streams. A stop and a start look at them and at the engine under this
        # lock (before the engine's), so that a stop is never between the two unseen by both.
        self._early_stops = RecentIds()
        self._stops = threading.Lock()

    def start(self, request_id: str, settings: dict, sender: Any, is_cancelled: Callable[[], bool]) -> None:
        """Claim the id and queue the stream in the engine; raises StreamIdError or ValueError (nothing
        claimed, nothing sent) for the adapter to refuse, and refuses a request beyond capacity itself."""
        self.active.claim(request_id)
        streamed = threading.Event()  # a response of the stream went out: the decoder holds state for its id
        try:
            with self._stops:
                self.engine.submit(GenerationRequest(
                    **settings, emit=self._emitter(sender, request_id, streamed),
                    fail=self._failer(sender, request_id, streamed),
                    is_cancelled=self.cancellations.watch(request_id, is_cancelled), request_id=request_id,
                ))
                stopped_early = self._early_stops.take(request_id)
            if stopped_early:
                self.stop(request_id)
        except Exception as error:
            self.cancellations.forget(request_id)
            self.active.drop(request_id)
            if not isinstance(error, CapacityError | ValueError):
                raise  # a fault: the adapter tells the request, and nothing of the stream stays behind
            # On the response thread, which may be asking about this request right now; alone: the id may
            # still be a stream's that is ending, whose failed sends must not take this answer with them.
            self.responses.put(request_id, functools.partial(self.refuse, sender, str(error)), alone=True,
                               lost=lambda failure: log.debug("could not refuse request %r: %s", request_id, failure))

    def stop(self, request_id: str) -> None:
        """End the stream with this id at the engine's next step. It ends normally, but its client
        may have cancelled the ensemble, which then never passes the end on: the id stays retired.
        A stop for an id no stream holds is kept for EARLY_STOP_SECONDS, for a stream it overtook (unless a
        stream with the id ended lately: the stop came after it)."""
        with self._stops:
            found = self.engine.stop_stream(request_id)
            if not found and not self.active.ended_lately(request_id):  # else it came late, for that stream
                self._early_stops.note(request_id)
        if found:
            self.active.release(request_id, completed=False)

    def close(self) -> None:
        """Send what is queued (call after the engine has stopped)."""
        self.responses.close()
        self.cancellations.close()

    def _emitter(self, sender: Any, request_id: str,
                 streamed: threading.Event) -> Callable[[list[int], str | None], None]:
        chunks = FrameChunker(self.tokens_per_response)
        released = threading.Event()  # the id was let go: it may be another stream's now

        def lost(error: Exception) -> None:
            with self._ends:
                if not released.is_set():  # the id is still this stream's: stop it
                    self._undeliverable(request_id, error)
                    return
            # A response sent late (the response thread behind) failed after the stream's end let its id go:
            # its end will not go out either, but a new stream with the id, if one came, must go on.
            log.warning("could not deliver tokens of request %r (%s) after its end", request_id, error)
            self.active.retire(request_id)

        def emit(tokens: list[int], finish: str | None) -> None:
            ready = chunks.add(tokens, finished=finish is not None)
            if ready is None:
                return
            sent = chunks.sent
            streamed.set()
            if finish is not None:
                # Before the put: the client may reuse the id as soon as the final response is out.
                # A new stream's responses come from the engine thread (this one), after this put.
                self.cancellations.forget(request_id)
                with self._ends:
                    released.set()
                    self.active.release(request_id)
            self.responses.put(request_id, lambda: self.respond(sender, ready, sent, finish), last=finish is not None,
                               lost=lost)

        return emit

    def _failer(self, sender: Any, request_id: str, streamed: threading.Event) -> Callable[[str], None]:
        def fail(message: str) -> None:
            def send() -> None:
                try:
                    self.refuse(sender, message)
                except Exception:  # noqa: BLE001 (a cancelled request's sender is closed: nothing more to say)
                    log.debug("could not tell request %r why it ended", request_id)

            self.cancellations.forget(request_id)
            self.responses.put(request_id, send, last=True)
            if streamed.is_set():
                self.active.release(request_id, completed=False)
            else:  # refused from the queue (server busy): the decoder holds nothing for the id
                self.active.drop(request_id)

        return fail

    def _undeliverable(self, request_id: str, error: Exception) -> None:
        log.warning("could not deliver tokens of request %r (%s); dropping the stream", request_id, error)
        self.active.release(request_id, completed=False)  # its end_id will not reach the decoder either
        self.engine.stop_stream(request_id)

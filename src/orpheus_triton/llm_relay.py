"""The `llm` stage in front of an engine model that streams token by token (TensorRT-LLM).

TensorRT-LLM's Triton backend sends one response per generated token and leaves
end_id out of its output, also when a stream stops at max_tokens. Behind it,
each token would be a request of its own through the ensemble into the SNAC
decoder (about 17,700 a second at 216 real-time streams, seven for every frame
the decoder can use), and the decoder would never see a stream end. The relay
is a Python model named `llm`, as the ensemble expects, that calls the engine
model (``tensorrt_llm``) itself and hands on what the decoder wants:

* one response per SNAC frame of tokens (``tokens_per_response``);
* every stream ends with end_id, appended when the engine left it out, so the
  decoder drops the stream's state at once;
* stream ids are guarded as in the torch engine's adapter (``ActiveStreams``);
* ``stop`` is passed on to the engine (one that came before its stream, to this instance, when the stream
  comes), and so is a client's cancellation of the
  relay's own request (asked of Triton for all streams in one pass, at most every
  ``CANCEL_CHECK_SECONDS`` and within ``CANCEL_CHECK_DUTY``: each question is a round trip to the server);
* input names are mapped: the seed's input is ``seed`` in current TensorRT-LLM
  backends; the audio-token guard, which TensorRT-LLM lacks, is refused rather
  than silently ignored.

Each stream is read on a thread of its own (the engine's response iterator
blocks); responses leave through one thread (``ResponseQueue``): a backend stub
whose responses were sent from dozens of threads at once was seen to crash
(segfault in libpython, tritonserver 2.51). How the engine is called and how
responses are built is the adapter's business: here they are plain callables,
so all of this is unit tested.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .constants import (
    CANCEL_CHECK_SECONDS,
    END_OF_SPEECH,
    FINISH_END_OF_SPEECH,
    FINISH_MAX_TOKENS,
    FINISH_STOPPED,
    LLM_AUDIO_GUARD,
    LLM_INPUT_IDS,
    LLM_OUTPUT_IDS,
    LLM_SEED,
    LLM_SEQUENCE_LENGTH,
    LLM_STOP,
)
from .serving import ActiveStreams, FrameChunker, RecentIds, Refuse, Respond, generation_settings
from .triton_calls import CancellationWatch, ResponseQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineResponse:
    """One response of the engine model: its new tokens, or the error that ended the stream."""

    tokens: list[int]
    error: str | None = None


class HeldReferences:
    """Keeps objects referenced for ``seconds`` after ``keep``, then lets them go on the next call.

    Why the relay needs it: tritonserver 2.51's Python backend frees a BLS response iterator on a
    thread of its own, without the GIL, once Python has dropped the iterator; whatever responses only
    the iterator still references die there, and freeing their tensors' Python objects crashes
    the stub on Python 3.12 (a segfault in ``_PyObject_Free`` under ``~ResponseIterator``). Holding
    the responses (and the request) from Python until well after that cleanup makes Python, on a
    thread holding the GIL, the one that frees them.
    """

    def __init__(self, seconds: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self._held: collections.deque[tuple[float, list]] = collections.deque()
        self._lock = threading.Lock()

    def keep(self, objects: list) -> None:
        now = self.clock()
        with self._lock:
            self._held.append((now + self.seconds, objects))
            released = []
            while self._held and self._held[0][0] <= now:
                released.append(self._held.popleft())
        del released  # dropped here, outside the lock, by a Python thread

    def clear(self) -> None:
        """Let everything go now: from the model's finalize(), while the stub can still free it (at the
        interpreter's teardown it would crash)."""
        with self._lock:
            released, self._held = self._held, collections.deque()
        del released

    def __len__(self) -> int:
        return len(self._held)


# call(request id, inputs by the engine's names) -> the engine's responses, in order, to its final one.
CallEngine = Callable[[str, dict[str, np.ndarray]], Iterable[EngineResponse]]
StopEngine = Callable[[str], None]


# What the relay asks of the engine model. TensorRT-LLM's backend fills a response only when both are
# requested (otherwise each response is an error: "sequence_length tensor must be present in list of
# output tensors"); the relay reads the ids.
ENGINE_OUTPUTS = (LLM_OUTPUT_IDS, LLM_SEQUENCE_LENGTH)


@dataclass(frozen=True)
class EngineInputs:
    """How the relay's inputs (the torch engine's names) map onto the engine model's."""

    seed: str = LLM_SEED
    audio_guard: bool = True  # whether the engine takes `audio_token_guard`

    def map(self, inputs: dict[str, np.ndarray], prompt_length: int | None = None) -> dict[str, np.ndarray]:
        """The inputs to send on, each as [1, n]: one request, as a client sends it (the relay's
        own config may reshape them on the way in), its ids cut to ``prompt_length`` (its checked
        `input_lengths`: TensorRT-LLM reads a lone request's ids whole, padding included, where the torch
        engine reads that many). Raises ValueError for one the engine cannot honour."""
        mapped = {name: value.reshape(1, -1) for name, value in inputs.items()}
        mapped.pop(LLM_STOP, None)
        if prompt_length is not None and LLM_INPUT_IDS in mapped:
            mapped[LLM_INPUT_IDS] = mapped[LLM_INPUT_IDS][:, :prompt_length]
        guard = mapped.get(LLM_AUDIO_GUARD)
        if not self.audio_guard and guard is not None:
            if guard.size and bool(guard.reshape(-1)[0]):
                raise ValueError(f"{LLM_AUDIO_GUARD} is not available with this LLM engine (TensorRT-LLM "
                                 "samples from the whole vocabulary); leave it out or send false")
            del mapped[LLM_AUDIO_GUARD]
        if LLM_SEED in mapped and self.seed != LLM_SEED:
            mapped[self.seed] = mapped.pop(LLM_SEED)
        return mapped


class RelayStreams:
    def __init__(self, call: CallEngine, stop: StopEngine, respond: Respond, refuse: Refuse, *,
                 engine_inputs: EngineInputs, tokens_per_response: int, hold_seconds: float,
                 cancel_check_seconds: float = CANCEL_CHECK_SECONDS,
                 caller_gone: Callable[[str], None] = lambda request_id: None):
        self.call, self.stop_engine = call, stop
        self.respond, self.refuse = respond, refuse
        self.engine_inputs = engine_inputs
        self.tokens_per_response = tokens_per_response
        self.active = ActiveStreams(hold_seconds=hold_seconds, caller_gone=caller_gone)
        # Triton is asked about cancellations on a thread of its own, every request in one pass, at most
        # once per cancel_check_seconds and within the passes' duty: each question is a round trip to the server.
        self.cancellations = CancellationWatch(threaded=True, min_interval=cancel_check_seconds)
        self.responses = ResponseQueue(on_error=self._undeliverable, threaded=True,
                                       before_last=self.cancellations.settle)
        self._undelivered: set[str] = set()  # streams whose client went away
        # Streams a `stop` came for: passed on again once the engine has answered, since an engine that does
        # not hold the id yet (the relay's own call still on its way) ignores it, as TensorRT-LLM does.
        self._stopped: set[str] = set()
        # Stops that came before their streams (to this instance): a stream that comes within their time is
        # stopped as it starts. Looked at with _threads under _lock.
        self._early_stops = RecentIds()
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def start(self, request_id: str, inputs: dict[str, np.ndarray], sender: Any,
              is_cancelled: Callable[[], bool]) -> None:
        """Claim the id and start relaying; raises StreamIdError or ValueError (nothing claimed,
        nothing sent) for the adapter to refuse."""
        settings = generation_settings(inputs.get)  # the torch engine's checks, for the same clear errors
        forwarded = self.engine_inputs.map(inputs, prompt_length=len(settings["prompt"]))
        end_id = settings.get("end_id", END_OF_SPEECH)
        max_tokens = settings["max_new_tokens"]
        self.active.claim(request_id)
        check = self.cancellations.watch(request_id, is_cancelled)
        thread = threading.Thread(target=self._relay, name=f"relay-{request_id}", daemon=True,
                                  args=(request_id, forwarded, end_id, max_tokens, sender, check))
        with self._lock:
            self._threads[request_id] = thread
            stopped_early = self._early_stops.take(request_id)
            if stopped_early:  # passed on again once the engine answers, as a stop that comes now would be
                self._stopped.add(request_id)
        try:
            thread.start()
        except Exception:  # e.g. no thread to be had: the adapter tells the request; nothing of it stays behind
            with self._lock:
                self._threads.pop(request_id, None)
                self._stopped.discard(request_id)
            self.cancellations.forget(request_id)
            self.active.drop(request_id)
            raise
        if stopped_early:
            self.active.release(request_id, completed=False)
            self.stop_engine(request_id)

    def stop(self, request_id: str) -> None:
        """Pass a `stop` on to the engine. The stream ends normally (with end_id), but its client may
        have cancelled the ensemble, which then never passes the end on: the id stays retired.
        Sent on whether or not this relay knows the id: another instance of it may hold the stream. One
        this relay does not know is also kept for EARLY_STOP_SECONDS, for a stream it overtook."""
        with self._lock:
            known = request_id in self._threads
            if known:
                self._stopped.add(request_id)
            elif not self.active.ended_lately(request_id):  # else it came late, for that stream
                self._early_stops.note(request_id)
        if known:
            self.active.release(request_id, completed=False)
        self.stop_engine(request_id)

    def in_flight(self) -> int:
        """Streams being relayed: generating in the engine model, or waiting for its slots."""
        with self._lock:
            return len(self._threads)

    def close(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout`` in all) for the streams being relayed to end, then send what is queued."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.responses.close()
        self.cancellations.close()

    def _undeliverable(self, request_id: str, error: Exception) -> None:
        """For a send queued without its own ``lost`` (none is: each stream's sends say what a failure means)."""
        log.warning("could not send a response of request %r (%s)", request_id, error)

    def _relay(self, request_id: str, inputs: dict[str, np.ndarray], end_id: int, max_tokens: int, sender: Any,
               is_cancelled: Callable[[], bool]) -> None:
        chunks = FrameChunker(self.tokens_per_response)
        ended = cancelled = stopped = False
        generated = 0
        error = None
        finished = threading.Event()  # _finish let the id go: it may be another stream's now

        def lost(failure: Exception) -> None:
            with self._lock:
                ours = not finished.is_set()  # the id is still this stream's: _relay or _finish sees it
                if ours:
                    self._undelivered.add(request_id)
            if ours:
                log.warning("could not deliver tokens of request %r (%s); stopping it", request_id, failure)
                return
            # Sent late (the response thread behind), after the stream's end let its id go: its end will not
            # go out either, but a new stream with the id, if one came, must go on.
            log.warning("could not deliver tokens of request %r (%s) after its end", request_id, failure)
            self.active.retire(request_id)
        try:
            for response in self.call(request_id, inputs):
                if response.error is not None:
                    error = response.error
                    break  # an error response is the engine stream's last
                if ended or cancelled:
                    continue  # read the engine's stream to its end; nothing more goes out
                tokens = response.tokens
                if end_id in tokens:  # the torch engine sends it; what came before it goes with the final response
                    tokens, ended = tokens[: tokens.index(end_id)], True
                generated += len(tokens)
                if ended:
                    chunks.pending += tokens
                elif (ready := chunks.add(tokens, finished=False)) is not None:
                    self.responses.put(request_id, functools.partial(self.respond, sender, ready, chunks.sent, None),
                                       lost=lost)
                with self._lock:
                    cancelled = request_id in self._undelivered
                    stop_again = request_id in self._stopped
                    self._stopped.discard(request_id)
                stopped = stopped or stop_again
                cancelled = cancelled or is_cancelled()
                if cancelled or stop_again:
                    self.stop_engine(request_id)
        except Exception as failure:  # noqa: BLE001 (the engine call itself failed; told to the client)
            log.exception("relaying request %r failed", request_id)
            error = f"the LLM engine call failed: {failure}"
        finally:
            with self._lock:
                self._threads.pop(request_id, None)
                stopped = stopped or request_id in self._stopped
                self._stopped.discard(request_id)
        # TensorRT-LLM leaves end_id out of its output: a stream that ended short of max_tokens unstopped ended on it.
        finish = (FINISH_MAX_TOKENS if generated >= max_tokens else FINISH_STOPPED if stopped
                  else FINISH_END_OF_SPEECH)
        chunks.pending.append(end_id)  # every stream ends with end_id (the decoder's sign that it is over)
        self._finish(request_id, sender, chunks, finish, cancelled, error, finished)

    def _finish(self, request_id: str, sender: Any, chunks: FrameChunker, finish: str,
                cancelled: bool, error: str | None, finished: threading.Event) -> None:
        with self._lock:  # a send of this stream failing from now on is told to the next one with its id no more
            finished.set()
            cancelled = cancelled or request_id in self._undelivered
            self._undelivered.discard(request_id)
        completed = error is None and not cancelled
        last = chunks.add([], finished=True) or []  # (never None once finished)

        def send() -> None:
            try:
                if completed:
                    self.respond(sender, last, chunks.sent, finish)
                else:
                    self.refuse(sender, error or "request cancelled by the client")
            except Exception:  # noqa: BLE001 (a cancelled request's sender is closed: nobody listens)
                log.debug("could not send the end of request %r", request_id)

        # Before the final response is queued: the request is not asked about after it, and the client
        # may reuse the id the moment it arrives.
        self.cancellations.forget(request_id)
        self.active.release(request_id, completed=completed)
        self.responses.put(request_id, send, last=True)

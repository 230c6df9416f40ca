"""Streaming gRPC clients for the `orpheus` ensemble: ``OrpheusClient`` (threads and callbacks) and
``AsyncOrpheusClient`` (asyncio: ``async for chunk in client.stream(text)``; text still arriving, or longer
than one request: ``client.stream_text(pieces)``).

Every stream gets a fresh uuid4 request id: the server keys each stream's
decoder state by it (see orpheus_triton.serving).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import inspect
import queue
import re
import socket
import threading
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .arguments import check_grpc_url, grpc_host_port
from .constants import (
    DEFAULT_GRPC_PORT,
    DEFAULT_GRPC_URL,
    ENSEMBLE_MODEL,
    IN_MAX_TOKENS,
    IN_REPETITION_PENALTY,
    IN_SEED,
    IN_TEMPERATURE,
    IN_TEXT,
    IN_TOP_P,
    IN_VOICE,
    LLM_MODEL,
    OUT_AUDIO,
    OUT_FINISH_REASON,
    SAMPLE_RATE,
    SERVER_BUSY,
    SERVER_SHUTTING_DOWN,
    max_tokens_refusal,
)
from .serving import finish_reason_of, stop_request_inputs
from .text_stream import MAX_SENTENCE_CHARS, PAUSE_SECONDS, sentences_of, speak_in_order

# A stream ended early gets its `stop` again this often until one was sent after the stream's first
# response: a stop reaches a stream only once the llm stage holds it, and one sent right after the
# request (still on its way, or in preprocessing) finds nothing there; the stream would run on to
# max_tokens. Once a response has come, the llm stage has (or had) the stream: that stop lands.
STOP_REPEAT_SECONDS = 0.25
# How long a stream ended early may take to end after its stop before it is cancelled: the stop drops
# what the llm stage generated ahead of the listener, but a decoder without the stop input (or one
# whose stop failed) decodes it first, seconds of work on a busy CPU server, and a cancelled stream
# stays counted in flight on the server.
END_EARLY_SECONDS = 15.0
# How long of that the caller leaving waits before it goes on, the end waited for beside it: a server
# that has stopped answering (a frozen process, a network cut) held a stream's own timeout, or a task
# cancelled around it, up to END_EARLY_SECONDS past its time. A server that answers ends the stream
# within a round trip or two.
END_WAIT_SECONDS = 1.0


class SynthesisError(RuntimeError):
    """The server refused or failed the request; the message is the server's."""

    @classmethod
    def of(cls, error) -> SynthesisError:
        """From the error a stream's callback got: the server's message, or for a connection lost
        mid-stream (the server stopped or crashed, the network failed) a message that says so."""
        failure = _stream_failure(None, str(error), _unavailable(error), first=False)
        assert isinstance(failure, SynthesisError)  # after a stream's first response: never a ConnectionError
        return failure


# A refusal to retry as a stage opens it ("orpheus llm: server busy: ...", "orpheus: server shutting down: ..."),
# not the words anywhere (an unknown voice named "server busy" is the request's own fault).
_TURNED_AWAY = re.compile(rf"(?:^|[:,] )orpheus(?: \w+)?: (?:{SERVER_BUSY}|{SERVER_SHUTTING_DOWN}): ")


class ServerUnavailable(SynthesisError):
    """The server cannot serve the stream now: it turned it away before generating anything (every slot
    taken and its queue full: `server busy`; draining to stop: `server shutting down`), or the connection
    to it was lost mid-stream (it stopped or crashed, the network failed). Retry the stream, on another
    server or later; other SynthesisErrors are the request's own or a failure."""


def _unavailable(error) -> bool:
    """Whether a tritonclient error is gRPC's UNAVAILABLE: no connection to the server (none there, or lost)."""
    return getattr(error, "status", lambda: None)() == "StatusCode.UNAVAILABLE"


def _stop_failure(url: str, request_id: str, message: str, unavailable: bool) -> Exception:
    """What a `stop` the server refused (SynthesisError), or one no server took (ConnectionError naming
    ``url``: gRPC's UNAVAILABLE), raises (either client)."""
    if unavailable:
        return ConnectionError(f"no Triton server reachable at {url} to stop {request_id!r} ({message})")
    return SynthesisError(f"the stop for {request_id!r} failed: {message}")


def _stream_failure(url: str | None, message: str, unavailable: bool, first: bool) -> Exception:
    """What a stream's failure raises, from either client. A connection that failed (gRPC's UNAVAILABLE):
    before the stream's first response, ConnectionError naming ``url`` (nobody listening there); after
    it, ServerUnavailable saying it was lost mid-stream. Anything else: SynthesisError with ``message``."""
    if unavailable and first:
        return ConnectionError(f"no Triton server reachable at {url} ({message}); is that the server's gRPC port "
                               f"({DEFAULT_GRPC_PORT} unless serve's --grpc-port says otherwise), not its HTTP or "
                               f"metrics one?")
    if unavailable:
        return ServerUnavailable(f"the connection to the server was lost mid-stream ({message})")
    if _TURNED_AWAY.search(message):
        return ServerUnavailable(message)
    return SynthesisError(message)


@dataclass
class Chunk:
    audio: np.ndarray  # int16
    arrived: float  # seconds since the stream was asked for (its gRPC stream's setup included)


@dataclass
class SynthesisResult:
    request_id: str
    chunks: list[Chunk] = field(default_factory=list)
    total_seconds: float = 0.0
    # Why the audio ended, as the server said with the stream's last audio: FINISH_END_OF_SPEECH,
    # FINISH_MAX_TOKENS (the text's last words may be missing) or FINISH_STOPPED; None where it did not say.
    finish_reason: str | None = None

    @property
    def audio(self) -> np.ndarray:
        if not self.chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate([c.audio for c in self.chunks])

    @property
    def time_to_first_audio(self) -> float | None:
        return self.chunks[0].arrived if self.chunks else None

    @property
    def audio_seconds(self) -> float:
        return sum(len(c.audio) for c in self.chunks) / SAMPLE_RATE

    @property
    def real_time_factor(self) -> float | None:
        """Wall time over audio time: below 1 means faster than real time."""
        return self.total_seconds / self.audio_seconds if self.audio_seconds else None


def infer_input(name: str, array: np.ndarray):
    """A tritonclient gRPC input holding ``array``; shape and Triton type come from the array."""
    import tritonclient.grpc as grpcclient  # noqa: PLC0415
    from tritonclient.utils import np_to_triton_dtype  # noqa: PLC0415

    tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def stop_inputs() -> list:
    """tritonclient gRPC input tensors of a `stop` control request to the `llm` model (see ``OrpheusClient.stop``)."""
    return [infer_input(name, value) for name, value in stop_request_inputs().items()]


def request_inputs(
    text: str,
    voice: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
):
    """tritonclient gRPC input tensors for one `orpheus` request (options left out, the voice included, take
    the server's defaults). Raises TypeError for text or a voice that is not a str, and ValueError for a
    whole number its tensor's type cannot hold (numpy would wrap it: a seed of -1 would become another
    seed, a huge max_tokens a negative one) or a max_tokens the server refuses."""
    for name, words in ((IN_TEXT, text), (IN_VOICE, voice)):
        if not isinstance(words, str) and not (name == IN_VOICE and words is None):
            raise TypeError(f"{name} must be a str, got {type(words).__name__}")
    given: list[tuple[str, object, type]] = [
        (IN_TEXT, text.encode("utf-8"), np.object_),
        (IN_VOICE, voice.encode("utf-8") if voice is not None else None, np.object_),
        (IN_MAX_TOKENS, max_tokens, np.int32),
        (IN_TEMPERATURE, temperature, np.float32),
        (IN_TOP_P, top_p, np.float32),
        (IN_REPETITION_PENALTY, repetition_penalty, np.float32),
        (IN_SEED, seed, np.uint64),
    ]
    for name, value, dtype in given:
        if value is None or not np.issubdtype(dtype, np.integer):
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        if name == IN_MAX_TOKENS and (refusal := max_tokens_refusal(int(value))) is not None:
            raise ValueError(refusal)
        bounds: np.iinfo = np.iinfo(dtype)
        if not bounds.min <= value <= bounds.max:
            raise ValueError(f"{name} must be a whole number from {bounds.min} to {bounds.max}, got {value!r}")
    return [infer_input(name, np.array([value], dtype=dtype)) for name, value, dtype in given if value is not None]


# The options a stream takes (``request_inputs``'s keyword arguments), for the clients' **options.
REQUEST_OPTIONS = tuple(inspect.signature(request_inputs).parameters)[1:]


def _inputs(text: str, options: dict) -> list:
    """``request_inputs`` for a client's ``text`` and ``**options``, an unknown option refused by name (the
    TypeError Python raises names ``request_inputs``, which the caller never called)."""
    for name in options:
        if name not in REQUEST_OPTIONS:
            close = difflib.get_close_matches(name, REQUEST_OPTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"unknown option {name!r}{hint}; a stream takes {', '.join(REQUEST_OPTIONS)}")
    return request_inputs(text, **options)


def _finish_reason(response) -> str | None:
    """Why the stream's audio ended, where this response of it says (the one with its last audio)."""
    return finish_reason_of(response.as_numpy(OUT_FINISH_REASON))


def _is_final(response) -> bool:
    """Whether a streamed response is its request's last (needs enable_empty_final_response)."""
    final = response.get_response().parameters.get("triton_final_response")
    return final is not None and final.bool_param


def require_ready_server(url: str, model: str | None = None, timeout: float = 5.0) -> None:
    """Raise ConnectionError naming ``url`` and why, unless a Triton server there is ready to serve
    (and ``model``, if given, is ready on it).

    The reasons differ in what the user does next: nothing listening (start a server, or fix the
    port), something that is not Triton's gRPC endpoint (the HTTP or metrics port given instead),
    a server still loading its models (wait), a server without ``model`` (another repository).
    """
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    target = grpc_host_port(url)
    probed = target is not None and target[1].isdigit()
    if target is not None and probed:
        host, port = target
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
        except OSError as error:
            raise ConnectionError(f"no ready Triton server at {url}: nothing answers there "
                                  f"({error.strerror or error}): no server runs there, or one is still loading its "
                                  f"models (tritonserver opens its ports once they have loaded: `orpheus-triton "
                                  f"serve` says when it is ready); start one with `orpheus-triton serve` (its gRPC "
                                  f"port is {DEFAULT_GRPC_PORT} unless --grpc-port says otherwise)") from None
    client = grpcclient.InferenceServerClient(url)
    try:
        try:
            live = client.is_server_live(client_timeout=timeout)
        except Exception as error:  # noqa: BLE001 (an HTTP/1 server, or any other protocol, fails the gRPC call)
            if not probed:
                raise ConnectionError(f"no ready Triton server at {url}: {error}") from None
            raise ConnectionError(
                f"no ready Triton server at {url}: something listens there but does not answer Triton's gRPC; "
                f"is it the server's HTTP or metrics port? Clients stream from its gRPC port "
                f"({DEFAULT_GRPC_PORT} unless serve's --grpc-port says otherwise)") from None
        try:
            ready = live and client.is_server_ready(client_timeout=timeout)
            has_model = ready and (model is None or client.is_model_ready(model, client_timeout=timeout))
        except Exception as error:  # noqa: BLE001 (a server that stopped answering meanwhile)
            raise ConnectionError(f"no ready Triton server at {url}: {error}") from None
        if not ready:
            raise ConnectionError(f"no ready Triton server at {url}: the server is up but not ready; its models "
                                  f"are still loading (`orpheus-triton serve` says when it is ready), or one "
                                  f"failed to load (see the server's log)")
        if not has_model:
            raise ConnectionError(f"the Triton server at {url} has no ready model {model!r}: is it serving "
                                  f"orpheus-triton's model repository?")
    finally:
        client.close()


def _seconds_at_least_0(name: str, value: float) -> float:
    if not value >= 0:  # NaN too
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


class _EarlyEnd:
    """The clean end of a stream ``OrpheusClient.synthesize`` left early (an exception in ``on_chunk``,
    Ctrl-C, a timeout), on the stream's connection.

    Cancelling the gRPC stream alone is not enough with tritonserver 2.51: it does
    not pass the cancellation to the `llm` request running inside the ensemble (so
    generation would go on), and the cancelled ensemble request stays counted in
    flight for good (a graceful stop then waits its whole exit timeout). So the
    stream's `llm` request gets a `stop` (see ``OrpheusClient.stop``), which ends it
    normally within a step, and the ensemble's remaining responses are read to its
    final one. The `stop` goes on the gRPC stream being ended (``_send_stop``).
    ``heard``: the stream had answered already; if not, the `stop` is sent again
    every STOP_REPEAT_SECONDS until one goes after its first response (see there).
    Each stop, like the stream, ends in exactly one final response or one error, and
    tritonclient does not say which request an error is of: so the stream has ended
    once more of them came than stops were sent; a stop that may have failed is sent
    again.
    """

    def __init__(self, connection, request_id: str, events: queue.Queue, heard: bool) -> None:
        self.connection = connection  # the tritonclient client whose stream is being ended
        self.request_id = request_id
        self.events = events
        self.heard = heard
        self.stops = self.ends = 0  # stops sent; stops answered and errors, whoever's
        self.landed = False
        self.next_stop = time.perf_counter()

    def run(self, until: float) -> bool | None:
        """Go on ending it until ``until`` (perf_counter): True once it has ended, None if not yet."""
        while True:
            now = time.perf_counter()
            if not self.landed and now >= self.next_stop:
                self._send_stop()
                self.stops += 1
                self.landed, self.next_stop = self.heard, time.perf_counter() + STOP_REPEAT_SECONDS
            wait = (until if self.landed else min(until, self.next_stop)) - time.perf_counter()
            try:
                response, error, _ = self.events.get(timeout=max(0.0, wait))
            except queue.Empty:
                response = error = None
            answers_stop = response is not None and response.get_response().model_name == LLM_MODEL
            if error is not None or answers_stop:
                self.ends += 1
                if self.ends > self.stops:
                    return True  # the stream's own error came beside every stop's end
                self.landed = self.landed and error is None  # the error may be a stop's: another one
            elif response is not None:
                if _is_final(response):
                    return True
                self.heard = True
            if time.perf_counter() >= until:
                return None

    def finish(self, deadline: float) -> None:
        """The rest of ``run``, up to ``deadline``, on a thread of its own; the connection is then closed,
        its stream cancelled if it has not ended (the server stopped answering)."""
        try:
            ended = self.run(deadline) is True
        except Exception:  # noqa: BLE001 (a stop that could not be sent: the server is gone)
            ended = False
        self.connection.stop_stream(cancel_requests=not ended)
        self.connection.close()

    def _send_stop(self) -> None:
        """``stop`` for the stream, sent on that same gRPC stream: a caller hanging up needs no new
        connection and no new threads, whose setup was seen to take over a second on a busy machine
        while generation ran on. Its answer, an empty final response from the `llm` model (or an
        error), comes among the stream's."""
        self.connection.async_stream_infer(LLM_MODEL, stop_inputs(), request_id=self.request_id,
                                           enable_empty_final_response=True)


class OrpheusClient:
    """One gRPC connection; ``synthesize`` runs one stream at a time on it (use one client per thread).

    ``end_wait``: how long a stream left early holds its caller for its clean end (``_leave``); a program
    that exits right after (a command line tool) or measures what follows wants END_EARLY_SECONDS.
    """

    def __init__(self, url: str = DEFAULT_GRPC_URL, model: str = ENSEMBLE_MODEL,
                 end_wait: float = END_WAIT_SECONDS):
        import tritonclient.grpc as grpcclient  # noqa: PLC0415

        self.url = check_grpc_url(url)
        self.model = model
        self.end_wait = _seconds_at_least_0("end_wait", end_wait)
        self.client = grpcclient.InferenceServerClient(url)

    def synthesize(
        self,
        text: str,
        on_chunk: Callable[[np.ndarray], None] | None = None,
        timeout: float = 600.0,
        request_id: str | None = None,
        **options,
    ) -> SynthesisResult:
        """Stream one utterance; ``on_chunk`` sees each int16 chunk as it arrives."""
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        events: queue.Queue = queue.Queue()
        result = SynthesisResult(request_id=request_id or str(uuid.uuid4()))
        inputs = _inputs(text, options)  # a bad option is refused before anything is sent
        completed, first = False, True
        # Timed from before the gRPC stream opens: its setup (a thread, a call) is the caller's wait too,
        # and took a second in a busy process.
        started = time.perf_counter()
        self.client.start_stream(callback=lambda result, error: events.put((result, error, time.perf_counter())))
        try:
            try:
                self.client.async_stream_infer(self.model, inputs, request_id=result.request_id,
                                               enable_empty_final_response=True)
            except InferenceServerException as broken:  # the stream broke before the request went out
                completed = True  # nothing to end
                cause = broken
                with contextlib.suppress(queue.Empty):  # tritonclient only says that; its callback has why
                    cause = events.get(timeout=1.0)[1] or broken
                raise self._failure(cause, first=True) from None
            while True:
                try:
                    response, error, arrived = events.get(timeout=max(0.0, started + timeout - time.perf_counter()))
                except queue.Empty:
                    raise TimeoutError(f"the stream did not end within its {timeout:g} s timeout") from None
                if error is not None:
                    completed = True  # the server ended the stream itself
                    raise self._failure(error, first)
                first = False
                # The stream has ended with its final response, whatever on_chunk does with its audio: a caller
                # hanging up on the last chunk sent a stop for a stream that was over, then waited 15 s for an
                # end that had come already.
                final = completed = _is_final(response)
                result.finish_reason = _finish_reason(response) or result.finish_reason
                audio = response.as_numpy(OUT_AUDIO)
                if audio is not None and audio.size:
                    audio = audio.reshape(-1)
                    result.chunks.append(Chunk(audio, arrived - started))
                    if on_chunk:
                        on_chunk(audio)
                if final:
                    break
            result.total_seconds = time.perf_counter() - started
            completed = True
            return result
        finally:
            if completed:
                self.client.stop_stream()
            else:
                self._leave(_EarlyEnd(self.client, result.request_id, events, heard=not first))

    def _failure(self, error, first: bool) -> Exception:
        """What to raise for a stream's error (``_stream_failure``; ``first``: no response came yet)."""
        return _stream_failure(self.url, str(error), _unavailable(error), first)

    def _leave(self, ending: _EarlyEnd) -> None:
        """End the abandoned stream (``_EarlyEnd``), waiting ``end_wait`` seconds for it: if it has not ended
        by then, a thread waits for the rest of END_EARLY_SECONDS on the stream's connection (the interpreter
        waits for it at its exit: a stream cut off there would stay in flight on the server), and the
        client's next stream gets a connection of its own."""
        started = time.perf_counter()
        try:
            ended = ending.run(started + min(self.end_wait, END_EARLY_SECONDS))
        except Exception:  # noqa: BLE001 (the stop could not be sent: the error raised is the stream's)
            ended = False
        except BaseException:  # a second Ctrl-C while ending it: cancel at once
            ending.connection.stop_stream(cancel_requests=True)
            raise
        if ended is not None:
            ending.connection.stop_stream(cancel_requests=not ended)
            return
        import tritonclient.grpc as grpcclient  # noqa: PLC0415

        self.client = grpcclient.InferenceServerClient(self.url)
        threading.Thread(target=ending.finish, args=(started + END_EARLY_SECONDS,),
                         name=f"orpheus-end-{ending.request_id}").start()

    def stop(self, request_id: str, timeout: float = 10.0) -> None:
        """Ask the LLM stage to end the stream with this id at its next step.

        This is TensorRT-LLM's `stop` control request, which both LLM backends take;
        the stream then ends normally (end of speech), and so does the ensemble
        around it. It goes over a connection of its own, so it can be sent from
        anywhere (another thread, another process) while the stream is open; a stream
        left early while ``synthesize`` reads it gets its `stop` on its own gRPC stream.
        Raises SynthesisError when the server refuses the stop, ConnectionError when no server answers at
        the url; one not answered within ``timeout`` is left to the server (as ``AsyncOrpheusClient.stop``
        does). A stop for an id that is not streaming (ended already, or never sent) is no error: it
        races with the stream's own end.
        """
        import tritonclient.grpc as grpcclient  # noqa: PLC0415
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        inputs = stop_inputs()
        done: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        client.start_stream(callback=lambda result, error: done.put(error))
        try:
            client.async_stream_infer(LLM_MODEL, inputs, request_id=request_id, enable_empty_final_response=True)
            error = done.get(timeout=timeout)
        except InferenceServerException as broken:  # the stream broke before the stop went out
            with contextlib.suppress(queue.Empty):  # tritonclient only says that; its callback has why
                broken = done.get(timeout=1.0) or broken
            error = broken
        except queue.Empty:
            error = None  # as the async client: a stop not answered in time is left to the server
        finally:
            client.stop_stream()
            client.close()
        if error is not None:
            raise _stop_failure(self.url, request_id, str(error), _unavailable(error))

    def close(self) -> None:
        self.client.close()


# Seconds past a stream's own timeout at which gRPC's deadline for its call falls.
GRPC_DEADLINE_MARGIN = 30.0


class _ShieldedReads:
    """A stream's (response, error) pairs, read so that cancelling the reader does not cancel the call.

    grpc.aio cancels a call whose read is cancelled (a cancelled task, a timeout around it). But a
    cancelled ensemble request is not passed on to the `llm` request inside it and stays counted in
    flight with tritonserver 2.51 (see ``_EarlyEnd``): a stream must end with a `stop`
    and its responses read to its end. So each read runs as a task of its own, awaited through
    ``asyncio.shield``: a cancelled reader leaves it running, and the next ``next`` picks it up.
    A failed connection (gRPC's status) is raised as ConnectionError naming ``url`` before the first
    response, as SynthesisError after it.
    """

    def __init__(self, responses, url: str) -> None:
        self._responses = responses
        self._url = url
        self.received = False  # a response has come
        self._pending: asyncio.Future | None = None

    async def next(self, deadline: float | None = None) -> tuple:
        """The next pair; StopAsyncIteration at the stream's end, TimeoutError at ``deadline`` (the
        loop's clock), the read left pending for the next call."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._read())
        loop = asyncio.get_running_loop()
        wait = None if deadline is None else max(0.0, deadline - loop.time())
        # A read that completes as its reader is cancelled stays for the next call; an ended or failed
        # stream raises the same again.
        pair = await asyncio.wait_for(asyncio.shield(self._pending), wait)
        self._pending = None
        return pair

    async def _read(self) -> tuple:
        import grpc  # noqa: PLC0415

        try:
            pair = await self._responses.__anext__()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or getattr(task, "cancelling", lambda: 1)():
                raise  # this read itself was cancelled (``cancel``, the loop shutting down)
            # grpc.aio ended the call under the read: its channel closed (the client's ``close``)
            raise SynthesisError("the stream's connection was closed: its client closed it") from None
        except grpc.aio.AioRpcError as error:
            unavailable = error.code() == grpc.StatusCode.UNAVAILABLE
            message = error.details() if unavailable else f"the stream failed: {error.code().name}: {error.details()}"
            raise _stream_failure(self._url, message, unavailable, first=not self.received) from None
        self.received = True
        return pair

    def cancel(self) -> None:
        self._responses.cancel()
        if self._pending is not None:
            self._pending.cancel()


class AsyncOrpheusClient:
    """The asyncio client, for voice agents built on an event loop.

        async with AsyncOrpheusClient("localhost:8001") as client:
            async for chunk in client.stream("Hello there.", voice="tara"):   # int16, 24 kHz, mono
                play(chunk)

    Leaving the loop early (a caller barging in), an exception, a timeout or a cancelled task ends the
    stream the clean way once the generator is closed (``contextlib.aclosing``, as below, or when it is
    collected; ``close`` waits for that): the llm stage gets a `stop` (``stop``) and generation ends
    within a step, as with ``OrpheusClient``:

        async with contextlib.aclosing(client.stream(reply)) as chunks:
            async for chunk in chunks:
                if caller_spoke():
                    break

    Streams may run concurrently on one client. Each request goes on a gRPC stream of its own, closed
    for writing once sent: the server ends that stream after the request's last response, which is
    how the end of an utterance shows here. A caller leaving a stream waits ``end_wait`` seconds at most
    for its clean end, which goes on beside it: close the client (``async with``) before the event loop
    ends, or the ends still under way are cancelled with it (a bare cancellation, which tritonserver
    2.51 keeps counted in flight).
    """

    def __init__(self, url: str = DEFAULT_GRPC_URL, model: str = ENSEMBLE_MODEL,
                 end_wait: float = END_WAIT_SECONDS):
        self.url = check_grpc_url(url)
        self.model = model
        self.end_wait = _seconds_at_least_0("end_wait", end_wait)  # as OrpheusClient's
        self._client = None  # made in the event loop that first uses it (``client``)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: weakref.WeakSet = weakref.WeakSet()  # the generators ``stream`` returned
        self._ending: set[asyncio.Future] = set()  # streams being ended early (``_end_early``)
        self._live: dict[str, asyncio.Future] = {}  # streams under way, by id: done when they have ended
        self._cut_off: set[str] = set()  # streams read by other tasks that ``close`` stopped
        self._closing = False

    @property
    def client(self):
        """The tritonclient asyncio client, made on first use in the running event loop: grpc.aio binds a
        channel to the loop it is made in, and a client made before ``asyncio.run`` failed in it with a
        future 'attached to a different loop'."""
        loop = asyncio.get_running_loop()
        if self._client is None:
            import tritonclient.grpc.aio as grpcaio  # noqa: PLC0415

            self._client, self._loop = grpcaio.InferenceServerClient(self.url), loop
        elif loop is not self._loop:
            raise RuntimeError("an AsyncOrpheusClient serves the event loop it was first used in; "
                               "make one in each event loop (each asyncio.run)")
        return self._client

    async def __aenter__(self) -> AsyncOrpheusClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def stream(self, text: str, request_id: str | None = None, timeout: float = 600.0,
               on_finish: Callable[[str], None] | None = None, **options) -> AsyncGenerator[np.ndarray, None]:
        """Yield the utterance's int16 chunks as they arrive; ``options`` as ``request_inputs`` takes them.
        ``on_finish`` hears why the audio ended (``SynthesisResult.finish_reason``: FINISH_MAX_TOKENS means
        the text's last words may be missing) as the server says it, before the last chunk is yielded.
        Raises SynthesisError with the server's message when the stream fails (or its connection does),
        ConnectionError when no server answers at the url, TimeoutError when it has not ended within
        ``timeout`` seconds (it is then ended the clean way)."""
        chunks = self._stream(text, request_id, timeout, on_finish, **options)
        self._streams.add(chunks)  # ``close`` ends those still open
        return chunks

    async def _stream(self, text: str, request_id: str | None, timeout: float,
                      on_finish: Callable[[str], None] | None, **options) -> AsyncGenerator[np.ndarray, None]:
        if self._closing:  # (stream_text's next sentence, say): it would be cut off as it started
            raise SynthesisError("the client is closed: no new stream")
        request_id = request_id or str(uuid.uuid4())
        inputs = _inputs(text, options)
        deadline = asyncio.get_running_loop().time() + timeout
        # gRPC's own deadline only backs the one kept here: at gRPC's, the call would be cancelled.
        responses = _ShieldedReads(self._open(self.model, inputs, request_id, timeout + GRPC_DEADLINE_MARGIN),
                                   self.url)
        ended = False
        self._live[request_id] = live = asyncio.get_running_loop().create_future()
        try:
            while True:
                try:
                    response, error = await responses.next(deadline)
                except StopAsyncIteration:
                    ended = True  # the server closed the stream after the last response
                    if request_id in self._cut_off:  # not the utterance's end: ``close`` stopped it
                        raise SynthesisError("the stream was cut off: its client was closed") from None
                    return
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                    raise TimeoutError(f"the stream did not end within its {timeout:g} s timeout") from None
                except (SynthesisError, ConnectionError):
                    ended = True  # the connection failed: nothing left to end
                    raise
                if error is not None:
                    ended = True  # the server ended the stream itself
                    raise SynthesisError.of(error)
                ended = _is_final(response)  # a caller leaving at the last chunk leaves an ended stream
                if on_finish is not None and (reason := _finish_reason(response)) is not None:
                    on_finish(reason)
                audio = response.as_numpy(OUT_AUDIO)
                if audio is not None and audio.size:
                    yield audio.reshape(-1)
        finally:
            try:
                if not ended:
                    await self._end_early(request_id, responses, wait=self.end_wait)
            finally:
                live.set_result(None)
                if self._live.get(request_id) is live:
                    del self._live[request_id]

    async def stream_text(self, text: str | Iterable[str] | AsyncIterable[str], lookahead: int = 2,
                          concurrency: int = 1, max_chars: int = MAX_SENTENCE_CHARS, timeout: float = 600.0,
                          pause_seconds: float | None = PAUSE_SECONDS, on_finish: Callable[[str], None] | None = None,
                          **options) -> AsyncGenerator[np.ndarray, None]:
        """Speak ``text`` sentence by sentence, starting as soon as its first sentence is complete.

        ``text``: a whole string, or its pieces as they arrive (an async iterable: a voice agent's LLM
        reply, token by token; a plain iterable is read on the event loop, so only for text at hand).
        Each sentence is one request (``text_stream``), with ``options`` as ``stream`` takes them;
        chunks come in text order. The next sentence starts when
        the one before it has finished generating (faster than it plays), so its audio follows without
        a gap; ``lookahead`` bounds how many sentences are started ahead of the one playing and
        ``concurrency`` how many generate at once (see ``text_stream.speak_in_order``). Text of any
        length is spoken whole, where one request takes at most MAX_TEXT_CHARS characters and plays
        DEFAULT_MAX_TOKENS tokens unless asked for more. A sentence is complete once the next one begins,
        or once the text has paused after its end mark for ``pause_seconds`` (a reply's "One moment." before
        a tool call is spoken then, not with the words after the call; ``text_stream.sentences_of``).
        Leaving early ends every running request the clean way (as ``stream``). ``on_finish`` hears why each
        sentence's audio ended as its stream's last response arrives: when the sentence has been decoded,
        which may be before it plays (``lookahead``), and with ``concurrency`` over 1 not always in text order.
        """
        if "request_id" in options:
            raise ValueError("stream_text gives each sentence a request id of its own; pass no request_id")
        _inputs("", options)  # an unknown option is refused here, not at the first sentence
        sentences = sentences_of(text, max_chars, pause_seconds)
        speech = speak_in_order(sentences, lambda sentence: self.stream(sentence, timeout=timeout,
                                                                        on_finish=on_finish, **options),
                                lookahead, concurrency)
        async with contextlib.aclosing(speech) as chunks:
            async for chunk in chunks:
                yield chunk

    async def stop(self, request_id: str, timeout: float = 10.0) -> None:
        """Ask the LLM stage to end the stream with this id at its next step (see ``OrpheusClient.stop``);
        raises SynthesisError when the server refuses it, ConnectionError when no server answers."""
        import grpc  # noqa: PLC0415

        inputs = stop_inputs()
        responses = self._open(LLM_MODEL, inputs, request_id, timeout + GRPC_DEADLINE_MARGIN)

        async def answered() -> None:
            async for _, error in responses:  # its one response, if any; then the server closes the stream
                if error is not None:
                    raise _stop_failure(self.url, request_id, str(error), _unavailable(error))

        try:
            await asyncio.wait_for(answered(), timeout)
        except asyncio.TimeoutError:
            responses.cancel()
        except grpc.aio.AioRpcError as error:
            raise _stop_failure(self.url, request_id, f"{error.code().name}: {error.details()}",
                                error.code() == grpc.StatusCode.UNAVAILABLE) from None

    async def close(self) -> None:
        """Close the connection, once every stream left open has ended the clean way (see ``stream``):
        one still being read by another task is stopped, and its reader gets SynthesisError (the stream
        was cut off: not the utterance's end). New streams are refused from here on (SynthesisError)."""
        self._closing = True
        for chunks in list(self._streams):  # still referenced somewhere, but done with
            with contextlib.suppress(RuntimeError):  # being read by another task: stopped below
                await chunks.aclose()
        # A stream collected just now is closed by a task the loop creates at its next turn and starts
        # at the one after: it then registers its ending below.
        for _ in range(2):
            await asyncio.sleep(0)
        self._cut_off.update(self._live)
        await asyncio.gather(*(self._stop_until_ended(request_id, ended)
                               for request_id, ended in list(self._live.items())))
        while self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    async def _stop_until_ended(self, request_id: str, ended: asyncio.Future,
                                timeout: float = END_EARLY_SECONDS) -> None:
        """Send a stream read elsewhere its `stop` (again every STOP_REPEAT_SECONDS) until it has ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not ended.done() and loop.time() < deadline:
            with contextlib.suppress(Exception):  # the connection is going anyway
                await self.stop(request_id)
            await asyncio.wait([ended], timeout=STOP_REPEAT_SECONDS)

    def _open(self, model: str, inputs: list, request_id: str, timeout: float):
        """One request on a gRPC stream of its own; the iterator of its (response, error) pairs."""
        async def requests():
            yield {"model_name": model, "inputs": inputs, "request_id": request_id}

        return self.client.stream_infer(requests(), stream_timeout=timeout)

    async def _end_early(self, request_id: str, responses: _ShieldedReads,
                         timeout: float = END_EARLY_SECONDS, wait: float = END_WAIT_SECONDS) -> None:
        """``_EarlyEnd`` for this client: `stop`, then read on to the stream's end;
        cancel the gRPC stream if that does not come within ``timeout``. It runs as a task of its own,
        which ``close`` waits for: a generator left without ``aclosing`` is closed when it is collected,
        maybe after its client's ``async with`` has begun to close the connection. The caller waits
        for it ``wait`` seconds at most (END_WAIT_SECONDS)."""
        async def end() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            try:
                while True:  # the stop again every STOP_REPEAT_SECONDS until one went after a response
                    landed = responses.received
                    try:
                        await self.stop(request_id)
                    except (SynthesisError, ConnectionError):  # refused or not sent: not landed; read on, again
                        landed = False
                    next_stop = deadline if landed else min(deadline, loop.time() + STOP_REPEAT_SECONDS)
                    try:
                        while (await responses.next(next_stop))[1] is None:
                            pass
                        return  # the stream's error: its end
                    except asyncio.TimeoutError:
                        if loop.time() >= deadline:
                            raise
            except StopAsyncIteration:
                pass  # the stream's end
            except Exception:  # noqa: BLE001 (a timeout, a broken connection: the gRPC stream goes anyway)
                responses.cancel()
            except asyncio.CancelledError:
                responses.cancel()
                raise

        ending = asyncio.ensure_future(end())
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)
        await asyncio.wait({ending}, timeout=wait)  # a caller cancelled again does not cut the stop short

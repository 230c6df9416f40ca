"""The llm model's stream rules (orpheus_triton.llm_streams), with a stand-in engine and senders."""

import numpy as np
import pytest

from orpheus_triton.constants import (
    CANCEL_CHECK_SECONDS,
    END_OF_SPEECH,
    FINISH_END_OF_SPEECH,
    FINISH_MAX_TOKENS,
    LLM_FINISH_REASON,
    LLM_INPUT_IDS,
    LLM_STOP,
    REQUEST_START,
)
from orpheus_triton.constants import LLM_OUTPUT_IDS as OUT_IDS
from orpheus_triton.constants import LLM_SEQUENCE_LENGTH as OUT_LENGTH
from orpheus_triton.engine import CapacityError
from orpheus_triton.llm_streams import LlmStreams
from orpheus_triton.serving import Reply, StreamIdError, llm_responders

SETTINGS = {"prompt": [1, 2, 3], "max_new_tokens": 70}


class Engine:
    """Records what the streams hand it; the test plays the engine loop by calling emit/fail."""

    def __init__(self):
        self.requests, self.stopped, self.full = {}, [], False

    def submit(self, request):
        if self.full:
            raise CapacityError("server busy: 256 requests already queued")
        self.requests[request.request_id] = request

    def stop_stream(self, request_id):
        self.stopped.append(request_id)
        return request_id in self.requests


def make(threaded: bool | int = False, fail_sends=(), cancel_check_seconds=CANCEL_CHECK_SECONDS):
    """``threaded``: False (responses sent where they are made), True (one response thread) or a count."""
    sent, refused = [], []
    streams = None

    def respond(sender, tokens, count, finish):
        if sender in fail_sends:
            raise RuntimeError("client went away")
        # What a client may do the moment the final response arrives: reuse the id.
        reusable = finish is not None and "a" not in streams.active._ids
        sent.append((sender, tokens, count, finish, reusable))

    def refuse(sender, message):
        refused.append((sender, message))

    engine = Engine()
    streams = LlmStreams(engine, respond, refuse, response_threads=int(threaded), tokens_per_response=7,
                         hold_seconds=600, cancel_check_seconds=cancel_check_seconds)
    return streams, engine, sent, refused


@pytest.mark.parametrize("threaded", [False, True, 3])
def test_a_stream_sends_frames_in_order_and_frees_its_id_before_the_final_response(threaded):
    streams, engine, sent, _ = make(threaded)
    streams.start("a", SETTINGS, "sender-a", lambda: False)
    emit = engine.requests["a"].emit
    emit([10, 11, 12], None)  # not a frame yet
    emit([13, 14, 15, 16], None)
    emit([17, END_OF_SPEECH], FINISH_END_OF_SPEECH)
    streams.close()
    assert sent == [("sender-a", [10, 11, 12, 13, 14, 15, 16], 7, None, False),
                    ("sender-a", [17, END_OF_SPEECH], 9, FINISH_END_OF_SPEECH, True)]
    streams.active.claim("a")  # free again


def test_a_start_that_fails_unexpectedly_raises_and_claims_nothing():
    streams, engine, sent, refused = make()

    def broken(request):
        raise RuntimeError("a fault in the engine")

    engine.submit = broken
    with pytest.raises(RuntimeError, match="a fault in the engine"):
        streams.start("a", SETTINGS, "sender-a", lambda: False)
    assert not sent and not refused  # the adapter answers (serving.serve_llm_requests)
    streams.active.claim("a")  # free again


def test_a_request_beyond_capacity_is_refused_and_claims_nothing():
    streams, engine, _, refused = make()
    engine.full = True
    streams.start("a", SETTINGS, "sender-a", lambda: False)
    assert refused == [("sender-a", "server busy: 256 requests already queued")]
    streams.active.claim("a")


def test_a_send_that_fails_drops_the_stream_and_retires_its_id():
    streams, engine, sent, _ = make(fail_sends={"sender-a"})
    streams.start("a", SETTINGS, "sender-a", lambda: False)
    engine.requests["a"].emit(list(range(7)), None)
    assert engine.stopped == ["a"] and not sent
    engine.requests["a"].emit([END_OF_SPEECH], FINISH_END_OF_SPEECH)  # the engine ends it: nothing more is sent
    assert not sent
    with pytest.raises(StreamIdError, match="cancelled or failed"):
        streams.active.claim("a")


def test_a_send_that_fails_after_its_streams_end_spares_the_next_stream_with_its_id():
    """With the response thread behind, a stream's last frame can fail to send after the stream ended and
    let its id go, and after its client started a new stream with that id: the failure used to stop the
    new stream and drop its claim. Now it only holds the id as unfinished, if nobody has it."""
    import threading
    import time

    from orpheus_triton.llm_streams import LlmStreams

    sent = []

    def behind_then_failing():
        behind = threading.Event()

        def respond(sender, tokens, count, finish):
            if sender == "gone":
                behind.wait(5)
                raise RuntimeError("client went away")
            sent.append((sender, tokens, finish))

        engine = Engine()
        return LlmStreams(engine, respond, lambda sender, message: None, response_threads=1,
                          tokens_per_response=7, hold_seconds=600), engine, behind

    streams, engine, behind = behind_then_failing()
    streams.start("a", SETTINGS, "gone", lambda: False)
    old = engine.requests["a"]
    old.emit(list(range(7)), None)  # a frame, whose send will fail
    old.emit([7, END_OF_SPEECH], FINISH_END_OF_SPEECH)  # the end: the id is let go
    streams.start("a", SETTINGS, "new", lambda: False)  # and taken again
    behind.set()
    time.sleep(0.3)
    assert engine.stopped == [] and "a" in streams.active._ids  # the new stream goes on
    new = engine.requests["a"]
    new.emit(list(range(100, 107)), None)
    new.emit([END_OF_SPEECH], FINISH_END_OF_SPEECH)
    streams.close()
    assert [finish for sender, _, finish in sent if sender == "new"] == [None, FINISH_END_OF_SPEECH]
    # Without a new stream, the lost end holds the id, as a cancelled stream's does.
    streams, engine, behind = behind_then_failing()
    streams.start("b", SETTINGS, "gone", lambda: False)
    engine.requests["b"].emit(list(range(7)), None)
    engine.requests["b"].emit([END_OF_SPEECH], FINISH_END_OF_SPEECH)
    assert "b" not in streams.active._ids
    behind.set()
    streams.close()
    assert engine.stopped == []
    with pytest.raises(StreamIdError, match="cancelled or failed"):
        streams.active.claim("b")


def test_stop_ends_the_stream_in_the_engine_and_retires_its_id():
    streams, engine, _, refused = make()
    streams.start("a", SETTINGS, "sender-a", lambda: False)
    streams.stop("a")
    streams.stop("nobody")  # harmless
    assert engine.stopped == ["a", "nobody"]
    with pytest.raises(StreamIdError, match="cancelled or failed"):
        streams.active.claim("a")
    # A stream the engine fails once it has streamed (the client cancelled it) is told why, and its id stays
    # retired too: the decoder may hold its audio's state.
    streams.start("b", SETTINGS, "sender-b", lambda: True)
    engine.requests["b"].emit(list(range(7)), None)
    engine.requests["b"].fail("request cancelled by the client")
    assert refused == [("sender-b", "request cancelled by the client")]
    with pytest.raises(StreamIdError):
        streams.active.claim("b")


def test_a_request_refused_before_it_streamed_leaves_its_id_free_for_a_retry():
    """A request that waited for a slot in vain was refused as `server busy ... retry later`, and its id
    retired for 10 minutes: the retry with the same id was refused as a stopped stream's."""
    streams, engine, sent, refused = make()
    streams.start("a", SETTINGS, "sender-a", lambda: False)
    engine.requests["a"].emit([1, 2, 3], None)  # less than a frame: nothing went out
    engine.requests["a"].fail("server busy: no stream slot came free within 5 s; retry later")
    assert refused == [("sender-a", "server busy: no stream slot came free within 5 s; retry later")] and not sent
    streams.start("a", SETTINGS, "sender-a2", lambda: False)  # the retry
    assert "a" in streams.active._ids


def test_a_stop_that_overtakes_its_request_stops_the_stream_as_it_arrives():
    """A stop sent right after its request can reach the llm stage first (the request goes through
    preprocessing): it found no stream, was answered as done, and the stream ran to its end."""
    import time

    from orpheus_triton.serving import EARLY_STOP_SECONDS

    streams, engine, _, _ = make()
    streams.stop("early")
    assert engine.stopped == ["early"] and "early" in streams._early_stops
    streams.start("early", SETTINGS, "sender", lambda: False)
    assert engine.stopped == ["early", "early"] and not streams._early_stops  # stopped as it came, once
    with pytest.raises(StreamIdError, match="cancelled or failed"):
        streams.active.claim("early")
    # One whose request never came is forgotten after EARLY_STOP_SECONDS: a later stream with the id runs.
    streams.stop("late")
    streams._early_stops._kept["late"] = time.monotonic() - EARLY_STOP_SECONDS
    streams.start("late", SETTINGS, "sender", lambda: False)  # its stop expired, though nothing swept it
    assert engine.stopped.count("late") == 1
    streams.stop("gone")
    streams._early_stops._kept["gone"] = time.monotonic() - EARLY_STOP_SECONDS
    streams.stop("other")  # forgets the expired ones
    assert "gone" not in streams._early_stops and "other" in streams._early_stops


class FakePbUtils:
    """The parts of triton_python_backend_utils that llm_responders uses."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    Tensor = staticmethod(lambda name, value: (name, value.tolist()))
    InferenceResponse = staticmethod(lambda outputs: outputs)


class Sender:
    def __init__(self):
        self.sent = []

    def send(self, response, flags=0):
        self.sent.append((response, flags))


@pytest.mark.parametrize(("asked", "expected"), [
    ({OUT_IDS}, [OUT_IDS]),  # what the ensemble asks of the llm stage
    ({OUT_IDS, OUT_LENGTH}, [OUT_IDS, OUT_LENGTH]),
    ({OUT_IDS, REQUEST_START}, [OUT_IDS, REQUEST_START]),  # with the request's start, for the decoder
    ({OUT_IDS, LLM_FINISH_REASON}, [OUT_IDS, LLM_FINISH_REASON]),  # and why it ended, for the client
    (set(), [OUT_IDS, OUT_LENGTH, REQUEST_START, LLM_FINISH_REASON]),  # a caller that names no outputs gets all
])
def test_responses_carry_only_the_outputs_asked_for(asked, expected):
    """An output the caller did not ask for is not built at all: Triton's Python backend would drop it
    inside send() after releasing the GIL, which crashes the stub on Python 3.12. The final response says
    why the stream ended; the others do not (they have no finish reason)."""
    respond, _ = llm_responders(FakePbUtils)
    sender = Sender()
    respond(Reply(sender, frozenset(asked), 1234.5), [5, 6], 2, None)
    respond(Reply(sender, frozenset(asked), 1234.5), [7], 3, FINISH_MAX_TOKENS)
    [(going_on, not_final), (response, flags)] = sender.sent
    assert [name for name, _ in going_on] == [name for name in expected if name != LLM_FINISH_REASON]
    assert not_final == 0
    assert [name for name, _ in response] == expected and flags == FakePbUtils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert dict(response)[OUT_IDS] == [[[7]]]
    if REQUEST_START in expected:
        assert dict(response)[REQUEST_START] == [[1234.5]]
    if LLM_FINISH_REASON in expected:
        assert dict(response)[LLM_FINISH_REASON] == [[FINISH_MAX_TOKENS.encode()]]


def test_threaded_a_stream_is_asked_about_cancellation_in_passes_within_their_duty():
    """The engine checks every stream at every step; on GPU (threaded) Triton is asked in passes on a thread of
    their own (each question is a round trip to the server), not once per check: by default as often as the
    passes keep within CANCEL_CHECK_DUTY of that thread's time, and at least cancel_check_seconds apart."""
    import threading
    import time

    from orpheus_triton.constants import CANCEL_CHECK_DUTY

    for interval in (0.0, 0.1):
        streams, engine, _, _ = make(threaded=True, cancel_check_seconds=interval)
        asked, requested = [], []  # when each pass asked Triton, when each was asked for (by an engine check)

        def ask(asked=asked):
            asked.append(time.monotonic())
            assert threading.current_thread().name == "triton-cancellations"
            time.sleep(0.004)  # a round trip to a busy server
            return False

        watch = streams.cancellations
        run = watch.run
        watch.run = lambda call, run=run, requested=requested: (requested.append(time.monotonic()), run(call))
        streams.start("a", SETTINGS, "sender-a", ask)
        check, checks = engine.requests["a"].is_cancelled, 0
        started = time.monotonic()
        deadline = started + 10
        while len(asked) < 4 and time.monotonic() < deadline:  # a few passes, however busy the machine
            assert not check()
            checks += 1
            time.sleep(0.001)
        took = time.monotonic() - started
        streams.close()
        assert len(asked) >= 4 and checks >= len(requested) >= len(asked)
        # The rest after a pass counts from its end: from one ask to the next at least its 4 ms and nine times
        # that (a pass held up by a busy machine is longer and rests longer).
        duty_spacing = 0.004 / CANCEL_CHECK_DUTY
        assert all(b - a >= duty_spacing * 0.99 for a, b in zip(asked, asked[1:], strict=False))
        # The interval counts from the check that asked for the pass (stamped here a statement later).
        assert all(b - a >= interval * 0.9 for a, b in zip(requested, requested[1:], strict=False))
        # Not once per check: no more passes than the spacing allows in the time the checks took.
        assert len(requested) <= took / max(interval, duty_spacing) + 1, (len(requested), took, checks)


class FakeRequest:
    """The parts of a Triton request serve_llm_requests reads."""

    def __init__(self, request_id: str, prompt: list[int]):
        self.id, self.sender = request_id, Sender()
        self.tensors = {LLM_INPUT_IDS: np.array([prompt], dtype=np.int32)}

    def request_id(self):
        return self.id

    def inputs(self):
        return [FakeTensor(name, value) for name, value in self.tensors.items()]

    def get_response_sender(self):
        return self.sender

    def requested_output_names(self):
        return []

    def is_cancelled(self):
        return False


class FakeTensor:
    def __init__(self, name, value):
        self._name, self._value = name, value

    def name(self):
        return self._name

    def as_numpy(self):
        return self._value


class ErrorPbUtils(FakePbUtils):
    TritonError = staticmethod(lambda message: message)
    InferenceResponse = staticmethod(lambda outputs=None, error=None: error if error is not None else outputs)


def test_a_start_that_fails_unexpectedly_is_told_to_its_request_and_the_batch_goes_on():
    from orpheus_triton.serving import serve_llm_requests

    started = []

    def start(request_id, inputs, reply, is_cancelled):
        if request_id == "broken":
            raise KeyError("a fault in the stage")
        started.append(request_id)

    def stop(request_id):
        raise ConnectionError("engine model unavailable")

    broken, fine = FakeRequest("broken", [1, 2]), FakeRequest("fine", [3, 4])
    stopped = FakeRequest("any", [0])
    stopped.tensors[LLM_STOP] = np.ones((1, 1), np.bool_)
    serve_llm_requests(ErrorPbUtils, [broken, stopped, fine], start, stop=stop)
    assert started == ["fine"] and fine.sender.sent == []
    [(message, flags)] = broken.sender.sent
    assert message.startswith("orpheus llm: internal error starting the stream ('a fault in the stage')")
    assert flags == ErrorPbUtils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    [(message, flags)] = stopped.sender.sent
    assert message.startswith("orpheus llm: internal error stopping the stream (engine model unavailable)")


def test_a_stop_the_decoder_cannot_take_is_logged_and_the_llm_stop_stands(caplog):
    """serving.stop_decoding: the decoder's `stop` only saves work; a decoder that refuses it or cannot be
    called (a stand-in, a failure) is logged, and nothing is raised into the llm stage's stop."""
    import numpy as np

    from orpheus_triton import constants as c
    from orpheus_triton.serving import stop_decoding

    sent = []

    class Response:
        def has_error(self):
            return True

        def error(self):
            return type("Error", (), {"message": lambda self: "unexpected inference input 'stop'"})()

    class Request:
        def __init__(self, model_name, requested_output_names, request_id, inputs, timeout):
            sent.append((model_name, request_id, dict(inputs)))

        def exec(self, decoupled):
            assert decoupled
            if sent[-1][1] == "unreachable":
                raise RuntimeError("stub gone")
            return [Response()]

    fake = type("PbUtils", (), {"InferenceRequest": Request, "Tensor": staticmethod(lambda name, value: (name, value))})
    with caplog.at_level("WARNING"):
        stop_decoding(fake, "refused")
        stop_decoding(fake, "unreachable")
    assert [(model, request_id) for model, request_id, _ in sent] == [(c.DECODER_MODEL, "refused"),
                                                                       (c.DECODER_MODEL, "unreachable")]
    assert sent[0][2][c.DECODER_STOP].tolist() == [[True]] and sent[0][2][c.DECODER_TOKENS].dtype == np.int32
    assert "refused the stop of stream 'refused': unexpected inference input 'stop'" in caplog.text
    assert "could not pass the stop of stream 'unreachable' on to the decoder: stub gone" in caplog.text


def test_a_new_stream_refused_while_the_last_one_with_its_id_ends_in_failure_still_hears_why():
    """Stream A's end lets its id go; a new stream B with that id comes before A's final response is
    queued, and is refused (server busy). One of A's earlier sends then fails (its client went away):
    A's later calls are dropped, and B's refusal, queued among them under the same id, was dropped too,
    leaving B's request unanswered for good."""
    import threading
    import time

    sent, refused, client_gone = [], [], threading.Event()

    def respond(sender, tokens, count, finish):
        if sender == "A":
            client_gone.wait(5)
            raise RuntimeError("client went away")
        sent.append(sender)

    engine = Engine()
    streams = LlmStreams(engine, respond, lambda sender, message: refused.append((sender, message)),
                         response_threads=1, tokens_per_response=7, hold_seconds=600)
    streams.start("a", SETTINGS, "A", lambda: False)
    first = engine.requests["a"]
    first.emit(list(range(7)), None)  # its send waits on the response thread, and fails
    release = streams.active.release

    def b_comes_as_a_lets_go(request_id, completed=True):
        release(request_id, completed)
        streams.active.release = release
        engine.full = True
        streams.start("a", SETTINGS, "B", lambda: False)  # execute(), between A's release and A's final

    streams.active.release = b_comes_as_a_lets_go
    first.emit([END_OF_SPEECH], FINISH_END_OF_SPEECH)
    client_gone.set()
    deadline = time.monotonic() + 5
    while not refused and time.monotonic() < deadline:
        time.sleep(0.01)
    streams.close()
    assert refused == [("B", "server busy: 256 requests already queued")] and sent == []


def test_the_caller_is_gone_wherever_a_stream_ends_before_its_end_reaches_the_decoder():
    """The leases of callers in flight (orpheus_triton.callers) end at the decoder's last audio, and in the
    llm stage where a stream's end never goes that far: refused, failed, stopped, its sends lost."""
    gone = []
    engine = Engine()
    failing = Sender()

    def respond(sender, tokens, count, finish):
        if sender is failing:
            raise RuntimeError("client went away")

    streams = LlmStreams(engine, respond, lambda sender, message: None, response_threads=0, tokens_per_response=7,
                         hold_seconds=600, caller_gone=gone.append)
    streams.start("done", SETTINGS, Sender(), lambda: False)
    engine.requests["done"].emit([*range(7), END_OF_SPEECH], FINISH_END_OF_SPEECH)
    assert gone == []  # the decoder ends it, with the stream's last audio
    engine.full = True
    streams.start("busy", SETTINGS, Sender(), lambda: False)
    engine.full = False
    streams.start("timed-out", SETTINGS, Sender(), lambda: False)
    engine.requests["timed-out"].fail("server busy: no stream slot came free within 5 s")
    streams.start("failed", SETTINGS, Sender(), lambda: False)
    engine.requests["failed"].emit(list(range(7)), None)
    engine.requests["failed"].fail("request cancelled by the client")
    streams.start("stopped", SETTINGS, Sender(), lambda: False)
    streams.stop("stopped")
    streams.stop("unknown")
    streams.start("lost", SETTINGS, failing, lambda: False)
    engine.requests["lost"].emit(list(range(7)), None)
    streams.close()
    assert gone == ["busy", "timed-out", "failed", "stopped", "lost"]


def test_a_request_refused_before_its_claim_leaves_the_caller_with_its_id_alone():
    """Only a claimed stream's end, or a retired id's refusal, lets a caller go: a request with a live
    caller's id (a client of the `llm` model alone) is refused and that caller stays. (Bad input is refused
    in serving.serve_llm_requests before any claim, and frees nothing.)"""
    from orpheus_triton.serving import ActiveStreams

    gone = []
    active = ActiveStreams(hold_seconds=600, caller_gone=gone.append)
    active.claim("live")
    active.release("held", completed=False)
    gone.clear()
    with pytest.raises(StreamIdError, match="already streaming"):
        active.claim("live")
    with pytest.raises(StreamIdError, match="stopped, cancelled or failed"):
        active.claim("held")
    assert gone == ["held"] and active.ids() == ["live"]


def test_a_stop_that_comes_after_its_stream_ended_does_not_stop_the_ids_next_stream():
    """A stop for a stream whose generation had ended (its audio still decoding) found no stream and was
    kept as an early stop: the id's next stream, sent once the audio had come, was stopped at once and
    ended with no audio and no error."""
    streams, engine, sent, _ = make()
    streams.start("a", SETTINGS, "first", lambda: False)
    engine.requests.pop("a").emit([*range(7), END_OF_SPEECH], FINISH_END_OF_SPEECH)  # ended: no longer held
    streams.stop("a")  # late
    streams.start("a", SETTINGS, "next", lambda: False)
    assert engine.stopped == ["a"]  # the late stop's own look, not the next stream's
    assert "a" in streams.active.ids()

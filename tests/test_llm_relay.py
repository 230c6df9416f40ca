"""The relay in front of a token-by-token engine (orpheus_triton.llm_relay): unit tests with a scripted
engine, then a real tritonserver with the relay in front of the torch engine streaming token by token."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from orpheus_triton.constants import (
    END_OF_SPEECH,
    FINISH_END_OF_SPEECH,
    FINISH_MAX_TOKENS,
    FINISH_STOPPED,
    LLM_AUDIO_GUARD,
    LLM_SEED,
    LLM_STOP,
)
from orpheus_triton.llm_relay import EngineInputs, EngineResponse, RelayStreams
from orpheus_triton.serving import StreamIdError

INPUTS = {"input_ids": np.array([[5, 6, 7]], np.int32), "input_lengths": np.array([3], np.int32),
          "request_output_len": np.array([100], np.int32)}


class Engine:
    """Plays an engine model: each call's responses are put on a queue by the test (None ends the stream)."""

    def __init__(self):
        self.streams: dict[str, queue.Queue] = {}
        self.inputs: dict[str, dict] = {}
        self.stopped: list[str] = []
        self.called = threading.Event()

    def call(self, request_id, inputs):
        self.inputs[request_id] = inputs
        responses = self.streams.setdefault(request_id, queue.Queue())
        self.called.set()
        while (response := responses.get(timeout=10)) is not None:
            yield response

    def stop(self, request_id):
        self.stopped.append(request_id)

    def send(self, request_id, *responses):
        stream = self.streams.setdefault(request_id, queue.Queue())
        for response in responses:
            stream.put(response)


def make(fail_sends=(), engine_inputs=None, cancel_check_seconds=0.1):
    engine, sent, refused = Engine(), [], []
    relay = None

    def respond(sender, tokens, count, finish):
        if sender in fail_sends:
            raise RuntimeError("client went away")
        reusable = finish is not None and "a" not in relay.active._ids
        sent.append((tokens, count, finish, reusable))

    def refuse(sender, message):
        refused.append(str(message))

    relay = RelayStreams(engine.call, engine.stop, respond, refuse, engine_inputs=engine_inputs or EngineInputs(),
                         tokens_per_response=7, hold_seconds=600, cancel_check_seconds=cancel_check_seconds)
    return relay, engine, sent, refused


def tokens(*ids):
    return [EngineResponse([i]) for i in ids]


def test_token_by_token_stream_goes_out_in_frames_and_ends_with_end_id():
    """TensorRT-LLM: one token per response, end_id left out of the output."""
    relay, engine, sent, refused = make()
    relay.start("a", INPUTS, "sender", lambda: False)
    engine.send("a", *tokens(*range(10, 19)), EngineResponse([]), None)  # an empty final response
    relay.close()
    # The id is free before the final response, which says why the stream ended: short of its
    # request_output_len (100) and not stopped, so on its end_id, which TensorRT-LLM leaves out.
    assert sent == [(list(range(10, 17)), 7, None, False),
                    ([17, 18, END_OF_SPEECH], 10, FINISH_END_OF_SPEECH, True)]
    assert not refused
    relay.active.claim("a")


@pytest.mark.parametrize("engine_sends_end_id", [False, True], ids=["tensorrt-llm", "torch-engine"])
def test_a_stream_cut_at_its_request_output_len_ends_saying_so(engine_sends_end_id):
    """At request_output_len the engine ends the stream (the torch engine with its end_id appended, TensorRT-LLM
    without it): the final response says max_tokens, so the client knows the text's last words are missing."""
    relay, engine, sent, _ = make()
    capped = {**INPUTS, "request_output_len": np.array([9], np.int32)}
    relay.start("a", capped, "sender", lambda: False)
    engine.send("a", *tokens(*range(1, 10)), *tokens(END_OF_SPEECH)[:engine_sends_end_id], None)
    relay.close()
    assert sent == [([1, 2, 3, 4, 5, 6, 7], 7, None, False), ([8, 9, END_OF_SPEECH], 10, FINISH_MAX_TOKENS, True)]


def test_end_id_from_the_engine_is_not_doubled_and_nothing_after_it_goes_out():
    relay, engine, sent, _ = make()
    relay.start("a", INPUTS, "sender", lambda: False)
    engine.send("a", *tokens(1, 2, 3, 4, 5, 6, 7, 8), EngineResponse([END_OF_SPEECH, 99]), None)
    relay.close()
    assert sent == [([1, 2, 3, 4, 5, 6, 7], 7, None, False), ([8, END_OF_SPEECH], 9, FINISH_END_OF_SPEECH, True)]


def test_an_engine_error_reaches_the_client_and_retires_the_id():
    relay, engine, sent, refused = make()
    relay.start("a", INPUTS, "sender", lambda: False)
    engine.send("a", *tokens(1, 2), EngineResponse([], "engine out of KV cache"), None)
    relay.close()
    assert sent == [] and refused == ["engine out of KV cache"]
    with pytest.raises(StreamIdError, match="cancelled or failed"):
        relay.active.claim("a")  # its end never reached the decoder


def test_a_cancelled_client_stops_the_engine_once_and_gets_nothing_more():
    cancelled = threading.Event()
    relay, engine, sent, refused = make(cancel_check_seconds=0.0)
    relay.start("a", INPUTS, "sender", cancelled.is_set)
    engine.send("a", *tokens(*range(1, 8)))
    cancelled.set()
    deadline = time.monotonic() + 5
    for token in range(8, 1000):  # the engine produces more until the stop reaches it
        engine.send("a", EngineResponse([token]))
        time.sleep(0.005)
        if engine.stopped or time.monotonic() > deadline:
            break
    engine.send("a", None)
    relay.close()
    assert engine.stopped == ["a"]
    assert all(finish is None for _, _, finish, _ in sent)
    assert refused == ["request cancelled by the client"]


def test_a_failed_send_stops_the_engine():
    relay, engine, sent, _ = make(fail_sends=("gone",))
    relay.start("a", INPUTS, "gone", lambda: False)
    engine.send("a", *tokens(*range(1, 8)))  # a frame, whose send fails (on the response thread)
    deadline = time.monotonic() + 5
    while "a" not in relay._undelivered and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.send("a", *tokens(*range(8, 15)), None)
    relay.close()
    assert engine.stopped == ["a"] and sent == []
    with pytest.raises(StreamIdError, match="cancelled or failed"):
        relay.active.claim("a")


def test_a_send_that_fails_after_its_streams_end_holds_the_id_and_spares_the_next_stream():
    """With the response thread behind, a stream's frame can fail to send after the relay let its id go:
    the id used to stay marked undelivered for good (and claimable at once), and the next stream with it,
    however much later, was stopped at its first token as if cancelled."""
    engine, sent, refused = Engine(), [], []
    behind = threading.Event()

    def respond(sender, tokens, count, finish):
        if sender == "gone":
            behind.wait(5)
            raise RuntimeError("client went away")
        sent.append((sender, finish))

    relay = RelayStreams(engine.call, engine.stop, respond, lambda sender, message: refused.append(message),
                         engine_inputs=EngineInputs(), tokens_per_response=7, hold_seconds=600)
    relay.start("a", INPUTS, "gone", lambda: False)
    relaying = relay._threads["a"]
    engine.send("a", *tokens(*range(1, 8)), None)  # a frame (its send will fail), then the engine's end
    relaying.join(timeout=5)  # the stream has ended: its id let go, its final response queued behind the frame
    assert not relaying.is_alive() and "a" not in relay.active._ids
    behind.set()
    handled = threading.Event()  # the response thread calls in order: the frame's failure is handled before this
    relay.responses.put(None, handled.set)
    assert handled.wait(5)
    with pytest.raises(StreamIdError, match="cancelled or failed"):  # its end was lost: held, as a cancel's
        relay.active.claim("a")
    relay.active.hold_seconds = 0  # later on
    engine.streams.pop("a")  # the first stream's, read to its end
    relay.start("a", INPUTS, "new", lambda: False)
    engine.send("a", *tokens(*range(10, 30)), None)
    relay.close()
    assert engine.stopped == [] and refused == [] and sent[-1] == ("new", FINISH_END_OF_SPEECH)


def test_stop_is_passed_on_and_the_stream_ends_normally_with_its_id_retired():
    relay, engine, sent, _ = make()
    relay.start("a", INPUTS, "sender", lambda: False)
    engine.called.wait(5)
    relay.stop("a")
    engine.send("a", *tokens(1, 2), None)  # the engine ends a stopped stream
    relay.close()
    assert engine.stopped == ["a", "a"]  # and again once the engine has answered (see the next test)
    assert sent == [([1, 2, END_OF_SPEECH], 3, FINISH_STOPPED, True)]  # ends normally: the ensemble completes
    with pytest.raises(StreamIdError):
        relay.active.claim("a")
    relay.stop("unknown")  # another relay instance's stream, maybe: the engine is told anyway
    assert engine.stopped == ["a", "a", "unknown"]


def test_a_stop_that_reaches_the_engine_before_the_relays_own_call_is_passed_on_again():
    """TensorRT-LLM ignores a stop for an id it does not hold: a stop right after the start (the same
    execute() batch) came before the relay's call and was lost; the stream ran to max_tokens."""
    live, sent, ignored = set(), [], []
    calling = threading.Event()

    def call(request_id, inputs):
        calling.wait(5)  # the relay's call is still on its way
        live.add(request_id)
        for token in range(1, 50):
            if request_id not in live:
                break
            yield EngineResponse([token])

    def stop(request_id):
        if request_id in live:
            live.discard(request_id)
        else:
            ignored.append(request_id)

    relay = RelayStreams(call, stop, lambda sender, tokens, count, finish: sent.append((count, finish)),
                         lambda sender, message: None, engine_inputs=EngineInputs(), tokens_per_response=7,
                         hold_seconds=600)
    relay.start("a", INPUTS, "sender", lambda: False)
    relay.stop("a")
    calling.set()
    relay.close()
    assert ignored == ["a"] and sent == [(2, FINISH_STOPPED)]  # stopped after the engine's first token, ended normally


def test_a_stop_that_overtakes_its_request_stops_the_stream_as_it_arrives():
    """A stop sent right after its request can reach the `llm` stage first (the request goes through
    preprocessing): the relay answered it as done, and the stream ran to max_tokens."""
    import time

    from orpheus_triton.serving import EARLY_STOP_SECONDS

    live, sent = set(), []

    def call(request_id, inputs):
        live.add(request_id)
        for token in range(1, 50):
            if request_id not in live:
                break
            yield EngineResponse([token])
            time.sleep(0.01)

    def new_relay():
        return RelayStreams(call, live.discard, lambda sender, tokens, count, finish: sent.append((count, finish)),
                            lambda sender, message: None, engine_inputs=EngineInputs(), tokens_per_response=7,
                            hold_seconds=600)

    relay = new_relay()
    relay.stop("early")
    relay.start("early", INPUTS, "sender", lambda: False)
    relay.close()
    assert sent[-1][1] == FINISH_STOPPED and sent[-1][0] < 10  # stopped within its first tokens, ended normally
    with pytest.raises(StreamIdError, match="cancelled or failed"):
        relay.active.claim("early")
    # One whose request never came in time stops nothing: a later stream with the id runs to its end.
    relay, sent[:] = new_relay(), []
    relay.stop("late")
    relay._early_stops._kept["late"] = time.monotonic() - EARLY_STOP_SECONDS
    relay.start("late", INPUTS, "sender", lambda: False)
    relay.close()
    assert sent[-1] == (50, FINISH_END_OF_SPEECH)


def test_a_stop_that_comes_after_its_stream_ended_does_not_stop_the_ids_next_stream():
    relay, engine, sent, _ = make()
    relay.start("a", INPUTS, "sender", lambda: False)
    engine.send("a", *tokens(*range(8)), EngineResponse([]), None)
    relay.close(timeout=5)
    relay.stop("a")  # late: the stream has ended
    assert "a" not in relay._early_stops


def test_requests_are_checked_before_anything_is_claimed():
    relay, engine, _, _ = make(engine_inputs=EngineInputs(audio_guard=False))
    with pytest.raises(ValueError, match="missing input 'input_ids'"):
        relay.start("a", {k: v for k, v in INPUTS.items() if k != "input_ids"}, "sender", lambda: False)
    with pytest.raises(ValueError, match="audio_token_guard is not available"):
        relay.start("a", INPUTS | {LLM_AUDIO_GUARD: np.array([True])}, "sender", lambda: False)
    with pytest.raises(ValueError, match=r"request_output_len \(max_tokens\) must be >= 1, got 0"):
        relay.start("a", INPUTS | {"request_output_len": np.array([0], np.int32)}, "sender", lambda: False)
    with pytest.raises(StreamIdError, match="no id"):
        relay.start("", INPUTS, "sender", lambda: False)
    relay.start("a", INPUTS, "sender", lambda: False)
    with pytest.raises(StreamIdError, match="already streaming"):
        relay.start("a", INPUTS, "sender", lambda: False)
    engine.send("a", None)
    relay.close()


def test_a_relay_that_cannot_start_its_thread_raises_and_claims_nothing(monkeypatch):
    import threading

    relay, _, sent, refused = make()

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        relay.start("a", INPUTS, "sender", lambda: False)
    monkeypatch.undo()
    assert not sent and not refused and not relay._threads
    relay.active.claim("a")  # free again
    relay.close()


def test_engine_inputs_are_mapped_to_the_engines_names_as_single_requests():
    trtllm = EngineInputs(seed="seed", audio_guard=False)
    given = INPUTS | {LLM_SEED: np.array([7], np.uint64), LLM_AUDIO_GUARD: np.array([False]),
                      LLM_STOP: np.array([False])}
    mapped = trtllm.map(given)
    assert set(mapped) == {"input_ids", "input_lengths", "request_output_len", "seed"}
    assert all(value.shape == (1, value.size) for value in mapped.values())
    assert mapped["seed"].tolist() == [[7]]
    torch_engine = EngineInputs().map(given)
    assert set(torch_engine) == {*INPUTS, LLM_SEED, LLM_AUDIO_GUARD}


def test_a_padded_prompt_goes_to_the_engine_cut_to_its_input_lengths():
    """TensorRT-LLM reads a lone request's input_ids whole (input_lengths only splits a batch): a client's
    padded prompt was generated from with its padding, where the torch engine reads input_lengths ids."""
    relay, engine, sent, refused = make()
    padded = INPUTS | {"input_ids": np.array([[5, 6, 7, 0, 0]], np.int32)}
    relay.start("a", padded, "sender", lambda: False)
    assert engine.called.wait(10)
    engine.send("a", None)
    relay.close()
    assert engine.inputs["a"]["input_ids"].tolist() == [[5, 6, 7]] and engine.inputs["a"]["input_lengths"] == 3
    assert not refused


# --- through a real tritonserver -------------------------------------------------------------------

@pytest.fixture(scope="module")
def relay_server(model_set, tmp_path_factory):
    """The repository with the relay as `llm` in front of the torch engine streaming token by token,
    as the GPU repository puts it in front of TensorRT-LLM; two relay instances, as there (more), so a
    client's `stop` may reach the instance that does not hold the stream."""
    from conftest import running_server, server_settings

    from orpheus_triton.repository import RelaySettings, render_with_relay

    work = tmp_path_factory.mktemp("relay-server")
    repository = render_with_relay(server_settings(model_set), work / "repository", RelaySettings(relay_instances=2))
    with running_server(repository, work) as process:
        yield process


@pytest.mark.server
def test_relay_serves_the_same_audio_in_frames(relay_server, grpc_url, model_set):
    from test_server import TEXT, assert_same_audio, llm_tokens

    from orpheus_triton.client import OrpheusClient
    from orpheus_triton.constants import ENGINE_MODEL, LLM_MODEL, TOKENS_PER_FRAME

    relay_url = f"localhost:{relay_server.ports.grpc}"
    direct = OrpheusClient(grpc_url).synthesize(TEXT, max_tokens=300, seed=11)
    relayed = OrpheusClient(relay_url).synthesize(TEXT, max_tokens=300, seed=11)
    assert relayed.audio.size > 0
    assert_same_audio(relayed.audio, direct.audio)
    assert relayed.finish_reason == direct.finish_reason == FINISH_MAX_TOKENS  # said through the relay too

    # Behind the relay the engine answers token by token; the relay, frame by frame, ended by end_id.
    engine_responses = llm_tokens(relay_url, model_set, text=TEXT, max_tokens=60, seed=2, model=ENGINE_MODEL,
                                  per_response=True)
    assert {len(r) for r in engine_responses[:-1]} == {1}
    relay_responses = llm_tokens(relay_url, model_set, text=TEXT, max_tokens=60, seed=2, model=LLM_MODEL,
                                 per_response=True)
    assert {len(r) for r in relay_responses[:-1]} == {TOKENS_PER_FRAME}
    assert sum(relay_responses, []) == sum(engine_responses, [])
    assert relay_responses[-1][-1] == END_OF_SPEECH


@pytest.mark.server
def test_abandoned_stream_is_stopped_through_the_relay(relay_server):
    """The client's `stop` reaches the engine through the relay; the ensemble completes and the slot frees."""
    from test_server import abandon_a_stream

    from orpheus_triton.client import OrpheusClient

    url = f"localhost:{relay_server.ports.grpc}"
    abandon_a_stream(relay_server, url)  # stopped in the engine, through the relay
    assert OrpheusClient(url).synthesize("next please", max_tokens=35).audio.size > 0


@pytest.mark.server
def test_a_stopped_stream_says_so_whichever_relay_instance_the_stop_reached(relay_server):
    """A stop reaches one relay instance; the stream may be another's, which then sees its engine stream
    end short of max_tokens and took it for the end of speech. The decoder, which every stop reaches,
    says the stream was stopped: the client is not told its text's end was spoken."""
    import uuid

    from orpheus_triton.client import OrpheusClient

    url = f"localhost:{relay_server.ports.grpc}"
    for _ in range(4):  # each stop reaches either of the two instances
        caller, chunks = f"stopped-{uuid.uuid4()}", []

        def stop_after_two(chunk, caller=caller, chunks=chunks):
            chunks.append(chunk)
            if len(chunks) == 2:
                OrpheusClient(url).stop(caller)

        result = OrpheusClient(url).synthesize("A long one.", max_tokens=6000, request_id=caller,
                                               on_chunk=stop_after_two)
        assert result.finish_reason == FINISH_STOPPED and result.audio_seconds < 30


@pytest.mark.server
def test_each_relay_instance_counts_its_streams_under_its_own_label(relay_server):
    """What a draining server waits for. The instances once set one shared gauge: the last writer's count
    showed, not the sum, and tritonserver freed it under the others as the first unloaded (an abort)."""
    import re
    import urllib.request

    from orpheus_triton.metrics import INSTANCE_LABEL, RELAYED_STREAMS_METRIC
    from orpheus_triton.server import streams_in_flight

    time.sleep(1.2)  # published every 0.5 s
    page = urllib.request.urlopen(f"http://localhost:{relay_server.ports.metrics}/metrics", timeout=10).read().decode()
    series = re.findall(rf"^{RELAYED_STREAMS_METRIC}{{(.*)}} (\S+)$", page, re.MULTILINE)
    # Labelled model_instance: an "instance" label of its own, Prometheus renames to exported_instance.
    instances = sorted(re.search(rf'{INSTANCE_LABEL}="([^"]+)"', labels).group(1) for labels, _ in series)
    assert instances == ["llm_0_0", "llm_0_1"] and 'instance="' not in page.replace(f'{INSTANCE_LABEL}="', "")
    assert streams_in_flight(relay_server.ports.metrics) == 0


@pytest.mark.server
def test_the_relay_passes_a_stop_on_to_the_decoder(relay_server):
    from test_server import leave_a_stream_the_llm_ran_ahead_of

    leave_a_stream_the_llm_ran_ahead_of(relay_server, f"localhost:{relay_server.ports.grpc}")


def test_held_references_let_go_only_after_their_time():
    """The relay holds BLS responses past the backend's cleanup (see HeldReferences) and no longer."""
    import gc
    import weakref

    from orpheus_triton.llm_relay import HeldReferences

    class Response:
        pass

    now = [0.0]
    held = HeldReferences(seconds=5.0, clock=lambda: now[0])
    first = Response()
    alive = weakref.ref(first)
    held.keep([first])
    del first
    gc.collect()
    now[0] = 4.9
    held.keep([Response()])
    assert alive() is not None and len(held) == 2  # still within its 5 s
    now[0] = 5.0
    held.keep([])
    gc.collect()
    assert alive() is None and len(held) == 2  # the first let go; the second and the empty one held
    held.clear()
    assert len(held) == 0


def test_the_caller_is_gone_where_a_relayed_stream_ends_before_its_end_reaches_the_decoder(monkeypatch):
    gone = []
    engine = Engine()
    relay = RelayStreams(engine.call, engine.stop, lambda *response: None, lambda sender, message: None,
                         engine_inputs=EngineInputs(), tokens_per_response=7, hold_seconds=600,
                         cancel_check_seconds=0.1, caller_gone=gone.append)
    relay.start("done", INPUTS, "sender", lambda: False)
    engine.send("done", *tokens(*range(8)), EngineResponse([]), None)
    relay.start("failed", INPUTS, "sender", lambda: False)
    engine.send("failed", *tokens(1, 2), EngineResponse([], "engine out of KV cache"), None)
    relay.start("stopped", INPUTS, "sender", lambda: False)
    relay.stop("stopped")
    engine.send("stopped", EngineResponse([END_OF_SPEECH]), None)
    relay.close()
    assert sorted(gone) == ["failed", "stopped"]  # the stop's end goes on to the decoder, which has its caller go
    monkeypatch.setattr(threading.Thread, "start", lambda self: (_ for _ in ()).throw(RuntimeError("no thread")))
    with pytest.raises(RuntimeError):
        relay.start("no-thread", INPUTS, "sender", lambda: False)
    assert gone[-1] == "no-thread"

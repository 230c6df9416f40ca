"""End to end through a real tritonserver: the `orpheus` ensemble streamed over gRPC."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import metric_series, server_metric, server_metrics, settled_server_metric, wait_for_metric
from snac import SNAC

from orpheus_triton import constants as c
from orpheus_triton import decode_rounds
from orpheus_triton.client import OrpheusClient, SynthesisError, infer_input
from orpheus_triton.frames import StreamFramer
from orpheus_triton.preprocess import OUT_REPETITION_PENALTY, OUT_TEMPERATURE, SynthesisOptions, llm_inputs
from orpheus_triton.prompt import Voices, build_prompt, load_tokenizer

from reference_decoder import convert_to_audio, reference_decode

# A stream the llm stage takes seconds over (about 640 tokens a second here, loaded or not: the decoder
# sets the ensemble's slower pace), so that a stop or an intruder sent after its first audio, which comes
# a second late on a loaded machine, lands long before the llm has finished it.
LONG_STREAM_TOKENS = 6000

pytestmark = pytest.mark.server
TEXT = "Hey there, <chuckle> this is a streaming test."


def assert_same_audio(a: np.ndarray, b: np.ndarray) -> None:
    """Same tokens decoded in different batches: equal up to the default decoder's one-step rounding."""
    assert a.shape == b.shape
    assert np.abs(a.astype(np.int32) - b.astype(np.int32)).max() <= 1


def llm_tokens(url: str, model_set, model: str = c.LLM_MODEL, per_response: bool = False, **options):
    """The tokens an LLM-stage model generates for a request, asked of it directly (a list per
    response with ``per_response``)."""
    tensors = llm_inputs(load_tokenizer(model_set.llm), SynthesisOptions(**options))
    renamed = {OUT_TEMPERATURE: c.LLM_TEMPERATURE, OUT_REPETITION_PENALTY: c.LLM_REPETITION_PENALTY}
    inputs = [infer_input(renamed.get(name, name), value) for name, value in tensors.items()]
    responses = _stream(url, model, inputs, c.LLM_OUTPUT_IDS)
    return responses if per_response else sum(responses, [])


def _stream(url, model, inputs, output, request_id=None, outputs=None) -> list[list]:
    """Every response's values of ``output`` (responses without it left out); ``outputs``: those asked for
    (none named: all)."""
    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    client.async_stream_infer(model, inputs, request_id=str(uuid.uuid4()) if request_id is None else request_id,
                              outputs=outputs, enable_empty_final_response=True)
    values = []
    while True:
        result, error = events.get(timeout=120)
        if error:
            client.stop_stream()
            raise SynthesisError(str(error))
        array = result.as_numpy(output)
        if array is not None:
            values.append(array.reshape(-1).tolist())
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    return values


def test_the_decoder_alone_decodes_a_stream_with_or_without_its_start_time(server, grpc_url):
    """`snac_decoder` called directly (as perf_analyzer does): a one-frame stream is one window of audio;
    `request_start` is optional, and where given the first audio is counted in the TTFA histogram."""
    import time as clock

    from orpheus_triton.frames import audio_token_id

    tokens = np.array([[audio_token_id(100 + i, i) for i in range(c.TOKENS_PER_FRAME)] + [c.END_OF_SPEECH]],
                      dtype=np.int32)
    audio = _stream(grpc_url, c.DECODER_MODEL, [infer_input(c.DECODER_TOKENS, tokens[None])], c.DECODER_AUDIO)
    assert [len(chunk) for chunk in audio] == [c.SAMPLES_PER_FRAME]
    counted = settled_server_metric(server, "orpheus_time_to_first_audio_seconds_count")
    total = server_metric(server, "orpheus_time_to_first_audio_seconds_sum")
    start = np.array([[clock.time() - 0.25]], dtype=np.float64)  # as if preprocessing took it 250 ms ago
    inputs = [infer_input(c.DECODER_TOKENS, tokens[None]), infer_input(c.REQUEST_START, start)]
    assert [len(chunk) for chunk in _stream(grpc_url, c.DECODER_MODEL, inputs, c.DECODER_AUDIO)] == [
        c.SAMPLES_PER_FRAME]
    assert settled_server_metric(server, "orpheus_time_to_first_audio_seconds_count") == counted + 1
    assert 0.25 <= server_metric(server, "orpheus_time_to_first_audio_seconds_sum") - total < 5
    # Two streams' tokens in one request were framed as one stream: refused, the decoder goes on.
    with pytest.raises(SynthesisError, match=r"output_ids has shape \[2, 1, 8\]: send one stream's tokens"):
        _stream(grpc_url, c.DECODER_MODEL, [infer_input(c.DECODER_TOKENS, np.stack([tokens, tokens]))],
                c.DECODER_AUDIO)
    assert [len(chunk) for chunk in _stream(grpc_url, c.DECODER_MODEL, [infer_input(c.DECODER_TOKENS, tokens[None])],
                                            c.DECODER_AUDIO)] == [c.SAMPLES_PER_FRAME]
    # A whole long stream in one request was one SNAC call of all its windows (10,000 of them took the
    # decoder's memory and the stub with it): more than a round's windows are refused.
    long = np.array([[[audio_token_id(7, i) for i in range(c.TOKENS_PER_FRAME * 300)]]], dtype=np.int32)
    with pytest.raises(SynthesisError, match=r"output_ids holds 2100 token ids; send at most \d+ a request"):
        _stream(grpc_url, c.DECODER_MODEL, [infer_input(c.DECODER_TOKENS, long)], c.DECODER_AUDIO)


def test_the_decoder_alone_hands_a_finish_reason_on_and_answers_only_what_is_asked_for(server, grpc_url):
    """A stream's last request may carry why it ended (the llm stage's finish_reason): its answer hands it on
    beside the audio. Asked for the finish reason alone, the decoder refuses, naming the audio every answer
    carries (an output not asked for would be dropped inside the backend's send)."""
    from orpheus_triton.frames import audio_token_id

    tokens = np.array([[[audio_token_id(100 + i, i) for i in range(c.TOKENS_PER_FRAME)] + [c.END_OF_SPEECH]]],
                      dtype=np.int32)
    reason = infer_input(c.DECODER_FINISH_REASON, np.array([[c.FINISH_MAX_TOKENS.encode()]], dtype=np.object_))
    inputs = [infer_input(c.DECODER_TOKENS, tokens), reason]
    assert _stream(grpc_url, c.DECODER_MODEL, inputs, c.DECODER_FINISH_REASON) == [[c.FINISH_MAX_TOKENS.encode()]]
    assert [len(chunk) for chunk in _stream(grpc_url, c.DECODER_MODEL, inputs, c.DECODER_AUDIO)] == [
        c.SAMPLES_PER_FRAME]
    with pytest.raises(SynthesisError, match="every answer carries 'audio': ask for it too"):
        _stream(grpc_url, c.DECODER_MODEL, inputs, c.DECODER_FINISH_REASON,
                outputs=[grpcclient.InferRequestedOutput(c.DECODER_FINISH_REASON)])


def test_the_models_log_into_the_server_log(server):
    """What the engine runs on reaches tritonserver's log (a stub process configures no logging itself)."""
    log = Path(server.log_path).read_text()
    assert "orpheus_triton.triton_llm: torch LLM engine on cpu: 4 streams" in log, log[-2000:]
    assert "orpheus_triton.snac_codec: SNAC decoder on cpu: span decode" in log, log[-2000:]


def test_log_records_map_to_tritons_levels_once_per_process():
    import logging

    from orpheus_triton.serving import log_to_triton

    package = logging.getLogger("orpheus_triton")
    handlers, level = package.handlers[:], package.level
    package.handlers = []
    try:
        _check_log_to_triton(package, log_to_triton)
    finally:
        package.handlers = handlers
        package.setLevel(level)  # setLevel also clears the level cache of the package's loggers


def _check_log_to_triton(package, log_to_triton):
    import logging

    got = []

    class Logger:  # pb_utils.Logger's four methods
        log_info = staticmethod(lambda m: got.append(("info", m)))
        log_warn = staticmethod(lambda m: got.append(("warn", m)))
        log_error = staticmethod(lambda m: got.append(("error", m)))
        log_verbose = staticmethod(lambda m: got.append(("verbose", m)))

    class PbUtils:
        pass

    PbUtils.Logger = Logger
    log_to_triton(PbUtils)
    log_to_triton(PbUtils)  # a second model in the same process adds no second handler
    assert len(package.handlers) == 1
    engine_log = logging.getLogger("orpheus_triton.engine")
    engine_log.debug("hidden")  # below INFO
    engine_log.info("step")
    engine_log.warning("slow")
    engine_log.error("failed")
    assert got == [("info", "orpheus_triton.engine: step"), ("warn", "orpheus_triton.engine: slow"),
                   ("error", "orpheus_triton.engine: failed")]


def test_stream_matches_reference_decode_of_the_same_tokens(grpc_url, model_set):
    options = {"text": TEXT, "voice": "leah", "seed": 11, "max_tokens": 210}
    result = OrpheusClient(grpc_url).synthesize(**options)
    tokens = llm_tokens(grpc_url, model_set, **options)
    assert tokens[-1] == c.END_OF_SPEECH
    upstream = SNAC.from_pretrained(str(model_set.snac)).eval()
    reference = reference_decode(upstream, tokens, drop_zero_codes=False)
    # The stream starts with the lead-in frame and ends with the lead-out frames: upstream's decode of
    # those windows (test_snac).
    framer = StreamFramer()
    lead_in, lead_out = framer.push(tokens)[0], framer.finish()
    assert lead_in.frame_index == -1 and len(lead_out) == 2
    reference = [convert_to_audio(upstream, list(w.codes), w.frame_index) for w in [lead_in]] + reference + [
        convert_to_audio(upstream, list(w.codes), w.frame_index) for w in lead_out]
    assert len(result.chunks) > 10
    # The default decoder computes only the kept samples: within one int16 step of upstream
    # (sample-identical with --decoder-exact, see test_snac).
    difference = np.abs(result.audio.astype(np.int32) - np.concatenate(reference).astype(np.int32))
    assert result.audio.shape == difference.shape and difference.max() <= 1 and (difference > 0).mean() < 0.01
    # Streaming: the first chunk arrives well before the last.
    assert result.chunks[0].arrived < 0.75 * result.chunks[-1].arrived


def test_text_that_is_not_utf8_is_refused_naming_the_input(grpc_url):
    inputs = [infer_input(c.IN_TEXT, np.array([b"caf\xe9"], dtype=np.object_))]  # Latin-1, not UTF-8
    with pytest.raises(SynthesisError, match="input 'text' is not UTF-8 text"):
        _stream(grpc_url, c.ENSEMBLE_MODEL, inputs, c.OUT_AUDIO)


def test_same_seed_same_audio_and_concurrent_streams_do_not_mix(grpc_url):
    def run(seed, text, out):
        out[seed] = OrpheusClient(grpc_url).synthesize(text, seed=seed, max_tokens=140).audio

    solo: dict = {}
    run(1, TEXT, solo)
    run(2, "A different sentence for the second stream.", solo)
    together: dict = {}
    threads = [threading.Thread(target=run, args=(1, TEXT, together)),
               threading.Thread(target=run, args=(2, "A different sentence for the second stream.", together))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert solo[1].size > 0 and not np.array_equal(solo[1], solo[2])
    assert_same_audio(together[1], solo[1])
    assert_same_audio(together[2], solo[2])


@pytest.mark.parametrize(("options", "message"), [
    ({"text": "hello", "voice": "bob"}, "unknown voice 'bob'"),
    ({"text": "   "}, "text is empty"),
    ({"text": "x" * (c.MAX_TEXT_CHARS + 1)}, "limit is"),
    ({"text": "hello", "temperature": -2.0}, "temperature must be"),
    ({"text": "hello", "max_tokens": 8190}, "exceeds the server's max_seq_len 8192; .* to \\d+ at most"),
])
def test_bad_requests_get_clear_errors_and_server_stays_healthy(grpc_url, options, message):
    client = OrpheusClient(grpc_url)
    with pytest.raises(SynthesisError, match=message):
        client.synthesize(**options)
    assert client.client.is_server_live() and client.client.is_server_ready()
    assert client.synthesize("still working", max_tokens=35).audio.size > 0


def test_max_tokens_below_a_frame_is_refused_and_one_frame_is_heard(grpc_url):
    """Fewer tokens than a frame's were answered with no audio and no error; a frame's are one chunk."""
    from orpheus_triton.client import infer_input, request_inputs

    inputs = [infer_input(c.IN_TEXT, np.array([b"hello"], dtype=np.object_)),
              infer_input(c.IN_MAX_TOKENS, np.array([c.TOKENS_PER_FRAME - 1], dtype=np.int32))]
    with pytest.raises(SynthesisError, match="the least that gives audio"):
        _stream(grpc_url, c.ENSEMBLE_MODEL, inputs, c.OUT_AUDIO)
    audio = _stream(grpc_url, c.ENSEMBLE_MODEL, request_inputs("hello", max_tokens=c.TOKENS_PER_FRAME), c.OUT_AUDIO)
    assert sum(map(len, audio)) == c.SAMPLES_PER_FRAME


@pytest.mark.parametrize(("options", "message"), [
    ({"seed": -1}, "seed must be a whole number from 0 to 18446744073709551615, got -1"),
    ({"seed": 2**64}, "seed must be a whole number from 0 to"),
    ({"max_tokens": 3_000_000_000}, f"max_tokens must be in \\[{c.MIN_MAX_TOKENS}, {c.MAX_MAX_TOKENS}\\]"),
    ({"max_tokens": 6}, "one SNAC frame, the least that gives audio\\), got 6"),
    ({"max_tokens": 35.5}, "max_tokens must be a whole number, got 35.5"),
    ({"seed": True}, "got True"),
])
def test_the_client_refuses_whole_numbers_their_tensor_cannot_hold(options, message):
    """numpy would wrap them into other values (seed -1 into 2**64 - 1) that the server cannot tell apart;
    a max_tokens the server refuses is refused with the server's words."""
    from orpheus_triton.client import request_inputs

    with pytest.raises(ValueError, match=message):
        request_inputs("hello", **options)
    assert len(request_inputs("hello", seed=2**64 - 1, max_tokens=35)) == 3


@pytest.mark.parametrize(("text", "voice", "message"), [
    (None, None, "text must be a str, got NoneType"),
    (b"hello", None, "text must be a str, got bytes"),
    ("hello", 5, "voice must be a str, got int"),
])
def test_the_client_names_text_or_a_voice_that_is_not_a_str(text, voice, message):
    from orpheus_triton.client import request_inputs

    with pytest.raises(TypeError, match=message):
        request_inputs(text, voice)


def test_a_stop_that_cannot_reach_the_server_says_so():
    """ConnectionError naming the url, as a stream's (from both clients); it was a SynthesisError."""
    import asyncio

    from orpheus_triton.client import AsyncOrpheusClient
    from orpheus_triton.server import free_port

    url = f"localhost:{free_port()}"
    with pytest.raises(ConnectionError, match=f"no Triton server reachable at {url} to stop 'x'"):
        OrpheusClient(url).stop("x", timeout=5)

    async def stop() -> None:
        async with AsyncOrpheusClient(url) as client:
            await client.stop("x", timeout=5)

    with pytest.raises(ConnectionError, match=f"no Triton server reachable at {url} to stop 'x'"):
        asyncio.run(stop())


def test_the_clients_refuse_a_misspelt_option_or_url_by_name_and_bind_no_event_loop_early():
    """A misspelt option raised Python's TypeError naming request_inputs, which the caller never called; an
    http:// URL failed in gRPC as a 'Misformatted domain name', a host without a port went to port 443; an
    AsyncOrpheusClient made before asyncio.run failed in it with a future 'attached to a different loop'."""
    import asyncio

    from orpheus_triton.client import AsyncOrpheusClient
    from orpheus_triton.server import free_port

    url = f"localhost:{free_port()}"
    with pytest.raises(TypeError, match=r"unknown option 'max_token' \(did you mean 'max_tokens'\?\); a stream "
                                        r"takes voice, max_tokens, temperature, top_p, repetition_penalty, seed"):
        OrpheusClient(url).synthesize("hello", max_token=50)
    for bad in ("http://localhost:8001", "localhost", "localhost:0", "::1:8001"):
        for client_class in (OrpheusClient, AsyncOrpheusClient):
            with pytest.raises(ValueError, match="expected|IPv6 address goes in brackets"):
                client_class(bad)
    early = AsyncOrpheusClient(url)  # made outside any event loop

    async def use(client) -> None:
        with pytest.raises(TypeError, match="unknown option 'speed'"):
            [chunk async for chunk in client.stream_text("Hi.", speed=2)]
        with pytest.raises(ConnectionError, match=f"no Triton server reachable at {url}"):
            [chunk async for chunk in client.stream("hello")]

    asyncio.run(use(early))
    with pytest.raises(RuntimeError, match="make one in each event loop"):
        asyncio.run(use(early))


def test_a_connection_lost_mid_stream_is_named_as_such():
    """A lost connection is the server's or the network's, not the request's: ServerUnavailable, retry it
    elsewhere (it was a plain SynthesisError, as an unknown voice is)."""
    from tritonclient.utils import InferenceServerException

    from orpheus_triton.client import ServerUnavailable

    lost = InferenceServerException("Stream removed (Socket closed)", status="StatusCode.UNAVAILABLE")
    assert isinstance(SynthesisError.of(lost), ServerUnavailable)
    assert str(SynthesisError.of(lost)) == ("the connection to the server was lost mid-stream "
                                            "([StatusCode.UNAVAILABLE] Stream removed (Socket closed))")
    refused = InferenceServerException("in ensemble 'orpheus', orpheus: text is empty", status="StatusCode.INTERNAL")
    assert str(SynthesisError.of(refused)) == str(refused)


def test_both_clients_name_an_unreachable_server_and_refuse_bad_options_before_sending():
    """Nobody listening: ConnectionError naming the url, from either client (tritonclient's own text was
    that the stream "is no longer in valid state"; the async client raised grpc's error). A bad option
    is refused at once, before a stream is opened (it took 5 s and a `stop` for a stream never sent)."""
    import asyncio

    from orpheus_triton.client import AsyncOrpheusClient
    from orpheus_triton.server import free_port

    url = f"localhost:{free_port()}"
    with pytest.raises(ConnectionError, match=f"no Triton server reachable at {url}"):
        OrpheusClient(url).synthesize("hello")
    started = time.monotonic()
    with pytest.raises(ValueError, match="seed must be"):
        OrpheusClient(url).synthesize("hello", seed=-1)
    assert time.monotonic() - started < 1

    async def main():
        async with AsyncOrpheusClient(url) as client:
            with pytest.raises(ConnectionError, match=f"no Triton server reachable at {url}"):
                [chunk async for chunk in client.stream("hello")]

    asyncio.run(main())


def test_the_async_client_names_a_connection_lost_mid_stream():
    import asyncio

    import grpc

    from orpheus_triton.client import _ShieldedReads

    class Responses:
        """A stream that answers once, then loses its connection (grpc.aio's error)."""

        def __init__(self):
            self.answers = iter([("first response", None)])

        async def __anext__(self):
            for answer in self.answers:
                return answer
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "Socket closed")

    async def main():
        reads = _ShieldedReads(Responses(), "localhost:1")
        assert await reads.next() == ("first response", None)
        with pytest.raises(SynthesisError, match=r"lost mid-stream \(Socket closed\)"):
            await reads.next()

    asyncio.run(main())


def test_request_without_id_is_refused(grpc_url):
    from orpheus_triton.client import request_inputs

    with pytest.raises(SynthesisError, match="no id"):
        _stream(grpc_url, c.ENSEMBLE_MODEL, request_inputs("hello", max_tokens=35), c.OUT_AUDIO, request_id="")


def test_concurrent_reuse_of_a_request_id_is_refused(grpc_url):
    shared = f"dup-{uuid.uuid4()}"
    streaming, first = threading.Event(), {}

    def long_stream():  # long enough that its first audio comes well before the llm has finished it
        first["audio"] = OrpheusClient(grpc_url).synthesize(
            TEXT, max_tokens=2000, request_id=shared, on_chunk=lambda _: streaming.set()).audio

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert streaming.wait(timeout=60)
    with pytest.raises(SynthesisError, match="already streaming"):
        OrpheusClient(grpc_url).synthesize("intruder", max_tokens=35, request_id=shared)
    thread.join()
    # the first stream was not disturbed: all of its 285 frames
    assert first["audio"].size == (2000 // 7) * c.SAMPLES_PER_FRAME
    # Once it has finished, the id may be used again and starts a clean stream.
    again = OrpheusClient(grpc_url).synthesize(TEXT, max_tokens=140, request_id=shared, seed=1)
    fresh = OrpheusClient(grpc_url).synthesize(TEXT, max_tokens=140, seed=1)
    assert_same_audio(again.audio, fresh.audio)


def test_a_caller_counts_from_its_request_to_its_last_audio(server, grpc_url):
    """Its lease (orpheus_triton.callers) is held while its audio still comes, after its generation has
    ended, and gone once the last audio has come: the client may send the id again at once."""
    caller = f"counted-{uuid.uuid4()}"
    held = []
    result = OrpheusClient(grpc_url).synthesize(TEXT, max_tokens=140, request_id=caller,
                                                on_chunk=lambda _: held.append(server.callers._path(caller).exists()))
    # Held as each chunk came, and let go before the last one was sent
    assert len(held) == len(result.chunks) > 2 and all(held[:-1]) and not held[-1]
    OrpheusClient(grpc_url).synthesize(TEXT, max_tokens=35, request_id=caller)


def test_a_stop_after_a_streams_generation_ended_spares_the_ids_next_stream(server, grpc_url):
    """A stop sent once a stream's generation had ended, its audio still decoding, was kept as one that
    overtook its request: the id's next stream, sent once the audio had come, ended at once, with no
    audio and no error."""
    caller = f"late-stop-{uuid.uuid4()}"
    tokens = "orpheus_llm_generated_tokens_total"
    before, stopped = settled_server_metric(server, tokens), []

    def stop_once_generated(_chunk):  # the demo model never ends its speech: all 1400 tokens, then the end
        if not stopped and server_metric(server, tokens) - before >= 1400:
            OrpheusClient(grpc_url).stop(caller)
            stopped.append(True)

    first = OrpheusClient(grpc_url).synthesize(TEXT, max_tokens=1400, request_id=caller, on_chunk=stop_once_generated)
    assert stopped  # the llm ran ahead of the decoder (2-3x here): its generation ended mid-audio
    # Its generation ended at max_tokens, but the stop cut its audio: it says it was stopped.
    assert first.finish_reason == c.FINISH_STOPPED and first.audio_seconds < 1400 / c.REAL_TIME_TOKENS_PER_SECOND
    again = OrpheusClient(grpc_url).synthesize(TEXT, max_tokens=140, request_id=caller)
    assert len(again.chunks) >= 140 // c.TOKENS_PER_FRAME - 3


def test_id_of_a_cancelled_stream_is_not_reused(grpc_url):
    """A cancelled stream never reached end-of-speech downstream, so its id stays retired."""
    retired = f"retired-{uuid.uuid4()}"

    def hang_up(_chunk):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        OrpheusClient(grpc_url).synthesize(TEXT, max_tokens=LONG_STREAM_TOKENS, request_id=retired, on_chunk=hang_up)
    deadline = time.monotonic() + 10
    while True:  # the stop reaches the engine within a step
        try:
            OrpheusClient(grpc_url).synthesize("reuse", max_tokens=35, request_id=retired)
        except SynthesisError as error:
            if "cancelled or failed" in str(error):
                break
            assert "already streaming" in str(error) and time.monotonic() < deadline
            time.sleep(0.2)
        else:
            raise AssertionError("a cancelled stream's id was accepted again")


def test_a_stream_left_after_its_first_audio_gets_one_stop(grpc_url, monkeypatch):
    """A stop sent after the stream's first response lands (the llm stage holds the stream): it is not
    sent again every quarter second while the decoder drains (one abandoned stream made 12-14)."""
    from orpheus_triton.client import _EarlyEnd

    stops = []
    original = _EarlyEnd._send_stop
    monkeypatch.setattr(_EarlyEnd, "_send_stop", lambda self: (stops.append(self.request_id), original(self)))

    def hang_up(_chunk):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        OrpheusClient(grpc_url).synthesize(TEXT, max_tokens=700, on_chunk=hang_up)
    assert len(stops) == 1


def test_a_caller_hanging_up_mid_stream_is_counted_once_at_the_decoder(server, grpc_url):
    """orpheus_decoder_stopped_streams_total: a stop that ends a stream with audio still to decode counts,
    once, whether the llm stage was still generating it or had finished (on a CPU it runs seconds ahead
    of the decoder, and the llm's cancelled count missed those hang-ups); a stop sent again does not."""
    stopped = settled_server_metric(server, "orpheus_decoder_stopped_streams_total")

    def hang_up(_chunk):
        raise KeyboardInterrupt

    request_id = str(uuid.uuid4())
    with pytest.raises(KeyboardInterrupt):
        OrpheusClient(grpc_url).synthesize(TEXT, max_tokens=700, on_chunk=hang_up, request_id=request_id)
    assert settled_server_metric(server, "orpheus_decoder_stopped_streams_total") == stopped + 1
    OrpheusClient(grpc_url).stop(request_id)  # again, for a stream already dropped
    assert settled_server_metric(server, "orpheus_decoder_stopped_streams_total") == stopped + 1


def test_a_caller_hanging_up_on_the_last_chunk_leaves_at_once(grpc_url, monkeypatch):
    """The last chunk comes with the stream's final response: a caller that stops there leaves an ended
    stream. Both clients sent it a stop and then waited for an end that had come already, the sync one
    its whole 15 s."""
    import asyncio
    import contextlib

    from orpheus_triton.client import AsyncOrpheusClient

    stops = []
    for client_class, method in ((OrpheusClient, "_leave"), (AsyncOrpheusClient, "_end_early")):
        original = getattr(client_class, method)
        monkeypatch.setattr(client_class, method, lambda self, *args, original=original, **kwargs: (
            stops.append(type(self).__name__), original(self, *args, **kwargs))[1])
    client = OrpheusClient(grpc_url)
    chunks = len(client.synthesize(TEXT, max_tokens=140, seed=3).chunks)
    heard = []

    def hang_up_on_the_last(chunk):
        heard.append(chunk)
        if len(heard) == chunks:
            raise KeyboardInterrupt

    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        client.synthesize(TEXT, max_tokens=140, seed=3, on_chunk=hang_up_on_the_last)
    assert len(heard) == chunks and time.perf_counter() - started < 5

    async def leave_at_the_last() -> int:
        async with AsyncOrpheusClient(grpc_url) as aclient:
            count = 0
            async with contextlib.aclosing(aclient.stream(TEXT, max_tokens=140, seed=3)) as stream:
                async for _ in stream:
                    count += 1
                    if count == chunks:
                        break
            return count

    assert asyncio.run(leave_at_the_last()) == chunks
    assert stops == []


def test_a_server_that_stops_answering_does_not_hold_a_caller_past_its_timeout(server, grpc_url):
    """A server that stops answering mid-stream (a network cut, a stopped process): a stream's own timeout, or
    a task cancelled around it, went on waiting up to 15 s for the stream's clean end. The caller now goes
    on END_WAIT_SECONDS after it leaves; the end, waited for beside it, lands once the server answers again
    (the stream is stopped, not cancelled: nothing stays in flight)."""
    import asyncio
    import os
    import signal

    from orpheus_triton.client import END_WAIT_SECONDS, AsyncOrpheusClient

    stopped = settled_server_metric(server, "orpheus_decoder_stopped_streams_total")
    frozen: list[float] = []

    def freeze(_chunk=None) -> None:
        if not frozen:
            os.kill(server.pid, signal.SIGSTOP)
            frozen.append(time.perf_counter())

    def thaw() -> None:
        os.kill(server.pid, signal.SIGCONT)
        frozen.clear()

    timeout = 3.0
    try:
        client = OrpheusClient(grpc_url)
        started = time.perf_counter()
        with pytest.raises(TimeoutError):
            client.synthesize(TEXT, max_tokens=1400, timeout=timeout, on_chunk=freeze)
        sync_took = time.perf_counter() - started
        thaw()
        for thread in [t for t in threading.enumerate() if t.name.startswith("orpheus-end-")]:
            thread.join(timeout=20)  # the end, waited for beside the caller
        assert len(client.synthesize(TEXT, max_tokens=70).chunks) > 0  # the next stream: a connection of its own

        async def leave_on_timeout() -> tuple[float, float]:
            async with AsyncOrpheusClient(grpc_url) as aclient:
                started = time.perf_counter()
                with pytest.raises(TimeoutError):
                    async for _ in aclient.stream(TEXT, max_tokens=1400, timeout=timeout):
                        freeze()
                took = time.perf_counter() - started
                thaw()
            return took, time.perf_counter() - started

        async_took, closed_after = asyncio.run(leave_on_timeout())
    finally:
        thaw()
    for took in (sync_took, async_took):
        assert timeout <= took < timeout + END_WAIT_SECONDS + 1.5, (sync_took, async_took)
    assert closed_after < 20  # close waited for the end, which came once the server answered
    assert settled_server_metric(server, "orpheus_decoder_stopped_streams_total") == stopped + 2
    assert settled_server_metric(server, "orpheus_llm_active_streams") == 0


@pytest.mark.parametrize("after_each_stop", [
    [["stop error"], ["stream end"]],  # the stop failed: another one, then the stream's end
    [["stop end", "error"]],  # the stop answered, then an error: the stream's own end
    [["error"], ["stop end", "stop end"]],  # an error before the stop's answer: whose? one more stop settles it
])
def test_a_stream_left_early_tells_its_end_from_its_stops(after_each_stop):
    """OrpheusClient's _EarlyEnd: the stop goes on the stream's own gRPC stream, whose events then carry
    the stops' answers and errors beside the stream's; it ends the stream cleanly (no cancel) in each case."""
    from types import SimpleNamespace

    from orpheus_triton.client import _EarlyEnd

    def response(model: str):
        parameters = {"triton_final_response": SimpleNamespace(bool_param=True)}
        return SimpleNamespace(get_response=lambda: SimpleNamespace(model_name=model, parameters=parameters))

    made = {"stop end": lambda: (response(c.LLM_MODEL), None, 0.0),
            "stream end": lambda: (response(c.ENSEMBLE_MODEL), None, 0.0),
            "stop error": lambda: (None, RuntimeError("stopping failed"), 0.0),
            "error": lambda: (None, RuntimeError("failed"), 0.0)}
    events: queue.Queue = queue.Queue()
    sent = []

    class Connection:  # the client's tritonclient stream: what each stop sent is followed by
        def async_stream_infer(self, model, inputs, request_id, enable_empty_final_response):
            sent.append((model, request_id, enable_empty_final_response))
            for name in after_each_stop[len(sent) - 1]:
                events.put(made[name]())

    assert _EarlyEnd(Connection(), "s", events, heard=True).run(time.perf_counter() + 5.0)
    assert sent == [(c.LLM_MODEL, "s", True)] * len(after_each_stop)


def test_the_async_client_sends_a_refused_stop_again_instead_of_cancelling():
    """AsyncOrpheusClient._end_early: since its stop raises what the server said, a refused stop cancelled the
    gRPC stream at once (a cancelled ensemble request stays counted in flight); it is sent again instead."""
    import asyncio

    from orpheus_triton.client import AsyncOrpheusClient

    class Reads:  # the stream's responses: nothing until the second stop, then its end
        received, cancelled = True, False

        async def next(self, deadline=None):
            if len(stops) < 2:
                await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))
                raise asyncio.TimeoutError
            raise StopAsyncIteration

        def cancel(self):
            self.cancelled = True

    stops = []

    async def stop(request_id, timeout=10.0):
        stops.append(request_id)
        if len(stops) == 1:
            raise SynthesisError("the stop for 's' failed: refused")

    async def end_early():
        client = AsyncOrpheusClient("localhost:1")
        client.stop = stop
        reads = Reads()
        await client._end_early("s", reads, timeout=5.0)
        await client.close()
        return reads

    reads = asyncio.run(end_early())
    assert stops == ["s", "s"] and not reads.cancelled


def test_first_audio_is_timed_from_before_the_stream_opens(grpc_url, monkeypatch):
    """A chunk's arrival counts the gRPC stream's setup: the caller waits for it too (it took a second
    in a busy process)."""
    original = grpcclient.InferenceServerClient.start_stream

    def slow_start(self, *args, **kwargs):
        time.sleep(0.3)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(grpcclient.InferenceServerClient, "start_stream", slow_start)
    result = OrpheusClient(grpc_url).synthesize("timed", max_tokens=35)
    assert 0.3 <= result.time_to_first_audio <= result.total_seconds


def test_engine_metrics_on_prometheus_endpoint(server, grpc_url):
    import urllib.request

    first_audio = "orpheus_time_to_first_audio_seconds"
    capped = settled_server_metric(server, "orpheus_llm_capped_requests_total")  # the decoder's published too
    count, total = server_metric(server, first_audio + "_count"), server_metric(server, first_audio + "_sum")
    result = OrpheusClient(grpc_url).synthesize("metrics please", max_tokens=35)
    # The server's time to first audio: from preprocessing to the first audio sent, inside the client's.
    assert settled_server_metric(server, first_audio + "_count") == count + 1
    assert 0 < server_metric(server, first_audio + "_sum") - total < result.chunks[0].arrived
    time.sleep(1.2)
    text = urllib.request.urlopen(f"http://localhost:{server.ports.metrics}/metrics", timeout=10).read().decode()
    for name in ("orpheus_llm_active_streams", "orpheus_llm_queued_requests", "orpheus_llm_step_seconds",
                 "orpheus_llm_tokens_per_second", "orpheus_llm_generated_tokens_total"):
        assert name in text
    total = [line for line in text.splitlines() if line.startswith("orpheus_llm_generated_tokens_total")]
    assert float(total[0].split()[-1]) > 0
    # The demo LLM never ends speech by itself: the stream was cut off at its max_tokens, and counted so.
    assert settled_server_metric(server, "orpheus_llm_capped_requests_total") == capped + 1
    for name in ("orpheus_decoder_streams", "orpheus_decoder_call_windows", "orpheus_decoder_call_seconds",
                 "orpheus_decoder_queued_windows", "orpheus_decoder_stalls_total",
                 "orpheus_decoder_stall_seconds_total", first_audio + "_bucket"):
        assert name in text
    windows = server_metric(server, "orpheus_decoder_windows_total")
    audio = server_metric(server, "orpheus_decoder_audio_seconds_total")
    assert windows >= 2 and audio == pytest.approx(windows * c.SAMPLES_PER_FRAME / c.SAMPLE_RATE)
    # The decoder was busy for some of the time, and never longer than the server has been up.
    assert 0 < server_metric(server, "orpheus_decoder_busy_seconds_total") < time.time() - server.started


def test_a_benchmark_level_reads_the_servers_own_listener_figures(server, grpc_url):
    """perf/run_all.py's per-level view of the server's listener metrics (common.server_listener_monitor)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "perf"))
    from common import server_listener_monitor

    from orpheus_triton.metrics import FIRST_AUDIO_BUCKETS

    finish = server_listener_monitor(f"http://localhost:{server.ports.metrics}/metrics", server.pid)()
    results = [OrpheusClient(grpc_url).synthesize("two streams", max_tokens=35, seed=s) for s in (1, 2)]
    time.sleep(1.1)  # the engine's counters reach /metrics every 0.5 s (EngineMetrics); a level is far longer
    figures = finish()
    assert figures["server_first_audio"] == 2
    # Interpolated within buckets: no higher than the bound of the bucket holding the slower stream's
    # client-side TTFA (the server's own is a little shorter).
    slowest = max(r.chunks[0].arrived for r in results)
    bound = min([b for b in FIRST_AUDIO_BUCKETS if b >= slowest], default=slowest)
    assert 0 < figures["server_ttfa_p50"] <= figures["server_ttfa_p99"] <= bound
    assert figures["server_stalls"] >= 0 and figures["server_stall_seconds"] >= 0
    assert 0 < figures["server_decoder_busy"] < 1  # two short streams one after the other: busy part of the time
    # Where the time went: the engine's steps (each gave a token to the one stream decoding) and the SNAC calls,
    # and the CPU of each server process, each model's stub by its name.
    load = figures["server_load"]
    assert 0 < load["llm_busy"] < 1 and load["llm_steps_per_s"] > 0 and load["llm_tokens_per_s"] > 0
    assert 1.0 <= load["llm_tokens_per_step"] <= 1.1  # one stream at a time (its prefill step's first token too)
    # Where the streams were: the engine held one at a time, for part of the span, and none waited long
    # for a slot (the rates of its stream- and queued-seconds).
    assert 0 < load["llm_streams"] < 1 and 0 <= load["llm_queued"] < 0.2
    assert load["decoder_windows_per_s"] > 0 and load["decoder_windows_per_call"] >= 1
    cpu = figures["server_cpu"]
    assert {"tritonserver", "preprocessing", "llm", "snac_decoder", "load generator"} <= set(cpu)
    assert cpu["llm"]["cores"] > 0 and 0 < cpu["snac_decoder"]["busiest_thread"] <= cpu["snac_decoder"]["cores"]
    assert server_listener_monitor(None)()() == {}  # no metrics endpoint: no figures, no error


def test_a_sweep_in_several_load_generator_processes(grpc_url):
    """loadgen.LoadProcesses: a level's closed-loop workers and Poisson arrivals dealt out to two processes,
    timed from one start, come back as one level (each worker's first stream where the ramp puts it)."""
    from orpheus_triton.loadgen import SweepSettings, poisson_schedule, sweep

    settings = SweepSettings(concurrency=[3], streams_per_worker=1, min_streams=3, ramp_seconds=0.6,
                             max_seconds_per_level=60.0, poisson_rates=[20.0], poisson_streams=2,
                             poisson_seconds=60.0, labels=["short"], max_tokens={"short": 28}, processes=2)
    result = sweep(grpc_url, settings, log=lambda line: None)
    closed, poisson = result["closed_loop"][3], result["poisson"][20.0]
    assert closed["streams"] == 3 and closed["errors"] == 0 and closed["no_audio"] == 0
    assert poisson["streams"] == 2 and poisson["errors"] == 0
    # Worker i's first stream at 0.6 i / 3 s (or sooner, in a worker whose first stream has ended); those
    # before the last worker's first are the ramp's fillers, and fillers kept all three workers busy until
    # the counted streams, from the last worker's first on, had ended (across both processes).
    records = result["records"]["closed_3"]
    starts = sorted(r["started"] for r in records)
    # (A stream's start is taken once its worker has woken and, for its first, set its client up: tenths of
    # a second late on a loaded 2-core machine; never early.)
    assert starts[0] < 0.5 and starts[2] < 0.4 + 0.5
    counted = [r for r in records if r["measured"]]
    assert len(counted) == 3 and min(r["started"] for r in counted) >= 0.4 - 0.01
    assert closed["filler_streams"] >= 2 and closed["streams_in_flight_mean"] > 2.0  # (3 but for the gaps)
    # A counted stream that ended while another still ran was followed in its worker by the next stream
    # (a filler), whichever process held the one still running: looked at where that one ran on for more than
    # a worker's wake-up between two streams (0.2 s here allows for a busy machine).
    wake_up = 0.2
    last_end = max(r["started"] + r["total"] for r in counted)
    for ended in (r["started"] + r["total"] for r in counted):
        if ended < last_end - wake_up:
            assert any(ended <= r["started"] <= ended + wake_up for r in records), (ended, records)
    # The two arrivals of the schedule, one in each process, each at its offset from the level's one start:
    # never before it (each waits for its offset), and late by no more than a wake-up and a client's setup.
    scheduled = poisson_schedule(20.0, 2, 60.0, seed=0)
    arrived = sorted(r["started"] for r in result["records"]["poisson_20.0"])
    assert all(offset - 0.001 <= at < offset + 0.5 for at, offset in zip(arrived, scheduled, strict=True)), arrived
    assert all(r["arrivals"] for r in counted + result["records"]["poisson_20.0"])


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_load_generator_told_to_stop_ends_its_streams_with_a_stop(server, grpc_url, processes):
    """SIGTERM ended the load generator at once, its streams cancelled bare: the decoder went on decoding
    their queued audio for nobody (a core for seconds). Now each stream under way ends with a stop."""
    import os
    import signal
    import subprocess
    import sys

    stopped = settled_server_metric(server, "orpheus_decoder_stopped_streams_total")
    started = server_metric(server, "orpheus_llm_generated_tokens_total")
    command = [sys.executable, "-m", "orpheus_triton.loadgen", "--url", grpc_url, "--concurrency", "2",
               "--texts", "short", "--max-tokens", "1400", "--processes", processes]
    loadgen = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 60
    while server_metric(server, "orpheus_llm_generated_tokens_total") < started + 200:  # streams under way
        assert loadgen.poll() is None and time.monotonic() < deadline, loadgen.stdout.read()
        time.sleep(0.2)
    loadgen.send_signal(signal.SIGTERM)
    output, _ = loadgen.communicate(timeout=60)
    assert loadgen.returncode == 130 and "stopping: the streams under way end with a stop each" in output, output
    assert settled_server_metric(server, "orpheus_decoder_stopped_streams_total") >= stopped + 2
    assert settled_server_metric(server, "orpheus_decoder_queued_windows") == 0


def test_async_client_streams_the_same_audio_and_a_barge_in_stops_generation(server, grpc_url):
    """AsyncOrpheusClient: the threaded client's audio for the same request, two streams at once on one
    client, and leaving a long stream after two chunks ends its generation (the llm's `stop`)."""
    import asyncio
    import contextlib

    from orpheus_triton.client import AsyncOrpheusClient

    expected = OrpheusClient(grpc_url).synthesize(TEXT, seed=3, max_tokens=140).audio

    async def main():
        async with AsyncOrpheusClient(grpc_url) as client:
            async def collect(**options):
                return np.concatenate([chunk async for chunk in client.stream(TEXT, **options)])

            together = await asyncio.gather(collect(seed=3, max_tokens=140), collect(seed=3, max_tokens=140))
            before = settled_server_metric(server, "orpheus_llm_generated_tokens_total")
            heard = 0
            async with contextlib.aclosing(client.stream("A long one.", max_tokens=LONG_STREAM_TOKENS)) as chunks:
                async for _ in chunks:
                    heard += 1
                    if heard == 2:
                        break  # the caller barged in
            with pytest.raises(SynthesisError, match="text is empty"):  # the server's error, raised here
                [chunk async for chunk in client.stream(" ")]
            return together, heard, before

    together, heard, before = asyncio.run(main())
    for audio in together:
        assert_same_audio(audio, expected)
    assert heard == 2
    # The long stream's generation ended early: far fewer than its tokens (about 65 with the `stop`), and
    # nothing runs on (without the stop it would for seconds more).
    assert settled_server_metric(server, "orpheus_llm_generated_tokens_total") - before < LONG_STREAM_TOKENS // 2
    assert server_metric(server, "orpheus_llm_active_streams") == 0


def test_async_client_speaks_text_as_it_arrives_sentence_by_sentence(grpc_url):
    """stream_text: text arriving in pieces is spoken sentence by sentence, one request each, with the
    next sentence generating ahead: the audio is each sentence's own, in order, with nothing between."""
    import asyncio

    from orpheus_triton.client import AsyncOrpheusClient

    sentences = ["Hello there.", "This is the second sentence!", "And <sigh> a third one?"]
    options = {"seed": 5, "max_tokens": 63}
    alone = OrpheusClient(grpc_url)
    expected = np.concatenate([alone.synthesize(sentence, **options).audio for sentence in sentences])

    async def pieces():
        text = " ".join(sentences)
        for start in range(0, len(text), 4):  # as a voice agent's LLM hands over its reply
            yield text[start : start + 4]

    async def main():
        async with AsyncOrpheusClient(grpc_url) as client:
            audio = np.concatenate([chunk async for chunk in client.stream_text(pieces(), **options)])
            with pytest.raises(ValueError, match="request id of its own"):
                [chunk async for chunk in client.stream_text("Hi.", request_id="x")]
            return audio

    assert_same_audio(asyncio.run(main()), expected)


def test_both_clients_hear_why_a_streams_audio_ended(grpc_url):
    """The stream's last response says why its audio ended: here its max_tokens (random weights never end
    their speech), so a caller knows the text's last words may be missing. The threaded client keeps it on
    the result; the asyncio client's ``on_finish`` hears it, once per stream and per sentence of stream_text."""
    import asyncio

    from orpheus_triton.client import AsyncOrpheusClient

    result = OrpheusClient(grpc_url).synthesize(TEXT, max_tokens=70)
    assert result.finish_reason == c.FINISH_MAX_TOKENS and result.audio.size == 10 * c.SAMPLES_PER_FRAME

    async def main():
        heard: list[str] = []
        async with AsyncOrpheusClient(grpc_url) as client:
            chunks = [chunk async for chunk in client.stream(TEXT, max_tokens=70, on_finish=heard.append)]
            assert sum(map(len, chunks)) == 10 * c.SAMPLES_PER_FRAME and heard == [c.FINISH_MAX_TOKENS]
            [chunk async for chunk in client.stream_text("One. Two.", max_tokens=14, on_finish=heard.append)]
        return heard

    assert asyncio.run(main()) == [c.FINISH_MAX_TOKENS] * 3


def _sse_events(url: str, body: dict) -> tuple[int, list[dict]]:
    """POST ``body`` to a Triton generate_stream endpoint: the HTTP status and the server-sent events' JSON."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        response = urllib.request.urlopen(request, timeout=120)
    except urllib.error.HTTPError as error:  # a refused request: its event comes with the error status
        response = error
    with response:
        return response.status, [json.loads(line[len(b"data:"):]) for line in response if line.startswith(b"data:")]


def test_http_clients_stream_the_same_audio_as_server_sent_events(server, grpc_url):
    """Without gRPC (curl, a browser): Triton's generate_stream endpoint on the HTTP port streams the
    ensemble's chunks as server-sent events, JSON with the audio as a list of int16 samples; errors
    come as an event too, with the server's message."""
    url = f"http://localhost:{server.ports.http}/v2/models/{c.ENSEMBLE_MODEL}/generate_stream"
    expected = OrpheusClient(grpc_url).synthesize(TEXT, seed=3, max_tokens=140).audio
    status, events = _sse_events(url, {"id": "http-stream-1", "text": TEXT, "seed": 3, "max_tokens": 140})
    assert status == 200 and len(events) > 5 and all("error" not in event for event in events)
    assert_same_audio(np.concatenate([np.array(event[c.OUT_AUDIO], dtype=np.int16) for event in events]), expected)
    # The last event, with the last audio, says why it ended: here its max_tokens (random weights never end
    # their speech); no other event says anything of its end.
    assert [event.get(c.OUT_FINISH_REASON) for event in events] == [None] * (len(events) - 1) + [c.FINISH_MAX_TOKENS]
    assert events[-1][c.OUT_AUDIO]
    status, refused = _sse_events(url, {"text": TEXT})  # no "id": the request has no stream key
    assert status == 400 and len(refused) == 1 and "this request has no id" in refused[0]["error"]


def test_an_http_stream_is_stopped_with_the_llm_stop_request(server):
    """Barge-in over HTTP: the llm's `stop` for the stream's id, posted to its generate_stream endpoint
    (as the README shows with curl), ends the stream within a step, far short of its max_tokens."""
    import json
    import threading
    import urllib.request

    base = f"http://localhost:{server.ports.http}/v2/models"
    events: list[dict] = []
    first_chunks = threading.Event()

    def listen():
        body = json.dumps({"id": "http-barge-in", "text": "A long one.", "max_tokens": LONG_STREAM_TOKENS}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{base}/{c.ENSEMBLE_MODEL}/generate_stream", data=body,
                                                           method="POST"), timeout=120) as response:
            for line in response:
                if line.startswith(b"data:"):
                    events.append(json.loads(line[len(b"data:"):]))
                    if len(events) == 2:
                        first_chunks.set()

    listener = threading.Thread(target=listen)
    listener.start()
    assert first_chunks.wait(60)
    stop = {"id": "http-barge-in", "stop": True, "input_ids": [0], "input_lengths": [1], "request_output_len": [1]}
    status, answer = _sse_events(f"{base}/{c.LLM_MODEL}/generate_stream", stop)
    listener.join(60)
    assert status == 200 and answer == [] and not listener.is_alive()
    assert all("error" not in event for event in events) and len(events) < LONG_STREAM_TOKENS // c.TOKENS_PER_FRAME // 2
    # The stream's last event says the stop ended it; no other says anything of its end.
    assert [event.get(c.OUT_FINISH_REASON) for event in events] == [None] * (len(events) - 1) + [c.FINISH_STOPPED]
    assert settled_server_metric(server, "orpheus_llm_active_streams") == 0  # (the gauge is refreshed every 0.5 s)


def test_a_stop_that_overtakes_its_request_still_stops_the_stream(server):
    """A stop posted right after its request can reach the llm stage before the request, which goes
    through preprocessing first: it found no stream, was answered as done all the same, and the stream
    ran to its max_tokens. Posted first here, it now waits for its stream and stops it as it arrives."""
    import json
    import urllib.request

    base = f"http://localhost:{server.ports.http}/v2/models"
    stop = {"id": "overtaken", "stop": True, "input_ids": [0], "input_lengths": [1], "request_output_len": [1]}
    assert _sse_events(f"{base}/{c.LLM_MODEL}/generate_stream", stop) == (200, [])
    body = json.dumps({"id": "overtaken", "text": "A long one.", "max_tokens": LONG_STREAM_TOKENS}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{base}/{c.ENSEMBLE_MODEL}/generate_stream", data=body,
                                                       method="POST"), timeout=120) as response:
        events = [json.loads(line[len(b"data:"):]) for line in response if line.startswith(b"data:")]
    assert all("error" not in event for event in events), events
    # Stopped at its start; its last event says so, with no audio where the stop left none to send.
    assert sum(len(event.get(c.OUT_AUDIO, [])) for event in events) < 8 * c.SAMPLES_PER_FRAME
    assert events[-1][c.OUT_FINISH_REASON] == c.FINISH_STOPPED


def test_cli_say_speaks_stdin_and_long_text_sentence_by_sentence(grpc_url, tmp_path):
    """`say -` reads the text from a pipe as it arrives; `say --sentences` speaks text longer than one
    request takes. Both: one request per sentence, each sentence's own audio, in order."""
    import subprocess
    import sys

    from orpheus_triton.wav import read_wav

    sentences = ["First things first.", "Then <laugh> the second one."]
    expected = np.concatenate([OrpheusClient(grpc_url).synthesize(s, seed=2, max_tokens=28).audio for s in sentences])
    piped = subprocess.run(
        [sys.executable, "-m", "orpheus_triton.cli", "say", "-", "-o", str(tmp_path / "piped.wav"), "--url", grpc_url,
         "--seed", "2", "--max-tokens", "28"], input=" ".join(sentences), capture_output=True, text=True, timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    assert_same_audio(read_wav(tmp_path / "piped.wav")[1], expected)
    assert "note: the audio was cut at its --max-tokens (28 tokens) before the speech ended" in piped.stdout
    assert "--sentences" not in piped.stdout  # it is spoken sentence by sentence already
    # A failure ends the command at once, though the program writing its stdin has not finished.
    writer = subprocess.Popen(
        [sys.executable, "-m", "orpheus_triton.cli", "say", "-", "-o", str(tmp_path / "refused.wav"), "--url",
         grpc_url, "--voice", "bob"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    writer.stdin.write("Hello there. Next")
    writer.stdin.flush()  # and left open
    try:
        assert writer.wait(timeout=60) == 1
        assert "unknown voice 'bob'" in writer.stderr.read()
    finally:
        writer.kill()
        writer.stdin.close()

    long_text = " ".join(f"Sentence number {i} is here to make this text longer than one request." for i in range(30))
    assert len(long_text) > c.MAX_TEXT_CHARS
    spoken = subprocess.run(
        [sys.executable, "-m", "orpheus_triton.cli", "say", long_text, "--sentences", "-o", str(tmp_path / "long.wav"),
         "--url", grpc_url, "--max-tokens", "14"], capture_output=True, text=True, timeout=300,
    )
    assert spoken.returncode == 0, spoken.stderr
    assert read_wav(tmp_path / "long.wav")[1].size == 30 * 2 * c.SAMPLES_PER_FRAME  # 14 tokens: 2 frames each


def test_cli_say_names_why_no_audio_came(grpc_url, tmp_path):
    """Blank text is "no sentence to say", a max_tokens below a frame is refused while the arguments are
    read; `--sentences` said "no sentence" whatever the cause."""
    import subprocess
    import sys

    def say(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "orpheus_triton.cli", "say", *args, "-o",
                               str(tmp_path / "x.wav"), "--url", grpc_url], input=stdin, capture_output=True,
                              text=True, timeout=120)

    for blank in (say("  ", "--sentences"), say("-", stdin=" \n "), say("... !!", "--sentences"),
                  say("-", stdin="... !!\n")):
        assert blank.returncode == 1 and "no audio: the text had no sentence to say" in blank.stderr, blank.stderr
    short = say("Hello. World.", "--sentences", "--max-tokens", str(c.TOKENS_PER_FRAME - 1))
    assert short.returncode == 2 and "the least that gives audio" in short.stderr, short.stderr


@pytest.mark.parametrize("text", ["Hello. World.", None])
def test_cli_say_blames_the_server_when_sentences_gave_no_audio(monkeypatch, tmp_path, text):
    """With sentences to say and no audio back, the cause is not the text (it said "no sentence")."""
    import io

    from orpheus_triton import cli
    from orpheus_triton.client import SynthesisResult

    async def no_audio(url, source, on_chunk, **options):
        return SynthesisResult(request_id="one per sentence"), True

    monkeypatch.setattr(cli, "_speak_sentences", no_audio)
    monkeypatch.setattr("orpheus_triton.client.require_ready_server", lambda url, model=None: None)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello."))
    with pytest.raises(SystemExit, match="the server finished the stream without audio"):
        cli._synthesize("localhost:1", text, str(tmp_path / "x.wav"), sentences=True)


def test_example_client_ends_a_stream_with_stops_on_its_own_grpc_stream():
    """client/stream_to_wav.py's end_early: stops go on the stream being ended (it opened a connection per
    stop), the stop's own final answer (the `llm` model's) is not the stream's end, and until the stream
    has answered the stop is repeated."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("stream_to_wav", Path(__file__).parents[1] / "client" /
                                                  "stream_to_wav.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    def response(model: str, final: bool):
        final_flag = types.SimpleNamespace(bool_param=final)
        return types.SimpleNamespace(get_response=lambda: types.SimpleNamespace(
            model_name=model, parameters={"triton_final_response": final_flag}))

    class Stream:
        def __init__(self, *answers):
            self.responses, self.answers, self.stops = queue.Queue(), list(answers), []

        def async_stream_infer(self, model, inputs, request_id, enable_empty_final_response):
            self.stops.append((model, request_id, {i.name() for i in inputs}))
            for answer in self.answers.pop(0) if self.answers else []:
                self.responses.put(answer)

    heard = Stream([(response(c.LLM_MODEL, True), None), (response(c.ENSEMBLE_MODEL, False), None),
                    (response(c.ENSEMBLE_MODEL, True), None)])
    assert example.end_early(heard, "s", heard.responses, heard=True, timeout=5)
    assert heard.stops == [(c.LLM_MODEL, "s", {c.LLM_INPUT_IDS, c.LLM_INPUT_LENGTHS, c.LLM_REQUEST_OUTPUT_LEN,
                                                c.LLM_STOP})]
    # Not answered yet: the first stop finds nothing (answered all the same), the next lands.
    early = Stream([(response(c.LLM_MODEL, True), None)],
                   [(response(c.ENSEMBLE_MODEL, False), None), (response(c.LLM_MODEL, True), None),
                    (response(c.ENSEMBLE_MODEL, True), None)])
    assert example.end_early(early, "s", early.responses, heard=False, timeout=5)
    assert len(early.stops) == 2
    # An error beside the stop's answer is the stream's end; an error alone may be the stop's: the stop goes
    # again a quarter second later (at once, a server refusing stops got tens of thousands a second).
    failed = Stream([(None, "the stream's error"), (response(c.LLM_MODEL, True), None)])
    assert example.end_early(failed, "s", failed.responses, heard=True, timeout=5) and len(failed.stops) == 1
    refused = Stream([(None, "the stop's error")], [(response(c.ENSEMBLE_MODEL, True), None)])
    started = time.monotonic()
    assert example.end_early(refused, "s", refused.responses, heard=True, timeout=5) and len(refused.stops) == 2
    assert time.monotonic() - started >= 0.25

    class Refusing(Stream):
        def async_stream_infer(self, model, inputs, request_id, enable_empty_final_response):
            self.stops.append(request_id)
            self.responses.put((None, "refused"))

    refusing = Refusing()
    assert not example.end_early(refusing, "s", refusing.responses, heard=True, timeout=1.0)
    assert 3 <= len(refusing.stops) <= 5
    assert not example.end_early(Stream(), "s", queue.Queue(), heard=True, timeout=0.3)


def test_the_example_client_ends_its_stream_when_killed(server, grpc_url, tmp_path):
    """SIGTERM (kill, timeout, a container stop) and SIGHUP end client/stream_to_wav.py's stream as Ctrl-C
    does: a stop, its end read, status 130. It died at once, its generation running on to max_tokens and
    the request counted in flight on the server."""
    import signal
    import subprocess
    import sys

    example = Path(__file__).parents[1] / "client" / "stream_to_wav.py"
    for signum in (signal.SIGTERM, signal.SIGHUP):
        cancelled = settled_server_metric(server, "orpheus_llm_cancelled_requests_total")
        process = subprocess.Popen([sys.executable, str(example), "a long one", str(tmp_path / "killed.wav"),
                                    "--url", grpc_url, "--max-tokens", str(LONG_STREAM_TOKENS)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert process.stdout.readline().startswith("first audio after")
        process.send_signal(signum)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err
        assert settled_server_metric(server, "orpheus_llm_cancelled_requests_total") == cancelled + 1
        assert server_metric(server, "orpheus_llm_active_streams") == 0
    refused = subprocess.run([sys.executable, str(example), "hi", str(tmp_path / "x.wav"), "--seed", "-1"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "a seed is from 0 to 2**64 - 1" in refused.stderr


def test_say_from_stdin_is_timed_from_its_first_words(grpc_url):
    """`say -`'s time to first audio and real-time factor counted the wait for another program's text."""
    import asyncio

    from orpheus_triton.cli import _speak_sentences

    written, heard = [], []

    async def slow_text():
        await asyncio.sleep(1.0)  # the program writing the text is thinking
        written.append(time.perf_counter())
        yield "Hello there."

    def on_chunk(_audio):
        if not heard:
            heard.append(time.perf_counter())

    result, had_text = asyncio.run(_speak_sentences(grpc_url, slow_text(), on_chunk, max_tokens=70))
    done = time.perf_counter()
    assert had_text and result.chunks and heard
    # Timed from the words: no longer than from their writing to the first audio heard, and to the end, here
    # (the report takes its times between those). Counted from the call, both were a second longer.
    assert 0 < result.chunks[0].arrived <= heard[0] - written[0]
    assert result.chunks[0].arrived < result.total_seconds <= done - written[0]


def test_cli_say_and_example_client_write_wavs(server, grpc_url, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from orpheus_triton.wav import read_wav

    say = subprocess.run(
        [sys.executable, "-m", "orpheus_triton.cli", "say", "Hello from the command line", "-o",
         str(tmp_path / "say.wav"), "--url", grpc_url, "--max-tokens", "70", "--voice", "zac"],
        capture_output=True, text=True, timeout=120,
    )
    assert say.returncode == 0, say.stderr
    assert "time to first audio" in say.stdout and "real-time factor" in say.stdout
    assert "note: the audio was cut at its --max-tokens (70 tokens) before the speech ended" in say.stdout
    rate, audio = read_wav(tmp_path / "say.wav")
    assert rate == c.SAMPLE_RATE and audio.size == 10 * c.SAMPLES_PER_FRAME  # 10 frames
    # -o -: the same audio as raw PCM on stdout, the summary on stderr
    raw = subprocess.run(
        [sys.executable, "-m", "orpheus_triton.cli", "say", "Hello from the command line", "-o", "-",
         "--url", grpc_url, "--max-tokens", "70", "--voice", "zac"], capture_output=True, timeout=120,
    )
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == audio.astype("<i2").tobytes()
    assert b"wrote raw PCM to stdout" in raw.stderr
    # ... and a reader that goes away stops the stream with a one-line message, not a traceback
    pipe = subprocess.run(
        f"{sys.executable} -m orpheus_triton.cli say 'a long one' -o - --url {grpc_url} --max-tokens 700"
        " | head -c 100 > /dev/null; echo \"exit ${PIPESTATUS[0]}\" >&2",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
    )
    assert "stopped: the reader of stdout went away" in pipe.stderr and "exit 1" in pipe.stderr, pipe.stderr
    assert "Traceback" not in pipe.stderr
    # ... as does an output that fails mid-stream (a full disk), and the server is free again at once
    full = subprocess.run([sys.executable, "-m", "orpheus_triton.cli", "say", "a long one", "-o", "/dev/full",
                           "--url", grpc_url, "--max-tokens", "700"], capture_output=True, text=True, timeout=120)
    assert full.returncode == 1 and "error: writing /dev/full failed: [Errno 28] No space left" in full.stderr, \
        full.stderr
    assert "Traceback" not in full.stderr

    example = Path(__file__).parents[1] / "client" / "stream_to_wav.py"
    run = subprocess.run([sys.executable, str(example), "Hello from the example", str(tmp_path / "ex.wav"),
                          "--url", grpc_url, "--max-tokens", "70"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert read_wav(tmp_path / "ex.wav")[1].size > 0
    assert "the audio was cut at the request's max_tokens" in run.stdout
    # SIGTERM mid-stream (kill, `timeout`): `say` ends the stream as on Ctrl-C and leaves a whole WAV
    # (it ended at once: the header said 0 frames, the stream ran on, counted in flight)
    import signal

    for how in ([], ["--sentences"]):  # the threaded client, and asyncio's (sentence by sentence)
        wav = tmp_path / f"term{len(how)}.wav"
        terminated = subprocess.Popen([sys.executable, "-m", "orpheus_triton.cli", "say", "a long one. Another.",
                                       *how, "-o", str(wav), "--url", grpc_url, "--max-tokens", "980"],
                                      stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while (not wav.exists() or wav.stat().st_size < 10_000) and time.monotonic() < deadline:
            time.sleep(0.05)
        terminated.send_signal(signal.SIGTERM)
        try:
            assert terminated.wait(timeout=30) == 130 and "interrupted" in terminated.stderr.read(), how
        finally:
            terminated.kill()
        assert read_wav(wav)[1].size > 0
        wait_for_metric(server, "orpheus_llm_active_streams", lambda value: value == 0, timeout=10)  # stopped
    # Ctrl-C mid-stream: the example sends the llm's `stop` and ends (it hung on tritonclient's thread)
    import signal

    # (SIGINT as in a terminal: a test run started in the background has it ignored, and a child inherits
    # that; a handler is not inherited. Not a preexec_fn: it makes the child fork, which gRPC's fork
    # handlers in this process can kill before its exec)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        interrupted = subprocess.Popen([sys.executable, "-u", str(example), "a long one", str(tmp_path / "cut.wav"),
                                        "--url", grpc_url, "--max-tokens", "980"], stdout=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted.stdout.readline().startswith("first audio after")
    interrupted.send_signal(signal.SIGINT)
    try:
        assert interrupted.wait(timeout=30) != 0  # it was still streaming: 980 tokens take seconds
    finally:
        interrupted.kill()
    wait_for_metric(server, "orpheus_llm_active_streams", lambda value: value == 0, timeout=10)  # stopped

    bad = subprocess.run([sys.executable, "-m", "orpheus_triton.cli", "say", "hi", "-o", str(tmp_path / "x.wav"),
                          "--url", "localhost:1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "could not synthesize" in bad.stderr
    # A request that fails leaves a file of that name as it was.
    refused = subprocess.run([sys.executable, "-m", "orpheus_triton.cli", "say", " ", "-o",
                              str(tmp_path / "say.wav"), "--url", grpc_url], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and "text is empty" in refused.stderr
    assert read_wav(tmp_path / "say.wav")[1].size == 10 * c.SAMPLES_PER_FRAME
    unreachable = subprocess.run([sys.executable, str(example), "hi", str(tmp_path / "none.wav"), "--url",
                                  "localhost:1"], capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr
    assert not (tmp_path / "none.wav").exists()


def _expect_one_cancellation(server, cancelled_before: float) -> None:
    """Within 10 s the engine reports exactly one more cancelled stream and no active one."""
    deadline = time.monotonic() + 10

    def state():
        return (server_metric(server, "orpheus_llm_cancelled_requests_total") - cancelled_before,
                server_metric(server, "orpheus_llm_active_streams"))

    while state() != (1, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state() == (1, 0)


def test_cancelling_the_llm_stream_stops_generation_within_a_step(server, grpc_url, model_set):
    """gRPC cancellation of an `llm` stream drops it from the engine at the next step.

    (Through the `orpheus` ensemble, tritonserver 2.51 checks cancellation only between
    ensemble steps and does not pass it to a composing request already running; see README.)
    """
    tensors = llm_inputs(load_tokenizer(model_set.llm), SynthesisOptions(text="a long one", max_tokens=1000))
    inputs = [infer_input(name, tensors[name]) for name in (c.LLM_INPUT_IDS, c.LLM_INPUT_LENGTHS,
                                                            c.LLM_REQUEST_OUTPUT_LEN)]
    cancelled_before = settled_server_metric(server, "orpheus_llm_cancelled_requests_total")
    tokens_before = server_metric(server, "orpheus_llm_generated_tokens_total")
    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    client.async_stream_infer(c.LLM_MODEL, inputs, request_id=str(uuid.uuid4()))
    result, error = events.get(timeout=60)  # first frame of tokens: generation is under way
    assert error is None
    client.stop_stream(cancel_requests=True)
    # The engine dropped the stream because of the cancellation, long before its 1000 tokens.
    _expect_one_cancellation(server, cancelled_before)
    assert server_metric(server, "orpheus_llm_generated_tokens_total") - tokens_before < 500
    # The freed slot serves the next request.
    assert OrpheusClient(grpc_url).synthesize("next please", max_tokens=35).audio.size > 0


def abandon_a_stream(server, url: str) -> None:
    """A client walks away mid-stream: within 10 s its engine stream was stopped, long before its end.

    The stop needs no new gRPC stream (here none can be opened once the client hangs up): a new
    connection's setup was seen to take seconds on a busy machine, while generation ran on."""
    cancelled_before = settled_server_metric(server, "orpheus_llm_cancelled_requests_total")
    tokens_before = server_metric(server, "orpheus_llm_generated_tokens_total")
    no_new_streams = mock.patch.object(grpcclient.InferenceServerClient, "start_stream",
                                       side_effect=ConnectionError("no new gRPC stream"))

    class HungUp(Exception):
        pass

    def hang_up(_chunk):
        no_new_streams.start()
        raise HungUp

    try:
        with pytest.raises(HungUp):
            OrpheusClient(url).synthesize("a long one", max_tokens=LONG_STREAM_TOKENS, on_chunk=hang_up)
    finally:
        no_new_streams.stop()  # (nothing to undo if no chunk came)
    _expect_one_cancellation(server, cancelled_before)
    assert server_metric(server, "orpheus_llm_generated_tokens_total") - tokens_before < LONG_STREAM_TOKENS // 2


def leave_a_stream_the_llm_ran_ahead_of(server, url: str) -> None:
    """A client walks away from a stream the llm stage had run ahead of the decoder (the tiny model's llm
    outruns the decoder 2.7x here): what was generated for nobody is not decoded (the stop passed on to
    the decoder), and the stream ends at once instead of after seconds of decoding."""
    tokens, windows = "orpheus_llm_generated_tokens_total", "orpheus_decoder_windows_total"
    tokens_before = settled_server_metric(server, tokens)
    windows_before = server_metric(server, windows)
    at_hang_up = {}

    class HungUp(Exception):
        pass

    def hang_up(_chunk):
        # The llm runs on ahead of the decoder meanwhile: hung up once its figures (published every 0.5 s,
        # so behind it) show 24 frames generated and not decoded (a fixed 2 s showed 18 to 40, by the machine)
        deadline = time.monotonic() + 15
        while True:
            time.sleep(0.25)
            generated, decoded = server_metrics(server, tokens, windows)
            at_hang_up["generated"] = (generated - tokens_before) // c.TOKENS_PER_FRAME
            at_hang_up["decoded"] = decoded - windows_before
            if at_hang_up["generated"] - at_hang_up["decoded"] >= 24 or time.monotonic() > deadline:
                break
        at_hang_up["time"] = time.monotonic()
        raise HungUp

    with pytest.raises(HungUp):
        OrpheusClient(url).synthesize("a long one", max_tokens=LONG_STREAM_TOKENS, on_chunk=hang_up)
    ended_after = time.monotonic() - at_hang_up["time"]
    backlog = at_hang_up["generated"] - at_hang_up["decoded"]  # frames generated, not yet decoded
    decoded_after = settled_server_metric(server, windows) - windows_before - at_hang_up["decoded"]
    assert backlog >= 20, at_hang_up  # what this test is about: the llm had run ahead
    assert decoded_after < backlog / 2, (decoded_after, backlog)
    assert ended_after < 2.0


def test_a_stream_left_while_the_decoder_is_behind_is_not_decoded_further(server, grpc_url):
    leave_a_stream_the_llm_ran_ahead_of(server, grpc_url)


def test_abandoning_an_ensemble_stream_stops_its_generation(server, grpc_url):
    """A client that walks away mid-stream ends the ensemble and, via `stop`, frees the engine slot."""
    abandon_a_stream(server, grpc_url)
    import asyncio

    from orpheus_triton.client import AsyncOrpheusClient
    from orpheus_triton.client import stop_inputs as client_stop_inputs

    # A stop for an id that is not streaming is harmless; one without an id is refused.
    OrpheusClient(grpc_url).stop("no-such-stream")
    with pytest.raises(SynthesisError, match="this request has no id: .* HTTP: the JSON body's \"id\""):
        _stream(grpc_url, c.LLM_MODEL, client_stop_inputs(), c.LLM_OUTPUT_IDS, request_id="")
    # Both clients raise what the server said (the async one read past it).
    with pytest.raises(SynthesisError, match="the stop for '' failed: .*this request has no id"):
        OrpheusClient(grpc_url).stop("")

    async def async_stop():
        async with AsyncOrpheusClient(grpc_url) as client:
            await client.stop("")

    with pytest.raises(SynthesisError, match="the stop for '' failed: .*this request has no id"):
        asyncio.run(async_stop())
    assert OrpheusClient(grpc_url).synthesize("next please", max_tokens=35).audio.size > 0


class ServeCommand:
    """`orpheus-triton serve` in a subprocess on free ports, as a user runs it."""

    def __init__(self, model_set, tmp_path, *options: str):
        import os
        import subprocess
        import sys

        from orpheus_triton.server import Ports, wait_until_ready

        self.ports = Ports.free()  # (.metrics for server_metric)
        self.url = f"localhost:{self.ports.grpc}"
        self.metrics_port = self.ports.metrics
        env = dict(os.environ, ORPHEUS_TRITON_CACHE=str(tmp_path / "cache"))
        self.log_path = tmp_path / "serve.log"  # a file, not a pipe: server processes inherit it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orpheus_triton.cli", "serve", "--models", str(model_set.root), "--device", "cpu",
             "--grpc-port", str(self.ports.grpc), "--http-port", str(self.ports.http),
             "--metrics-port", str(self.ports.metrics), "--max-streams", "2", *options],
            env=env, stdout=subprocess.DEVNULL, stderr=(log_file := self.log_path.open("w")),
        )
        log_file.close()  # the command has its own copy
        try:
            wait_until_ready(self.process, self.url, timeout=180)
        except Exception:
            self.process.kill()
            raise

    def stream_in_background(self, max_tokens: int) -> tuple[threading.Thread, list]:
        """A long synthesis on its own thread, under way on return: (thread, [its result or error])."""
        first_chunk, outcome = threading.Event(), []

        def run() -> None:
            try:
                outcome.append(OrpheusClient(self.url).synthesize(TEXT, max_tokens=max_tokens,
                                                                  on_chunk=lambda _: first_chunk.set()))
            except SynthesisError as error:
                outcome.append(error)
            first_chunk.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert first_chunk.wait(timeout=60)
        return thread, outcome

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        """Return once the command's log says ``text``; fails if it does not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_text():
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.log_path.read_text()[-2000:]}"
            time.sleep(0.05)

    def server_processes(self) -> list[int]:
        """The pids of this command's tritonserver and its stubs still running."""
        import re
        from pathlib import Path

        repository = re.search(r"model repository: (\S+)", self.log_path.read_text()).group(1).encode()
        return [int(path.parent.name) for path in Path("/proc").glob("[0-9]*/cmdline") if repository in _read(path)]

    def callers(self):
        """The leases of the server's callers in flight (callers.CallerLeases), in the folder its
        tritonserver's environment names."""
        from pathlib import Path

        from orpheus_triton.callers import CallerLeases

        for pid in self.server_processes():
            for variable in _read(Path(f"/proc/{pid}/environ")).split(b"\0"):
                name, _, value = variable.decode().partition("=")
                if name == c.CALLERS_DIR_ENV:
                    return CallerLeases(value)
        raise AssertionError(f"no server process has {c.CALLERS_DIR_ENV} in its environment")

    def kill(self) -> None:
        """SIGKILL the command and what is left of its server (a failing test must not leave them)."""
        import contextlib
        import os
        import signal

        self.process.kill()
        self.process.wait()
        for pid in self.server_processes():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def finish(self, timeout: float) -> tuple[int, str, float]:
        """(exit status, stderr, seconds it took) once the command has ended; fails if a server
        process outlived it or the rendered repository was left behind."""
        import re
        from pathlib import Path

        start = time.monotonic()
        try:
            status = self.process.wait(timeout=timeout)
        finally:
            self.process.kill()
        took = time.monotonic() - start
        log = self.log_path.read_text()
        repository = re.search(r"model repository: (\S+)", log).group(1)
        assert not Path(repository).exists()
        leftovers = self.server_processes()
        assert not leftovers, f"server processes left running: {leftovers}\n{log[-3000:]}"
        return status, log, took


def _read(path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended while we looked
        return b""


def drained_stop_seconds() -> float:
    """The most `serve` takes from a stop signal to its end where nothing is left in flight: the drain's
    quiet looks at the metrics, then tritonserver's own exit timeout behind a drain (its models' unloading
    counts in it: 2.5-3 s here, longer on a busy machine, after which 2.51 may hang rather than exit) and
    the grace before it is killed; a few seconds more cover the looks' metric reads and the launcher's exit."""
    from orpheus_triton.server import DRAIN_LOOK_SECONDS, DRAIN_QUIET_LOOKS, DRAINED_EXIT_SECONDS, STOP_GRACE_SECONDS

    return DRAIN_QUIET_LOOKS * DRAIN_LOOK_SECONDS + DRAINED_EXIT_SECONDS + STOP_GRACE_SECONDS + 3


def in_flight_at_exit(log: str) -> list[str]:
    """tritonserver's lines, once drained, naming requests it still held in flight as it stopped."""
    return [line for line in log.split("drained:")[-1].splitlines()
            if "in-flight inferences" in line and "Found 0 model versions" not in line]


def test_serve_command_stops_on_sigterm(model_set, tmp_path):
    """`docker stop` signals the container's first process, the serve command: it passes SIGTERM on."""
    import signal
    import subprocess
    import sys

    serve = ServeCommand(model_set, tmp_path, "--exit-timeout", "30")  # far longer than a drained stop
    try:
        assert OrpheusClient(serve.url).synthesize("served", max_tokens=35).audio.size > 0

        def hang_up(_chunk):
            raise KeyboardInterrupt  # as `say` does at Ctrl-C: cancel, then `stop` the llm stream

        with pytest.raises(KeyboardInterrupt):
            OrpheusClient(serve.url).synthesize("walked away from", max_tokens=700, on_chunk=hang_up)
        time.sleep(1)
        serve.process.send_signal(signal.SIGTERM)
        status, log, took = serve.finish(timeout=60)
    finally:
        serve.kill()
    # Nothing is left in flight: the stopped stream ended normally through the whole ensemble. Ended with
    # an error, the ensemble kept it in flight: in the llm stage's figures, the drain waited out the whole
    # exit timeout; in tritonserver's own, it names the request as it stops.
    assert "gRPC on" in log and "SIGTERM: draining" in log and "drained: every stream has finished" in log
    assert not in_flight_at_exit(log), log[-2000:]
    assert status == 0 and took < drained_stop_seconds(), log[-2000:]

    bad = subprocess.run([sys.executable, "-m", "orpheus_triton.cli", "serve", "--models", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "orpheus_triton.cli", "serve", "--exit-timeout", "1.5"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "whole number of seconds" in bad.stderr


def test_serve_command_stop_is_bounded_with_a_stream_in_flight(model_set, tmp_path):
    """A stream that outlasts the drain is cut off when tritonserver stops (it refuses the ensemble's next
    step, and 2.51 may hang after its exit timeout): the command ends it in bounded time. Stopped here by
    a closed terminal (SIGHUP): the server, in a session of its own, used to run on."""
    import signal

    from orpheus_triton.server import CUT_OFF_GRACE_SECONDS, STOP_GRACE_SECONDS

    serve = ServeCommand(model_set, tmp_path, "--exit-timeout", "1")
    try:
        thread, outcome = serve.stream_in_background(max_tokens=1400)
        serve.process.send_signal(signal.SIGHUP)
        status, log, took = serve.finish(timeout=30)
    finally:
        serve.kill()
    assert "SIGHUP: draining" in log
    assert "streams still in flight after 1 s (--exit-timeout): stopping tritonserver" in log
    # The drain's 1 s, tritonserver's own 1 s and, as it holds a stream it cannot finish, CUT_OFF_GRACE_SECONDS
    # before it is killed (2.51 may hang after its exit timeout); 4 s more for the drain's last metric read and
    # the launcher's exit, still short of a kill after STOP_GRACE_SECONDS.
    assert took < 1 + 1 + CUT_OFF_GRACE_SECONDS + 4 <= 1 + 1 + STOP_GRACE_SECONDS, log[-2000:]
    # A stop asked for that cut a stream off: 128 + the signal, told from a dead stub's 1 (it was 1 or 137)
    assert status == 128 + signal.SIGHUP and "requests in flight were cut off" in log, log[-2000:]
    thread.join(timeout=30)
    assert isinstance(outcome[0], SynthesisError)  # the client hears that its stream was cut off


def test_serve_command_lets_the_streams_in_flight_finish_and_refuses_new_ones(model_set, tmp_path):
    """A stopping tritonserver refuses the ensemble's next step into a composing model: at SIGTERM every
    stream stopped where it was (no audio after it) and was cut off at the exit timeout. Now the streams
    in flight end whole, a new one is refused as UNAVAILABLE-to-retry-elsewhere, and the command exits 0
    once they have ended, well before its exit timeout."""
    import signal
    import subprocess
    import sys

    from orpheus_triton.client import ServerUnavailable

    serve = ServeCommand(model_set, tmp_path, "--exit-timeout", "60")
    try:
        whole = OrpheusClient(serve.url).synthesize(TEXT, max_tokens=700)
        thread, outcome = serve.stream_in_background(max_tokens=700)
        serve.process.send_signal(signal.SIGTERM)
        serve.wait_for_log("SIGTERM: draining")  # logged once the drain's flag is up
        with pytest.raises(ServerUnavailable, match="server shutting down: it takes no new streams while those in "
                                                    "flight finish; retry on another server"):
            OrpheusClient(serve.url).synthesize(TEXT, max_tokens=70)
        refused = subprocess.run([sys.executable, "-m", "orpheus_triton.cli", "say", "Hi", "--url", serve.url, "-o",
                                  str(tmp_path / "late.wav")], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 75 and "server shutting down" in refused.stderr  # EX_TEMPFAIL: retry
        thread.join(timeout=60)
        status, log, took = serve.finish(timeout=60)
    finally:
        serve.kill()
    assert not isinstance(outcome[0], Exception) and len(outcome[0].chunks) == len(whole.chunks)
    assert "SIGTERM: draining" in log and "drained: every stream has finished; stopping tritonserver" in log
    assert status == 0 and took < 30, log[-2000:]
    assert "in-flight inferences" not in log.split("drained:")[1].replace("Found 0 model versions that have "
                                                                           "in-flight inferences", "")


def test_serve_command_admits_callers_end_to_end_up_to_max_callers(model_set, tmp_path):
    """--max-streams counts streams generating: a caller whose generation had ended, its audio still
    decoding (seconds of it on a CPU), no longer counted, and callers past what the decoder plays in real
    time were let in, each of them stuttering. --max-callers counts each caller until its last audio."""
    import signal

    from orpheus_triton.client import ServerUnavailable

    serve = ServeCommand(model_set, tmp_path, "--max-callers", "1")  # and 2 stream slots
    busy = r"server busy: 1 in flight, as many callers as this server takes \(--max-callers 1\)"
    tokens = "orpheus_llm_generated_tokens_total"
    try:
        before = settled_server_metric(serve, tokens)
        thread, outcome = serve.stream_in_background(max_tokens=1400)  # 200 frames, the llm 2-3x ahead
        with pytest.raises(ServerUnavailable, match=busy):
            OrpheusClient(serve.url).synthesize(TEXT, max_tokens=70)
        assert wait_for_metric(serve, "orpheus_callers_in_flight", lambda value: value == 1) == 1
        assert sum(metric_series(serve, "orpheus_callers_refused_total")) == 1  # of two instances
        wait_for_metric(serve, tokens, lambda value: value - before >= 1400)  # the demo model never ends early
        assert thread.is_alive()  # its generation has ended; its audio is still coming
        with pytest.raises(ServerUnavailable, match=busy):
            OrpheusClient(serve.url).synthesize(TEXT, max_tokens=70)
        thread.join(timeout=120)
        assert not isinstance(outcome[0], Exception) and len(outcome[0].chunks) >= 1400 // c.TOKENS_PER_FRAME - 3
        wait_for_metric(serve, "orpheus_callers_in_flight", lambda value: value == 0)
        assert OrpheusClient(serve.url).synthesize(TEXT, max_tokens=70).audio.size > 0
        assert sum(metric_series(serve, "orpheus_callers_refused_total")) == 2
        serve.process.send_signal(signal.SIGTERM)
        status, log, _ = serve.finish(timeout=60)
    finally:
        serve.kill()
    assert status == 0, log[-3000:]
    assert not [line for line in log.splitlines() if "not counted" in line or "could not count" in line
                or "lease" in line], log[-3000:]  # the leases' own complaints


def test_serve_command_stops_at_once_on_a_second_ctrl_c(model_set, tmp_path):
    import signal

    serve = ServeCommand(model_set, tmp_path)  # exit timeout 10 s
    try:
        serve.stream_in_background(max_tokens=1400)
        serve.process.send_signal(signal.SIGINT)
        serve.wait_for_log("SIGINT: draining")
        assert serve.process.poll() is None  # waiting for the stream
        serve.process.send_signal(signal.SIGINT)
        status, log, took = serve.finish(timeout=30)
    finally:
        serve.kill()
    assert "stopping at once" in log and "drained:" not in log, log[-2000:]
    # A stop asked for, which cut a stream off: 128 + the signal (was 137, the kill's: read as an OOM kill).
    # At once: the launcher's next pass (0.2 s), the kill and its exit, not the drain's wait for the stream.
    assert status == 128 + signal.SIGINT and took < 5, log[-2000:]


def test_async_streams_ended_early_in_every_way_leave_nothing_in_flight(model_set, tmp_path):
    """A cancelled task, an asyncio timeout around it, the stream's own timeout, `stream_text` left early,
    a stream left without aclosing just before its client closes, one read by another task when its
    client closes, streams ended right after they were sent (their first `stop` comes before the llm
    stage has them: it is sent again), from both clients: each ends with the llm's `stop`, its
    responses read to the end. grpc.aio cancels a call whose read is cancelled, and a cancelled
    ensemble request stays counted in flight in tritonserver 2.51: the server's graceful stop then
    waited out its whole exit timeout."""
    import asyncio
    import contextlib
    import re
    import signal

    from orpheus_triton.client import AsyncOrpheusClient

    serve = ServeCommand(model_set, tmp_path, "--exit-timeout", "30")  # far longer than a drained stop
    long = "A long sentence that takes a while to say. " * 3

    async def main() -> list[str]:
        outcomes = []
        async with AsyncOrpheusClient(serve.url) as client:
            async def listen(**options):
                async for _ in client.stream(long, max_tokens=1400, **options):
                    outcomes.append("chunk")

            task = asyncio.ensure_future(listen())
            while "chunk" not in outcomes:
                await asyncio.sleep(0.05)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(listen(), 1.5)
            with contextlib.suppress(TimeoutError):
                await listen(timeout=1.5)
                outcomes.append("no timeout")
            async with contextlib.aclosing(client.stream_text(f"{long} {long}", max_tokens=1400)) as chunks:
                async for _ in chunks:
                    break
        async with AsyncOrpheusClient(serve.url) as client:
            async for _ in client.stream(long, max_tokens=1400):
                break  # no aclosing: closed when collected, while the client closes
        async with AsyncOrpheusClient(serve.url) as client:
            early = [asyncio.ensure_future(listen()) for _ in range(4)]
            await asyncio.sleep(0)
            for index, task in enumerate(early):  # ended before or while the server takes them
                await asyncio.sleep(0.02 * index)
                task.cancel()
            await asyncio.gather(*early, return_exceptions=True)
            for _ in range(2):
                with contextlib.suppress(TimeoutError):
                    await listen(timeout=0.05)
            heard = outcomes.count("chunk")
            reader = asyncio.ensure_future(listen())
            while outcomes.count("chunk") == heard:
                await asyncio.sleep(0.05)
        with pytest.raises(SynthesisError, match="the stream was cut off: its client was closed"):
            await reader  # its client closed while it read: its stream was stopped, and its reader told
        async with AsyncOrpheusClient(serve.url) as client:
            async def speak() -> None:
                try:
                    async for _ in client.stream_text(f"{long} {long}", max_tokens=140):
                        outcomes.append("sentence chunk")
                except SynthesisError:  # the next sentence, refused by the closed client
                    outcomes.append("refused")

            speaker = asyncio.ensure_future(speak())
            while "sentence chunk" not in outcomes:
                await asyncio.sleep(0.05)
        await speaker  # closed under stream_text: an end or an error, never a CancelledError
        return outcomes

    try:
        for timeout in (0.05, 0.3):  # the threaded client's timeout: its stream is ended as early
            with contextlib.suppress(TimeoutError):
                OrpheusClient(serve.url).synthesize(long, max_tokens=1400, timeout=timeout)
        outcomes = asyncio.run(main())
        serve.process.send_signal(signal.SIGINT)
        status, log, took = serve.finish(timeout=60)
    finally:
        serve.kill()
    assert "no timeout" not in outcomes
    assert not re.findall(r"has [1-9][0-9]* in-flight inferences", log), log[-2000:]
    assert took < drained_stop_seconds()  # a request left in flight made it wait the whole 30 s exit timeout


def test_an_id_reused_after_its_grpc_stream_was_cancelled_gets_its_own_audio(model_set, tmp_path):
    """A client that only cancels its gRPC stream: tritonserver 2.51 does not pass the cancellation to
    the `llm` request, which runs to its end and frees the id, but that end never reaches the decoder.
    A new stream with the id got the old one's decoder state: its first windows framed on the old
    codes, no lead-in frame, two frames too many. It now sounds as under a fresh id."""
    from orpheus_triton.client import request_inputs

    serve = ServeCommand(model_set, tmp_path, "--exit-timeout", "1")  # the cancelled request stays in flight
    try:
        reused = f"reused-{uuid.uuid4()}"
        events: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(serve.url)
        client.start_stream(callback=lambda result, error: events.put(error))
        client.async_stream_infer(c.ENSEMBLE_MODEL, request_inputs(TEXT, seed=7, max_tokens=140), request_id=reused,
                                  enable_empty_final_response=True)
        assert events.get(timeout=60) is None and events.get(timeout=60) is None  # two chunks heard
        client.stop_stream(cancel_requests=True)
        deadline = time.monotonic() + 30
        while server_metric(serve, "orpheus_llm_active_streams") and time.monotonic() < deadline:
            time.sleep(0.2)  # the llm stage runs the stream to its end
        time.sleep(0.5)
        # Its caller still counts (no stage saw the stream end): the id is refused until its lease expires
        # (callers.LEASE_IDLE_SECONDS, a minute), stood in for here by removing the lease.
        with pytest.raises(SynthesisError, match="already streaming"):
            OrpheusClient(serve.url).synthesize(TEXT, seed=7, max_tokens=140, request_id=reused)
        serve.callers()._path(reused).unlink()
        fresh = OrpheusClient(serve.url).synthesize(TEXT, seed=7, max_tokens=140)
        again = OrpheusClient(serve.url).synthesize(TEXT, seed=7, max_tokens=140, request_id=reused)
        assert len(again.chunks) == len(fresh.chunks)
        assert_same_audio(again.audio, fresh.audio)
    finally:
        serve.kill()


def test_serve_stops_the_server_when_a_backend_stub_dies(model_set, tmp_path):
    """A model's stub killed (as the OOM killer does): tritonserver 2.51 neither restarts it nor stops
    reporting ready, and every request to the model fails. `serve` stops the server, exit status 1,
    for its supervisor to start a whole one again."""
    import os
    import signal

    from orpheus_triton.server import StubWatch

    serve = ServeCommand(model_set, tmp_path, "--exit-timeout", "1")
    try:
        (server,) = [pid for pid in serve.server_processes() if b"tritonserver --model" in _read(
            Path(f"/proc/{pid}/cmdline")).replace(b"\0", b" ")]
        stubs = StubWatch(server).stubs()
        assert sorted(set(stubs.values())) == sorted([c.PREPROCESSING_MODEL, c.LLM_MODEL, c.DECODER_MODEL])
        os.kill(next(pid for pid, model in stubs.items() if model == c.DECODER_MODEL), signal.SIGKILL)
        status, log, took = serve.finish(timeout=30)
    finally:
        serve.kill()
    assert status == 1 and f"the backend stub of '{c.DECODER_MODEL}' died" in log


def test_server_stops_when_its_serve_command_is_killed(model_set, tmp_path):
    """A launcher killed with SIGKILL cannot stop its server, which runs in a session of its own: the
    kernel's parent-death signal does (SIGTERM, Triton's graceful stop), stubs included."""
    import signal

    serve = ServeCommand(model_set, tmp_path, "--exit-timeout", "1")
    assert serve.server_processes()
    serve.process.send_signal(signal.SIGKILL)
    serve.process.wait(timeout=10)
    deadline = time.monotonic() + 30
    while serve.server_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = serve.server_processes()
    serve.kill()  # a failing test must not leave its server running
    assert not left, "tritonserver outlived its killed launcher"


OTHER_MAX_SEQ_LEN = 240


@pytest.fixture(scope="module")
def other_server(model_set, tmp_path_factory):
    """A second server, with options of the default one's changed (one start for their tests): the llm
    engine's ``overlap`` option, no lead-in frame, voices of another fine-tune (tara and pierre,
    pierre by default), and a max_seq_len shorter than a prompt and the default max_tokens."""
    from conftest import running_server, server_settings

    from orpheus_triton.repository import render

    work = tmp_path_factory.mktemp("other-server")
    settings = server_settings(model_set, llm_overlap=True, decoder_lead_in=False, voices="tara, Pierre",
                               default_voice="pierre", max_seq_len=OTHER_MAX_SEQ_LEN)
    repository = render(settings, work / "repository")
    assert 'key: "overlap", value: { string_value: "true" }' in (repository / c.LLM_MODEL / "config.pbtxt").read_text()
    with running_server(repository, work) as process:
        yield f"localhost:{process.ports.grpc}"


def test_an_overlapping_engine_without_lead_in_serves_the_same_audio_after_frame_0(grpc_url, other_server, model_set):
    """The llm stage with its engine's ``overlap`` option (tokens read back a step late) generates exactly
    the default engine's tokens, and the decoder without the lead-in frame streams the same audio but
    frame 0's."""
    options = {"text": TEXT, "voice": "tara", "seed": 5, "max_tokens": 140}
    expected = OrpheusClient(grpc_url).synthesize(**options)
    got = OrpheusClient(other_server).synthesize(**options)
    assert llm_tokens(other_server, model_set, **options) == llm_tokens(grpc_url, model_set, **options)
    assert len(got.chunks) == len(expected.chunks) - 1 > 5
    assert_same_audio(got.audio, expected.audio[c.SAMPLES_PER_FRAME :])


def test_a_server_speaks_the_voices_it_was_given(other_server):
    """--voices / --default-voice: a request naming no voice gets the default one, any case of a listed
    name is that voice, and a name the checkpoint was not fine-tuned with is refused with the list."""
    client = OrpheusClient(other_server)
    default = client.synthesize("Bonjour.", seed=1, max_tokens=35).audio
    assert np.array_equal(default, client.synthesize("Bonjour.", voice="PIERRE", seed=1, max_tokens=35).audio)
    assert not np.array_equal(default, client.synthesize("Bonjour.", voice="tara", seed=1, max_tokens=35).audio)
    with pytest.raises(SynthesisError, match="unknown voice 'leo'; choose one of: tara, Pierre"):
        client.synthesize("Bonjour.", voice="leo")


def test_a_request_naming_no_max_tokens_gets_what_the_servers_length_leaves(other_server, model_set):
    """Without max_tokens a stream may generate DEFAULT_MAX_TOKENS, or what the server's max_seq_len leaves
    after its prompt where that is less (here 240 positions): served, not refused; naming more is refused
    with the most it may name."""
    prompt = len(build_prompt(load_tokenizer(model_set.llm), "Bonjour.", "pierre",
                              Voices.parse("tara, Pierre", "pierre")))
    room = OTHER_MAX_SEQ_LEN - prompt
    assert room < c.DEFAULT_MAX_TOKENS
    client = OrpheusClient(other_server)
    audio = client.synthesize("Bonjour.", seed=1).audio
    assert np.array_equal(audio, client.synthesize("Bonjour.", seed=1, max_tokens=room).audio)
    assert audio.size == (room // c.TOKENS_PER_FRAME - 1) * c.SAMPLES_PER_FRAME  # no lead-in frame here
    with pytest.raises(SynthesisError, match=f"prompt of {prompt} tokens \\+ max_tokens {room + 1} exceeds the "
                                             f"server's max_seq_len {OTHER_MAX_SEQ_LEN}"):
        client.synthesize("Bonjour.", seed=1, max_tokens=room + 1)
    # `say` naming no --max-tokens: its note on the cut names the server's length as its bound, not only the default.
    import subprocess
    import sys

    say = subprocess.run([sys.executable, "-m", "orpheus_triton.cli", "say", "Bonjour.", "-o", "/dev/null",
                          "--url", other_server], capture_output=True, text=True, timeout=120)
    assert say.returncode == 0, say.stderr
    assert ("cut at its max_tokens (1200 tokens by default, fewer where the server's --max-seq-len leaves fewer after "
            "the prompt)") in say.stdout
    assert "raise --max-tokens (up to what the server's --max-seq-len leaves)" in say.stdout


def test_a_counted_stream_that_fails_keeps_the_audio_it_had(grpc_url):
    """The load generator's record of a stream that fails midway (here: its time is up) holds the chunks
    that came, for the audio a level delivered; only fillers' chunks were kept before."""
    from orpheus_triton.loadgen import Utterance, grpc_stream

    # 1,400 tokens take the ensemble about 6 s here; its first audio may come a second late on a loaded machine
    record = grpc_stream(grpc_url, timeout=2.5)(Utterance("long", TEXT, "tara", 1400), time.perf_counter())
    assert record.error.startswith("TimeoutError") and record.arrivals and len(record.samples) == len(record.arrivals)


def test_a_server_that_cannot_be_used_is_named_with_why(server):
    """`say` and the load generator said 'no ready Triton server ... start one' for a server that was
    running, given its HTTP or metrics port, or still loading its models."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from orpheus_triton.client import require_ready_server
    from orpheus_triton.server import free_port

    nobody = f"localhost:{free_port()}"
    with pytest.raises(ConnectionError, match=f"no ready Triton server at {nobody}: nothing answers there \\(.*\\): "
                                              "no server runs there, or one is still loading its models .*; "
                                              "start one with `orpheus-triton serve`"):
        require_ready_server(nobody)
    for port in (server.ports.http, server.ports.metrics):
        with pytest.raises(ConnectionError, match="something listens there but does not answer Triton's gRPC; is it "
                                                  "the server's HTTP or metrics port?"):
            require_ready_server(f"localhost:{port}")
    grpc_url = f"localhost:{server.ports.grpc}"
    require_ready_server(grpc_url, c.ENSEMBLE_MODEL)
    with pytest.raises(ConnectionError, match=f"the Triton server at {grpc_url} has no ready model 'nope'"):
        require_ready_server(grpc_url, "nope")

    class Loading(service_pb2_grpc.GRPCInferenceServiceServicer):  # a server whose models still load
        def ServerLive(self, request, context):  # noqa: N802 (the service's method names)
            return service_pb2.ServerLiveResponse(live=True)

        def ServerReady(self, request, context):  # noqa: N802
            return service_pb2.ServerReadyResponse(ready=False)

    loading = grpc.server(ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Loading(), loading)
    port = loading.add_insecure_port("localhost:0")
    loading.start()
    try:
        with pytest.raises(ConnectionError, match="the server is up but not ready; its models are still loading"):
            require_ready_server(f"localhost:{port}")
    finally:
        loading.stop(grace=None)


def test_a_caller_of_the_decoder_alone_that_cancels_has_its_queued_windows_dropped(server, grpc_url):
    """A client of `snac_decoder` alone that queued a long stream and cancelled it (hung up) had every
    window decoded for nobody, ahead of the other streams (seconds of their audio late on 2 cores); the
    next request under its id starts a stream afresh (not inside the cancelled one's frames)."""
    from orpheus_triton.frames import audio_token_id

    frame = [audio_token_id(100 + i, i) for i in range(c.TOKENS_PER_FRAME)]
    chunk = np.array([[frame * decode_rounds.MAX_REQUEST_FRAMES]], dtype=np.int32)
    stopped = settled_server_metric(server, "orpheus_decoder_stopped_streams_total")
    answered: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: answered.put(error))
    for _ in range(20):  # 640 windows: 10-15 s of this decoder's time on 2 cores
        client.async_stream_infer(c.DECODER_MODEL, [infer_input(c.DECODER_TOKENS, chunk)],
                                  request_id="hung-up-decoder-caller")
    assert answered.get(timeout=60) is None  # decoding under way
    queued, windows = "orpheus_decoder_queued_windows", "orpheus_decoder_windows_total"
    wait_for_metric(server, queued, lambda value: value > 400)
    queued_at_hang_up, decoded_at_hang_up = server_metrics(server, queued, windows)
    client.stop_stream(cancel_requests=True)
    wait_for_metric(server, queued, lambda value: value == 0, timeout=120)  # dropped, or else decoded
    # Dropped: what was decoded after the hang-up is the round under way as the cancellation came (32 windows
    # here), not the hundreds queued, however fast or slow the machine decodes.
    decoded_after = settled_server_metric(server, windows) - decoded_at_hang_up
    assert decoded_after < queued_at_hang_up / 2, (decoded_after, queued_at_hang_up)
    assert server_metric(server, "orpheus_decoder_stopped_streams_total") == stopped + 1
    end = np.array([[frame + [c.END_OF_SPEECH]]], dtype=np.int32)
    audio = _stream(grpc_url, c.DECODER_MODEL, [infer_input(c.DECODER_TOKENS, end)], c.DECODER_AUDIO,
                    request_id="hung-up-decoder-caller")
    assert [len(chunk) for chunk in audio] == [c.SAMPLES_PER_FRAME]  # one frame, alone: its one window


def test_token_ids_the_decoder_drops_are_counted(server, grpc_url):
    dropped = settled_server_metric(server, "orpheus_decoder_dropped_tokens_total")
    ids = np.array([[[-1, 2**31 - 1, 0, 5, c.AUDIO_TOKEN_BASE + c.CODEBOOK_SIZE * c.TOKENS_PER_FRAME,
                      c.END_OF_SPEECH]]], dtype=np.int32)
    assert _stream(grpc_url, c.DECODER_MODEL, [infer_input(c.DECODER_TOKENS, ids)], c.DECODER_AUDIO) == []
    assert settled_server_metric(server, "orpheus_decoder_dropped_tokens_total") == dropped + 5


def test_preprocessing_refuses_a_bad_request_as_invalid_not_as_an_internal_error(server, grpc_url):
    """Its refusals came back as INTERNAL (HTTP 500): a client or load balancer could not tell a request
    to fix from a server to retry elsewhere."""
    import json
    import urllib.error
    import urllib.request

    from tritonclient.utils import InferenceServerException

    text = np.array([b""], dtype=object)
    with pytest.raises(InferenceServerException, match="orpheus: text is empty") as refused:
        grpcclient.InferenceServerClient(grpc_url).infer(c.PREPROCESSING_MODEL, [infer_input(c.IN_TEXT, text)])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    body = json.dumps({"inputs": [{"name": c.IN_TEXT, "shape": [1], "datatype": "BYTES", "data": [""]}]})
    request = urllib.request.Request(f"http://localhost:{server.ports.http}/v2/models/{c.PREPROCESSING_MODEL}/infer",
                                     data=body.encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as http_refused:
        urllib.request.urlopen(request, timeout=30)
    assert http_refused.value.code == 400 and "text is empty" in http_refused.value.read().decode()


def test_a_killed_servers_shared_memory_regions_are_removed(tmp_path):
    """Triton removes its Python backend stubs' shared memory regions (/dev/shm, 1 MiB and up each) as
    it stops, but not those of stubs killed outright: a server killed after its exit timeout, or a second
    Ctrl-C, held that memory until the next reboot (hundreds of MiB after days of test runs). Each server
    names its regions with a prefix of its own, and ``kill_server_group`` removes what is left."""
    import os
    import shutil
    import signal
    import sys

    from orpheus_triton import server as launcher

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
    import loadgen_bench  # the load generator's stand-in `orpheus`: one Python model, loads in a second

    model = tmp_path / "repository" / c.ENSEMBLE_MODEL
    shutil.copytree(loadgen_bench.STANDIN / "1", model / "1")
    (model / "config.pbtxt").write_text(loadgen_bench.standin_config(1.0))
    ports = launcher.Ports.free()
    with open(tmp_path / "server.log", "w") as log:
        process = launcher.start_server(tmp_path / "repository", ports, log_file=log)
    prefix = launcher._SHM_PREFIXES[process.pid]
    try:
        launcher.wait_until_ready(process, f"localhost:{ports.grpc}", timeout=120)
        assert list(launcher.SHM_FOLDER.glob(f"{prefix}*")), "the stub's regions carry the server's prefix"
        os.killpg(process.pid, signal.SIGKILL)  # no stop: nothing of it removes its regions
        process.wait(timeout=30)
        assert list(launcher.SHM_FOLDER.glob(f"{prefix}*"))
    finally:
        launcher.kill_server_group(process)
    assert not list(launcher.SHM_FOLDER.glob(f"{prefix}*"))

import numpy as np
import pytest

from orpheus_triton.constants import AUDIO_TOKEN_BASE, CODEBOOK_SIZE, END_OF_SPEECH, TOKENS_PER_FRAME, VOCAB_SIZE
from orpheus_triton.frames import StreamFramer, audio_token_id, split_codebooks, token_code, token_slot, window_seed


def audio_stream(codes):
    return [audio_token_id(c, i) for i, c in enumerate(codes)]


def test_token_layout_matches_orpheus():
    assert audio_token_id(0, 0) == 128266
    assert audio_token_id(4095, 6) == 128266 + 4095 + 6 * 4096
    assert audio_token_id(5, 7) == audio_token_id(5, 0)  # slot = position mod 7
    assert AUDIO_TOKEN_BASE + TOKENS_PER_FRAME * CODEBOOK_SIZE <= VOCAB_SIZE
    assert token_slot(audio_token_id(17, 3)) == 3
    assert token_slot(END_OF_SPEECH) is None
    assert token_code(audio_token_id(17, 3), 10) == 17
    assert token_code(audio_token_id(17, 3), 11) is None
    with pytest.raises(ValueError, match="outside"):
        audio_token_id(4096, 0)


def test_split_codebooks_uses_orpheus_slot_order():
    frame = [10, 11, 12, 13, 14, 15, 16]
    c0, c1, c2 = split_codebooks(frame * 2)
    assert c0.tolist() == [10, 10]
    assert c1.tolist() == [11, 14, 11, 14]
    assert c2.tolist() == [12, 13, 15, 16, 12, 13, 15, 16]
    with pytest.raises(ValueError, match="whole number"):
        split_codebooks([1, 2, 3])


def test_framer_emits_a_window_every_frame_after_four():
    """Without the lead-in frame: upstream's windows, the last 4 frames every 7 tokens once 28 are in."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, CODEBOOK_SIZE, 7 * 10).tolist()
    framer = StreamFramer(lead_in=False)
    windows = []
    for token in audio_stream(codes):  # one token at a time, as the LLM streams
        windows += framer.push([token])
    assert [w.frame_index for w in windows] == list(range(7))
    for w in windows:
        start = w.frame_index * 7
        assert list(w.codes) == codes[start : start + 28]
    # Same windows whatever the chunking.
    chunked = StreamFramer(lead_in=False)
    again = chunked.push(audio_stream(codes)[:30]) + chunked.push(audio_stream(codes)[30:])
    assert again == windows


def test_lead_in_window_comes_at_21_tokens_then_upstreams_windows():
    """The lead-in window: frame 0 twice, then frames 1 and 2, emitted with the 21st token; after it
    exactly the windows without the lead-in, so a stream gains frame 0's audio and nothing else changes."""
    from orpheus_triton.constants import LEAD_IN_TOKENS

    codes = np.random.default_rng(1).integers(0, CODEBOOK_SIZE, 7 * 6).tolist()
    framer, emitted_at = StreamFramer(), []
    windows = []
    for position, token in enumerate(audio_stream(codes), start=1):
        new = framer.push([token])
        emitted_at += [position] * len(new)
        windows += new
    assert LEAD_IN_TOKENS == 21 and emitted_at == [21, 28, 35, 42]
    lead_in = windows[0]
    assert lead_in.frame_index == -1 and list(lead_in.codes) == codes[:7] + codes[:21]
    assert windows[1:] == StreamFramer(lead_in=False).push(audio_stream(codes))
    assert lead_in.seed != windows[1].seed  # its own noise: a different window at a different place
    # A stream of 3 frames still has audio; shorter ones have none, with or without the lead-in.
    assert len(StreamFramer().push(audio_stream(codes[:21]))) == 1
    assert StreamFramer().push(audio_stream(codes[:20])) == []


def test_framer_skips_non_audio_and_drops_misaligned_tokens():
    codes = list(range(1, 36))
    tokens = audio_stream(codes)
    # A stray token for slot 3 arrives at position 1; then end-of-speech.
    noisy = tokens[:1] + [audio_token_id(9, 3)] + tokens[1:] + [END_OF_SPEECH]
    framer = StreamFramer()
    windows = framer.push(noisy)
    assert framer.misaligned == 1
    assert windows == StreamFramer().push(tokens)


def test_window_seed_depends_on_codes_and_position_only():
    codes = list(range(28))
    assert window_seed(codes, 0) == window_seed(list(codes), 0)
    assert window_seed(codes, 0) != window_seed(codes, 1)
    assert window_seed(codes, 0) != window_seed([1] + codes[1:], 0)
    assert window_seed(codes, -1) not in (window_seed(codes, 0), window_seed(codes, 1))  # the lead-in window
    assert 0 <= window_seed(codes, 5) < 2**63


def test_frame_chunker_sends_whole_frames_and_flushes_at_the_end():
    from orpheus_triton.serving import FrameChunker

    chunker = FrameChunker(7)
    sent = [chunker.add([t], finished=False) for t in range(13)]
    assert [s for s in sent if s] == [list(range(7))]
    assert chunker.add([13, END_OF_SPEECH], finished=True) == [7, 8, 9, 10, 11, 12, 13, END_OF_SPEECH]
    assert chunker.sent == 15
    assert FrameChunker(1).add([5], finished=False) == [5]
    with pytest.raises(ValueError, match=">= 1"):
        FrameChunker(0)


def test_decoder_state_is_per_stream_and_ends_with_end_of_speech():
    from orpheus_triton.decode_rounds import StreamDecoderState

    state = StreamDecoderState(lead_in=False, lead_out=False)
    a = [audio_token_id(c, i) for i, c in enumerate(range(1, 29))]
    b = [audio_token_id(c, i) for i, c in enumerate(range(100, 128))]
    # Interleaved chunks of two streams never mix.
    out = state.items_for([("a", np.array(a[:14]), 0), ("b", np.array(b[:20]), 1), ("a", np.array(a[14:]), 2),
                           ("b", np.array(b[20:] + [END_OF_SPEECH]), 3)])
    assert [(i.stream_id, len(i.windows), i.reply, i.last) for i in out] == [
        ("a", 0, 0, False), ("b", 0, 1, False), ("a", 1, 2, False), ("b", 1, 3, True)]
    assert out[2].windows[0].codes == tuple(range(1, 29)) and out[3].windows[0].codes == tuple(range(100, 128))
    assert set(state.streams) == {"a"}  # b ended
    # A new stream reusing "b" starts clean.
    again = state.items_for([("b", np.array(b), None)])
    assert again[0].windows[0].codes == tuple(range(100, 128)) and again[0].windows[0].frame_index == 0


def _item(stream_id, windows=1, last=False, arrived=0.0):
    from orpheus_triton.decode_rounds import DecodeItem
    from orpheus_triton.frames import Window

    return DecodeItem(stream_id, [Window((0,) * 28, i) for i in range(windows)], reply=None, last=last,
                      arrived=arrived)


def _names(items):
    return [(i.stream_id, i.arrived) for i in items]


def test_decoder_rounds_take_each_streams_oldest_request_in_order():
    from orpheus_triton.decode_rounds import DecodeScheduler

    scheduler = DecodeScheduler(max_windows=64)
    # Stream a ran ahead (three requests queued), b has two, c one.
    scheduler.add([_item("a", arrived=1), _item("b", arrived=2), _item("a", arrived=3), _item("c", arrived=4),
                   _item("a", arrived=5), _item("b", arrived=6)])
    rounds = [scheduler.next_round(timeout=0)[1] for _ in range(4)]
    assert [_names(r) for r in rounds] == [[("a", 1), ("b", 2), ("c", 4)], [("a", 3), ("b", 6)], [("a", 5)], []]
    assert scheduler.queued_windows() == 0


def test_a_newcomer_joins_the_next_round_not_the_queue_behind_others():
    """The round is composed when the decoder is free: a chunk that arrives meanwhile is in it."""
    from orpheus_triton.decode_rounds import DecodeScheduler

    scheduler = DecodeScheduler(max_windows=64)
    scheduler.add([_item("a", arrived=1), _item("b", arrived=2), _item("a", arrived=3), _item("b", arrived=4)])
    first = scheduler.next_round(timeout=0)[1]
    assert _names(first) == [("a", 1), ("b", 2)]
    scheduler.add([_item("new", arrived=5)])  # while that round decodes
    for item in first:
        scheduler.delivered(item, 0.085)
    assert _names(scheduler.next_round(timeout=0)[1]) == [("new", 5), ("a", 3), ("b", 4)]


def test_a_full_round_takes_the_streams_whose_audio_runs_out_first():
    from orpheus_triton.decode_rounds import DecodeScheduler

    now = [100.0]
    scheduler = DecodeScheduler(max_windows=2, clock=lambda: now[0])
    for stream_id, seconds in (("ahead", 3.0), ("behind", 0.5)):
        scheduler.delivered(_item(stream_id), seconds)  # both started playing at t=100
    scheduler.add([_item("ahead", arrived=1), _item("behind", arrived=2), _item("newcomer", arrived=3),
                   _item("other newcomer", arrived=4)])
    # Newcomers first (nothing to hear yet), by arrival; then whose audio runs out sooner.
    assert _names(scheduler.next_round(timeout=0)[1]) == [("newcomer", 3), ("other newcomer", 4)]
    assert _names(scheduler.next_round(timeout=0)[1]) == [("behind", 2), ("ahead", 1)]
    # A stream's end forgets its clock: a later stream with the same id is a newcomer again (and
    # "behind", with 0.5 s still to play, waits a round for it: see the test below).
    scheduler.delivered(_item("ahead", last=True), 0.5)
    scheduler.add([_item("behind", arrived=7), _item("ahead", arrived=8)])
    assert _names(scheduler.next_round(timeout=0)[1]) == [("ahead", 8)]
    assert _names(scheduler.next_round(timeout=0)[1]) == [("behind", 7)]


def test_a_newcomers_first_window_goes_in_a_round_of_its_own_unless_a_listener_is_about_to_run_out():
    """While a newcomer waits for its first audio, streams with more than the horizon of audio still to
    play wait a round, so the newcomer's round is small; a stream about to run out is never held back."""
    from orpheus_triton.decode_rounds import DecodeScheduler

    now = [100.0]
    scheduler = DecodeScheduler(max_windows=8, clock=lambda: now[0], defer_horizon=0.25)
    for stream_id, seconds in (("comfortable", 2.0), ("nearly out", 0.1)):
        scheduler.delivered(_item(stream_id), seconds)
    scheduler.add([_item("comfortable", arrived=1), _item("nearly out", arrived=2), _item("newcomer", arrived=3)])
    assert _names(scheduler.next_round(timeout=0)[1]) == [("newcomer", 3), ("nearly out", 2)]
    assert _names(scheduler.next_round(timeout=0)[1]) == [("comfortable", 1)]
    # Without a newcomer waiting, every stream's next window goes in the round, as without the horizon.
    scheduler.add([_item("comfortable", arrived=4), _item("nearly out", arrived=5)])
    assert _names(scheduler.next_round(timeout=0)[1]) == [("nearly out", 5), ("comfortable", 4)]
    # A newcomer whose first requests completed no window yet (its first window needs 21 tokens) is
    # waiting for first audio all the same once one of its queued requests holds a window.
    scheduler.add([_item("comfortable", arrived=8), _item("late newcomer", arrived=9, windows=0),
                   _item("late newcomer", arrived=10)])
    answer, heads = scheduler.next_round(timeout=0)
    assert _names(answer) == [("late newcomer", 9)] and _names(heads) == [("late newcomer", 10)]
    plain = DecodeScheduler(max_windows=8, clock=lambda: now[0], defer_horizon=0)
    plain.delivered(_item("comfortable"), 2.0)
    plain.add([_item("comfortable", arrived=6), _item("newcomer", arrived=7)])
    assert _names(plain.next_round(timeout=0)[1]) == [("newcomer", 7), ("comfortable", 6)]


def test_deliveries_tell_first_audio_and_the_gaps_a_listener_hears():
    """The server's estimate of what a listener hears, by loadgen.playback's rule: playback from the
    first audio sent; a chunk sent after the audio before it has played is a gap, and playback resumes
    from it."""
    from orpheus_triton.decode_rounds import DecodeScheduler, Delivery

    now = [10.0]
    scheduler = DecodeScheduler(max_windows=8, clock=lambda: now[0])
    assert scheduler.delivered(_item("a"), 0.0) == Delivery()  # no audio yet (a request without a window)
    assert scheduler.delivered(_item("a"), 0.1) == Delivery(first_audio=True)  # plays 10.0-10.1
    now[0] = 10.05
    assert scheduler.delivered(_item("a"), 0.1) == Delivery()  # in time: plays to 10.2
    now[0] = 10.2
    assert scheduler.delivered(_item("a"), 0.1) == Delivery()  # just in time
    now[0] = 10.45
    late = scheduler.delivered(_item("a"), 0.1)  # the listener waited 10.3-10.45
    assert not late.first_audio and late.stall == pytest.approx(0.15)
    now[0] = 10.5
    assert scheduler.delivered(_item("a"), 0.1) == Delivery()  # resumed at 10.45: plays to 10.65
    now[0] = 10.7
    assert scheduler.delivered(_item("a", last=True), 0.1).stall == pytest.approx(0.05)
    assert scheduler.delivered(_item("a"), 0.1) == Delivery(first_audio=True)  # a new stream of that id


def test_requests_without_windows_pass_through_in_stream_order():
    from orpheus_triton.decode_rounds import DecodeScheduler

    scheduler = DecodeScheduler(max_windows=1)
    scheduler.add([_item("a", 0, arrived=1), _item("a", arrived=2), _item("a", 0, arrived=3),
                   _item("b", 0, arrived=4), _item("c", 2, arrived=5)])
    answer, decode = scheduler.next_round(timeout=0)
    # a's empty head and b's are answered now; a's second empty one waits behind a's window.
    # c's two windows exceed max_windows but a round always takes its most urgent request.
    assert _names(answer) == [("a", 1), ("b", 4)] and _names(decode) == [("a", 2)]
    answer, decode = scheduler.next_round(timeout=0)
    assert _names(answer) == [("a", 3)] and _names(decode) == [("c", 5)]


def test_decoder_scheduler_waits_for_work_and_closes():
    import threading

    from orpheus_triton.decode_rounds import DecodeScheduler

    scheduler = DecodeScheduler(max_windows=8)
    assert scheduler.next_round(timeout=0.01) == ([], [])
    got = []
    worker = threading.Thread(target=lambda: got.append(scheduler.next_round()))
    worker.start()
    scheduler.add([_item("a", arrived=1)])
    worker.join(5)
    assert _names(got[0][1]) == [("a", 1)]
    scheduler.close()
    assert scheduler.next_round() is None
    with pytest.raises(ValueError, match="max_windows must be >= 1"):
        DecodeScheduler(max_windows=0)


def test_cancellation_watch_asks_in_passes_the_engine_asks_for_and_never_after_forget():
    from orpheus_triton.triton_calls import CancellationWatch

    passes, asked = [], []
    cancelled = {"a": False}

    def asker(key):
        def is_cancelled():
            asked.append(key)
            if key == "gone":
                raise RuntimeError("request released")
            return cancelled.get(key, False)
        return is_cancelled

    watch = CancellationWatch(run=passes.append)  # passes run when the test says (the response thread)
    check_a, check_b, check_gone = (watch.watch(key, asker(key)) for key in ("a", "b", "gone"))
    assert not passes  # no step yet: nothing to ask
    assert not check_a() and not check_b()  # one step's checks ask for one pass
    assert len(passes) == 1 and not asked
    passes.pop()()
    assert sorted(asked) == ["a", "b", "gone"] and check_gone()  # cannot be asked: counts as cancelled
    cancelled["a"] = True
    asked.clear()
    check_a()
    watch.forget("b")  # b's final response may now be queued: b is not asked again
    passes.pop()()
    assert asked == ["a"] and check_a() and watch._watched == {}
    # Without a response thread the engine's check asks Triton itself.
    direct = CancellationWatch(run=None)
    assert direct.watch("c", asker("c"))() is False and asked[-1] == "c"


def test_passes_on_their_thread_hold_up_no_response_and_a_final_one_waits_out_an_ask_of_its_stream():
    """Threaded, a pass asks Triton on a thread of its own: another stream's response goes out while an ask
    is in flight, and a stream's final response only once Triton is no longer being asked about it
    (asking after the final response crashed tritonserver 2.51)."""
    import threading
    import time

    from orpheus_triton.triton_calls import CancellationWatch, ResponseQueue

    asking, release, sent = threading.Event(), threading.Event(), []

    def slow_ask():  # a round trip that takes as long as the test says
        asking.set()
        release.wait(5)
        sent.append("asked a")
        return False

    watch = CancellationWatch(threaded=True)
    responses = ResponseQueue(on_error=lambda key, error: None, before_last=watch.settle)
    check = watch.watch("a", slow_ask)
    assert not check() and asking.wait(5)  # a pass is asking about a
    delivered = threading.Event()
    responses.put("b", lambda: (sent.append("b"), delivered.set()))
    assert delivered.wait(5) and sent == ["b"]  # not behind the pass
    watch.forget("a")
    responses.put("a", lambda: sent.append("a final"), last=True)
    time.sleep(0.1)
    assert sent == ["b"]  # waits for the ask in flight
    release.set()
    responses.close()
    watch.close()
    assert sent == ["b", "asked a", "a final"]


def test_cancellation_passes_are_spaced_by_min_interval():
    """The relay's streams each check on every engine response; passes still start only so often."""
    import time

    from orpheus_triton.triton_calls import CancellationWatch

    passes = []
    watch = CancellationWatch(run=passes.append, min_interval=0.2)
    check = watch.watch("a", lambda: False)
    check()
    passes.pop()()
    check()  # too soon after the last pass started
    assert not passes
    time.sleep(0.25)
    check()
    assert len(passes) == 1


def test_cancellation_passes_are_a_model_parameter_rendered_from_the_settings(tmp_path):
    from orpheus_triton.constants import CANCEL_CHECK_SECONDS
    from orpheus_triton.repository import RepositorySettings, render
    from orpheus_triton.serving import llm_stream_options

    assert llm_stream_options({})["cancel_check_seconds"] == CANCEL_CHECK_SECONDS
    assert llm_stream_options({"cancel_check_seconds": "0"})["cancel_check_seconds"] == 0.0
    with pytest.raises(ValueError, match="cancel_check_seconds must be >= 0, got -1.0"):
        llm_stream_options({"cancel_check_seconds": "-1"})
    repository = render(RepositorySettings(llm_dir="/m/llm", snac_dir="/m/snac", llm_cancel_check_seconds=0.25),
                        tmp_path / "repository")
    assert 'key: "cancel_check_seconds", value: { string_value: "0.25" }' in (
        repository / "llm" / "config.pbtxt").read_text()


def test_both_adapters_response_threads_are_rendered_from_the_settings(tmp_path):
    from orpheus_triton.repository import RepositorySettings, render

    def parameter(settings, model):
        text = (render(settings, tmp_path / model / "repository") / model / "config.pbtxt").read_text()
        return text.split('key: "response_thread", value: { string_value: "')[1].split('"')[0]

    default = RepositorySettings(llm_dir="/m/llm", snac_dir="/m/snac")
    assert parameter(default, "llm") == parameter(default, "snac_decoder") == "auto"
    inline = RepositorySettings(llm_dir="/m/llm", snac_dir="/m/snac", decoder_response_thread="false")
    assert parameter(inline, "snac_decoder") == "false" and parameter(inline, "llm") == "auto"


def test_response_thread_is_on_for_gpus_by_default():
    from orpheus_triton.triton_calls import response_thread

    assert response_thread({}, "cuda") and not response_thread({}, "cpu")
    assert response_thread({"response_thread": "true"}, "cpu")
    assert not response_thread({"response_thread": "false"}, "cuda")
    with pytest.raises(ValueError, match="response_thread must be auto, true or false"):
        response_thread({"response_thread": "yes"}, "cpu")


def test_response_queue_sends_in_order_and_drops_a_failed_streams_rest():
    from orpheus_triton.triton_calls import ResponseQueue

    sent, errors = [], []

    def send(key, n):
        def run():
            if n == "boom":
                raise RuntimeError("client went away")
            sent.append((key, n))
        return run

    for threaded in (True, False):  # on its own thread, or right where it is put: the same outcome
        sent.clear()
        errors.clear()
        queue = ResponseQueue(on_error=lambda key, error: errors.append((key, str(error))), threaded=threaded)
        queue.put("a", send("a", 1))
        queue.put("b", send("b", 1))
        queue.put("a", send("a", "boom"))
        queue.put("a", send("a", 2))  # dropped: stream a failed
        queue.put("b", send("b", 2), last=True)
        queue.put("a", send("a", 3), last=True)  # dropped, and ends a's failed state
        queue.put("a", send("a", 1))  # a new stream under the same id
        queue.close()
        assert sent == [("a", 1), ("b", 1), ("b", 2), ("a", 1)]
        assert errors == [("a", "client went away")]


def test_a_producer_waits_for_room_in_the_response_queue():
    """Threaded, wait_for_room holds its caller while more than ``most`` calls are queued; unthreaded it
    never waits (nothing is ever queued)."""
    import threading

    from orpheus_triton.triton_calls import ResponseQueue

    gate, sent = threading.Event(), []
    queue = ResponseQueue(on_error=lambda key, error: None, threaded=True)
    queue.put(None, gate.wait)  # the thread is busy until the gate opens
    for n in range(4):
        queue.put("s", lambda n=n: sent.append(n))
    waited = threading.Event()
    producer = threading.Thread(target=lambda: (queue.wait_for_room(1), waited.set()))
    producer.start()
    assert not waited.wait(0.2)  # four queued behind the busy send: more than one
    gate.set()
    assert waited.wait(5) and len(sent) >= 3
    producer.join()
    queue.close()
    assert sent == [0, 1, 2, 3]
    ResponseQueue(on_error=lambda key, error: None, threaded=False).wait_for_room(0)


def test_idle_stream_state_goes_after_idle_seconds_in_periodic_sweeps():
    """A stream whose end never reaches the decoder (a vanished client; TensorRT-LLM, which sends no
    end_id) loses its state after idle_seconds; idle states are looked for once a sweep period."""
    from orpheus_triton.decode_rounds import DecodeScheduler, StreamDecoderState
    from orpheus_triton.serving import STALE_SWEEP_SECONDS

    now = [100.0]
    state = StreamDecoderState(idle_seconds=30, clock=lambda: now[0])
    scheduler = DecodeScheduler(max_windows=4, idle_seconds=30, clock=lambda: now[0])
    tokens = np.array([audio_token_id(c, i) for i, c in enumerate(range(28))])
    for stream_id in ("gone", "live"):
        scheduler.delivered(_item(stream_id), 0.085)
        state.items_for([(stream_id, tokens[:7], None)])
    now[0] += 20
    state.items_for([("live", tokens[7:14], None)])
    scheduler.delivered(_item("live"), 0.085)
    assert set(state.streams) == {"gone", "live"} and set(scheduler._playback) == {"gone", "live"}
    now[0] += 15  # "gone" idle 35 s, "live" 15 s
    state.items_for([("live", tokens[14:21], None)])
    scheduler.delivered(_item("live"), 0.085)
    assert set(state.streams) == {"live"} and set(scheduler._playback) == {"live"}
    # Between sweeps nothing is scanned: an idle state waits for the next one.
    now[0] = 0.0
    state = StreamDecoderState(idle_seconds=0.1, clock=lambda: now[0])
    state.items_for([("idle", tokens[:7], None)])
    now[0] = STALE_SWEEP_SECONDS / 2
    state.items_for([("other", tokens[:7], None)])
    assert set(state.streams) == {"idle", "other"}
    now[0] = STALE_SWEEP_SECONDS
    state.items_for([("other", tokens[7:14], None)])
    assert set(state.streams) == {"other"}


def test_decoder_state_starts_streams_with_the_lead_in_frame_unless_told_not_to():
    from orpheus_triton.decode_rounds import StreamDecoderState

    tokens = np.array([audio_token_id(c, i) for i, c in enumerate(range(1, 22))])
    (item,) = StreamDecoderState().items_for([("a", tokens, None)])
    assert [w.frame_index for w in item.windows] == [-1]
    (item,) = StreamDecoderState(lead_in=False).items_for([("a", tokens, None)])
    assert item.windows == []
    # ... and ends them with the lead-out windows, in the request that carries end-of-speech
    state = StreamDecoderState()
    more = np.array([audio_token_id(c, i) for i, c in enumerate(range(22, 36), start=21)] + [END_OF_SPEECH])
    first, last = state.items_for([("a", tokens, None), ("a", more, None)])
    assert [w.frame_index for w in first.windows] == [-1]
    assert last.last and [w.frame_index for w in last.windows] == [0, 1, 2, 3]  # frames 1, 2, then 3, 4
    assert state.streams == {}


def _frames_of(codes, *indices):
    return [c for i in indices for c in codes[7 * i : 7 * i + 7]]


def test_lead_out_windows_give_the_last_two_frames_at_the_end():
    """finish(): frame f from frames f-1..f+2 as always, the frames past the end repeating the last one;
    with the lead-in frame a stream then plays each of its whole frames exactly once."""
    codes = np.random.default_rng(2).integers(0, CODEBOOK_SIZE, 7 * 6 + 3).tolist()  # 6 frames + 3 codes
    framer = StreamFramer()
    windows = framer.push(audio_stream(codes))
    lead_out = framer.finish()
    assert [w.frame_index for w in windows] == [-1, 0, 1, 2]  # frames 0 (lead-in), 1, 2, 3
    assert [w.frame_index for w in lead_out] == [3, 4]  # frames 4 and 5; the partial 7th frame is dropped
    assert list(lead_out[0].codes) == _frames_of(codes, 3, 4, 5, 5)
    assert list(lead_out[1].codes) == _frames_of(codes, 4, 5, 5, 5)
    assert len(windows + lead_out) == 6  # every whole frame once
    assert StreamFramer(lead_out=False).finish() == [] and StreamFramer().finish() == []


@pytest.mark.parametrize(("frames", "lead_in", "expected"), [
    (3, True, [(1, 0, 1, 2, 2), (2, 1, 2, 2, 2)]),  # frame 0 came from the lead-in window
    (3, False, [(1, 0, 1, 2, 2), (2, 1, 2, 2, 2)]),  # frame 0 is not played without the lead-in
    (2, True, [(0, 0, 0, 1, 1), (1, 0, 1, 1, 1)]),
    (2, False, [(1, 0, 1, 1, 1)]),
    (1, True, [(0, 0, 0, 0, 0)]),
    (1, False, []),
])
def test_lead_out_of_short_streams(frames, lead_in, expected):
    """(frame given, then the four frames of its window) for streams too short for any regular window."""
    codes = np.random.default_rng(3).integers(0, CODEBOOK_SIZE, 7 * frames).tolist()
    framer = StreamFramer(lead_in=lead_in)
    pushed = framer.push(audio_stream(codes))
    assert len(pushed) == (1 if lead_in and frames == 3 else 0)
    got = framer.finish()
    assert [w.frame_index + 1 for w in got] == [f for f, *_ in expected]
    assert [list(w.codes) for w in got] == [_frames_of(codes, *window) for _, *window in expected]

"""The SNAC decoder stage's per-stream state and rounds (orpheus_triton.decode_rounds)."""

import numpy as np
import pytest

from orpheus_triton.constants import END_OF_SPEECH
from orpheus_triton.frames import audio_token_id


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


def test_a_streams_finish_reason_goes_with_its_last_item_only():
    """The llm stage says why a stream ended with its last tokens; the decoder hands it on with the stream's
    last answer. One on a chunk without the end (a client of the decoder alone) is not a stream's end."""
    from orpheus_triton.decode_rounds import StreamDecoderState

    state = StreamDecoderState()
    tokens = [audio_token_id(c, i) for i, c in enumerate(range(1, 15))]
    first, last = state.items_for([("a", np.array(tokens[:7]), None, 1.0, "max_tokens"),
                                   ("a", np.array(tokens[7:] + [END_OF_SPEECH]), None, 1.0, "max_tokens")])
    assert (first.finish_reason, last.finish_reason, last.last) == (None, "max_tokens", True)
    (untold,) = state.items_for([("b", np.array(tokens + [END_OF_SPEECH]), None, 1.0)])
    assert untold.last and untold.finish_reason is None


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


@pytest.mark.parametrize("later", [601, 0.5], ids=["after-idle-seconds", "at-once"])
def test_a_new_stream_with_a_vanished_streams_id_starts_afresh_though_no_sweep_ran(later):
    """On a quiet server no sweep runs: a vanished stream's state outlives idle_seconds. A new stream
    with its id (the llm stage allows it after as long) must not inherit its frames, its start time
    or its listener's playback clock. Nor when it comes at once: a client that cancelled its ensemble
    stream leaves the llm stage to finish it (tritonserver 2.51 does not pass the cancellation on),
    which frees the id, but the end never reaches the decoder; the new request's start tells."""
    from orpheus_triton.decode_rounds import DecodeScheduler, Delivery, StreamDecoderState
    from orpheus_triton.frames import StreamFramer

    now = [1000.0]
    state = StreamDecoderState(idle_seconds=600, clock=lambda: now[0])
    scheduler = DecodeScheduler(max_windows=8, idle_seconds=600, clock=lambda: now[0])
    old = [audio_token_id(code, i) for i, code in enumerate(range(1, 36))]  # 5 frames, then it vanished
    for item in state.items_for([("x", np.array(old), None, 111.0)]):
        scheduler.add([item])
        scheduler.delivered(item, 0.085 * len(item.windows))
    scheduler.next_round()
    now[0] += later
    new = [audio_token_id(code, i) for i, code in enumerate(range(500, 521))]  # 3 frames: the lead-in window
    (item,) = state.items_for([("x", np.array(new), None, 222.0)])
    assert [w.codes for w in item.windows] == [w.codes for w in StreamFramer().push(new)]
    assert item.request_start == 222.0
    scheduler.add([item])
    assert scheduler._urgency("x")[0] == 0  # ranked as the newcomer it is
    assert scheduler.delivered(item, 0.085) == Delivery(first_audio=True)  # not a 600 s stall


def test_the_llm_holds_a_vanished_streams_id_longer_than_the_decoder_keeps_its_state():
    from orpheus_triton.serving import ID_HOLD_MARGIN_SECONDS, llm_stream_options

    assert llm_stream_options({"stream_idle_seconds": "30"})["hold_seconds"] == 30 + ID_HOLD_MARGIN_SECONDS > 30


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


def test_a_dropped_stream_is_answered_without_decoding_up_to_its_end():
    """``drop`` (the llm stage's `stop` passed on): the stream's queued requests, and those still to come up
    to its end, go out without audio, in order; other streams, and a new stream with the id, are decoded."""
    from orpheus_triton.decode_rounds import DecodeScheduler

    now = [0.0]
    scheduler = DecodeScheduler(max_windows=64, idle_seconds=60, clock=lambda: now[0])
    assert not scheduler.drop("a", still_open=False)  # nothing of it under way: nothing to drop
    scheduler.add([_item("a", arrived=1), _item("a", 2, arrived=2), _item("b", arrived=3)])
    answer, decode = scheduler.next_round(timeout=0)
    assert answer == [] and _names(decode) == [("a", 1), ("b", 3)]
    # Dropped while its first request is being decoded (no audio delivered yet): that one is decoded.
    assert scheduler.drop("a", still_open=True)
    assert not scheduler.drop("a", still_open=True)  # a stop sent again ends nothing more (counted once)
    for item in decode:
        scheduler.delivered(item, 0.085)
    scheduler.add([_item("a", 3, arrived=4), _item("b", arrived=5)])
    answer, decode = scheduler.next_round(timeout=0)
    assert _names(answer) == [("a", 2), ("a", 4)] and all(not item.windows for item in answer)
    assert _names(decode) == [("b", 5)]
    scheduler.add([_item("a", arrived=6, last=True)])  # its end: then the id is free again
    answer, decode = scheduler.next_round(timeout=0)
    assert _names(answer) == [("a", 6)] and decode == []
    scheduler.add([_item("a", arrived=7)])
    assert _names(scheduler.next_round(timeout=0)[1]) == [("a", 7)]


def test_a_stream_whose_audio_a_stop_cut_short_ends_saying_stopped():
    """The llm stage runs ahead of the decoder: a stop often comes once generation has ended (max_tokens or
    end of speech), its audio still queued. The stream's end then says it was stopped, not max_tokens (a
    client told "raise max_tokens" for audio its own stop cut); a stop that cut nothing leaves the reason."""
    from orpheus_triton.decode_rounds import DecodeScheduler

    def ended(stream_id, windows, arrived, reason="max_tokens"):
        item = _item(stream_id, windows, last=True, arrived=arrived)
        item.finish_reason = reason
        return item

    scheduler = DecodeScheduler(max_windows=64, idle_seconds=60, clock=lambda: 0.0)
    # Generated whole, its last two requests still queued: the stop cuts their audio.
    cut, untold = ended("cut", 3, arrived=2), ended("untold", 1, arrived=4, reason=None)
    scheduler.add([_item("cut", arrived=1), cut, _item("untold", arrived=3), untold])
    assert scheduler.drop("cut", still_open=False) and scheduler.drop("untold", still_open=False)
    assert cut.finish_reason == "stopped" and untold.finish_reason is None  # none asked for: none made up
    # Its whole audio decoded already, only its windowless end queued: nothing was cut.
    heard = ended("heard", 0, arrived=5)
    scheduler.add([heard])
    assert not scheduler.drop("heard", still_open=False) and heard.finish_reason == "max_tokens"
    # Stopped while its tokens still come: its end, when it arrives, says stopped.
    scheduler.add([_item("open", arrived=6)])
    scheduler.drop("open", still_open=True)
    later = ended("open", 2, arrived=7, reason="end_of_speech")
    scheduler.add([later])
    assert later.finish_reason == "stopped" and later.windows == []


def test_a_dropped_stream_whose_end_never_comes_is_forgotten():
    """A dropped stream's mark goes with a new request start under its id, or after idle_seconds; a
    stream whose end had arrived is not marked at all (a later stream with the id, even without a
    request start, is decoded)."""
    from orpheus_triton.decode_rounds import DecodeScheduler

    now = [0.0]
    scheduler = DecodeScheduler(max_windows=64, idle_seconds=60, clock=lambda: now[0])
    first = _item("a", arrived=1)
    first.request_start = 100.0
    scheduler.add([first])
    assert scheduler.drop("a", still_open=True, request_start=100.0)
    assert scheduler.next_round(timeout=0) == ([first], [])
    newer = _item("a", arrived=2)
    newer.request_start = 200.0  # another request under the id: decoded
    scheduler.add([newer])
    assert scheduler.next_round(timeout=0)[1] == [newer]
    assert scheduler.drop("c", still_open=True)
    now[0] = 61.0
    scheduler.add([_item("c", arrived=4)])  # an idle mark is stale: a new stream
    assert _names(scheduler.next_round(timeout=0)[1]) == [("c", 4)]
    # Its end taken into a round already when the stop comes: nothing marked.
    scheduler.add([_item("d", arrived=5, last=True)])
    scheduler.next_round(timeout=0)
    assert not scheduler.drop("d", still_open=False)
    scheduler.add([_item("d", arrived=7)])
    assert _names(scheduler.next_round(timeout=0)[1]) == [("d", 7)]


def test_the_decoder_state_says_which_streams_are_open():
    from orpheus_triton.decode_rounds import StreamDecoderState

    now = [0.0]
    state = StreamDecoderState(idle_seconds=60, clock=lambda: now[0])
    tokens = [audio_token_id(c, i) for i, c in enumerate(range(1, 15))]
    state.items_for([("a", np.array(tokens), None, 123.0), ("b", np.array(tokens + [END_OF_SPEECH]), None)])
    assert state.open_stream("a") == (True, 123.0) and state.open_stream("b") == (False, None)
    now[0] = 61.0
    assert state.open_stream("a") == (False, None)  # vanished


def test_state_a_caller_of_the_decoder_alone_left_under_an_id_is_not_an_ensemble_streams():
    """A request without a start (a caller of snac_decoder alone) left frames, or a stop, under an id; an
    ensemble stream with that id (its requests carry preprocessing's start) took them over: other audio,
    or none at all after such a stop. And the other way round."""
    from orpheus_triton.decode_rounds import DecodeScheduler, StreamDecoderState
    from orpheus_triton.frames import StreamFramer

    tokens = [audio_token_id(code, i) for i, code in enumerate(range(1, 22))]
    for first, then in ((None, 300.0), (300.0, None)):
        state = StreamDecoderState()
        state.items_for([("x", np.array(tokens[:10]), None, first)])  # 10 tokens: a frame and 3 more
        (item,) = state.items_for([("x", np.array(tokens), None, then)])
        assert [w.codes for w in item.windows] == [w.codes for w in StreamFramer().push(tokens)]
        assert item.request_start == then
    scheduler = DecodeScheduler(max_windows=8, idle_seconds=600, clock=lambda: 0.0)
    assert scheduler.drop("x", still_open=True, request_start=None)  # a stop sent to the decoder alone
    (item,) = StreamDecoderState().items_for([("x", np.array(tokens), None, 300.0)])
    scheduler.add([item])
    assert scheduler.next_round(timeout=0)[1] == [item] and item.windows  # decoded, not dropped


def test_only_requests_of_callers_of_the_decoder_alone_are_asked_whether_they_were_cancelled():
    """The ensemble's requests (with a start) are never cancelled by tritonserver 2.51: asking each would
    cost a round trip a round for nothing. A request that cannot be asked is decoded."""
    from orpheus_triton.decode_rounds import split_cancelled

    direct, gone, broken, ensemble = (_item(name, arrived=i) for i, name in enumerate("abcd"))
    ensemble.request_start = 5.0
    asked = []

    def is_cancelled(item):
        asked.append(item.stream_id)
        if item is broken:
            raise RuntimeError("the request is gone")
        return item is gone or item is ensemble

    keep, cancelled = split_cancelled([direct, gone, broken, ensemble], is_cancelled)
    assert keep == [direct, broken, ensemble] and cancelled == [gone] and asked == ["a", "b", "c"]


def test_each_request_counts_its_token_ids_that_gave_no_audio():
    """Token ids that are not audio (end-of-speech aside) or sit in the wrong frame slot were dropped
    without a trace."""
    from orpheus_triton.decode_rounds import StreamDecoderState

    frame = [audio_token_id(100 + i, i) for i in range(7)]
    state = StreamDecoderState()
    clean, noisy, rotated, end = state.items_for([
        ("a", np.array(frame), None), ("a", np.array([-1, 2**31 - 1, 0, 5, 156_939, *frame]), None),
        ("a", np.array(frame[1:] + frame[:1]), None), ("a", np.array([END_OF_SPEECH]), None)])
    assert [item.dropped_tokens for item in (clean, noisy, rotated, end)] == [0, 5, 6, 0]


def test_a_cancelled_streams_state_is_forgotten_by_the_thread_that_frames_unless_it_went_on():
    """``forget`` comes from the decoder's worker thread while ``items_for`` runs on Triton's: it used to
    change the dict under the framing (KeyError, a sweep's 'dictionary changed size'), failing a whole batch."""
    from orpheus_triton.decode_rounds import StreamDecoderState

    now = [0.0]
    state = StreamDecoderState(clock=lambda: now[0])
    tokens = [audio_token_id(code, i) for i, code in enumerate(range(1, 15))]
    state.items_for([("gone", np.array(tokens[:10]), None), ("on", np.array(tokens[:10]), None)])
    now[0] = 1.0
    state.forget("gone")
    state.forget("on")
    assert set(state.streams) == {"gone", "on"}  # not touched from the other thread
    now[0] = 2.0
    (on,) = state.items_for([("on", np.array(tokens[10:]), None)])  # the forgets are done first
    assert "gone" not in state.streams and on.windows == []  # "on" starts afresh: 4 tokens, no frame yet
    # Tokens framed after a forget was asked for (a call already under way on the other thread): kept.
    state.forget("on")
    state.streams["on"].last_seen = 3.0
    state.items_for([])
    assert "on" in state.streams

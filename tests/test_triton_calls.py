"""Calls to Triton off the stages' loops: the response queue and the cancellation passes
(orpheus_triton.triton_calls), and their model parameters."""

import pytest


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

    # Passes run when the test says (the response thread); duty 1: no rest after a pass.
    watch = CancellationWatch(run=passes.append, duty=1.0)
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


def test_a_pass_never_asks_a_request_whose_id_a_new_stream_took_meanwhile():
    """During a pass (a round trip per stream), stream a may end, its final response go out and the
    client start a new stream with the id a. The pass must not ask the old request (after its final
    response: it crashed tritonserver 2.51), nor drop the new stream's watch."""
    from orpheus_triton.triton_calls import CancellationWatch

    passes, asked = [], []
    watch = CancellationWatch(run=passes.append, duty=1.0)
    reused = {}

    def ask_x():  # meanwhile (the first time), on the engine's and the response thread's side:
        if reused:
            return False
        watch.forget("a")  # a's final emit
        watch.settle("a")  # then its final response is sent
        reused["check"] = watch.watch("a", lambda: asked.append("new a") or True)  # the client reuses the id
        return False

    check_x = watch.watch("x", ask_x)
    watch.watch("a", lambda: asked.append("old a") or True)
    check_x()
    passes.pop()()
    assert asked == [] and "a" in watch._watched
    check_x()
    passes.pop()()
    assert asked == ["new a"] and reused["check"]()  # the new stream's cancellation is seen


def test_cancellation_passes_take_at_most_their_duty_of_the_time(monkeypatch):
    """After a pass of d seconds the next waits d (1 - duty) / duty: with few streams (short passes) a pass at
    every step, with many as often as the share allows, so that the questions never crowd out the responses.
    Timed on a clock the test moves (each ask takes what it says, a step 1 ms): on the real clock a pass
    held up by a busy machine counts as a long one, and its rest nine times over."""
    import types

    from orpheus_triton import triton_calls
    from orpheus_triton.triton_calls import CancellationWatch

    with pytest.raises(ValueError, match="duty must be in"):
        CancellationWatch(duty=0.0)
    now = [0.0]
    monkeypatch.setattr(triton_calls, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    step = 0.001
    durations = [0.005, 0.005, 0.005, 0.020, 0.001, 0.005]  # what each pass's ask takes
    starts = []

    def slow_ask():
        starts.append(now[0])
        now[0] += durations[min(len(starts), len(durations)) - 1]
        return False

    watch = CancellationWatch(run=lambda call: call(), duty=0.1)  # each pass runs at once, in the check
    check = watch.watch("a", slow_ask)
    checks = 0
    while now[0] < 0.4:
        check()
        checks += 1
        now[0] += step  # the engine's next step
    # Each pass, then ten times its length from its start to the next one's (nine of them at rest), to the
    # step: 0, 50, 100, 150 ms, then a 20 ms pass rests 180 ms (350), a 1 ms one 9 ms (360).
    assert len(starts) == len(durations) and checks > 300
    for d, a, b in zip(durations, starts, starts[1:], strict=False):
        assert d / 0.1 - 1e-9 <= b - a <= d / 0.1 + step + 1e-9, (d, b - a)
    quick = CancellationWatch(run=lambda call: call(), duty=0.1)
    fast_asks = []
    quick_check = quick.watch("b", lambda: fast_asks.append(now[0]) or False)
    for _ in range(20):  # a pass that takes no time rests none: a pass at every step
        quick_check()
        now[0] += step
    assert len(fast_asks) == 20


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


def test_response_threads_are_one_on_gpus_by_default_and_may_be_several():
    from orpheus_triton.triton_calls import response_threads

    assert response_threads({}, "cuda") == 1 and response_threads({}, "cpu") == 0
    # the SNAC decoder's auto: two on a GPU (constants.DECODER_GPU_RESPONSE_THREADS), still none on a CPU
    assert response_threads({}, "cuda", on_gpu=2) == 2 and response_threads({}, "cpu", on_gpu=2) == 0
    assert response_threads({"response_thread": "true"}, "cuda", on_gpu=2) == 1
    assert response_threads({"response_thread": "true"}, "cpu") == 1
    assert response_threads({"response_thread": "false"}, "cuda") == 0
    assert response_threads({"response_thread": "4"}, "cuda") == 4
    with pytest.raises(ValueError, match="response_thread must be auto, true, false or a number of threads up to 16"):
        response_threads({"response_thread": "yes"}, "cpu")
    with pytest.raises(ValueError, match="got '17'"):
        response_threads({"response_thread": "17"}, "cuda")
    with pytest.raises(ValueError, match="got '-2'"):
        response_threads({"response_thread": "-2"}, "cpu")


def test_response_lanes_keep_each_streams_calls_in_order_on_one_thread():
    import threading

    from orpheus_triton.triton_calls import ResponseLanes, ResponseQueue, response_queue

    sent, errors, settled = [], [], []
    lock = threading.Lock()

    def send(key, n):
        def run():
            if n == "boom":
                raise RuntimeError("client went away")
            with lock:
                sent.append((key, n, threading.current_thread().name))
        return run

    lanes = response_queue(lambda key, error: errors.append((key, str(error))), 3, before_last=settled.append)
    assert isinstance(lanes, ResponseLanes)
    keys = [f"call-{i}" for i in range(12)]
    for n in range(5):
        for key in keys:
            lanes.put(key, send(key, "boom" if (key, n) == ("call-3", 2) else n), last=n == 4)
    lanes.close()
    for key in keys:
        mine = [(n, thread) for k, n, thread in sent if k == key]
        assert [n for n, _ in mine] == ([0, 1] if key == "call-3" else [0, 1, 2, 3, 4])  # in order; the rest dropped
        assert {thread for _, thread in mine} == {f"triton-responses-{lanes.lane_of(key)}"}  # one lane a stream
    assert {thread for _, _, thread in sent} == {f"triton-responses-{i}" for i in range(3)}  # every lane used
    assert errors == [("call-3", "client went away")] and sorted(settled) == sorted(keys)
    assert isinstance(response_queue(lambda key, error: None, 1), ResponseQueue)
    with pytest.raises(ValueError, match="response threads must be >= 0"):
        response_queue(lambda key, error: None, -1)


def test_a_producer_waits_for_room_in_every_lane():
    import threading

    from orpheus_triton.triton_calls import ResponseLanes

    lanes = ResponseLanes(on_error=lambda key, error: None, lanes=2)
    gate = threading.Event()
    lanes.put(None, gate.wait)  # lane 0 is busy until the gate opens
    busy_key = next(f"s{i}" for i in range(100) if lanes.lane_of(f"s{i}") == 0)
    for _ in range(4):
        lanes.put(busy_key, lambda: None)
    waited = threading.Event()
    producer = threading.Thread(target=lambda: (lanes.wait_for_room(2), waited.set()))
    producer.start()
    assert not waited.wait(0.2)  # four queued in lane 0: more than its share (1) of 2
    gate.set()
    assert waited.wait(5)
    producer.join()
    lanes.close()


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


def test_a_response_thread_outlives_a_failing_callback_and_an_alone_call_outlives_its_keys_failure():
    """A ``lost`` callback that raises used to end the response thread: every later call then waited
    for good (a producer in wait_for_room with it). A call put ``alone`` (another request's only
    answer under the key) is made even while the key's stream is failed, and leaves its state as it is."""
    from orpheus_triton.triton_calls import ResponseQueue

    sent = []

    def fails():
        raise RuntimeError("client went away")

    def broken_callback(error):
        raise AttributeError("a bug in a stream's own bookkeeping")

    queue = ResponseQueue(on_error=lambda key, error: None, threaded=True)
    queue.put("a", fails, lost=broken_callback)
    queue.put("a", lambda: sent.append("a, dropped"))  # stream a failed: dropped
    queue.put("a", lambda: sent.append("refusal of another request"), alone=True)
    queue.put("a", lambda: sent.append("a's last, dropped"), last=True)
    queue.put("b", lambda: sent.append("b"), last=True)
    queue.close()  # sends what is queued
    assert sent == ["refusal of another request", "b"]


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

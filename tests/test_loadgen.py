"""Unit tests of the load generator's arithmetic: playback starvation, percentiles, capacity, Poisson schedule."""

import threading
import time

import pytest

from orpheus_triton.constants import SAMPLE_RATE, SAMPLES_PER_FRAME
from orpheus_triton.loadgen import (
    StreamRecord,
    Utterance,
    check_loopback,
    meets_realtime,
    passing_above_capacity,
    percentile,
    playback,
    poisson_schedule,
    realtime_capacity,
    run_closed_loop,
    run_poisson,
    summarize,
    workload,
)

CHUNK = SAMPLES_PER_FRAME / SAMPLE_RATE  # seconds of audio in one chunk


# ---- playback ---------------------------------------------------------------------------------


def test_chunks_arriving_in_time_never_starve():
    arrivals = [0.3 + i * CHUNK * 0.9 for i in range(20)]  # a bit faster than real time
    play = playback(arrivals, [SAMPLES_PER_FRAME] * 20)
    assert not play.starved and play.stalls == 0 and play.stall_seconds == 0
    assert all(h > 0 for h in play.headroom)
    assert play.gaps == pytest.approx([CHUNK * 0.9] * 19)


def test_exactly_real_time_is_not_a_stall():
    arrivals = [1.0 + i * CHUNK for i in range(10)]  # each chunk lands as the previous one ends
    play = playback(arrivals, [SAMPLES_PER_FRAME] * 10)
    assert not play.starved
    assert play.headroom == pytest.approx([0.0] * 9, abs=1e-12)


def test_late_chunk_stalls_by_how_late_it_is():
    # Two chunks in a burst give 2 chunks of audio; the third arrives 0.1 s after both have played.
    arrivals = [0.0, 0.0, 2 * CHUNK + 0.1]
    play = playback(arrivals, [SAMPLES_PER_FRAME] * 3)
    assert play.starved and play.stalls == 1
    assert play.stall_seconds == pytest.approx(0.1)
    assert play.headroom == pytest.approx([CHUNK, -0.1])


def test_playback_resumes_from_the_late_chunk():
    # After the stall at t=1.0 the late chunk plays until 1.0 + CHUNK; the next one arrives just in time.
    arrivals = [0.0, 1.0, 1.0 + CHUNK]
    play = playback(arrivals, [SAMPLES_PER_FRAME] * 3)
    assert play.stalls == 1
    assert play.stall_seconds == pytest.approx(1.0 - CHUNK)
    assert play.headroom[1] == pytest.approx(0.0, abs=1e-12)


def test_a_burst_ahead_covers_a_later_gap():
    # Five chunks at once buy 5 x 85 ms of playback: a sixth 0.4 s later is in time.
    arrivals = [0.0] * 5 + [0.4]
    assert not playback(arrivals, [SAMPLES_PER_FRAME] * 6).starved
    assert playback([0.0] * 4 + [0.4], [SAMPLES_PER_FRAME] * 5).starved


def test_chunk_length_counts_not_chunk_count():
    # One big first chunk (1 s of audio) covers a 0.9 s gap; a small one would not.
    assert not playback([0.0, 0.9], [SAMPLE_RATE, 100]).starved
    assert playback([0.0, 0.9], [100, 100]).starved


def test_start_buffer_delays_playback():
    arrivals = [0.0, 2 * CHUNK]
    assert playback(arrivals, [SAMPLES_PER_FRAME] * 2).starved
    assert not playback(arrivals, [SAMPLES_PER_FRAME] * 2, start_buffer=CHUNK).starved


def test_buffer_needed_is_the_start_delay_that_avoids_every_stall():
    arrivals = [0.2, 0.2 + CHUNK, 0.2 + 3 * CHUNK + 0.05, 0.2 + 3 * CHUNK + 0.06]
    samples = [SAMPLES_PER_FRAME] * 4
    play = playback(arrivals, samples)
    assert play.buffer_needed == pytest.approx(CHUNK + 0.05)
    assert not playback(arrivals, samples, start_buffer=play.buffer_needed + 1e-9).starved
    assert playback(arrivals, samples, start_buffer=play.buffer_needed - 1e-3).starved
    assert playback([0.0, 0.01], samples[:2]).buffer_needed == 0.0


def test_playback_edge_cases():
    empty = playback([], [])
    assert not empty.starved and empty.gaps == [] and empty.headroom == []
    one = playback([0.5], [SAMPLES_PER_FRAME])
    assert not one.starved and one.gaps == []
    with pytest.raises(ValueError):
        playback([0.0, 1.0], [SAMPLES_PER_FRAME])


# ---- records and summaries ------------------------------------------------------------------------


def record(arrivals, total=None, error=None, started=0.0):
    total = total if total is not None else (arrivals[-1] if arrivals else 0.0)
    return StreamRecord("short", "tara", started, list(arrivals), [SAMPLES_PER_FRAME] * len(arrivals), total, error)


def test_stream_record_properties():
    r = record([0.25, 0.3, 0.35, 0.4], total=0.5)
    assert r.ttfa == 0.25
    assert r.audio_seconds == pytest.approx(4 * CHUNK)
    assert r.real_time_factor == pytest.approx(0.5 / (4 * CHUNK))
    empty = record([], total=1.0)
    assert empty.ttfa is None and empty.real_time_factor is None


def test_percentile_is_the_nearest_rank():
    values = [10, 20, 30, 40, 50]
    assert percentile(values, 0) == 10
    assert percentile(values, 50) == 30
    assert percentile(values, 100) == 50
    assert percentile(values, 25) == 20
    assert percentile(values, 90) == 50
    assert percentile(values, 80) == 40
    assert percentile([3, 1, 2], 50) == 2  # unsorted input
    assert percentile([7], 99) == 7
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_a_p99_of_fewer_than_100_streams_is_their_maximum():
    """Interpolated, the p99 of 16 streams with one at 550 ms and the rest at 200 ms was 497.5 ms: the
    level passed a 500 ms limit that one of its streams missed."""
    ttfa = [0.2] * 15 + [0.55]
    assert percentile(ttfa, 99) == 0.55
    level = {"streams": 16, "errors": 0, "no_audio": 0, "starved_streams": 0, "ttfa_p99": percentile(ttfa, 99)}
    assert not meets_realtime(level, ttfa_limit=0.5)
    assert percentile(list(range(1, 201)), 99) == 198  # of 200, two may be slower


def test_percentile_matches_numpy_inverted_cdf():
    np = pytest.importorskip("numpy")
    values = [0.31, 0.52, 0.18, 0.77, 0.43, 0.95, 0.12, 0.66]
    for q in (1, 25, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q, method="inverted_cdf")))


def test_summarize_counts_starvation_and_errors():
    fed = record([0.2 + i * CHUNK * 0.5 for i in range(10)], started=0.0)
    starved = record([0.3, 0.3 + 3 * CHUNK], started=0.1)
    failed = record([], total=0.05, error="SynthesisError: boom", started=0.2)
    level = summarize([fed, starved, failed], wall_seconds=2.0)
    assert level["streams"] == 3 and level["errors"] == 1 and level["no_audio"] == 0
    assert level["starved_streams"] == 1 and level["stalls"] == 1
    assert level["stall_seconds"] == pytest.approx(2 * CHUNK)
    assert level["ttfa_p50"] == pytest.approx(0.2)  # nearest rank: the lower of the two
    assert level["audio_seconds"] == pytest.approx(12 * CHUNK)
    # rates over the streams' span (from the first request to the last end), not the level's whole wall time
    window = max(fed.total, 0.1 + starved.total)
    assert level["window_seconds"] == pytest.approx(window) and level["wall_seconds"] == 2.0
    assert level["realtime_streams_served"] == pytest.approx(12 * CHUNK / window)
    assert level["streams_in_flight_mean"] == pytest.approx((fed.total + starved.total + 0.05) / window)
    assert level["error_examples"] == ["SynthesisError: boom"]


def test_summarize_counts_measured_streams_and_the_load_of_all_over_their_span():
    """A closed loop's fillers are left out of the listener figures, but their audio and their being open
    count over the measured streams' span (their chunks and time outside it do not)."""
    span = 0.1 + 4 * CHUNK
    measured = record([0.1 + i * CHUNK for i in range(4)], total=span, started=1.0)
    ramp = record([0.1, 1.2], total=1.5, started=0.0)  # open through the whole span, its second chunk in it
    ramp.measured = False
    cut = record([0.05], total=0.1, started=1.0 + span - 0.1)
    cut.measured = False  # cut at the level's end: no error recorded
    level = summarize([ramp, measured, cut])
    assert level["streams"] == 1 and level["filler_streams"] == 2 and level["errors"] == 0
    assert level["filler_errors"] == 0 and meets_realtime(level)
    assert level["ttfa_p50"] == pytest.approx(0.1)
    assert level["window_seconds"] == pytest.approx(span)
    assert level["realtime_streams_served"] == pytest.approx((4 + 1 + 1) * CHUNK / span)
    assert level["streams_in_flight_mean"] == pytest.approx((span + span + 0.1) / span)


def test_a_filler_the_server_failed_is_counted_and_fails_the_level():
    """Fillers keep the load at the level's concurrency: one the server refused (a full queue) left the
    counted streams running beside fewer others, yet the level passed real time, its failure unsaid."""
    measured = record([0.1 + i * CHUNK for i in range(4)], total=0.1 + 4 * CHUNK, started=1.0)
    refused = record([], total=0.01, started=1.0, error="SynthesisError: server busy")
    refused.measured = False
    level = summarize([measured, refused])
    assert level["errors"] == 0 and level["filler_errors"] == 1
    assert level["error_examples"] == ["SynthesisError: server busy"]
    assert not meets_realtime(level) and realtime_capacity({1: level}) == 0


def test_summarize_without_wall_time_uses_the_records_span():
    level = summarize([record([0.1], total=1.0, started=0.0), record([0.1], total=1.0, started=0.5)])
    assert level["wall_seconds"] == pytest.approx(1.5) and level["window_seconds"] == pytest.approx(1.5)


def level(p99, starved=0, errors=0, streams=8, no_audio=0):
    return {"streams": streams, "errors": errors, "no_audio": no_audio, "starved_streams": starved, "ttfa_p99": p99}


def test_realtime_needs_low_p99_no_starvation_and_no_errors():
    assert meets_realtime(level(0.2))
    assert not meets_realtime(level(0.5))  # strictly below the limit
    assert not meets_realtime(level(0.2, starved=1))
    assert not meets_realtime(level(0.2, errors=1))
    assert not meets_realtime(level(0.2, no_audio=1))
    assert not meets_realtime(level(None, streams=0))
    assert meets_realtime(level(0.15), ttfa_limit=0.2) and not meets_realtime(level(0.25), ttfa_limit=0.2)


def test_capacity_is_the_largest_passing_level():
    levels = {1: level(0.1), 2: level(0.2), 4: level(0.3), 8: level(0.6), 16: level(0.9, starved=3)}
    assert realtime_capacity(levels) == 4
    assert realtime_capacity(levels, ttfa_limit=0.25) == 2
    assert realtime_capacity({1: level(0.7), 2: level(0.8)}) == 0
    assert realtime_capacity({}) == 0
    # A level that passes above a failing one does not count: the capacity says every level up to it held;
    # the level above is listed beside it.
    levels = {1: level(0.1), 2: level(0.1, starved=1), 4: level(0.2)}
    assert realtime_capacity(levels) == 1 and passing_above_capacity(levels) == [4]
    assert passing_above_capacity({1: level(0.1), 2: level(0.2)}) == []
    assert realtime_capacity({2: level(0.7), 4: level(0.1)}) == 0 and passing_above_capacity({4: level(0.1)}) == []


# ---- Poisson schedule --------------------------------------------------------------------------------


def test_poisson_schedule_is_bounded_by_count_and_duration():
    by_count = poisson_schedule(rate=100.0, max_count=25, max_duration=60.0, seed=1)
    assert len(by_count) == 25
    by_time = poisson_schedule(rate=2.0, max_count=10_000, max_duration=5.0, seed=1)
    assert 0 < len(by_time) < 10_000 and by_time[-1] < 5.0
    assert poisson_schedule(rate=1.0, max_count=0, max_duration=10.0) == []
    assert poisson_schedule(rate=1.0, max_count=10, max_duration=0.0) == []


def test_poisson_schedule_is_increasing_seeded_and_near_its_rate():
    starts = poisson_schedule(rate=4.0, max_count=100_000, max_duration=500.0, seed=7)
    assert all(b > a for a, b in zip(starts, starts[1:], strict=False))
    assert starts == poisson_schedule(rate=4.0, max_count=100_000, max_duration=500.0, seed=7)
    assert starts != poisson_schedule(rate=4.0, max_count=100_000, max_duration=500.0, seed=8)
    assert len(starts) / 500.0 == pytest.approx(4.0, rel=0.1)


def test_poisson_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError):
        poisson_schedule(rate=0.0, max_count=5, max_duration=5.0)
    with pytest.raises(ValueError):
        poisson_schedule(rate=1.0, max_count=-1, max_duration=5.0)


# ---- runners with a fake stream (no server) ----------------------------------------------------------------


def fake_stream(active, peak, lock, seconds=0.01, cut=None):
    """Streams of ``seconds`` each; a filler's (given ``stop``) ends early once ``stop()`` says so, counted in
    ``cut``."""
    def run(utterance: Utterance, run_start: float, stop=None) -> StreamRecord:
        started = time.perf_counter() - run_start
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline and not (stop and stop()):
            threading.Event().wait(0.002)
        with lock:
            active[0] -= 1
        if cut is not None and time.perf_counter() < deadline:
            cut.append(utterance)
        return StreamRecord(utterance.label, utterance.voice, started, [0.001], [SAMPLES_PER_FRAME],
                            time.perf_counter() - run_start - started)

    return run


def test_closed_loop_runs_the_count_with_at_most_n_streams_at_once():
    active, peak, lock = [0], [0], threading.Lock()
    records = run_closed_loop(fake_stream(active, peak, lock), 3, workload(count=4), max_streams=10,
                              max_seconds=30.0)
    assert sum(r.measured for r in records) == 10
    assert peak[0] <= 3


def test_closed_loop_stops_at_its_time_bound():
    active, peak, lock = [0], [0], threading.Lock()
    records = run_closed_loop(fake_stream(active, peak, lock), 2, workload(count=2), max_streams=10_000,
                              max_seconds=0.1)
    assert 0 < sum(r.measured for r in records) < 10_000


def test_closed_loop_counts_only_streams_that_met_the_full_load():
    """The ramp's streams are fillers, and so are those started while counted ones still run once the count
    is reached: the load stays at N until the last counted stream ends (only a worker between two streams
    is missing), then the fillers are cut."""
    active, peak, lock, cut = [0], [0], threading.Lock(), []
    samples, level_done = [], threading.Event()

    def watch():
        while not level_done.is_set():
            with lock:
                samples.append((time.perf_counter(), active[0]))
            threading.Event().wait(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    records = run_closed_loop(fake_stream(active, peak, lock, seconds=0.1, cut=cut), 4, workload(count=4),
                              max_streams=8, max_seconds=30.0, ramp_seconds=0.2, start=start)
    ended = time.perf_counter()
    level_done.set()
    watcher.join()
    measured = [r for r in records if r.measured]
    assert len(measured) == 8 and peak[0] == 4
    first, last = min(r.started for r in measured), max(r.started + r.total for r in measured)
    assert first >= 0.2 * 3 / 4 - 0.01  # from the last worker's first start on
    assert all(not r.measured for r in records if r.started < first)  # the ramp's streams
    during = [n for at, n in samples if start + first + 0.01 < at < start + last - 0.01]
    assert during and min(during) >= 3  # at full load but for a worker between two streams
    # The fillers still running were cut (``cut``: ended before their 0.1 s because the level said so), not
    # waited for: waited for, none would end early. And the level returned once they had noticed (a poll
    # every 2 ms), with room for a busy machine's thread wake-ups.
    assert cut and ended - start < last + 0.2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the failing worker's
def test_a_counted_stream_that_fails_still_ends_the_level():
    """A stream function that raises for a counted stream is recorded as an error (it was left out of the
    level, its worker thread ended, and the level ran on below its concurrency), counted as ended, and the
    level returns."""
    active, peak, lock = [0], [0], threading.Lock()
    ok = fake_stream(active, peak, lock, seconds=0.02)
    calls = [0]

    def flaky(utterance, run_start, stop=None):
        with lock:
            calls[0] += 1
            fail = calls[0] == 3
        if fail and stop is None:
            raise RuntimeError("stream function bug")
        return ok(utterance, run_start, stop)

    done: list = []
    runner = threading.Thread(target=lambda: done.append(run_closed_loop(flaky, 2, workload(count=2), max_streams=4,
                                                                         max_seconds=30.0)))
    runner.start()
    runner.join(timeout=10)
    assert not runner.is_alive() and done
    measured = [r for r in done[0] if r.measured]
    assert len(measured) == 4 and [r.error for r in measured].count("RuntimeError: stream function bug") == 1
    poisson = run_poisson(lambda utterance, run_start, stop=None: 1 / 0, 50.0, workload(count=3), max_streams=3,
                          max_seconds=5.0)
    assert len(poisson) == 3 and all(r.error == "ZeroDivisionError: division by zero" for r in poisson)


def test_closed_loop_ramp_spreads_the_workers_first_starts():
    def starts_of(ramp: float) -> list[float]:
        begun = time.perf_counter()

        def run(utterance: Utterance, run_start: float, stop=None) -> StreamRecord:
            started = time.perf_counter() - begun
            threading.Event().wait(0.3)  # each worker runs one stream in the level
            return StreamRecord(utterance.label, utterance.voice, started, [0.001], [SAMPLES_PER_FRAME], 0.3)

        records = run_closed_loop(run, 4, workload(count=4), max_streams=4, max_seconds=5.0, ramp_seconds=ramp)
        return sorted(r.started for r in records)[:4]  # each worker's first

    burst, ramped = starts_of(0.0), starts_of(0.4)
    assert max(burst) < 0.05  # all at once
    # worker i at 0.1 s x i
    assert all(abs(got - want) < 0.05 for got, want in zip(ramped, [0.0, 0.1, 0.2, 0.3], strict=True)), ramped


def test_closed_loop_ramp_must_end_within_the_level():
    with pytest.raises(ValueError, match="ramp_seconds"):
        run_closed_loop(lambda u, s, stop: None, 2, workload(count=1), 2, max_seconds=1.0, ramp_seconds=1.0)
    with pytest.raises(ValueError, match="ramp_seconds"):
        run_closed_loop(lambda u, s, stop: None, 2, workload(count=1), 2, max_seconds=1.0, ramp_seconds=-0.5)


def test_poisson_runner_starts_the_scheduled_streams():
    active, peak, lock = [0], [0], threading.Lock()
    records = run_poisson(fake_stream(active, peak, lock), rate=200.0, utterances=workload(count=3),
                          max_streams=12, max_seconds=5.0)
    assert len(records) == 12


def test_closed_loop_rejects_zero_workers():
    with pytest.raises(ValueError):
        run_closed_loop(lambda u, s, stop: None, 0, workload(count=1), 1, 1.0)


# ---- workload and targets ------------------------------------------------------------------------------------


def test_workload_cycles_texts_and_voices():
    items = workload(["short", "long"], voices=["tara", "leo", "mia"], max_tokens={"long": 99}, count=6)
    assert [u.label for u in items] == ["short", "long"] * 3
    assert [u.voice for u in items] == ["tara", "leo", "mia"] * 2
    assert {u.max_tokens for u in items if u.label == "long"} == {99}
    assert len({u.seed for u in items}) == 6


@pytest.mark.parametrize("url", ["localhost:8001", "127.0.0.1:8001", "127.1.2.3:9", "[::1]:8001", "localhost"])
def test_loopback_targets_are_accepted(url):
    assert check_loopback(url) == url


@pytest.mark.parametrize("url", ["10.0.0.5:8001", "192.168.1.2:8001", "example.com:8001", "8.8.8.8:8001",
                                 "[2001:db8::1]:8001"])
def test_other_targets_are_refused(url):
    with pytest.raises(ValueError, match="this machine only"):
        check_loopback(url)


def test_load_processes_that_cannot_start_say_why():
    """A LoadProcesses child that cannot build its stream function (here: a target that is not this machine)
    is reported by the parent with the child's reason, and no process is left behind."""
    from orpheus_triton.loadgen import LoadProcesses

    with pytest.raises(RuntimeError, match="did not start: ValueError: the load generator targets this machine"):
        LoadProcesses("example.com:8001", 2)
    with pytest.raises(ValueError, match="at least 2 processes"):
        LoadProcesses("localhost:8001", 1)


def test_a_closed_loop_level_dealt_out_to_processes_keeps_its_stream_count():
    """Streams go where their workers are: a level of 1 worker and 2 streams in 2 processes runs both streams
    in the one process with the worker (the other's half had been dropped), 3 workers split 2 + 1."""
    from orpheus_triton.loadgen import closed_loop_shares

    assert closed_loop_shares(1, 2, 2) == [([0], 2), ([], 0)]
    assert closed_loop_shares(3, 6, 2) == [([0, 2], 4), ([1], 2)]
    assert closed_loop_shares(8, 16, 3) == [([0, 3, 6], 6), ([1, 4, 7], 6), ([2, 5], 4)]
    for concurrency, streams, processes in [(1, 2, 8), (5, 7, 2), (216, 432, 8), (4, 3, 4)]:
        assert sum(n for _, n in closed_loop_shares(concurrency, streams, processes)) == streams


def test_a_level_without_counted_streams_is_refused_with_the_flag_named(capsys):
    from orpheus_triton import loadgen

    with pytest.raises(SystemExit):
        loadgen.main(["--streams-per-worker", "0"])
    assert "argument --streams-per-worker: expected a whole number >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        loadgen.main(["--concurrency", "2,x"])
    assert "argument --concurrency: expected whole numbers >= 1" in capsys.readouterr().err


def test_a_sweep_gives_its_monitor_the_span_the_counted_streams_ran():
    """The ramp's and the tail's streams ran beside fewer others: the server's rates are taken over the
    counted streams' span, which the monitor is given in the load generator's clock."""
    from orpheus_triton.loadgen import SweepSettings, _OneProcess, _sweep

    active, peak, lock = [0], [0], threading.Lock()
    spans, levels = [], []

    def monitor():
        levels.append([time.perf_counter()])

        def finish(span=None):
            levels[-1].append(time.perf_counter())
            spans.append(span)
            return {"monitored": True}

        return finish

    settings = SweepSettings(concurrency=[3], poisson_rates=[2.0], poisson_streams=3, poisson_seconds=5.0,
                             min_streams=6, ramp_seconds=0.3, labels=["short"])
    runner = _OneProcess(fake_stream(active, peak, lock, seconds=0.1))
    result = _sweep(runner, settings, lambda line: None, monitor)
    closed = result["closed_loop"][3]
    measured = [r for r in result["records"]["closed_3"] if r["measured"]]
    assert closed["monitored"] and result["poisson"][2.0]["monitored"]
    (start, end), (level_start, level_end) = spans[0], levels[0]
    assert end - start == pytest.approx(closed["window_seconds"])
    assert level_start < start < end < level_end
    assert start - level_start >= 0.3 * 2 / 3 - 0.01  # after the ramp: the last worker's first start on
    assert start == pytest.approx(level_start + min(r["started"] for r in measured), abs=0.01)
    assert spans[1] is not None and levels[1][0] < spans[1][0] < spans[1][1] < levels[1][1]


def test_the_command_lines_min_streams_and_max_tokens_reach_the_sweep(monkeypatch, tmp_path):
    """Both were settings of the sweep that only run_all could set: the load generator alone counted at
    least 4 streams a level, whatever its flags said, and ran each text to its own length."""
    from orpheus_triton import loadgen

    seen = []
    monkeypatch.setattr(loadgen, "require_ready_server", lambda url, model=None: None)
    monkeypatch.setattr(loadgen, "sweep", lambda url, settings: seen.append(settings) or {
        "realtime_capacity": 0, "closed_loop": {}, "poisson": {}})
    assert loadgen.main(["--concurrency", "1", "--min-streams", "1", "--max-tokens", "70",
                         "--texts", "short,long"]) == 0
    assert seen[-1].min_streams == 1 and seen[-1].max_tokens == {"short": 70, "long": 70}
    assert loadgen.main(["--concurrency", "1"]) == 0
    assert seen[-1].min_streams == 4 and seen[-1].max_tokens == {}  # each text's own length

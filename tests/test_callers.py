"""Callers in flight across the server's processes (orpheus_triton.callers): leases in a shared folder."""

import multiprocessing
import os

import pytest

from orpheus_triton.callers import (
    EXACT_COUNT_SECONDS,
    LEASE_IDLE_SECONDS,
    LEASE_TOUCH_SECONDS,
    CallerLeases,
    CallersFull,
    admission_check,
    ended_by,
)
from orpheus_triton.constants import CALLERS_DIR_ENV
from orpheus_triton.serving import StreamIdError


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def leases_on(folder, clock=None):
    folder.mkdir(exist_ok=True)
    return CallerLeases(folder, clock=clock or Clock())


def test_callers_are_admitted_up_to_the_bound_and_each_end_frees_a_place(tmp_path):
    leases = leases_on(tmp_path / "callers")
    for caller in ("a", "b", "c"):
        leases.admit(caller, max_callers=3)
    with pytest.raises(CallersFull, match=r"^server busy: 3 in flight, as many callers as this server takes "
                                          r"\(--max-callers 3\)"):
        leases.admit("d", max_callers=3)
    assert leases.count() == 3
    leases.end("b")
    leases.end("b")  # an end told twice (the llm stage and the decoder) frees one place
    leases.admit("d", max_callers=3)
    assert leases.count() == 3
    leases.admit("e")  # 0: no bound, still counted
    assert leases.count() == 4
    # The leases do not say whose they are: anyone who knows a stream's id can stop it.
    assert all(set(name) <= set("0123456789abcdef") for name in os.listdir(tmp_path / "callers")
               if not name.startswith("."))


def test_an_id_in_flight_is_refused_to_a_second_caller_and_free_once_its_caller_ends(tmp_path):
    leases = leases_on(tmp_path / "callers")
    leases.admit("same")
    with pytest.raises(StreamIdError, match=r"request id 'same' is already streaming \(a caller with it is still in "
                                            r"flight\)"):
        leases.admit("same")
    leases.end("same")
    leases.admit("same")


def test_a_lease_nobody_touches_stops_counting_and_a_touched_one_lives_on(tmp_path):
    clock = Clock()
    leases = leases_on(tmp_path / "callers", clock)
    other_process = CallerLeases(tmp_path / "callers", clock=clock)  # the decoder's, say
    leases.admit("lost", max_callers=2)
    leases.admit("playing", max_callers=2)
    for _ in range(3):
        clock.now += LEASE_IDLE_SECONDS / 2
        other_process.touch("playing")
    assert leases.count() == 1
    assert leases._path("lost").exists()  # counting removes nothing: only admission does, under its lock
    leases.admit("lost", max_callers=2)  # its id and its place are free again
    clock.now += LEASE_IDLE_SECONDS + 1
    leases.admit("newcomer", max_callers=2)  # both expired
    assert leases.count() == 1


def test_touches_are_at_most_one_per_interval_and_never_bring_an_ended_lease_back(tmp_path):
    clock = Clock()
    leases = leases_on(tmp_path / "callers", clock)
    leases.admit("a")
    path = leases._path("a")
    clock.now += 1
    leases.touch("a")
    touched = path.stat().st_mtime
    assert touched == clock.now
    clock.now += LEASE_TOUCH_SECONDS / 2
    leases.touch("a")
    assert path.stat().st_mtime == touched  # within the interval: not again
    clock.now += LEASE_TOUCH_SECONDS
    leases.touch("a")
    assert path.stat().st_mtime == clock.now
    leases.end("a")
    clock.now += LEASE_TOUCH_SECONDS
    leases.touch("a")  # a late chunk of the ended stream
    assert not path.exists() and leases.count() == 0


def _admit_all(folder: str, ids: list[str], limit: int, admitted) -> None:
    leases = CallerLeases(folder)
    for request_id in ids:
        try:
            leases.admit(request_id, max_callers=limit)
            admitted.put(request_id)
        except CallersFull:
            pass


def test_processes_admitting_at_once_take_no_more_than_the_bound(tmp_path):
    """Preprocessing runs as several processes (instances): counting and taking a lease is one step."""
    folder = tmp_path / "callers"
    folder.mkdir()
    context = multiprocessing.get_context("spawn")  # not fork: this process may have gRPC channels open
    admitted = context.Queue()
    workers = [context.Process(target=_admit_all, args=(str(folder), [f"{n}-{i}" for i in range(20)], 13, admitted))
               for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert CallerLeases(folder).count() == 13
    assert len({admitted.get(timeout=5) for _ in range(13)}) == 13 and admitted.empty()


def test_the_servers_folder_comes_from_its_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(CALLERS_DIR_ENV, raising=False)
    assert CallerLeases.from_environment() is None
    ended_by(None)("anyone")  # counting nothing: harmless
    monkeypatch.setenv(CALLERS_DIR_ENV, str(tmp_path / "run" / "callers"))
    leases = CallerLeases.from_environment()
    leases.admit("a")
    ended_by(leases)("a")
    assert leases.count() == 0


def test_a_bound_that_cannot_be_kept_is_refused_as_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match=f"max_callers 4 needs .*{CALLERS_DIR_ENV}.*`orpheus-triton serve`"):
        admission_check(None, 4)
    with pytest.raises(ValueError, match="max_callers must be >= 0"):
        admission_check(leases_on(tmp_path / "callers"), -1)
    admission_check(None, 0)


def test_a_full_server_is_a_refusal_the_clients_retry_elsewhere(tmp_path):
    from orpheus_triton.client import _TURNED_AWAY

    leases = leases_on(tmp_path / "callers")
    leases.admit("a", max_callers=1)
    with pytest.raises(CallersFull) as refusal:
        leases.admit("b", max_callers=1)
    assert _TURNED_AWAY.search(f"orpheus: {refusal.value}")  # as the preprocessing model words it


def test_a_killed_launchers_folder_goes_with_the_next_start(tmp_path, monkeypatch):
    """A lease a killed run left must not count against the next one, nor its folder stay for good."""
    import subprocess
    import sys
    from pathlib import Path

    from orpheus_triton.server import counted_callers

    monkeypatch.setenv("ORPHEUS_TRITON_CACHE", str(tmp_path / "cache"))
    serving = ("import time\nfrom orpheus_triton.server import counted_callers\n"
               "with counted_callers(print) as env:\n"
               f"    print(env[{CALLERS_DIR_ENV!r}], flush=True)\n    time.sleep(60)")
    killed = subprocess.Popen([sys.executable, "-c", serving], stdout=subprocess.PIPE, text=True)
    try:
        left = Path(killed.stdout.readline().strip())
        CallerLeases(left).admit("a caller of the killed run")
    finally:
        killed.kill()
        killed.wait()
    with counted_callers(print) as environment:
        folder = Path(environment[CALLERS_DIR_ENV])
        assert folder.is_dir() and not left.exists()
    assert not folder.exists()


def test_admission_keeps_no_record_per_caller_and_removes_expired_leases_unbounded_too(tmp_path):
    clock = Clock()
    leases = leases_on(tmp_path / "callers", clock)
    for n in range(50):
        leases.admit(f"caller-{n}")
    assert not leases._touched  # a preprocessing process admits millions of callers over its life
    clock.now += LEASE_IDLE_SECONDS + 1  # all lost, unseen (bare cancellations, say)
    leases.admit("next")
    assert sorted(os.listdir(tmp_path / "callers")) == [".admission.lock", leases._path("next").name]


def test_a_folder_that_went_is_made_again_and_one_that_cannot_be_leaves_callers_uncounted(tmp_path, caplog):
    import shutil

    leases = leases_on(tmp_path / "callers")
    shutil.rmtree(tmp_path / "callers")  # a cache cleaned while serving
    leases.admit("a", max_callers=2)
    assert leases.count() == 1
    (tmp_path / "file").write_text("")
    lost = CallerLeases(tmp_path / "file" / "callers")  # cannot be made
    lost.admit("b")  # unbounded: let in, uncounted, said
    lost.admit("c")
    assert caplog.text.count("callers in flight are not counted") == 1
    with pytest.raises(OSError):
        lost.admit("d", max_callers=2)
    lost.end("b")  # nothing to free: no error
    assert lost.count() is None  # not known, rather than none


def test_the_llm_stages_streams_are_kept_alive_while_they_wait_or_generate(tmp_path):
    import time

    (tmp_path / "callers").mkdir()
    leases = CallerLeases(tmp_path / "callers", idle_seconds=0.4, touch_seconds=0.05)
    leases.admit("queued")
    leases.admit("gone")
    leases.keep_alive(lambda: ["queued", "never admitted"])
    time.sleep(0.8)
    assert leases.count() == 1 and not leases._path("never admitted").exists()
    leases.close()
    time.sleep(0.8)
    assert leases.count() == 0


def test_a_bounded_admission_counts_leases_by_name_and_looks_at_them_at_most_once_a_second(tmp_path, monkeypatch):
    """A bounded admission counted the live leases by looking at each (a stat per lease, under the
    admission's lock: a millisecond at hundreds of callers). Their names are enough below the bound;
    where the names reach it, expired leases are looked for at most every EXACT_COUNT_SECONDS, so a lost
    caller's place frees that long after its lease expired, and only live leases count."""
    clock = Clock()
    start = clock.now
    leases = leases_on(tmp_path / "callers", clock)
    for n in range(3):
        leases.admit(f"caller-{n}", max_callers=5)  # the first one counts them (none yet); the next in 30 s
    looked = []
    real_count = CallerLeases._count
    monkeypatch.setattr(CallerLeases, "_count", lambda self, *a, **k: looked.append(1) or real_count(self, *a, **k))
    leases.admit("caller-3", max_callers=5)
    leases.admit("caller-4", max_callers=5)  # 4 named before it: under 5, in
    with pytest.raises(CallersFull, match="5 in flight"):
        leases.admit("caller-5", max_callers=5)  # by the names: the live leases were looked at under a second ago
    assert not looked
    clock.now = start + EXACT_COUNT_SECONDS
    with pytest.raises(CallersFull, match="5 in flight"):
        leases.admit("caller-5", max_callers=5)
    assert looked == [1]  # and the next look at every lease is due 30 s later (at start + 31)
    clock.now = start + 15
    leases.touch("caller-0")
    clock.now = start + LEASE_IDLE_SECONDS + 0.5  # all but caller-0 expired: 5 named, 1 live
    leases.admit("caller-5", max_callers=2)  # at the bound by the names: a look at each frees four places
    assert looked == [1, 1]
    assert leases.count() == 2 and len(os.listdir(tmp_path / "callers")) == 3  # the lock file and two leases


def test_a_bounded_admission_looks_at_the_leases_after_the_clock_went_back(tmp_path):
    """Its looks at every lease are planned by the wall clock: set back by ten minutes, the clock put them
    off by as much, and the places of lost callers stayed taken meanwhile."""
    clock = Clock()
    leases = leases_on(tmp_path / "callers", clock)
    leases.admit("lost", max_callers=1)
    clock.now += LEASE_IDLE_SECONDS + 1  # its lease expired...
    clock.now -= 600  # ...and the clock went back (an NTP step), leaving it in the future by the clock
    leases._set_time(leases._name("lost"), clock.now - LEASE_IDLE_SECONDS - 1)  # expired by the clock now
    leases.admit("next", max_callers=1)
    assert leases.count() == 1


def test_a_caller_whose_own_lease_expired_is_not_counted_against_itself(tmp_path):
    """Its lease would be taken again, not added: counted among the names, it refused the caller for up to
    a second after a look at every lease."""
    clock = Clock()
    start = clock.now
    leases = leases_on(tmp_path / "callers", clock)
    leases.admit("again", max_callers=1)
    clock.now = start + LEASE_IDLE_SECONDS - 0.1
    with pytest.raises(CallersFull):
        leases.admit("other", max_callers=1)  # a look at every lease: "again" still live
    clock.now = start + LEASE_IDLE_SECONDS + 0.1  # lost (unseen), and the same id comes back within the second
    leases.admit("again", max_callers=1)
    assert leases.count() == 1

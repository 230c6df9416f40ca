"""perf/round_trips.py against a real tritonserver: the stand-in model's timings, and every response it
timed reached the client."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))

import round_trips  # noqa: E402 (perf/ is not a package)

SENDS = ("send_tokens", "send_audio", "send_then_ask_one_thread", "send_beside_asking_thread",
         "send_beside_pass_thread", "send_audio_2_threads", "send_audio_4_threads")


def test_round_trips_are_timed_in_the_stub_and_every_timed_response_arrives(tmp_path):
    out = tmp_path / "run"
    assert round_trips.main(["--streams", "3", "--seconds", "0.05", "--runs", "1", "--out", str(out)]) == 0
    result = json.loads((out / "round_trips.json").read_text())
    run = result["runs"][0]
    assert run["streams"] == 3
    for key, _ in round_trips.ROWS:
        assert run[key]["calls"] >= 1 and 0 < run[key]["p50_us"] <= run[key]["p99_us"]
    assert run["asking_thread_beside_sends"]["per_second"] > 0 and run["pass_thread_beside_sends"]["per_second"] > 0
    # Every send timed was a response the client received, besides each held stream's final one and the
    # measuring request's answer.
    assert run["responses_received"] == sum(run[key]["calls"] for key in SENDS) + 3 + 1
    report = (out / "round_trips.md").read_text()
    assert "| a cancellation pass: ask every held stream |" in report
    assert "| 216 |" in report  # a pass at the bar's streams, from the measured ask


def test_round_trips_refuses_settings_it_cannot_measure_with(capsys):
    with pytest.raises(SystemExit):
        round_trips.main(["--streams", "0"])
    assert "--streams and --runs must be >= 1" in capsys.readouterr().err

"""perf/stacks.py: py-spy samples of the server's model stubs, summed by where each thread was."""

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "perf"))
import stacks  # noqa: E402

# py-spy's raw format: one line per distinct stack (thread first, innermost frame last) and its sample count.
RAW = """\
thread (11): inflight-engine;Thread.run (threading.py:982);InflightEngine._loop (orpheus_triton/engine.py:297);\
InflightEngine.step (orpheus_triton/engine.py:311);InflightEngine._decode (orpheus_triton/engine.py:521);\
Llama.forward (orpheus_triton/llama.py:383);linear (torch/nn/functional.py:1) 30
thread (11): inflight-engine;Thread.run (threading.py:982);InflightEngine._loop (orpheus_triton/engine.py:297);\
InflightEngine.step (orpheus_triton/engine.py:311);InflightEngine._sample (orpheus_triton/engine.py:540);\
gumbel_noise (orpheus_triton/sampling.py:25) 50
thread (11): inflight-engine;Thread.run (threading.py:982);InflightEngine._loop (orpheus_triton/engine.py:297);\
InflightEngine.step (orpheus_triton/engine.py:311) 5
thread (11): inflight-engine;Thread.run (threading.py:982);InflightEngine._loop (orpheus_triton/engine.py:295);\
Event.wait (threading.py:600) 15
thread (12): MainThread 100
thread (13): snac-decoder;start_torch_thread.<locals>.run (orpheus_triton/threads.py:25);\
TritonPythonModel._decode_rounds (model.py:88);TritonPythonModel._decode (model.py:98) 40
py-spy> Samples: 100 Errors: 0
"""


def test_a_threads_samples_are_summed_by_the_innermost_function_of_ours_and_by_the_parts_of_its_common_call():
    summary = stacks.summarize(RAW)
    engine = summary["inflight-engine"]
    assert engine["samples"] == 100  # the progress line at the end is not a stack
    assert engine["functions"] == [["gumbel_noise", 0.5], ["Llama.forward", 0.3], ["InflightEngine._loop", 0.15],
                                   ["InflightEngine.step", 0.05]]
    # 85 of 100 samples pass through the step (80% needed): its parts, the rest where they were
    assert engine["within"] == "InflightEngine.step"
    assert engine["parts"] == [["InflightEngine._sample", 0.5], ["InflightEngine._decode", 0.3],
                               ["InflightEngine._loop", 0.15], ["(itself)", 0.05]]
    assert summary["MainThread"] == {"samples": 100, "functions": [["(no Python frame)", 1.0]]}  # no parts
    decoder = summary["snac-decoder"]  # a model.py's functions are ours too
    assert decoder["functions"] == [["TritonPythonModel._decode", 1.0]]
    assert list(summary) == ["inflight-engine", "MainThread", "snac-decoder"]  # by samples, most first


def test_the_table_lists_each_level_and_stub_or_why_it_has_no_stacks():
    levels = [("8 streams", {"server_stacks": {"llm": stacks.summarize(RAW), "snac_decoder": {"error": "denied"}}}),
              ("16 streams", {"server_stacks": {"error": "py-spy not found"}}),
              ("32 streams", {})]
    text = "\n".join(stacks.stacks_table(levels, threads=1))
    assert "- 8 streams, `llm`, thread inflight-engine (100 samples): gumbel_noise 50%, Llama.forward 30%" in text
    assert "  - within InflightEngine.step: InflightEngine._sample 50%, InflightEngine._decode 30%" in text
    assert "- 8 streams, `snac_decoder`: no stacks (denied)" in text
    assert "- 16 streams: no stacks (py-spy not found)" in text and "32 streams" not in text
    every = "\n".join(stacks.stacks_table(levels))
    assert "thread snac-decoder" in every and "MainThread" not in every  # all threads but those never in Python
    assert stacks.stacks_table([("1 streams", {})]) == []


@pytest.mark.skipif(stacks.py_spy() is None, reason="py-spy is installed with the test extras")
def test_a_level_records_where_a_running_process_threads_were(tmp_path):
    """py-spy attached to a real process (a Python child of ours, a thread busy in a function of this
    project's): the level's summary names the thread and the function."""
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", (
        "import threading, time\n"
        "from orpheus_triton.counter_noise import hash32\n"
        "def busy():\n"
        "    while True:\n"
        "        hash32(12345)\n"
        "threading.Thread(target=busy, name='busy-worker', daemon=True).start()\n"
        "print('busy', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        # Sampled once the thread runs (the child's imports take a second or more on a busy machine).
        assert child.stdout.readline() == "busy\n"
        start = stacks.stack_monitor(lambda: {"worker": child.pid}, seconds=1.0, delay=0.2, folder=tmp_path)
        finish = start()
        threading.Event().wait(1.5)
        level = finish()
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    summary = level["server_stacks"]["worker"]
    assert "error" not in summary, summary
    assert summary["busy-worker"]["functions"][0][0] == "hash32"
    assert (tmp_path / "stacks_worker_1.txt").is_file()


@pytest.mark.server
@pytest.mark.skipif(stacks.py_spy() is None, reason="py-spy is installed with the test extras")
def test_a_served_level_says_where_the_engine_and_decoder_threads_were(server, grpc_url, tmp_path):
    """run_all's sweep with stacks (guarded_sweep): a level of two streams through the server records the
    `llm` stub's engine thread and the `snac_decoder` stub's decoding thread, with the step's parts."""
    import run_all

    from orpheus_triton.loadgen import SweepSettings

    settings = SweepSettings(concurrency=[2], streams_per_worker=2, min_streams=2, max_seconds_per_level=60.0,
                             labels=["short"], max_tokens={"short": 140})
    guard = run_all.Guard(retries=0, threshold=99.0, wait_seconds=0.0)
    out = run_all.guarded_sweep(grpc_url, settings, guard, f"http://localhost:{server.ports.metrics}/metrics",
                                server.pid, {"models": ("llm", "snac_decoder"), "seconds": 1.0, "delay": 0.3,
                                             "folder": tmp_path})
    found = out["closed_loop"][2]["server_stacks"]
    assert "error" not in found["llm"] and "error" not in found["snac_decoder"], found
    engine = found["llm"]["inflight-engine"]
    assert engine["samples"] > 20, engine
    # Two streams of a tiny model: the loop waits for work most of the time (its parts: waiting, steps);
    # a slower machine's steps may fill it (then the parts are the step's).
    # Functions by name: py-spy names a method with its class from Python 3.11 on (co_qualname), bare before.
    def bare(function: str) -> str:
        return function.rsplit(".", 1)[-1]

    inner = {"_loop": "step", "step": "_decode"}
    assert inner[bare(engine["within"])] in {bare(part) for part, _ in engine["parts"]}, engine
    assert "snac-decoder" in found["snac_decoder"]
    assert {path.name for path in tmp_path.iterdir()} == {"stacks_llm_1.txt", "stacks_snac_decoder_1.txt"}

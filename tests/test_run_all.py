"""perf/ bookkeeping: a comparison that fails is a note, not the end of the run; the GPU run's summary page."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))

import run_all  # noqa: E402 (perf/ is not a package)

from orpheus_triton import constants as c  # noqa: E402


def test_a_comparison_that_fails_becomes_a_note_and_the_run_goes_on():
    result = {"comparisons": {}, "notes": []}

    def out_of_memory():
        raise RuntimeError("CUDA out of memory")

    assert run_all.compare(result, "serving", out_of_memory) is None
    assert result["comparisons"] == {}
    assert result["notes"] == ["comparison serving failed: RuntimeError: CUDA out of memory"]

    assert run_all.compare(result, "snac", lambda: {"cpu_ratio": 0.4}) == {"cpu_ratio": 0.4}
    assert result["comparisons"] == {"snac": {"cpu_ratio": 0.4}}
    assert len(result["notes"]) == 1


def test_product_flops_counts_every_form_of_matrix_product():
    import torch  # noqa: PLC0415
    from comparisons import product_flops  # noqa: PLC0415

    a, b, bias = torch.randn(5, 3), torch.randn(3, 4), torch.randn(4)
    out = torch.empty(5, 4)

    def products():
        torch.mm(a, b)  # 2*5*3*4 = 120
        torch.addmm(bias, a, b, out=out)  # 120
        out.addmm_(a[:, :2], b[:2])  # 2*5*2*4 = 80: torch's FlopCounterMode misses this form
        torch.add(a, a)  # not a product

    assert product_flops(products) == 320


def test_snac_comparison_reports_its_products_flops_and_rates(model_set):
    """Comparison (b) on the test model set: the products' FLOPs are those of the decodes measured (a
    little more batched: sums straddling two windows are computed, then cut), and the report states
    their rates."""
    import comparisons  # noqa: PLC0415
    import report  # noqa: PLC0415

    result = comparisons.compare_snac_batching(model_set.snac, device="cpu", windows=3, repeats=1)
    products = result["products"]
    decoder = comparisons.load_window_decoder(model_set.snac, device="cpu")
    windows = comparisons.random_windows(3)
    one_by_one = comparisons.product_flops(lambda: [decoder.decode([w]) for w in windows])
    assert products["one_by_one_gflop"] * 1e9 == one_by_one > 0
    assert one_by_one < products["batched_gflop"] * 1e9 < 1.1 * one_by_one
    assert 0 < products["share_of_batched"] < 1
    assert products["batched_gflops"] > 0 and products["one_by_one_gflops"] > 0
    text = "\n".join(report._comparison_section({"snac": result}))
    assert f"{products['batched_gflop']:.2f} GFLOP for the 3 windows batched" in text


def test_the_gpu_summary_reads_a_short_runs_folder(tmp_path):
    """perf/gpu/summarize.py on the H100 run's own results (check, engine, a served sweep), laid out as
    run_on_gpu.sh short leaves them; the parts that did not run say so."""
    import shutil

    sys.path.insert(0, str(ROOT / "perf" / "gpu"))
    import summarize

    h100 = ROOT / "perf" / "results" / "2026-11-26_h100"
    for part in ("check", "engine", "profile"):
        shutil.copytree(h100 / part, tmp_path / part)
    shutil.copytree(h100 / "serving-2", tmp_path / "serving")
    shutil.copytree(ROOT / "perf" / "results" / "2026-11-26_cpu-2core-amd-epyc-round-trips", tmp_path / "round-trips")
    (tmp_path / "serving.status").write_text("exit 0 after 102 s")
    # a level as the stack sampler leaves it (perf/stacks.py; the H100 run had none)
    result_path = tmp_path / "serving" / "result.json"
    result = json.loads(result_path.read_text())
    result["tts"]["closed_loop"]["1"]["server_stacks"] = {"llm": {"inflight-engine": {
        "samples": 500, "functions": [["gumbel_noise", 0.4]], "within": "InflightEngine.step",
        "parts": [["InflightEngine._decode", 0.7]]}}}
    result_path.write_text(json.dumps(result))
    assert summarize.main([str(tmp_path)]) == 0
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "- serving: exit 0 after 102 s" in text
    assert "NVIDIA H100 80GB HBM3 (torch 2.11.0+cu130); failed: none" in text
    assert "| 1 | 6.23 | 161 | 161 | yes |" in text and "| 256 | 16.30 | 61 | 15707 | no |" in text
    assert "| closed 1 | 8 | 0 | 201 | 229 |" in text
    assert "- closed 1, `llm`, thread inflight-engine (500 samples): gumbel_noise 40%" in text
    assert "  - within InflightEngine.step: InflightEngine._decode 70%" in text
    assert "no serving-no-overlap/result.json" in text and "no perf-analyzer/perf_analyzer.json" in text
    assert "## Served with the GPU shared under MPS (serving-mps)\n\nno serving-mps/result.json" in text
    assert "- profile, 1 streams: step 7.88 ms, device busy 5.10 ms, 1650 kernels a step" in text
    assert "## Round trips of the Python backend (round-trips)" in text and "| 216 | 8.1 |" in text
    assert "## Counting the callers in flight (callers)\n\nnot run (SHORT_STEPS without callers)" in text
    assert "no serving-max-callers/result.json" in text


def test_text_stream_bench_summarises_and_reports_its_runs():
    import text_stream_bench  # noqa: PLC0415 (perf/ is on the path above)

    runs = [{"concurrency": 1, "first_audio_s": first, "stalls": stalls, "stall_s": stall, "audio_s": 8.5,
             "total_s": 3.2} for first, stalls, stall in ((0.12, 0, 0.0), (0.18, 3, 0.037), (0.14, 0, 0.0))]
    figures = text_stream_bench.summary(runs)
    assert figures["first_audio_median_s"] == 0.14 and figures["runs_with_stalls"] == 1
    assert figures["first_audio_min_s"] == 0.12 and figures["first_audio_max_s"] == 0.18
    result = {"sentences": 5, "max_tokens": 140, "machine": {"cpu": "x", "cores": 2}, "source": "abc", "text": "Hi.",
              "summary": {"1": figures}, "runs": runs}
    text = text_stream_bench.report(result)
    assert "| 1 | 3 | 140 | 120 / 180 | 1 | 0.037 |" in text and text.count("\n| ") >= 6


def test_barge_in_bench_measures_streams_left_early(server, grpc_url):
    """perf/barge_in_bench.py against the test server: a stream left after its 15th chunk (the llm stage
    some 25 frames ahead of the decoder) ends at once, next to nothing decoded that was not heard; one
    that ends before that chunk is an error naming the fix."""
    import barge_in_bench  # noqa: PLC0415 (perf/ is on the path above)

    metrics_url = f"http://localhost:{server.ports.metrics}/metrics"
    run = barge_in_bench.barge_in(grpc_url, metrics_url, 15, 2000, seed=1)
    assert run["after_chunks"] == 15 and run["audio_heard_s"] == 15 * c.SAMPLES_PER_FRAME / c.SAMPLE_RATE
    assert run["wait_for_end_s"] < 2 and 0 < run["tokens_generated"] < 2000
    assert run["windows_decoded"] >= 15 and run["windows_unheard"] < 8, run
    result = {"max_tokens": 2000, "models": "tiny", "machine": {"cpu": "x", "cores": 2},
              "source": {"commit": "abc", "uncommitted": ["src/x.py"]}, "runs": [run],
              "summary": {"15": barge_in_bench.summary([run])}}
    text = barge_in_bench.report(result)
    assert "code abc with uncommitted changes to src/x.py" in text and "\n| 15 | 1 | " in text
    with pytest.raises(RuntimeError, match="ended after .* chunks, before chunk 50: raise --max-tokens"):
        barge_in_bench.barge_in(grpc_url, metrics_url, 50, 28, seed=1)


def test_a_run_folder_is_never_one_that_holds_other_results(tmp_path):
    import datetime as dt

    from common import run_folder  # noqa: PLC0415 (perf/ is on the path above)

    base = f"{dt.date.today().isoformat()}_cpu-test"
    (tmp_path / base).mkdir()
    (tmp_path / base / "result.json").write_text("{}")
    (tmp_path / f"{base}-2").mkdir()
    (tmp_path / f"{base}-2" / "README.md").write_text("five engine runs")  # results of another kind
    (tmp_path / f"{base}-3" / "raw").mkdir(parents=True)  # a run that stopped before writing anything
    assert run_folder("cpu-test", root=tmp_path) == tmp_path / f"{base}-3"


def test_a_cpu_run_folder_names_the_cpu_family():
    from common import cpu_family, cpu_model, machine_name  # noqa: PLC0415

    assert cpu_family("Intel(R) Xeon(R) Processor") == "intel-xeon"
    assert cpu_family("Intel(R) Xeon(R) Platinum 8480+") == "intel-xeon"
    assert cpu_family("AMD EPYC 9654 96-Core Processor") == "amd-epyc"
    assert cpu_family("AMD EPYC") == "amd-epyc"
    assert cpu_family("") == ""
    family = cpu_family(cpu_model())
    assert machine_name().endswith(f"core-{family}" if family else "core")


def test_loadgen_bench_measures_the_load_generator_against_a_paced_stand_in(tmp_path):
    """perf/loadgen_bench.py end to end: the stand-in `orpheus` (the ensemble's tensor names, chunks paced at
    `--speed` times real time) streamed at one level by one load generator process and by two."""
    import json

    import loadgen_bench

    assert loadgen_bench.main(["--concurrency", "2", "--processes", "2", "--max-tokens", "70", "--speed", "4",
                               "--level-seconds", "3", "--ramp-seconds", "0.5", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "loadgen_bench.json").read_text())["levels"]
    assert [(r["processes"], r["concurrency"]) for r in rows] == [(1, 2), (2, 2)]
    for row in rows:
        assert row["streams"] == 4 and row["errors"] == 0 and row["starved"] == 0, row  # failures say why
        # 10 chunks of 2048 samples at 4x real time: each stream about 0.21 s long, 0.85 s of audio
        assert 0.15 < row["rtf_p50"] < 0.6
    assert "| 2 | 2 | 0 | 0 |" in (tmp_path / "loadgen_bench.md").read_text()  # streams, failed, starved
    # A level where every stream failed has no TTFA nor RTF: shown as such (its figures raised TypeError).
    failed = rows[0] | {"errors": 4, "ttfa_p99": None, "rtf_p50": None, "audio_per_second": None}
    text = loadgen_bench.markdown(json.loads((tmp_path / "loadgen_bench.json").read_text()) | {"levels": [failed]})
    assert "| 1 | 2 | 4 | 0 | - | - | - |" in text


def test_loadgen_bench_fails_when_streams_failed_and_keeps_the_servers_log(tmp_path, monkeypatch, capsys):
    """A level whose streams all failed exited 0, and the stand-in server's log, the only trace of why,
    went with its temporary folder."""
    import loadgen_bench

    def failing_level(runner, url, concurrency, processes, server_pid, args) -> dict:
        return {"processes": processes, "concurrency": concurrency, "streams": 4, "errors": 4, "starved": 0,
                "error_examples": ["ConnectionError: no Triton server reachable"], "ttfa_p99": None,
                "rtf_p50": None, "audio_per_second": None, "loadgen_cores": None, "standin_cores": None}

    monkeypatch.setattr(loadgen_bench, "level_row", failing_level)
    assert loadgen_bench.main(["--concurrency", "2", "--processes", "2", "--out", str(tmp_path)]) == 1
    assert "error: 8 streams failed, e.g. ConnectionError: no Triton server reachable" in capsys.readouterr().err
    assert (tmp_path / "server.log").is_file() and (tmp_path / "loadgen_bench.json").is_file()


def test_level_readings_pick_the_counted_span_where_it_holds_two_of_them():
    import time  # noqa: PLC0415

    from common import Readings  # noqa: PLC0415

    values = iter(range(1000))

    def read():
        value = next(values)
        if value == 2:
            raise OSError("no page this time")  # skipped, not fatal
        return value

    readings = Readings(read, interval=0.02)
    time.sleep(0.3)
    readings.stop()
    times = [t for t, _ in readings.readings]
    assert 2 not in [v for _, v in readings.readings] and len(times) >= 8
    assert readings.pair() == (readings.readings[0], readings.readings[-1])
    span = (times[3] - 0.001, times[6] + 0.001)
    assert readings.pair(span) == (readings.readings[3], readings.readings[6])
    # A span holding fewer than two readings, or two closer than an interval: the whole level.
    assert readings.pair((times[3] - 0.001, times[3] + 0.001)) == (readings.readings[0], readings.readings[-1])
    brief = Readings(lambda: 1, interval=0.01, lifetime=0.05)  # a level that failed never stops it
    time.sleep(0.3)
    assert not brief._thread.is_alive() and len(brief.readings) <= 7
    lone = Readings(lambda: 1, interval=60)
    lone.stop()
    assert lone.pair((0, 1)) == (lone.readings[0], lone.readings[-1])


def test_bad_benchmark_arguments_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    """A typo in a level list used to surface minutes in, after the comparisons had run."""
    import pytest
    import run_perf_analyzer  # noqa: PLC0415

    monkeypatch.setattr(run_all, "model_set", lambda *args: pytest.fail("the run started"))
    for argv, message in (
        (["--concurrency", "1,x"], "argument --concurrency: expected whole numbers >= 1, comma-separated"),
        (["--concurrency", "0"], "got '0'"),
        (["--texts", "short,huge"], "argument --texts: expected text names from short, medium, long"),
        (["--poisson-rates", "0.5,-1"], "argument --poisson-rates: expected numbers > 0"),
        (["--pa-concurrency", ""], "argument --pa-concurrency: expected whole numbers >= 1"),
        (["--max-tokens", "-3"], "argument --max-tokens: max_tokens must be in [7, 8192]"),
        (["--max-tokens", "5"], "the least that gives audio), got 5"),  # every stream would be refused
        (["--pa-max-tokens", "9000"], "argument --pa-max-tokens: max_tokens must be in [7, 8192]"),
        (["--level-seconds", "0"], "argument --level-seconds: expected seconds > 0"),
        (["--max-streams", "0"], "argument --max-streams: expected a whole number >= 1"),
    ):
        with pytest.raises(SystemExit):
            run_all.main([*argv, "--out", str(tmp_path / "run")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        run_perf_analyzer.main(["--decoder-concurrency", "4,,-8"])
    assert "argument --decoder-concurrency: expected whole numbers >= 1" in capsys.readouterr().err
    # More streams than engine slots is allowed (queueing is worth measuring), and said before the run.
    with pytest.raises(pytest.fail.Exception, match="the run started"):
        run_all.main(["--concurrency", "1,32", "--max-streams", "16", "--out", str(tmp_path / "run")])
    assert "note: --concurrency up to 32 with --max-streams 16: the streams beyond 16 wait for an engine slot" \
        in capsys.readouterr().out


def test_argument_types_read_lists_and_numbers():
    import argparse

    import pytest

    from orpheus_triton.arguments import (
        counts,
        max_tokens,
        max_tokens_or_zero,
        non_negative,
        positive,
        positive_seconds,
        rates,
    )

    assert counts(" 1, 8,32 ,") == [1, 8, 32]
    assert rates("") == [] and rates("0.25,2") == [0.25, 2.0]
    assert (positive("3"), non_negative("0"), positive_seconds("0.5")) == (3, 0, 0.5)
    assert (max_tokens("7"), max_tokens(str(c.MAX_MAX_TOKENS)), max_tokens_or_zero("0")) == (7, c.MAX_MAX_TOKENS, 0)
    for parse, bad in ((counts, ","), (counts, "1.5"), (rates, "nan"), (rates, "inf"), (positive, "0"),
                       (non_negative, "-1"), (positive_seconds, "inf"), (positive_seconds, ""), (max_tokens, "0"),
                       (max_tokens, "6"), (max_tokens, "7.5"), (max_tokens_or_zero, "6"),
                       (max_tokens_or_zero, str(c.MAX_MAX_TOKENS + 1))):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_a_benchmark_counts_the_cpu_of_its_ended_children_as_its_own():
    """A level's perf_analyzer or stack sampler, ended and waited for, is the benchmark's CPU, not other
    work on the machine (which would make a level look disturbed and measure it again)."""
    import os
    import subprocess

    from common import tree_jiffies  # noqa: PLC0415

    before = tree_jiffies(os.getpid())
    subprocess.run([sys.executable, "-c", "import time\nend = time.process_time() + 0.5\n"
                                          "while time.process_time() < end: pass"], check=True)
    assert (tree_jiffies(os.getpid()) - before) / os.sysconf("SC_CLK_TCK") >= 0.45


def test_report_plots_a_level_without_audio_as_missing_not_as_the_fastest(monkeypatch, tmp_path):
    """A level whose streams all failed has no TTFA: its point is left out and marked, not drawn at 0 ms,
    and its streams count as not played in real time in the capacity plot."""
    import math

    import report  # noqa: PLC0415

    result = json.loads((ROOT / "perf" / "results" / "2026-11-26_cpu-2core-amd-epyc-5" / "result.json").read_text())
    failed = result["tts"]["closed_loop"]["4"]
    failed.update(errors=failed["streams"], starved_streams=0, no_audio=0, rtf_p50=None,
                  **{key: None for key in ("ttfa_p50", "ttfa_p95", "ttfa_p99")})
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    report.plot_ttfa(result, tmp_path / "ttfa.png")
    report.plot_capacity(result, tmp_path / "capacity.png")
    ttfa, capacity = figures
    lines = {line.get_label(): list(line.get_ydata()) for line in ttfa.axes[0].get_lines()}
    assert math.isnan(lines["TTFA p99"][-1]) and lines["TTFA p99"][0] > 0
    markers = {c.get_label(): c.get_offsets().tolist() for c in ttfa.axes[0].collections}
    assert markers["level without audio (all streams failed)"] == [[4, 1000 * result["tts"]["settings"]["ttfa_limit"]]]
    bars = capacity.axes[1].patches
    assert [round(bar.get_y() + bar.get_height()) for bar in bars[-4:]] == [0, 0, 100, 100]  # 3: starved; 4: failed


def test_a_perf_analyzer_sweep_that_fails_is_a_note_and_the_result_is_still_written(monkeypatch, tmp_path):
    import argparse

    def unreadable_export(*args, **kwargs):
        raise KeyError("timestamp")

    monkeypatch.setattr(run_all.run_perf_analyzer, "run", unreadable_export)
    result = {"notes": []}
    args = argparse.Namespace(pa_concurrency=[1], pa_decoder_concurrency=[1], pa_max_tokens=100,
                              pa_request_count=4, ttfa_limit=0.5)
    section = run_all.perf_analyzer_sweep(result, "perf_analyzer", None, tmp_path, args)
    assert section == {"skipped": "perf_analyzer sweep failed: KeyError: 'timestamp'"}
    assert result["notes"] == [section["skipped"]]


def test_a_report_without_comparisons_links_no_comparisons_plot():
    import report  # noqa: PLC0415

    result = json.loads((ROOT / "perf" / "results" / "2026-11-26_cpu-2core-amd-epyc-5" / "result.json").read_text())
    assert "![comparisons](comparisons.png)" in report.markdown(result)
    result["comparisons"] = {}
    text = report.markdown(result)
    assert "comparisons.png" not in text and "Not run (`--skip-comparisons`" in text


def test_the_report_says_what_a_capacity_and_its_levels_rest_on(monkeypatch, tmp_path):
    """A level that passes above a failed one is named beside the capacity, not taken for it; a level whose
    time ran out before all its streams started says how many it counted of those planned; a ratio without
    a target is drawn neither passing nor failing."""
    import report  # noqa: PLC0415

    result = json.loads((ROOT / "perf" / "results" / "2026-11-26_cpu-2core-amd-epyc-5" / "result.json").read_text())
    tts = result["tts"]
    tts["realtime_capacity"], tts["passing_above_capacity"] = 1, [3]
    tts["closed_loop"]["2"]["streams_planned"] = tts["closed_loop"]["2"]["streams"] + 3
    text = report.markdown(result)
    assert "**Real-time capacity: 1 concurrent streams** (the largest level up to which every level had" in text
    assert "Above it, level 3 met that on its own." in text
    assert f"| 2 | {tts['closed_loop']['2']['streams']} of {tts['closed_loop']['2']['streams'] + 3} |" in text
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    report.plot_comparisons(result, tmp_path / "comparisons.png")
    colors = [bar.get_facecolor()[:3] for bar in figures[0].axes[0].patches]
    import matplotlib.colors as mcolors  # noqa: PLC0415

    assert colors[-1] == mcolors.to_rgb("tab:blue")  # the engine's speedup: no target here


def test_the_engine_benchs_closed_loop_admits_newcomers_at_the_rate_streams_end(model_set):
    """engine_bench --churn: N callers, each stream T tokens, the next arriving as one ends: newcomers come
    about N / T a generated token of each stream, and the engine is left idle."""
    import engine_bench

    from orpheus_triton.engine import InflightEngine
    from orpheus_triton.llama import load_llama

    engine = InflightEngine(load_llama(model_set.llm), max_streams=6, max_seq_len=256)
    level = engine_bench.churn(engine, streams=6, tokens=30, steps=90)
    assert level["streams"] == 6 and level["step_ms"] > 0
    per_token = level["arrivals_per_s"] / (6 * level["tokens_per_s_per_stream"])  # newcomers per token made
    assert 0.7 / 30 < per_token < 1.3 / 30
    assert engine.idle()


@pytest.mark.parametrize("script", [
    [sys.executable, "make_input_data.py"], [sys.executable, "report.py"], ["bash", "install_perf_analyzer.sh"],
    [sys.executable, "run_all.py"], [sys.executable, "run_perf_analyzer.py"], [sys.executable, "engine_bench.py"],
    [sys.executable, "callers_bench.py"],
])
def test_perf_scripts_answer_help_without_doing_anything(script, tmp_path):
    """--help printed usage only after the work had started: a venv created, packages installed, files
    rewritten, or an error that the result file "--help" does not exist."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    perf = ROOT / "perf"

    def files() -> dict[Path, int]:  # bytecode caches aside: importing a module may write one
        return {path: path.stat().st_mtime_ns for path in perf.rglob("*")
                if not {".tools", "__pycache__"} & set(path.parts)}

    before = files()
    # A tools folder of its own: the install script must not even create it.
    env = {**os.environ, "PERF_TOOLS_DIR": str(tmp_path / "tools")}
    done = subprocess.run([*script, "--help"], cwd=perf, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower() or script[-1] in done.stdout, done.stdout
    assert not (tmp_path / "tools").exists()
    assert files() == before


def test_the_in_process_side_of_comparison_a_runs_as_the_served_models_do(server, grpc_url, model_set):
    """Comparison (a)'s in-process pipeline takes the served `llm` and `snac_decoder`'s own parameters:
    their CPU threads above all (with torch's default, every core for both stages in one process, the
    in-process side oversubscribed the cores and the ratio flattered the server). The target counts
    as met only when every stream of both sides gave audio."""
    import comparisons  # noqa: PLC0415 (perf/ is on the path above)
    import torch

    from orpheus_triton.loadgen import StreamRecord, Utterance, grpc_stream

    llm_params, _ = comparisons.served_parameters(grpc_url, c.LLM_MODEL)
    decoder_params, max_windows = comparisons.served_parameters(grpc_url, c.DECODER_MODEL)
    assert llm_params["llm_dir"] == str(model_set.llm) and llm_params["max_streams"] == "4"
    assert decoder_params["snac_dir"] == str(model_set.snac) and max_windows > 1
    served_threads = max(1, len(os.sched_getaffinity(0)) // 2)  # the server's 'auto', on a CPU
    caller_threads = torch.get_num_threads()
    pipeline = comparisons.InProcessPipeline(llm_params, decoder_params, max_windows)
    try:
        assert (pipeline.llm_threads, pipeline.decoder_threads) == (served_threads, served_threads)
        assert pipeline.engine.max_streams == 4 and pipeline.engine.max_seq_len == 8192
        utterance = Utterance("short", "Hello there.", "tara", 60, 1)
        order = []

        def served(u, start):
            order.append("served")
            return grpc_stream(grpc_url)(u, start)

        def in_process(u, start):
            order.append("in process")
            return pipeline.synthesize(u, start)

        result = comparisons.compare_serving(served, in_process, [utterance], repeats=2)
        assert order == ["served", "in process", "in process", "served"]  # each side first in turn
        assert len(result["served_ttfa"]) == len(result["in_process_ttfa"]) == 2 and not result["errors"]
        assert result["ttfa_ratio"] == result["served_ttfa_median"] / result["in_process_ttfa_median"]

        def failing(u, start):  # the server refuses 3 of 4 streams: the one that gave audio must not pass
            record = StreamRecord(u.label, u.voice, 0.0)
            record.arrivals, record.samples, record.total = [0.001], [2048], 0.01
            if failing.calls % 4:
                record.error, record.arrivals, record.samples = "server busy", [], []
            failing.calls += 1
            return record

        failing.calls = 0
        result = comparisons.compare_serving(failing, in_process, [utterance], repeats=4)
        assert result["ttfa_ratio"] < 1 and not result["target_met"]
        assert result["errors"] == ["server busy"] * 3 and result["in_process_errors"] == []
    finally:
        pipeline.close()
    assert torch.get_num_threads() == caller_threads


def test_the_engine_comparison_takes_turns_and_keeps_every_pairs_speedup(model_set):
    """Comparison (c) timed each side once, the one-at-a-time run always second: it varied 2.9-4.4x from run
    to run on a 2-core VM. Now pairs of runs, each side first in turn, medians and each pair's speedup."""
    import comparisons  # noqa: PLC0415 (perf/ is on the path above)

    result = comparisons.compare_engine_batching(model_set.llm, "cpu", streams=3, max_new_tokens=14, repeats=3)
    assert result["repeats"] == 3 and len(result["speedups"]) == 3
    assert result["batched_tokens"] == result["one_at_a_time_tokens"] == 3 * 14
    assert result["speedup"] == result["batched_tokens_per_s"] / result["one_at_a_time_tokens_per_s"] > 0
    assert all(speedup > 0 for speedup in result["speedups"])


def test_perf_analyzer_runs_name_a_missing_binary_data_file_or_server_and_leave_no_folder(tmp_path, capsys):
    """A wrong --perf-analyzer or --data ended in a traceback; a server that was not there left an empty run
    folder behind."""
    import run_perf_analyzer  # noqa: PLC0415

    out = tmp_path / "run"
    assert run_perf_analyzer.main(["--perf-analyzer", str(tmp_path / "pa"), "--url", "localhost:1",
                                   "--out", str(out)]) == 1
    assert f"error: no perf_analyzer at {tmp_path / 'pa'}" in capsys.readouterr().out
    binary = tmp_path / "perf_analyzer"
    binary.write_text("#!/bin/sh\n")
    assert run_perf_analyzer.main(["--perf-analyzer", str(binary), "--data", str(tmp_path / "nope.json"),
                                   "--url", "localhost:1", "--out", str(out)]) == 1
    assert f"error: no input data file {tmp_path / 'nope.json'}" in capsys.readouterr().out
    assert run_perf_analyzer.main(["--perf-analyzer", str(binary), "--url", "localhost:1", "--out", str(out)]) == 1
    assert "no ready Triton server at localhost:1" in capsys.readouterr().out and not out.exists()


def test_perf_analyzer_runs_refuse_a_metrics_page_they_cannot_read(server, tmp_path, capsys):
    """An unreadable --metrics-url went unsaid: the wait for an idle engine between levels (request ids
    restart with each level) was skipped."""
    import run_perf_analyzer  # noqa: PLC0415

    binary = tmp_path / "perf_analyzer"
    binary.write_text("#!/bin/sh\n")
    out = tmp_path / "run"
    assert run_perf_analyzer.main(["--perf-analyzer", str(binary), "--url", f"localhost:{server.ports.grpc}",
                                   "--metrics-url", "http://localhost:9/metrics", "--out", str(out)]) == 1
    assert "error: --metrics-url http://localhost:9/metrics: " in capsys.readouterr().out and not out.exists()


def test_benchmark_servers_count_their_callers_as_serve_does(model_set, tmp_path):
    """perf's servers (common.serve_repository) ran without the folder where `serve`'s stages count the
    callers in flight: what they measured left the leases' work out, and a repository rendered with a
    max_callers (run_all's --max-callers) failed to load."""
    import threading

    from common import metric_values, serve_repository
    from conftest import server_settings

    from orpheus_triton.callers import CALLERS_FULL
    from orpheus_triton.client import OrpheusClient, ServerUnavailable
    from orpheus_triton.metrics import CALLERS_METRIC
    from orpheus_triton.repository import render

    repository = render(server_settings(model_set, max_callers=1), tmp_path / "repository")
    with serve_repository(repository, tmp_path / "server.log") as server:
        long_one = threading.Thread(target=OrpheusClient(server.url).synthesize, args=("a long one",),
                                    kwargs={"max_tokens": 1400})
        long_one.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if 1.0 in metric_values(server.metrics_url, CALLERS_METRIC):
                    break  # counted (a series per preprocessing instance)
                time.sleep(0.1)
            else:
                raise AssertionError(f"no caller counted in flight: {CALLERS_METRIC} not 1 in 30 s")
            with pytest.raises(ServerUnavailable, match=CALLERS_FULL):
                OrpheusClient(server.url).synthesize("Hello there.", max_tokens=70)
        finally:
            long_one.join(timeout=120)


def test_callers_bench_times_each_lease_operation_and_leaves_no_lease(tmp_path):
    """perf/callers_bench.py end to end, in a folder of the test's: every operation timed at each level,
    the report's table, and the folder as empty as it was (the admission's lock file aside)."""
    import callers_bench

    folder = tmp_path / "leases"
    assert callers_bench.main(["--held", "1,40", "--ops", "20", "--folder", str(folder),
                               "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "callers_bench.json").read_text())
    assert [row["held"] for row in result["levels"]] == [1, 40]
    for row in result["levels"]:
        assert all(0 < row[name] < 0.5 for name in callers_bench.OPERATIONS), row
        assert row["core_share"] > 0 and row["core_share_bounded"] > 0
    assert "| 40 | " in (tmp_path / "out" / "callers_bench.md").read_text()
    assert [path.name for path in folder.iterdir()] == [".admission.lock"]

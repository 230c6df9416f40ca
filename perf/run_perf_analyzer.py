"""perf_analyzer against the `orpheus` ensemble (gRPC streaming, decoupled) and `snac_decoder` alone.

    python perf/run_perf_analyzer.py                      # starts a server with the demo model set
    python perf/run_perf_analyzer.py --url localhost:8001 # uses a running server
    python perf/run_perf_analyzer.py --concurrency 1,2,4,8 --decoder-concurrency 1,4,8,16 --max-tokens 0
    python perf/run_perf_analyzer.py --shape orpheus-3b --device cuda --max-streams 64   # a GPU server

Each level runs one perf_analyzer process (concurrency mode, count windows) and
leaves in the run folder: its CSV (``-f --verbose-csv``), its console output and
its profile export (``raw/``, per-request send and response timestamps and
outputs). From the export this script computes what perf_analyzer does not: time
to first audio and playback starvation per stream, from each response's time and
audio size. perf_analyzer's own latency for this decoupled model is the time to
the stream's last response.

Request ids: perf_analyzer 2.47 sets one on every request, (worker thread << 48) |
counter, unique within one perf_analyzer process and restarting with each
process. The pipeline keys a stream's decoder state by that id, so each level
waits for the server to go idle before the next process reuses ids. For
`snac_decoder` alone every request is one whole stream (one frame + end of
speech: one window, see make_input_data.py), so unique ids per request are all it needs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import PERF, SHAPES, RunningServer, log, other_load_monitor, run_folder, wait_idle

from orpheus_triton.arguments import DefaultsHelpFormatter, counts, max_tokens_or_zero, positive, positive_seconds
from orpheus_triton.client import require_ready_server
from orpheus_triton.constants import DECODER_MODEL, ENSEMBLE_MODEL, IN_MAX_TOKENS, OUT_AUDIO
from orpheus_triton.loadgen import DEFAULT_TTFA_LIMIT, meets_realtime, percentile, playback, realtime_capacity
from orpheus_triton.triton_calls import response_thread_setting

DATA = PERF / "data"
INSTALLER = PERF / "install_perf_analyzer.sh"


def find_perf_analyzer(explicit: str | None = None, install: bool = False) -> str | None:
    """An explicit path (None if no such file), perf_analyzer on PATH, a previous install under perf/.tools, or
    (install=True) a new one."""
    if explicit:
        return explicit if Path(explicit).is_file() else None
    tools = Path(os.environ.get("PERF_TOOLS_DIR") or PERF / ".tools")  # where install_perf_analyzer.sh put it
    for candidate in (shutil.which("perf_analyzer"), str(tools / "bin" / "perf_analyzer")):
        if candidate and Path(candidate).is_file():
            return candidate
    if install:
        done = subprocess.run(["bash", str(INSTALLER)], capture_output=True, text=True)
        sys.stderr.write(done.stderr)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[-1]
    return None


def read_csv(path: Path) -> dict:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    row = rows[0]
    out = {}
    for key, value in row.items():
        if key is None:
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def read_profile_export(path: Path) -> list[dict]:
    """Per-request timing from perf_analyzer's profile export: send time and each response's time and size.

    The export writes BYTES and INT16 outputs as raw bytes inside JSON strings (control
    bytes escaped), which is not UTF-8: read as Latin-1, every byte is one character, so
    an audio output's string length is its size in bytes (2 per int16 sample).
    """
    document = json.loads(path.read_bytes().decode("latin-1"), strict=False)
    requests = []
    for experiment in document.get("experiments", []):
        for request in experiment.get("requests", []):
            sent = request["timestamp"]
            outputs = request.get("response_outputs") or [{}] * len(request["response_timestamps"])
            requests.append({
                "concurrency": experiment["experiment"]["value"],
                "sent_ns": sent,
                "responses": [(t - sent) / 1e9 for t in request["response_timestamps"]],
                "samples": [len(o.get(OUT_AUDIO) or "") // 2 if o else 0 for o in outputs],
            })
    return requests


def stream_stats(requests: list[dict]) -> dict:
    """TTFA percentiles and starvation of perf_analyzer's streams (same definitions as the load generator)."""
    ttfa, starved, stalls = [], 0, 0
    for request in requests:
        chunks = [(t, n) for t, n in zip(request["responses"], request["samples"], strict=True) if n]
        if not chunks:
            continue
        ttfa.append(chunks[0][0])
        play = playback([t for t, _ in chunks], [n for _, n in chunks])
        starved += play.starved
        stalls += play.stalls
    return {
        "streams": len(requests),
        "errors": 0,
        "no_audio": len(requests) - len(ttfa),
        "ttfa_p50": percentile(ttfa, 50),
        "ttfa_p95": percentile(ttfa, 95),
        "ttfa_p99": percentile(ttfa, 99),
        "starved_streams": starved,
        "stalls": stalls,
    }


def run_level(perf_analyzer: str, model: str, url: str, data: Path, concurrency: int, out: Path,
              request_count: int, timeout: float, tag: str) -> dict:
    csv_path = out / f"pa_{tag}_c{concurrency}.csv"
    export = out / "raw" / f"pa_{tag}_c{concurrency}_export.json"
    export.unlink(missing_ok=True)  # perf_analyzer refuses to overwrite it (reruns into the same folder)
    command = [
        perf_analyzer, "-m", model, "-u", url, "-i", "grpc", "--streaming",
        "--input-data", str(data), "--concurrency-range", str(concurrency),
        "--measurement-mode", "count_windows", "--measurement-request-count", str(request_count),
        "--stability-percentage", "100", "--max-trials", "5",
        "-f", str(csv_path), "--verbose-csv", "--profile-export-file", str(export),
    ]
    started, finish = time.perf_counter(), other_load_monitor()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        console, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        console = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (
            expired.stdout or "")
        console, code = console + f"\n[timed out after {timeout:.0f} s]", -1
    (out / "raw" / f"pa_{tag}_c{concurrency}.log").write_text(" ".join(command) + "\n\n" + console)
    result = {"command": " ".join(command), "returncode": code, "seconds": time.perf_counter() - started} | finish()
    if code != 0 or not csv_path.is_file():
        result["error"] = console.strip().splitlines()[-1] if console.strip() else f"exit code {code}"
        return result
    result["csv"] = read_csv(csv_path)
    if export.is_file():
        result["streams"] = stream_stats(read_profile_export(export))
    return result


def with_max_tokens(data: Path, max_tokens: int, out: Path) -> Path:
    """A copy of an `orpheus` input data file with every request's max_tokens replaced."""
    document = json.loads(data.read_text())
    for entry in document["data"]:
        entry[IN_MAX_TOKENS] = [max_tokens]
    target = out / "raw" / f"{data.stem}_max{max_tokens}.json"
    target.write_text(json.dumps(document))
    return target


def _ms(value: float | None, seconds_per_unit: float = 1.0) -> str:
    """A time in milliseconds for the log; "-" where perf_analyzer gave none."""
    return "-" if value is None else f"{1000 * value * seconds_per_unit:.0f}"


def run(perf_analyzer: str, server: RunningServer, out: Path, concurrency: list[int], decoder_concurrency: list[int],
        data: Path, max_tokens: int, request_count: int, decoder_request_count: int, timeout: float,
        ttfa_limit: float = DEFAULT_TTFA_LIMIT) -> dict:
    source = str(data.relative_to(PERF.parent) if data.is_relative_to(PERF.parent) else data)
    if max_tokens:
        data = with_max_tokens(data, max_tokens, out)
    version = subprocess.run([perf_analyzer, "--version"], capture_output=True, text=True)
    result = {"perf_analyzer": perf_analyzer, "version_output": (version.stdout + version.stderr).strip()[:200],
              "input_data": str(data.relative_to(PERF.parent) if data.is_relative_to(PERF.parent) else data),
              "source_data": source, "max_tokens": max_tokens or None, "orpheus": {}, "snac_decoder": {}}
    for c in concurrency:
        wait_idle(server)
        level = run_level(perf_analyzer, ENSEMBLE_MODEL, server.url, data, c, out,
                          max(request_count, c), timeout, "orpheus")
        result["orpheus"][c] = level
        streams = level.get("streams", {})
        log(f"perf_analyzer orpheus c={c}: " + (level.get("error") or (
            f"{level['csv'].get('Inferences/Second', 0):.2f} streams/s, TTFA p99 "
            f"{_ms(streams.get('ttfa_p99'))} ms, starved {streams.get('starved_streams')}")))
    passing = {c: level["streams"] for c, level in result["orpheus"].items() if "streams" in level}
    result["ttfa_limit"] = ttfa_limit
    result["orpheus_realtime_capacity"] = realtime_capacity(passing, ttfa_limit)
    result["orpheus_realtime_levels"] = [c for c, s in passing.items() if meets_realtime(s, ttfa_limit)]
    for c in decoder_concurrency:
        wait_idle(server)
        level = run_level(perf_analyzer, DECODER_MODEL, server.url, DATA / "snac_decoder.json", c, out,
                          max(decoder_request_count, 2 * c), timeout, "snac_decoder")
        result["snac_decoder"][c] = level
        row = level.get("csv", {})
        log(f"perf_analyzer snac_decoder c={c}: " + (level.get("error") or (
            f"{row.get('Inferences/Second', 0):.1f} windows/s, p50 {_ms(row.get('p50 latency'), 1e-6)} ms")))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--url", help="gRPC endpoint of a running server (default: start one, see --shape)")
    parser.add_argument("--metrics-url", help="its metrics page, to wait for idle between levels")
    parser.add_argument("--perf-analyzer",
                        help="perf_analyzer binary (default: PATH, then $PERF_TOOLS_DIR or perf/.tools)")
    parser.add_argument("--install", action="store_true", help="run install_perf_analyzer.sh if none is found")
    parser.add_argument("--concurrency", type=counts, default="1,2,4",
                        help="streams perf_analyzer keeps open against the orpheus ensemble, one level each")
    parser.add_argument("--decoder-concurrency", type=counts, default="1,4,8",
                        help="requests it keeps in flight against snac_decoder alone, one level each")
    parser.add_argument("--data", default=str(DATA / "orpheus_short.json"), help="perf_analyzer input data file")
    parser.add_argument("--max-tokens", type=max_tokens_or_zero, default=100,
                        help="override max_tokens of every request (0: keep the data file's)")
    parser.add_argument("--request-count", type=positive, default=4, help="requests per measurement window")
    parser.add_argument("--decoder-request-count", type=positive, default=16,
                        help="snac_decoder requests per measurement window")
    parser.add_argument("--timeout", type=positive_seconds, default=300.0, help="seconds per perf_analyzer process")
    parser.add_argument("--ttfa-limit", type=positive_seconds, default=DEFAULT_TTFA_LIMIT,
                        help="p99 time to first audio (s) under which a level counts as real-time (default 0.5)")
    parser.add_argument("--out", help="run folder (default perf/results/<date>_<machine>)")
    parser.add_argument("--max-streams", type=positive, default=16, help="engine streams when starting a server")
    parser.add_argument("--shape", choices=SHAPES, default="demo",
                        help="random-weight LLM shape of the server it starts")
    parser.add_argument("--models", help="a real model set directory for the server it starts (llm/ + snac/)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda, for the server it starts")
    parser.add_argument("--decoder-response-thread", type=response_thread_setting, default="auto",
                        help="the snac_decoder adapter's response thread, for the server it starts: auto (two on a "
                             "GPU, none on a CPU), true, false or a number of threads")
    parser.add_argument("--max-seq-len", type=positive, default=2048, help="engine positions per stream, likewise")
    args = parser.parse_args(argv)
    if args.url and (args.models or args.shape != "demo"):
        parser.error("--shape and --models pick the models of a server this script starts; not with --url")

    perf_analyzer = find_perf_analyzer(args.perf_analyzer, args.install)
    if not perf_analyzer:
        log(f"error: no perf_analyzer at {args.perf_analyzer}" if args.perf_analyzer else
            "perf_analyzer not found: run perf/install_perf_analyzer.sh (or pass --install)")
        return 1
    if not Path(args.data).is_file():
        log(f"error: no input data file {args.data} (perf/make_input_data.py writes them)")
        return 1
    if args.url:  # before the run folder is made: a server that is not there leaves no empty one behind
        try:
            require_ready_server(args.url)
        except ConnectionError as error:
            log(f"error: {error}")
            return 1
        if args.metrics_url:  # read between levels to wait for an idle engine: unread, that wait was skipped
            from common import metrics_page  # noqa: PLC0415

            try:
                metrics_page(args.metrics_url)
            except (OSError, ValueError) as error:
                log(f"error: --metrics-url {args.metrics_url}: {error}; give the server's metrics page "
                    f"(http://HOST:METRICS_PORT/metrics), or leave the option out")
                return 1
    out = Path(args.out) if args.out else run_folder()
    (out / "raw").mkdir(parents=True, exist_ok=True)
    common = dict(out=out, concurrency=args.concurrency, decoder_concurrency=args.decoder_concurrency,
                  data=Path(args.data),
                  max_tokens=args.max_tokens, request_count=args.request_count,
                  decoder_request_count=args.decoder_request_count, timeout=args.timeout, ttfa_limit=args.ttfa_limit)
    if args.url:
        result = run(perf_analyzer, RunningServer(args.url, args.metrics_url), **common)
    else:
        from common import local_server, model_set  # noqa: PLC0415

        models, description = model_set(args.shape, args.models)
        log(f"starting a server: {description}, device {args.device}, {args.max_streams} engine streams")
        overrides = {"decoder_response_thread": args.decoder_response_thread}
        with local_server(models, args.max_streams, out / "raw" / "server_perf_analyzer.log", device=args.device,
                          max_seq_len=args.max_seq_len, settings_overrides=overrides) as server:
            result = run(perf_analyzer, server, **common)
        result["model_set"] = description
    path = out / "perf_analyzer.json"
    path.write_text(json.dumps(result, indent=1))
    log(f"wrote {path}")
    failed = [f"{model} c={c}" for model in ("orpheus", "snac_decoder")
              for c, level in result[model].items() if "error" in level]
    if failed:
        log(f"error: perf_analyzer failed at {', '.join(failed)} (see {path})")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

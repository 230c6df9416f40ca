#!/usr/bin/env python3
"""One page from a GPU short run's folder: what ran and passed, the engine's figures (each engine_bench
run's, with the GPU's default overlap and, where `engine-no-overlap` ran, without; and its bursts), the
served sweeps, perf_analyzer and the Python backend's round trips, written to SUMMARY.md and printed.

    python perf/gpu/summarize.py perf/results/gpu-short

`run_on_gpu.sh short` runs it last, so the figures are in the command's own output (the tail a lent
machine hands back) before the folder is unpacked. Each part is skipped, with a line saying so, when
its step did not run or left no result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # perf/: load_table
from load_table import figure, load_table  # noqa: E402
from stacks import stacks_table  # noqa: E402


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def steps(folder: Path) -> list[str]:
    """Each step's exit line (run_on_gpu.sh's NAME.status files), in the order they ran."""
    statuses = sorted(folder.glob("*.status"), key=lambda p: p.stat().st_mtime)
    return [f"- {p.stem}: {p.read_text().strip()}" for p in statuses] or ["- no step statuses"]


def check(folder: Path) -> list[str]:
    result = _load(folder / "check" / "check_gpu.json")
    if result is None:
        return ["no check_gpu.json"]
    lines = [f"{result.get('device')} (torch {result.get('torch')}); failed: {result.get('failed') or 'none'}"]
    for name, outcome in result.get("checks", {}).items():
        figures = {k: v for k, v in outcome.items() if k not in ("ok", "seconds", "error", "trace")}
        lines.append(f"- {name}: {'ok' if outcome.get('ok') else 'FAILED'} {figures}"
                     + (f" error: {outcome['error'][:300]}" if outcome.get("error") else ""))
    return lines


def engine(folder: Path) -> list[str]:
    """Each engine_bench.py run's own report (its step table and bursts), headings two levels down."""
    reports = sorted((folder / "engine").glob("engine_*.md"))
    lines = []
    for path in reports:
        lines += ["##" + line if line.startswith("#") else line for line in path.read_text().splitlines()] + [""]
    return lines or ["no engine results"]


def serving(folder: Path, name: str) -> list[str]:
    result = _load(folder / name / "result.json")
    if result is None:
        return [f"no {name}/result.json"]
    tts = result["tts"]
    settings = tts.get("settings", {})
    lines = [f"capacity {tts.get('realtime_capacity')} streams (by p99 TTFA limit: "
             f"{tts.get('realtime_capacity_by_limit')}); server {result.get('server_settings')}; "
             f"ramp {settings.get('ramp_seconds', 0)} s, {settings.get('streams_per_worker')} streams per worker",
             "", "| level | streams | errors | TTFA p50 ms | p99 ms | max ms | starved | stall s | RTF p50 | "
             "server's TTFA p50 / p99 ms, stalls | decoder busy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    levels = [(f"closed {c}", level) for c, level in tts.get("closed_loop", {}).items()]
    levels += [(f"Poisson {rate}/s", level) for rate, level in tts.get("poisson", {}).items()]
    for label, level in levels:
        server = (f"{_ms(level['server_ttfa_p50'])} / {_ms(level['server_ttfa_p99'])}, {level['server_stalls']}"
                  if level.get("server_first_audio") is not None else "-")
        lines.append(f"| {label} | {level['streams']} | {level['errors']} | {_ms(level['ttfa_p50'])} | "
                     f"{_ms(level['ttfa_p99'])} | {_ms(level.get('ttfa_max'))} | {level['starved_streams']} | "
                     f"{level.get('stall_seconds', 0):.1f} | {figure(level.get('rtf_p50'))} | {server} | "
                     f"{figure(level.get('server_decoder_busy'))} |")
    table = load_table(levels)
    stacks = stacks_table(levels)
    return lines + ([""] + table if table else []) + ([""] + stacks if stacks else []) + [""]


def perf_analyzer(folder: Path) -> list[str]:
    result = _load(folder / "perf-analyzer" / "perf_analyzer.json")
    if result is None:
        return ["no perf-analyzer/perf_analyzer.json"]
    version = (result.get("version_output") or "").splitlines()[:1]
    lines = [f"{version[0] if version else 'perf_analyzer'}; {result.get('model_set')}", "",
             "| model | concurrency | per second | p50 latency ms | TTFA p50 / p99 ms | starved | error |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for model in ("orpheus", "snac_decoder"):
        for concurrency, level in result.get(model, {}).items():
            row, streams = level.get("csv", {}), level.get("streams", {})
            lines.append(f"| {model} | {concurrency} | {row.get('Inferences/Second', 0):.1f} | "
                         f"{row.get('p50 latency', 0) / 1000:.0f} | {_ms(streams.get('ttfa_p50'))} / "
                         f"{_ms(streams.get('ttfa_p99'))} | {streams.get('starved_streams', '-')} | "
                         f"{level.get('error', '')} |")
    return lines + [""]


def profiles(folder: Path) -> list[str]:
    """profile_step.py's figures (the opt-in `profile` and `profile-no-overlap` steps), when they ran."""
    lines = []
    for name in ("profile", "profile-no-overlap"):
        result = _load(folder / name / "profile.json")
        if result is None:
            continue
        for streams, run in result.get("profiles", {}).items():
            lines.append(f"- {name}, {streams} streams: step {run['step_ms']:.2f} ms, device busy "
                         f"{run['device_busy_ms_per_step']:.2f} ms, {run['kernels_per_step']:.0f} kernels a step")
    return lines or ["not run (SHORT_STEPS without profile)"]


def round_trips(folder: Path) -> list[str]:
    """perf/round_trips.py's table (the `round-trips` step): the Python backend's round trips on this host."""
    path = folder / "round-trips" / "round_trips.md"
    if not path.is_file():
        return ["no round_trips.md"]
    return [line for line in path.read_text().splitlines() if not line.startswith("# ")]


def callers(folder: Path) -> list[str]:
    """perf/callers_bench.py's table (the `callers` step): the leases' operations on this host."""
    path = folder / "callers" / "callers_bench.md"
    if not path.is_file():
        return ["not run (SHORT_STEPS without callers)"]
    return [line for line in path.read_text().splitlines() if not line.startswith("# ")]


def summary(folder: Path) -> str:
    machine = (folder / "machine.txt").read_text().splitlines()[:3] if (folder / "machine.txt").is_file() else []
    sections = [("Steps", steps(folder)), ("check_gpu", check(folder)), ("Engine", engine(folder)),
                ("Served (serving)", serving(folder, "serving")),
                ("Served with the GPU shared under MPS (serving-mps)", serving(folder, "serving-mps")),
                ("Served with a paced stand-in engine (serving-paced)", serving(folder, "serving-paced")),
                ("The same, responses on two lanes a model (serving-paced-lanes)",
                 serving(folder, "serving-paced-lanes")),
                ("Served with stand-ins for the engine and SNAC (serving-plumbing)",
                 serving(folder, "serving-plumbing")),
                ("Served without the engine's overlap (serving-no-overlap)", serving(folder, "serving-no-overlap")),
                ("Served without the newcomer round (serving-newcomer-off)", serving(folder, "serving-newcomer-off")),
                ("Served with the decoder's responses inline (serving-decoder-inline)",
                 serving(folder, "serving-decoder-inline")),
                ("Served bounded by --max-callers (serving-max-callers)", serving(folder, "serving-max-callers")),
                ("Counting the callers in flight (callers)", callers(folder)),
                ("perf_analyzer", perf_analyzer(folder)), ("Step profile", profiles(folder)),
                ("Round trips of the Python backend (round-trips)", round_trips(folder))]
    parts = [f"# GPU short run: {folder}", "", *machine]
    for title, lines in sections:
        parts += ["", f"## {title}", "", *lines]
    return "\n".join(parts).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="perf/results/gpu-short")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        parser.error(f"{folder} is not a folder")
    text = summary(folder)
    (folder / "SUMMARY.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

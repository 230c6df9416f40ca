"""Turn a run's result.json into report.md and PNG plots (matplotlib, headless).

    python perf/report.py perf/results/<date>_<machine>/result.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from load_table import figure, load_table  # perf/, beside this file
from stacks import stacks_table

from orpheus_triton.constants import SAMPLE_RATE, SAMPLES_PER_FRAME
from orpheus_triton.loadgen import DEFAULT_TTFA_LIMIT, StreamRecord

CHUNK_MS = 1000 * SAMPLES_PER_FRAME / SAMPLE_RATE


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _us(microseconds) -> str:
    """perf_analyzer's microseconds as milliseconds; "-" where its CSV has no such column."""
    return "-" if microseconds is None else f"{microseconds / 1000:.0f}"


def _counted(level: dict) -> str:
    """A level's counted streams, "of" those planned when its time ran out before they all started."""
    planned = level.get("streams_planned")
    return f"{level['streams']} of {planned}" if planned and planned > level["streams"] else str(level["streams"])


def _f(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _levels(block: dict) -> list[tuple[int, dict]]:
    return sorted(((int(k), v) for k, v in block.items()), key=lambda kv: kv[0])


def _records(result: dict, key: str) -> list[StreamRecord]:
    fields = {"label", "voice", "started", "arrivals", "samples", "total", "error", "measured"}
    return [StreamRecord(**{k: v for k, v in r.items() if k in fields})
            for r in result["tts"]["records"].get(key, [])]


def _pyplot():
    """matplotlib's pyplot, headless: the `perf` extra. Only the plots need it, not the markdown."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _ms_or_gap(seconds) -> float:
    """Milliseconds to plot; a missing figure (no stream of the level heard audio) breaks the line."""
    return float("nan") if seconds is None else 1000 * seconds


def _failed_share(level: dict) -> float:
    """Counted streams that failed or heard no audio, as a share of the level's counted streams."""
    return (level["errors"] + level["no_audio"]) / level["streams"] if level["streams"] else 1.0


def plot_ttfa(result: dict, path: Path) -> None:
    tts = result["tts"]
    levels = _levels(tts["closed_loop"])
    limit = tts["settings"]["ttfa_limit"]
    fig, ax = _pyplot().subplots(figsize=(7.5, 4.5))
    xs = [c for c, _ in levels]
    for key, style in (("ttfa_p50", "o-"), ("ttfa_p95", "s--"), ("ttfa_p99", "^-")):
        ax.plot(xs, [_ms_or_gap(lv[key]) for _, lv in levels], style, label=key.replace("ttfa_", "TTFA "))
    heard = [(c, lv) for c, lv in levels if lv["ttfa_p99"] is not None]
    starved = [(c, lv) for c, lv in heard if lv["starved_streams"] or lv["errors"] or lv["no_audio"]]
    if starved:
        ax.scatter([c for c, _ in starved], [1000 * lv["ttfa_p99"] for _, lv in starved], s=160,
                   facecolors="none", edgecolors="red", linewidths=1.5, label="level with starved or failed streams",
                   zorder=5)
    silent = [c for c, lv in levels if lv["ttfa_p99"] is None]  # no counted stream heard audio: no TTFA to plot
    if silent:
        ax.scatter(silent, [1000 * limit] * len(silent), marker="X", s=120, color="red", zorder=5,
                   label="level without audio (all streams failed)")
    pa = result.get("perf_analyzer") or {}
    pa_levels = [(int(c), lv["streams"]) for c, lv in (pa.get("orpheus") or {}).items() if "streams" in lv]
    if pa_levels:
        ax.plot([c for c, _ in pa_levels], [_ms_or_gap(s["ttfa_p99"]) for _, s in pa_levels], "x:",
                color="gray", label="TTFA p99 (perf_analyzer)")
    ax.axhline(1000 * limit, color="red", lw=1, ls=":", label=f"{1000 * limit:.0f} ms limit")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent streams (closed loop)")
    ax.set_ylabel("time to first audio (ms)")
    ax.set_title(f"Time to first audio vs concurrency: real-time capacity {tts['realtime_capacity']} streams\n"
                 f"({result['machine_name']}, {result['model_set']})", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_capacity(result: dict, path: Path) -> None:
    tts = result["tts"]
    levels = _levels(tts["closed_loop"])
    xs = [c for c, _ in levels]
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(10, 4.2))
    served = [lv["realtime_streams_served"] or 0 for _, lv in levels]
    left.plot(xs, served, "o-", label="audio produced per wall second")
    # An upper guide: a closed loop's callers hear nothing while they wait for each stream's first audio.
    left.plot(xs, xs, ":", color="gray", label="streams x real time (at most what a closed loop needs)")
    left.set_xscale("log", base=2)
    left.set_xticks(xs, [str(x) for x in xs])
    left.set_xlabel("concurrent streams")
    left.set_ylabel("audio seconds per second")
    left.set_title("Throughput vs demand", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    names = [str(x) for x in xs]
    starved = [100 * lv["starved_streams"] / max(1, lv["streams"]) for _, lv in levels]
    failed = [100 * _failed_share(lv) for _, lv in levels]
    right.bar(names, starved, color="tab:red", alpha=0.7, label="starved")
    bars = right.bar(names, failed, bottom=starved, color="black", alpha=0.6, label="failed or without audio")
    for bar, (_, lv) in zip(bars, levels, strict=True):
        right.annotate(f"RTF {_f(lv['rtf_p50'])}", (bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height()),
                       ha="center", va="bottom", fontsize=8)
    right.set_ylim(0, 115)
    right.set_xlabel("concurrent streams")
    right.set_ylabel("streams not played in real time (%)")
    right.set_title(f"Starved or failed (median RTF on bars); capacity = {tts['realtime_capacity']}", fontsize=10)
    right.legend(fontsize=8, loc="upper left")
    _save(fig, path)


def plot_gaps(result: dict, path: Path) -> None:
    levels = _levels(result["tts"]["closed_loop"])
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(10, 4.2))
    longest = 0.0
    for c, _ in levels:
        plays = [r.playback() for r in _records(result, f"closed_{c}")
                 if r.measured and r.error is None and r.arrivals]  # not the fillers around the level
        gaps = sorted(1000 * g for p in plays for g in p.gaps)
        headroom = sorted(1000 * h for p in plays for h in p.headroom)
        if gaps:
            longest = max(longest, gaps[-1])
            left.plot(gaps, [i / len(gaps) for i in range(1, len(gaps) + 1)], label=f"{c} streams")
        if headroom:
            right.plot(headroom, [i / len(headroom) for i in range(1, len(headroom) + 1)], label=f"{c} streams")
    left.axvline(CHUNK_MS, color="gray", ls=":", lw=1, label=f"chunk length {CHUNK_MS:.0f} ms")
    left.set_xscale("symlog", linthresh=10)
    left.set_xlim(0, max(longest, CHUNK_MS) * 1.5)
    left.set_xlabel("gap between consecutive chunks (ms)")
    left.set_ylabel("fraction of gaps <= x")
    left.set_title("Chunk gap distribution (CDF)", fontsize=10)
    right.axvline(0, color="red", ls=":", lw=1, label="0: playback stalls")
    right.set_xlabel("audio buffered when a chunk arrives (ms); < 0 = stall")
    right.set_ylabel("fraction of chunks <= x")
    right.set_title("Playback headroom (CDF)", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def _comparison_bars(comp: dict) -> list[tuple[str, float, float | None, str]]:
    """(label, ratio, target, sense) of each comparison the run measured."""
    bars = []
    if comp.get("serving", {}).get("ttfa_ratio") is not None:
        bars.append(("served / in-process\nTTFA, 1 stream", comp["serving"]["ttfa_ratio"], comp["serving"]["target"],
                     "lower is better"))
    if comp.get("snac"):
        measure = comp["snac"].get("target_measure", "cpu_ratio")
        bars.append((f"SNAC 8 windows batched /\none by one, {'CPU' if measure == 'cpu_ratio' else 'wall'} time",
                     comp["snac"][measure], comp["snac"]["target"], "lower is better"))
    if comp.get("engine"):
        bars.append(("engine 8 streams in-flight /\none at a time, tokens/s", comp["engine"]["speedup"], None,
                     "higher is better"))
    return bars


def plot_comparisons(result: dict, path: Path) -> None:
    """The comparisons' ratios against their targets; nothing when the run measured none."""
    bars = _comparison_bars(result.get("comparisons") or {})
    if not bars:
        return
    fig, ax = _pyplot().subplots(figsize=(8, 4))
    xs = range(len(bars))
    # A ratio without a target here (the engine's: its target is engine_bench's, on another model) is neither.
    colors = ["tab:blue" if target is None else "tab:green" if value <= target else "tab:red"
              for _, value, target, _ in bars]
    ax.bar(xs, [b[1] for b in bars], color=colors, alpha=0.75)
    for x, (_, value, target, sense) in zip(xs, bars, strict=True):
        if target is not None:
            ax.hlines(target, x - 0.4, x + 0.4, colors="black", linestyles="--", lw=1.2)
            ax.annotate(f"target <= {target:g}", (x, target), xytext=(0, 4), textcoords="offset points",
                        ha="center", fontsize=8)
        ax.annotate(f"{value:.2f}x ({sense})", (x, value), xytext=(0, -14 if value > 0.3 else 4),
                    textcoords="offset points", ha="center", fontsize=9, weight="bold")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("ratio")
    ax.set_title(f"Comparisons ({result['machine_name']}, {result['model_set']})", fontsize=10)
    ax.set_ylim(0, max(max(b[1] for b in bars), 1.3) * 1.15)
    _save(fig, path)


def _threads_note(settings: dict) -> str:
    """The server processes' torch threads where a run set them (older results: not recorded, 'auto')."""
    threads = {stage: settings.get(f"{stage}_cpu_threads", "auto") for stage in ("llm", "decoder")}
    if set(threads.values()) == {"auto"}:
        return ""
    return f"; torch threads: llm {threads['llm']}, decoder {threads['decoder']}"


def _source_line(source: dict | None) -> str:
    if not source:
        return "* code: not recorded"
    line = f"* code: commit {source.get('commit')}"
    if source.get("uncommitted"):
        line += f", with uncommitted changes to {', '.join(source['uncommitted'])}"
    return line


def _other(step: dict) -> str:
    """Other processes' CPU during a step, and how many tries it took to get a quiet one."""
    tries = step.get("attempts", 1)
    return _f(step.get("cores_other"), 1) + (f" ({tries} tries)" if tries > 1 else "")


def _met(flag) -> str:
    return "**met**" if flag else "**missed**"


def _server_view(levels: dict) -> list[str]:
    """The server's own listener metrics per level beside the client's figures (runs that have them)."""
    rows = [(c, lv) for c, lv in _levels(levels) if lv.get("server_first_audio") is not None]
    if not rows:
        return []
    labelled = [(f"{c} streams", lv) for c, lv in _levels(levels)]
    stacks = stacks_table(labelled)
    return [
        "",
        "What the server saw over the whole level, filler streams included (the client's figures beside them "
        "are the counted streams'), from its own metrics (`orpheus_time_to_first_audio_seconds`: "
        "from preprocessing taking a request to its first audio sent, quantiles interpolated within the "
        "histogram's buckets; `orpheus_decoder_stalls_total`: chunks sent after their listener had played "
        "everything before them, playback counted from the first audio sent; *decoder busy*: the level's share "
        "of time in decoder rounds (SNAC and answering), `orpheus_decoder_busy_seconds_total`, 1 = saturated, "
        "a little over 1 where a round spans the level's edges; *streams with first audio*: how many streams the "
        "server sent first audio for, fillers included):",
        "",
        "| streams | streams with first audio, server | TTFA p50 ms, server / client | TTFA p99 ms, server / client | "
        "stalls, server / client | decoder busy |",
        "|---:|---:|---:|---:|---:|---:|",
        *[f"| {c} | {lv['server_first_audio']} | {_ms(lv['server_ttfa_p50'])} / {_ms(lv['ttfa_p50'])} | "
          f"{_ms(lv['server_ttfa_p99'])} / {_ms(lv['ttfa_p99'])} | {lv['server_stalls']} / {lv['stalls']} | "
          f"{figure(lv.get('server_decoder_busy'))} |"
          for c, lv in rows],
        "",
        *load_table(labelled),
        *([""] + stacks if stacks else []),
    ]


def markdown(result: dict) -> str:
    tts, machine = result["tts"], result["machine"]
    limit = tts["settings"]["ttfa_limit"]
    lines = [
        f"# Benchmark run {result['run']}",
        "",
        f"* machine: **{result['machine_name']}**: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB; GPU: {machine['gpu'] or 'none'}; torch {machine['torch']} "
        f"({machine['torch_threads']} threads), Python {machine['python']}",
        f"* models: {result['model_set']} (random weights; speed depends on shapes only)",
        _source_line(result.get("source")),
        f"* server: tritonserver from {result.get('tritonserver', '?')}, engine max_streams "
        f"{result['server_settings']['max_streams']}, device {result['server_settings']['device']}; "
        + ("streams start with the lead-in frame (first audio after 21 tokens)"
           if result["server_settings"].get("lead_in", False) else "first audio after 28 tokens (no lead-in frame)")
        + _threads_note(result["server_settings"]),
        (f"* cores busy with other work just before the run: {result['busy_cores_before']:.2f}\n"
           if result.get("busy_cores_before") is not None else "")
        + f"* load average (1/5/15 min) at start {result['load_average_start']}, at end {result['load_average_end']} "
        f"(*other cores*, in the tables: the cores' worth of CPU that processes outside this benchmark used "
        f"during that step; above 0.2 or so, other work shared the {machine['cores']} cores and slowed it)",
        f"* wall time of the whole run: {result['seconds']:.0f} s; command: `{result['command']}`",
        "",
        "## Streaming TTS load (closed loop)",
        "",
        f"Texts: {', '.join(tts['settings']['labels'])}; max_tokens "
        f"{tts['settings']['max_tokens'] or 'per text'}; streams per level = max({tts['settings']['min_streams']}, "
        f"{tts['settings']['streams_per_worker']} x concurrency); "
        + (f"the workers' first streams started over {tts['settings']['ramp_seconds']:g} s"
           if tts['settings'].get('ramp_seconds') else "every worker's first stream started at once (a burst)")
        + ". TTFA = request sent -> first audio chunk. "
        "A stream *starves* when a chunk arrives after all audio delivered before it has played "
        "(playback starting at the first chunk); *buffer needed* is how long a player would have to wait after "
        "the first chunk to play that stream without a stall. Percentiles by nearest rank: the p99 of fewer than "
        "100 streams is their maximum. *streams*: counted, of those planned where the level's time ran out first.",
        "",
        "| level | streams | errors | TTFA p50 ms | p95 ms | p99 ms | RTF p50 | starved | stall s | "
        "gap p99 ms | buffer needed p99 s | audio s / s | other cores |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, lv in _levels(tts["closed_loop"]):
        lines.append(
            f"| {c} | {_counted(lv)} | {lv['errors']} | {_ms(lv['ttfa_p50'])} | {_ms(lv['ttfa_p95'])} | "
            f"{_ms(lv['ttfa_p99'])} | {_f(lv['rtf_p50'])} | {lv['starved_streams']} | {_f(lv['stall_seconds'], 1)} | "
            f"{_ms(lv['gap_p99'])} | {_f(lv.get('buffer_needed_p99'))} | {_f(lv['realtime_streams_served'])} | "
            f"{_other(lv)} |"
        )
    lines += _server_view(tts["closed_loop"])
    lines += [
        "",
        f"**Real-time capacity: {tts['realtime_capacity']} concurrent streams** (the largest level up to which "
        f"every level had p99 TTFA < {1000 * limit:.0f} ms, no starved stream, every stream with audio, no error, "
        "no filler stream failed)."
        + (f" Above it, level{'s' if len(above) > 1 else ''} {', '.join(map(str, above))} met that on "
           f"{'their' if len(above) > 1 else 'its'} own." if (above := tts.get("passing_above_capacity")) else "")
        + "".join(f" With p99 TTFA < {1000 * float(other):.0f} ms: {capacity}."
                  for other, capacity in (tts.get("realtime_capacity_by_limit") or {}).items()
                  if float(other) != limit),
        "",
        "![TTFA vs concurrency](ttfa_vs_concurrency.png)",
        "",
        "![capacity](capacity.png)",
        "",
        "![chunk gaps](chunk_gaps.png)",
        "",
    ]
    if tts["poisson"]:
        lines += ["### Poisson arrivals", "",
                  "| rate /s | streams | errors | TTFA p50 ms | p99 ms | RTF p50 | starved | other cores |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for rate, lv in sorted(tts["poisson"].items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {rate} | {lv['streams']} | {lv['errors']} | {_ms(lv['ttfa_p50'])} | "
                         f"{_ms(lv['ttfa_p99'])} | {_f(lv['rtf_p50'])} | {lv['starved_streams']} | "
                         f"{_other(lv)} |")
        lines.append("")
    lines += _perf_analyzer_section(result.get("perf_analyzer"))
    lines += _comparison_section(result.get("comparisons") or {})
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"* {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def _perf_analyzer_section(pa: dict | None) -> list[str]:
    lines = ["## perf_analyzer", ""]
    if not pa:
        return lines + ["Not run (perf_analyzer not installed; `perf/install_perf_analyzer.sh`).", ""]
    if pa.get("skipped"):
        return lines + [f"Not run: {pa['skipped']}", ""]
    lines += [
        f"`{pa['version_output']}`, gRPC streaming, concurrency mode, input `{pa.get('source_data', pa['input_data'])}`"
        + (f" with max_tokens {pa['max_tokens']}" if pa.get("max_tokens") else "") + ". "
        "perf_analyzer's latency for this decoupled model is the time to a stream's last response; TTFA and "
        "starvation come from its profile export (per-response timestamps).",
        "",
        "| `orpheus` concurrency | streams/s | responses/s | stream latency p50 ms | p99 ms | TTFA p50 ms | "
        "TTFA p99 ms | starved | other cores |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, lv in _levels(pa["orpheus"]):
        if "error" in lv:
            lines.append(f"| {c} | failed: {lv['error'][:80]} |||||||")
            continue
        row, s = lv["csv"], lv.get("streams", {})
        lines.append(f"| {c} | {_f(row.get('Inferences/Second'))} | {_f(row.get('Response Throughput'))} | "
                     f"{_us(row.get('p50 latency'))} | {_us(row.get('p99 latency'))} | "
                     f"{_ms(s.get('ttfa_p50'))} | {_ms(s.get('ttfa_p99'))} | {s.get('starved_streams', '-')}"
                     f"/{s.get('streams', '-')} | {_f(lv.get('cores_other'), 1)} |")
    if "orpheus_realtime_capacity" in pa:
        limit = pa.get("ttfa_limit", DEFAULT_TTFA_LIMIT)
        lines += ["", f"Real-time capacity by perf_analyzer's own streams (the rule above, p99 TTFA under "
                      f"{1000 * limit:.0f} ms): **{pa['orpheus_realtime_capacity']}** "
                      f"stream{'' if pa['orpheus_realtime_capacity'] == 1 else 's'}."]
    lines += ["", "| `snac_decoder` concurrency | windows/s | audio s / s | latency p50 ms | p99 ms | "
              "server compute ms | server queue ms | other cores |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, lv in _levels(pa["snac_decoder"]):
        if "error" in lv:
            lines.append(f"| {c} | failed: {lv['error'][:80]} ||||||")
            continue
        row = lv["csv"]
        rate = row.get("Inferences/Second") or 0
        lines.append(f"| {c} | {_f(rate, 1)} | {_f(rate * SAMPLES_PER_FRAME / SAMPLE_RATE)} | "
                     f"{_us(row.get('p50 latency'))} | {_us(row.get('p99 latency'))} | "
                     f"{_us(row.get('Server Compute Infer'))} | {_us(row.get('Server Queue'))} | "
                     f"{_f(lv.get('cores_other'), 1)} |")
    lines += ["", "Each `snac_decoder` request is one whole stream decoded from one window (see "
              "perf/make_input_data.py), so windows/s "
              f"x {SAMPLES_PER_FRAME / SAMPLE_RATE * 1000:.1f} ms is the audio the decoder alone can produce per "
              "second, and concurrency c lets the decoder batch up to c windows in one round. Its *server compute* "
              "is Triton's, which for a decoupled model is the time `execute` takes to queue a request, not its "
              "decoding (that runs on the decoder's own thread): the latency is the figure to read.", ""]
    return lines


def _comparison_section(comp: dict) -> list[str]:
    if not comp:
        return ["## Comparisons", "", "Not run (`--skip-comparisons`, or each one failed: see the notes).", ""]
    lines = ["## Comparisons", ""] + (["![comparisons](comparisons.png)", ""] if _comparison_bars(comp) else [])
    serving = comp.get("serving")
    if serving:
        threads = serving.get("in_process_threads")
        failed = [f"{side}: {len(errors)} of {serving['repeats']} ({errors[0]})"
                  for side, errors in (("served", serving.get("errors")),
                                       ("in process", serving.get("in_process_errors"))) if errors]
        lines += [
            f"**(a) Serving cost, TTFA at concurrency 1**: through Triton {_ms(serving['served_ttfa_median'])} ms vs "
            f"in-process {_ms(serving['in_process_ttfa_median'])} ms (medians of {len(serving['served_ttfa'])} "
            f"and {len(serving['in_process_ttfa'])} streams with audio, of {serving['repeats']} each, interleaved"
            + (f"; in process with the served models' torch threads, {threads['llm']} for the engine and "
               f"{threads['decoder']} for SNAC" if threads else "")
            + f"): ratio **{_f(serving['ttfa_ratio'])}** (target <= {serving['target']}: "
            f"{_met(serving['target_met'])}"
            + (f"; streams without audio, {'; '.join(failed)}" if failed else "")
            + f"). Whole stream: ratio {_f(serving['total_ratio'])}. Other cores meanwhile: {_other(serving)}.",
            "",
        ]
    snac = comp.get("snac")
    if snac:
        lines += [
            f"**(b) SNAC, {snac['windows']} windows of {snac['windows']} streams in one call vs one call each** "
            f"({snac['device']}, medians of {snac['repeats']}): CPU time {snac['batched_cpu_s']:.3f} s vs "
            + (f"{snac['one_by_one_cpu_s']:.3f} s, ratio **{_f(snac['cpu_ratio'])}** (target <= {snac['target']}: "
               f"{_met(snac['target_met'])}); wall ratio {_f(snac['wall_ratio'])}"
               if snac.get("target_measure", "cpu_ratio") == "cpu_ratio" else
               f"{snac['one_by_one_cpu_s']:.3f} s, ratio {_f(snac['cpu_ratio'])} (the launches' CPU); wall ratio "
               f"**{_f(snac['wall_ratio'])}** (target <= {snac['target']}: {_met(snac['target_met'])})")
            + f". Other cores meanwhile: {_other(snac)}.",
        ]
        one = snac.get("one_thread")
        if one:
            lines += [
                "",
                f"That is with {snac['threads']} torch threads. On one thread, as the server's `snac_decoder` runs "
                f"beside the LLM: {one['batched_cpu_s']:.3f} s vs {one['one_by_one_cpu_s']:.3f} s, ratio "
                f"{_f(one['cpu_ratio'])} (a thread pool's busy-waiting costs small calls more).",
            ]
        exact = snac.get("exact")
        if exact:
            lines += [
                "",
                f"The serving decoder computes only each window's kept samples, with dense convolutions batched "
                f"(within one int16 step of upstream). The exact decoder (`--decoder-exact`: whole windows, dense "
                f"convolutions row by row, sample-identical to upstream alone or batched) takes "
                f"{exact['batched_cpu_s']:.3f} s batched and {exact['one_by_one_cpu_s']:.3f} s one by one "
                f"(ratio {_f(exact['cpu_ratio'])}); per window, the serving decoder batched costs "
                f"{_f(snac['batched_cpu_s'] / exact['one_by_one_cpu_s'])}x the exact one by one.",
            ]
        lines += ["", "Where the CPU time goes (torch profiler, self time, one profiled run each):", "",
                  "| operator | batched: calls | batched: ms | share | one by one: calls | one by one: ms |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| `{row['op']}` | {row['calls']} | {row['self_cpu_ms']:.1f} | {100 * row['share']:.0f}% | "
                  f"{row.get('one_by_one_calls', '-')} | {_f(row.get('one_by_one_ms'), 1)} |"
                  for row in snac["profile_top"]]
        products = snac.get("products")
        if products and products["batched_gflops"] and products["one_by_one_gflops"]:
            lines += [
                "",
                f"Matrix products (the dense convolutions): {products['batched_gflop']:.2f} GFLOP for the "
                f"{snac['windows']} windows batched, {products['one_by_one_gflop']:.2f} one by one; "
                f"{100 * products['share_of_batched']:.0f}% of the batched "
                f"profile, run at {products['batched_gflops']:.0f} GFLOP/s batched and "
                f"{products['one_by_one_gflops']:.0f} GFLOP/s one by one ({snac['threads']} threads). Batching "
                "shares a window's calls, not its arithmetic: where one window's products already run near the "
                "cores' peak, only the rest of a decode can get cheaper.",
            ]
        lines.append("")
    engine = comp.get("engine")
    if engine:
        lines += [
            f"**(c) In-flight batching**, {engine['streams']} streams x {engine['max_new_tokens']} tokens "
            f"({engine['device']}): {engine['batched_tokens_per_s']:.0f} tokens/s batched vs "
            f"{engine['one_at_a_time_tokens_per_s']:.0f} tokens/s one at a time: **{engine['speedup']:.2f}x**"
            + (f" (medians of {engine['repeats']} pairs of runs; each pair "
               f"{', '.join(f'{x:.2f}x' for x in engine['speedups'])})" if engine.get("speedups") else "") + ". "
            f"Other cores meanwhile: {_other(engine)}. No target here: the demo model's steps are mostly fixed "
            "costs; the engine's target (>= 4x) is `perf/engine_bench.py`'s, with a small Llama.",
            "",
        ]
    return lines


def write_report(result: dict, folder: Path) -> Path:
    """report.md and the PNG plots; ImportError, before anything is written, without matplotlib."""
    _pyplot()
    plot_ttfa(result, folder / "ttfa_vs_concurrency.png")
    plot_capacity(result, folder / "capacity.png")
    plot_gaps(result, folder / "chunk_gaps.png")
    plot_comparisons(result, folder / "comparisons.png")
    path = folder / "report.md"
    path.write_text(markdown(result))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, help="a run folder's result.json (the report is written beside it)")
    path = parser.parse_args(argv).result
    if not path.is_file():
        print(f"error: {path} does not exist (expected a run folder's result.json)", file=sys.stderr)
        return 2
    print(write_report(json.loads(path.read_text()), path.parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


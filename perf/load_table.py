"""Where a served level's time went, as a markdown table: the LLM engine's and the SNAC decoder's busy
shares and rates (the server's counters, metrics.ListenerFigures.load) and the CPU each server process
used (common.server_cpu_monitor). Shared by perf/report.py and perf/gpu/summarize.py; imports nothing
heavy, since the summary runs on a GPU machine with only what it needs.
"""

from __future__ import annotations

# Server processes in the table's order (others follow as they come).
PROCESS_ORDER = ("tritonserver", "preprocessing", "llm", "tensorrt_llm", "snac_decoder")


def figure(value, digits: int = 2) -> str:
    """A figure of a level's table, "-" where the run did not record it (older results, another server)."""
    return "-" if value is None else f"{value:.{digits}f}"


def _cpu(usage: dict | None) -> str:
    if not usage:
        return "-"
    busiest = usage.get("busiest_thread")
    return f"{usage['cores']:.2f}" + (f" ({busiest:.2f})" if busiest is not None else "")


def load_table(levels: list[tuple[str, dict]]) -> list[str]:
    """Markdown lines for (label, level result) pairs; empty when no level has the figures."""
    rows = [(label, level) for label, level in levels if level.get("server_load") or level.get("server_cpu")]
    if not rows:
        return []
    processes = [p for p in PROCESS_ORDER if any(p in (lv.get("server_cpu") or {}) for _, lv in rows)]
    processes += sorted({p for _, lv in rows for p in (lv.get("server_cpu") or {})} - {*processes, "load generator"})
    processes.append("load generator")
    header = ("| level | streams open | in LLM slots | LLM queue | LLM busy | steps/s | step ms | tokens/step | "
              "tokens/s | decoder busy | windows/s | windows/call | "
              + " | ".join(f"CPU {p}" for p in processes) + " |")
    lines = [
        "Where the time went (the server's counters and its processes' CPU over the span the level's counted "
        "streams ran, read every 0.5 s, as *streams open* is: the ramp and the tail left out; *busy* = share of "
        "the time in engine steps or "
        "decoder rounds, 1 = saturated; *streams open*: the client's streams in flight on average, *in LLM slots* "
        "and *LLM queue*: the engine's mean streams holding a slot and requests waiting for one, *tokens/step*: "
        "the streams decoding; *step ms*: an engine step's mean length, to set beside the engine bench's at that "
        "many tokens a step; CPU in cores, with the busiest thread's share in brackets: a process whose "
        "busiest thread is near 1 is bound by that thread, however idle the machine):",
        "",
        header,
        "|---|" + "---:|" * (11 + len(processes)),
    ]
    for label, level in rows:
        load, cpu = level.get("server_load") or {}, level.get("server_cpu") or {}
        lines.append(
            f"| {label} | {figure(level.get('streams_in_flight_mean'), 1)} | {figure(load.get('llm_streams'), 1)} | "
            f"{figure(load.get('llm_queued'), 1)} | {figure(load.get('llm_busy'))} | "
            f"{figure(load.get('llm_steps_per_s'), 0)} | {figure(load.get('llm_step_ms'), 1)} | "
            f"{figure(load.get('llm_tokens_per_step'), 1)} | {figure(load.get('llm_tokens_per_s'), 0)} | "
            f"{figure(level.get('server_decoder_busy'))} | {figure(load.get('decoder_windows_per_s'), 0)} | "
            f"{figure(load.get('decoder_windows_per_call'), 1)} | "
            + " | ".join(_cpu(cpu.get(p)) for p in processes) + " |")
    return lines

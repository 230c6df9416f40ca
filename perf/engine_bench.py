#!/usr/bin/env python3
"""The torch LLM engine alone: in-flight batching throughput, newcomer latency, step time vs streams.

    python perf/engine_bench.py                       # CPU, small model
    python perf/engine_bench.py --shape demo          # CPU, the demo model set's tiny LLM
    python perf/engine_bench.py --shape orpheus-3b    # GPU: Orpheus 3B's exact shape, random weights
    python perf/engine_bench.py --shape orpheus-3b --llm MODELS/llm --no-graph-sampling   # a model set's
                                                      # checkpoint; without the engine's graph sampling
    python perf/engine_bench.py --shape orpheus-3b --no-overlap   # without the engine's overlap (a GPU's default)
    python perf/engine_bench.py --burst 0+8,4+4 --burst-prefill 64,256,1024   # bursts at three prefill budgets

Measures, in process (no Triton):
1. aggregate tokens/s of N concurrent streams vs one stream (in-flight batching gain);
2. a newcomer's time to first token while N-1 streams are mid-generation (it must not wait
   for them to finish: it should cost about one step);
3. step time vs active streams, and how many streams stay at or above real time
   (REAL_TIME_TOKENS_PER_SECOND, ~82 tokens/s per stream);
4. bursts (--burst): many requests at once, alone or beside running streams, at one or more prefill
   budgets (--burst-prefill): the newcomers' time to their first window of tokens (first audio:
   LEAD_IN_TOKENS, 21, with the SNAC decoder's default lead-in frame) and the running streams'
   longest wait between tokens;
5. closed loop (--churn): N callers, each stream ending after --churn-tokens tokens and the next
   caller's request coming at once, the streams' ends spread out as a served closed-loop level's are:
   the step with newcomers prefilled beside the decoding streams (a served engine's steady work, which
   the step sweep, without arrivals, leaves out), and whether each stream stays at real time.
Writes JSON and a markdown table to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from orpheus_triton.arguments import DefaultsHelpFormatter, counts, positive
from orpheus_triton.constants import LEAD_IN_TOKENS, NO_END_ID, REAL_TIME_TOKENS_PER_SECOND
from orpheus_triton.demo_models import DEMO_LLM_SHAPE, ORPHEUS_3B_SHAPE, write_random_llama
from orpheus_triton.engine import GenerationRequest, InflightEngine, overlap_for
from orpheus_triton.llama import load_llama
from orpheus_triton.loadgen import percentile
from orpheus_triton.timing import synced_seconds
from orpheus_triton.triton_llm import pick_device

# "small": a 1/6-width, 1/7-depth Llama-3 (~13M parameters besides the 80M embedding), big enough
# that weights, not Python overhead, dominate a CPU step, as they do for Orpheus 3B on a GPU.
SMALL_SHAPE = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 4, "intermediate_size": 1536}
SHAPES = {"demo": DEMO_LLM_SHAPE, "small": SMALL_SHAPE, "orpheus-3b": ORPHEUS_3B_SHAPE}
PROMPT_LEN = 40  # about what "tara: <one sentence>" tokenizes to, plus the Orpheus wrapper
# The step sweep's longest context: a stream about 11 s into its audio. Contexts spread up to it.
SWEEP_CONTEXT = 960


def bench_model(shape: str, llm: str | None, device: str):
    """The Llama to measure: the checkpoint folder ``llm`` (checked to be of ``shape``), else random
    weights of ``shape`` (bf16 off the CPU)."""
    if llm:
        config = json.loads((Path(llm) / "config.json").read_text())
        mismatched = {k: (config.get(k), v) for k, v in SHAPES[shape].items() if config.get(k) != v}
        if mismatched:
            raise ValueError(f"--llm {llm} is not of the {shape} shape (have, want): {mismatched}")
        return load_llama(llm, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing a random {shape} checkpoint ...", file=sys.stderr)
        write_random_llama(Path(tmp), SHAPES[shape], dtype=torch.bfloat16 if device != "cpu" else torch.float32)
        return load_llama(tmp, device=device)


def prompt(i: int) -> list[int]:
    return [1000 + (i * 7919 + k) % 100_000 for k in range(PROMPT_LEN)]


def submit(engine: InflightEngine, i: int, tokens: int, sink: dict) -> None:
    """Queue stream ``i`` of ``tokens`` tokens; ``sink[i]`` records its token count, when its first token
    and its first window's worth (LEAD_IN_TOKENS, what the SNAC decoder needs for first audio) came, and
    the longest wait between two of its tokens."""
    sink[i] = {"tokens": 0, "first": None, "window": None, "last": None, "max_gap": 0.0,
               "submitted": time.perf_counter()}

    def emit(new, finish, i=i):
        entry, now = sink[i], time.perf_counter()
        entry["tokens"] += len(new)
        entry["first"] = entry["first"] or now
        if entry["window"] is None and entry["tokens"] >= LEAD_IN_TOKENS:
            entry["window"] = now
        if entry["last"] is not None:
            entry["max_gap"] = max(entry["max_gap"], now - entry["last"])
        entry["last"] = now
        if finish is not None:
            entry["done"] = now

    # NO_END_ID: never stop early, so every stream generates exactly `tokens`.
    engine.submit(GenerationRequest(prompt=prompt(i), max_new_tokens=tokens, emit=emit, seed=i, end_id=NO_END_ID,
                                    request_id=f"bench-{i}"))


def throughput(engine: InflightEngine, streams: int, tokens: int) -> float:
    sink: dict = {}
    for i in range(streams):
        submit(engine, i, tokens, sink)
    start = time.perf_counter()
    engine.run_until_idle()
    return sum(s["tokens"] for s in sink.values()) / (time.perf_counter() - start)


def median_step(engine: InflightEngine, steps: int = 5) -> float:
    """The median of ``steps`` single steps' wall times (seconds)."""
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    return sorted(times)[steps // 2]


def newcomer_wait(engine: InflightEngine, running: int, tokens: int) -> dict:
    """Time to first token of a request arriving while `running` streams are mid-way."""
    sink: dict = {}
    for i in range(running):
        submit(engine, i, tokens, sink)
    for _ in range(tokens // 4):
        engine.step()
    step = median_step(engine)
    submit(engine, running, 8, sink)
    while sink[running]["first"] is None:
        engine.step()
    ttft = sink[running]["first"] - sink[running]["submitted"]
    others_done = all("done" in sink[i] for i in range(running))
    engine.run_until_idle()
    return {"running_streams": running, "newcomer_ttft_s": ttft, "step_s_before": step,
            "others_finished_first": others_done}


def burst(engine: InflightEngine, running: int, arriving: int, prefill_tokens: int) -> dict:
    """``arriving`` requests submitted at once while ``running`` streams decode (a burst of callers, as when a
    closed-loop level starts), with the engine's prefill budget at ``prefill_tokens`` per step.

    Returns the newcomers' time to their first token and to their first window (LEAD_IN_TOKENS tokens:
    when the SNAC decoder can give first audio), and the running streams' longest wait between two tokens
    while the newcomers are admitted (a step that prefills many prompts is a long one for them).
    """
    engine.prefill_chunk = prefill_tokens
    if running + arriving > engine.max_streams:
        raise SystemExit(f"burst {running}+{arriving} exceeds the engine's {engine.max_streams} slots")
    sink: dict = {}
    for i in range(running):
        submit(engine, i, engine.max_seq_len - PROMPT_LEN, sink)  # they run until stopped
    while engine.queue or engine.prefilling is not None:
        engine.step()
    step = median_step(engine)
    for entry in sink.values():
        entry["max_gap"] = 0.0
    newcomers = range(running, running + arriving)
    for i in newcomers:
        submit(engine, i, LEAD_IN_TOKENS, sink)
    longest = 0.0
    while any(sink[i]["window"] is None for i in newcomers):
        started = time.perf_counter()
        engine.step()
        longest = max(longest, time.perf_counter() - started)
    for i in range(running):
        engine.stop_stream(f"bench-{i}")
    engine.run_until_idle()
    first = sorted(sink[i]["first"] - sink[i]["submitted"] for i in newcomers)
    window = sorted(sink[i]["window"] - sink[i]["submitted"] for i in newcomers)
    return {"running": running, "arriving": arriving, "prefill_tokens": prefill_tokens,
            "step_s_before": step if running else None, "longest_step_s": longest,
            "first_token_s": {"p50": percentile(first, 50), "max": first[-1]},
            "first_window_s": {"p50": percentile(window, 50), "p99": percentile(window, 99), "max": window[-1]},
            "running_max_gap_s": max((sink[i]["max_gap"] for i in range(running)), default=None)}


def churn(engine: InflightEngine, streams: int, tokens: int, steps: int = 200) -> dict:
    """``streams`` callers in closed loop on ``engine``: each stream generates ``tokens`` tokens, and when one
    ends the next caller's request is submitted before the next step. The first streams' lengths spread
    from 1/N to all of ``tokens``, so streams end (and newcomers arrive) one by one at the steady rate,
    about streams / tokens a step. After ``tokens`` steps of warm-up (every stream then a newcomer's),
    ``steps`` steps are timed together: the mean step, the newcomers admitted a second and tokens/s per
    stream."""
    if streams > engine.max_streams:
        raise SystemExit(f"churn of {streams} streams exceeds the engine's {engine.max_streams} slots")
    sink: dict = {}
    arrivals = 0

    def refill() -> None:
        nonlocal arrivals
        held = len(engine.decoding) + len(engine.queue) + (engine.prefilling is not None)
        for _ in range(streams - held):
            submit(engine, 10_000 + arrivals, tokens, sink)
            arrivals += 1

    for i in range(streams):
        submit(engine, i, max(1, tokens * (i + 1) // streams), sink)
    for _ in range(tokens):
        engine.step()
        refill()
    generated, admitted = engine.stats.tokens_generated, arrivals

    def timed_steps() -> None:
        for _ in range(steps):
            engine.step()
            refill()

    seconds = synced_seconds(engine.device, timed_steps)
    per_stream = (engine.stats.tokens_generated - generated) / seconds / streams
    for stream in [*engine.decoding, *engine.queue]:
        engine.stop_stream(stream.request.request_id)
    engine.run_until_idle()
    return {"streams": streams, "tokens_per_stream": tokens, "step_ms": 1000 * seconds / steps,
            "arrivals_per_s": (arrivals - admitted) / seconds, "tokens_per_s_per_stream": per_stream,
            "real_time": per_stream >= REAL_TIME_TOKENS_PER_SECOND}


def release(device: str) -> None:
    """Hand a dropped engine's KV cache and CUDA graph pools back before the next engine allocates its own."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def decoding_engine(make_engine, n: int, context: int) -> InflightEngine:
    """A fresh engine with ``n`` streams decoding, their contexts spread evenly from a prompt's length
    up to ``context`` (streams of a busy server started at different times), each decode shape's
    CUDA graph captured."""
    engine = make_engine()
    if n > engine.max_streams:
        raise SystemExit(f"{n} streams exceed the engine's {engine.max_streams} slots; raise --max-streams")
    sink: dict = {}
    for i in range(n):
        submit(engine, i, context, sink)
    # Admit every stream (a step prefills prefill_chunk prompt tokens: ~6 prompts), then one
    # more step so this batch's CUDA graph is captured before the timed steps.
    while engine.queue or engine.prefilling is not None:
        engine.step()
    engine.step()
    if len(engine.decoding) != n:
        raise RuntimeError(f"{len(engine.decoding)} of {n} streams decoding; raise --tokens or --max-streams")
    # Move each stream to its place in the spread (what its cache holds there does not change a step's
    # time), and take one step at the new shape so its CUDA graph is captured before the timed steps.
    for i, stream in enumerate(engine.decoding):
        stream.length = PROMPT_LEN + (context - PROMPT_LEN) * (i + 1) // n
    engine.step()
    return engine


def steady_step(engine: InflightEngine, steps: int = 10) -> float:
    """Mean seconds per step over ``steps`` consecutive steps, the device synchronised only around them,
    so that an engine overlapping its host work with the device's (``overlap``) is timed as it runs."""
    return synced_seconds(engine.device, lambda: [engine.step() for _ in range(steps)]) / steps


def step_sweep(make_engine, levels: list[int], context: int, device: str) -> list[dict]:
    """Step time with n streams decoding (a fresh engine per n, see ``decoding_engine``)."""
    rows = []
    for n in levels:
        engine = decoding_engine(make_engine, n, context)
        step = sorted(steady_step(engine) for _ in range(3))[1]  # the median of 3 runs of 10 steps
        per_stream = 1.0 / step
        if len(engine.decoding) != n:
            raise RuntimeError(f"streams finished during the timed steps of the {n}-stream sweep; raise --tokens")
        rows.append({"streams": n, "step_ms": step * 1000, "tokens_per_s_per_stream": per_stream,
                     "aggregate_tokens_per_s": n / step, "real_time": per_stream >= REAL_TIME_TOKENS_PER_SECOND})
        del engine
        release(device)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--streams", type=positive, default=8)
    parser.add_argument("--tokens", type=positive, default=200, help="tokens per stream in the throughput runs")
    parser.add_argument("--sweep", type=counts, default="1,2,4,8", help="active-stream counts for the step-time sweep")
    parser.add_argument("--max-streams", type=positive, default=None)
    parser.add_argument("--repeat", type=positive, default=3, help="alternating runs of 1 and N streams (best kept)")
    parser.add_argument("--graph-sampling", action=argparse.BooleanOptionalAction, default=True,
                        help="sample guarded rows from one CUDA graph per bucket (InflightEngine option; "
                             "on by default)")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                        help="read each step's tokens back after queueing the next (InflightEngine option; "
                             "default: the engine's, on a GPU)")
    parser.add_argument("--burst", default="0+8,4+4",
                        help="bursts RUNNING+ARRIVING: ARRIVING requests at once beside RUNNING decoding streams")
    parser.add_argument("--burst-prefill", type=counts, default=None,
                        help="prefill budgets (tokens per step) to measure each burst with (default: the engine's)")
    parser.add_argument("--churn", type=counts, default=None, metavar="N[,N...]",
                        help="closed-loop levels: N callers, each stream --churn-tokens long, the next caller "
                             "arriving as one ends (newcomers prefilled beside decoding streams)")
    parser.add_argument("--churn-tokens", type=positive, default=250,
                        help="tokens per stream in the closed loop (default 250: a short text's, about 3 s)")
    parser.add_argument("--llm", help="a Llama checkpoint folder of --shape's shape (e.g. a model set's llm/) "
                                      "instead of writing random weights")
    parser.add_argument("--out", default="perf/results/engine")
    args = parser.parse_args()

    device = pick_device(args.device)
    levels = args.sweep
    try:
        bursts = [tuple(int(n) for n in b.split("+")) for b in args.burst.split(",") if b]
    except ValueError:
        bursts = [()]
    if any(len(b) != 2 or min(b) < 0 or b[1] < 1 for b in bursts):
        parser.error(f"--burst {args.burst!r}: want RUNNING+ARRIVING[,RUNNING+ARRIVING...], e.g. 0+8,4+4")
    churn_levels = args.churn or []
    max_streams = args.max_streams or max(levels + [args.streams] + [sum(b) for b in bursts] + churn_levels)
    if max(levels + [args.streams] + churn_levels) > max_streams:
        parser.error(f"--sweep/--streams/--churn up to {max(levels + [args.streams] + churn_levels)} need "
                     "--max-streams of at least that")
    try:
        model = bench_model(args.shape, args.llm, device)
    except ValueError as error:
        parser.error(str(error))
    def make_engine():
        return InflightEngine(model, max_streams=max_streams,
                              max_seq_len=PROMPT_LEN + max(args.tokens, SWEEP_CONTEXT + 64, args.churn_tokens),
                              graph_sampling=args.graph_sampling, overlap=args.overlap)

    engine = make_engine()
    overlap = engine.overlap  # --overlap or the engine's default for the device
    # On GPU every decode shape's CUDA graph now, as a server does at load, not mid-measurement.
    engine.capture_graphs()

    throughput(engine, 1, 16)  # warm-up
    # Alternate the two runs and keep each one's best: other work on a shared machine
    # only ever slows a run down, so the best of a few is the least disturbed.
    singles, batches = [], []
    for _ in range(args.repeat):
        singles.append(throughput(engine, 1, args.tokens))
        batches.append(throughput(engine, args.streams, args.tokens))
    single, batched = max(singles), max(batches)
    newcomer = newcomer_wait(engine, args.streams - 1, args.tokens)
    default_budget = engine.prefill_chunk
    budgets = args.burst_prefill or [default_budget]
    bursts = [burst(engine, running, arriving, budget) for running, arriving in bursts for budget in budgets]
    engine.prefill_chunk = default_budget  # the closed loop prefills as a server does
    closed_loop = [churn(engine, n, args.churn_tokens) for n in churn_levels]
    varlen = engine.decoder is not None and engine.decoder.varlen
    graph_sampling = engine.sampler is not None  # the option takes effect on the bucketed (GPU) path only
    del engine  # the sweep's engines each hold a KV cache of their own
    release(device)
    sweep = step_sweep(make_engine, levels, context=SWEEP_CONTEXT, device=device)

    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                    "torch_threads": torch.get_num_threads()},
        "decode_attention": "per-row key lengths" if varlen else "masked (keys up to the longest row)",
        "sweep_contexts": f"spread evenly from {PROMPT_LEN} to {SWEEP_CONTEXT} positions",
        "graph_sampling": graph_sampling, "overlap": overlap,
        "shape": args.shape, "model": SHAPES[args.shape],
        "single_stream_tokens_per_s": single, "streams": args.streams,
        "batched_tokens_per_s": batched, "batching_gain": batched / single,
        # Each alternating pair's ratio, run one after the other: a slow or fast phase of the machine hits
        # both of a pair, where the best of each may come from different phases.
        "batching_gain_pairs_median": statistics.median(b / s for s, b in zip(singles, batches, strict=True)),
        "single_runs_tokens_per_s": singles, "batched_runs_tokens_per_s": batches,
        "newcomer": newcomer, "bursts": bursts, "step_sweep": sweep, "closed_loop": closed_loop,
        "real_time_streams": max((r["streams"] for r in sweep if r["real_time"]), default=0),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # A run with an option other than the device's default says so in its name (a GPU's default: overlap)
    options = (("" if args.graph_sampling else "_eager-sampling")
               + ("" if overlap == overlap_for(device) else "_overlap" if overlap else "_no-overlap"))
    name = f"engine_{args.shape}_{device.split(':')[0]}{options}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Torch engine, {args.shape} shape, on {result['machine']['device']} ({result['machine']['processor']})",
        "",
        f"- 1 stream: {single:.0f} tokens/s; {args.streams} streams: {batched:.0f} tokens/s aggregate "
        f"(**{batched / single:.2f}x**; the median of the {args.repeat} alternating pairs' ratios: "
        f"{result['batching_gain_pairs_median']:.2f}x)",
        f"- newcomer beside {newcomer['running_streams']} running streams: first token after "
        f"{newcomer['newcomer_ttft_s'] * 1000:.1f} ms (one step was {newcomer['step_s_before'] * 1000:.1f} ms; "
        f"running streams finished first: {newcomer['others_finished_first']})",
        f"- streams at or above real time ({REAL_TIME_TOKENS_PER_SECOND:.0f} tokens/s each): "
        f"{result['real_time_streams']} of those measured",
        f"- step sweep: contexts {result['sweep_contexts']}; decode attention: {result['decode_attention']}; "
        f"graph sampling: {'on' if graph_sampling else 'off'}; overlap: {'on' if overlap else 'off'}",
        "",
        "| active streams | step (ms) | tokens/s per stream | aggregate tokens/s | real time |",
        "|---:|---:|---:|---:|:---:|",
        *[f"| {r['streams']} | {r['step_ms']:.2f} | {r['tokens_per_s_per_stream']:.0f} | "
          f"{r['aggregate_tokens_per_s']:.0f} | {'yes' if r['real_time'] else 'no'} |" for r in sweep],
        "",
        f"Bursts: requests arriving at once beside running streams; first window = {LEAD_IN_TOKENS} tokens, "
        "what the SNAC decoder needs for first audio with its default lead-in frame (times in ms):",
        "",
        "| running | arriving | prefill tokens/step | first token p50 / max | first window p50 / p99 / max "
        "| running streams' longest wait | longest step | step before |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {b['running']} | {b['arriving']} | {b['prefill_tokens']} | "
          f"{b['first_token_s']['p50'] * 1000:.0f} / {b['first_token_s']['max'] * 1000:.0f} | "
          f"{b['first_window_s']['p50'] * 1000:.0f} / {b['first_window_s']['p99'] * 1000:.0f} / "
          f"{b['first_window_s']['max'] * 1000:.0f} | "
          + (f"{b['running_max_gap_s'] * 1000:.0f}" if b["running_max_gap_s"] is not None else "-")
          + f" | {b['longest_step_s'] * 1000:.0f} | "
          + (f"{b['step_s_before'] * 1000:.1f}" if b["step_s_before"] is not None else "-") + " |"
          for b in bursts],
    ]
    if closed_loop:
        lines += [
            "",
            f"Closed loop: streams of {args.churn_tokens} tokens, the next caller arriving as one ends (newcomers "
            "prefilled beside the decoding streams, as a served level's are):",
            "",
            "| streams | step (ms) | newcomers a second | tokens/s per stream | real time |",
            "|---:|---:|---:|---:|:---:|",
            *[f"| {c['streams']} | {c['step_ms']:.2f} | {c['arrivals_per_s']:.1f} | "
              f"{c['tokens_per_s_per_stream']:.0f} | {'yes' if c['real_time'] else 'no'} |" for c in closed_loop],
        ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

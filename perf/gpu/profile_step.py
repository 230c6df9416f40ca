#!/usr/bin/env python3
"""Where a decode step's time goes: torch.profiler over engine steps at a few stream counts.

    PYTHONPATH=src:perf python perf/gpu/profile_step.py --shape orpheus-3b --llm MODELS/llm \
        --streams 1,128 --out perf/results/gpu-profile

For each number of streams (decoding, contexts spread as in engine_bench's sweep): the step's wall
time, the device's busy time in a step (its kernels' summed time) and kernels launched per step, and
the operators with the most self time on the device and on the host. A step much longer than its
device busy time waits on the host (launches, Python, reading tokens back); a busy time far above
the memory floor (weights + keys and values read once) points at the kernels themselves.
Writes profile.json and profile.md to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from engine_bench import PROMPT_LEN, SHAPES, SWEEP_CONTEXT, bench_model, decoding_engine, release, steady_step
from torch.profiler import ProfilerActivity, profile

from orpheus_triton.arguments import counts, positive
from orpheus_triton.engine import InflightEngine, overlap_for
from orpheus_triton.triton_llm import pick_device


def _device_time(event) -> float:
    """An event's own device time in microseconds (the attribute's name changed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _is_kernel(event) -> bool:
    return getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA


def profile_steps(engine: InflightEngine, steps: int, top: int) -> dict:
    """Profile ``steps`` engine steps; per-step figures and the top operators."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step = steady_step(engine, steps)
    events = prof.events()
    kernels = [e for e in events if _is_kernel(e)]
    averages = prof.key_averages()

    def ranked(key, unit_scale: float = 1.0) -> list[dict]:
        rows = sorted(averages, key=key, reverse=True)[:top]
        return [{"name": r.key[:90], "calls_per_step": r.count / steps,
                 "ms_per_step": key(r) * unit_scale / steps / 1000} for r in rows if key(r) > 0]

    return {
        "step_ms": step * 1000,
        "device_busy_ms_per_step": sum(k.time_range.elapsed_us() for k in kernels) / steps / 1000,
        "kernels_per_step": len(kernels) / steps,
        "top_device": ranked(_device_time),
        "top_host": ranked(lambda r: float(r.self_cpu_time_total)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--llm", help="a checkpoint folder of --shape's shape instead of random weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--streams", type=counts, default="1,128", help="numbers of decoding streams to profile")
    parser.add_argument("--steps", type=positive, default=10, help="profiled steps per number of streams")
    parser.add_argument("--top", type=int, default=15, help="operators listed per table")
    parser.add_argument("--graph-sampling", action=argparse.BooleanOptionalAction, default=True,
                        help="the engine's graph sampling (on by default)")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                        help="the engine's overlap option (default: the engine's, on a GPU)")
    parser.add_argument("--out", default="perf/results/gpu-profile")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    levels = args.streams
    try:
        model = bench_model(args.shape, args.llm, device)
    except ValueError as error:
        parser.error(str(error))

    overlap = overlap_for(device, args.overlap)

    def make_engine():
        return InflightEngine(model, max_streams=max(levels), max_seq_len=PROMPT_LEN + SWEEP_CONTEXT + 64,
                              graph_sampling=args.graph_sampling, overlap=overlap)

    results = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "shape": args.shape, "graph_sampling": args.graph_sampling,
               "overlap": overlap,
               "profiles": {}}
    lines = [f"# Decode step profile, {args.shape} shape, on {results['device']} (torch {results['torch']}), "
             f"graph sampling {'on' if args.graph_sampling else 'off'}, overlap {'on' if overlap else 'off'}", ""]
    for n in levels:
        engine = decoding_engine(make_engine, n, SWEEP_CONTEXT)
        for _ in range(3):
            engine.step()  # settle after the profiler's own start-up
        result = profile_steps(engine, args.steps, args.top)
        results["profiles"][str(n)] = result
        del engine
        release(device)
        busy = result["device_busy_ms_per_step"]
        lines += [f"## {n} streams: step {result['step_ms']:.2f} ms, device busy {busy:.2f} ms, "
                  f"{result['kernels_per_step']:.0f} kernels per step", ""]
        for title, rows in (("device", result["top_device"]), ("host", result["top_host"])):
            if rows:
                lines += [f"| top self {title} time | calls/step | ms/step |", "|---|---:|---:|",
                          *[f"| `{r['name']}` | {r['calls_per_step']:.1f} | {r['ms_per_step']:.3f} |"
                            for r in rows], ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(results, indent=2))
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

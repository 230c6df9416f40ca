#!/usr/bin/env python3
"""The folded Snakes' sine, NumPy's against torch's: the serving SNAC decoder's CPU time with each.

(By default the decoder takes NumPy's where torch runs one thread: snake.sine.)

Alternates the two in one process, round after round (a round: 8 windows of 8 streams in one call,
then the same windows one call each, as comparison (b)), so that the VM's drifting speed hits both
alike; reports the medians and their ratios.

    python perf/sine_ab.py --rounds 30 --threads 1 --out perf/results/<folder>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # perf/: common, comparisons
from common import log, machine_info, source_state  # noqa: E402
from comparisons import random_windows  # noqa: E402

from orpheus_triton import snake  # noqa: E402
from orpheus_triton.arguments import DefaultsHelpFormatter
from orpheus_triton.demo_models import demo_model_set  # noqa: E402
from orpheus_triton.snac_codec import load_window_decoder, warm_up  # noqa: E402

SINES = {"numpy": snake.numpy_sine, "torch": torch.sin}
DEFAULT_SINE = snake.sine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server's decoder runs one)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", default="perf/results/sine-ab")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    decoder = load_window_decoder(demo_model_set(log=log).snac, device="cpu")
    windows = random_windows(args.windows)
    warm_up(decoder)
    times = {name: {"batched": [], "one_by_one": []} for name in SINES}
    for round_index in range(args.rounds):
        for name in sorted(SINES, reverse=round_index % 2 == 1):  # alternate which goes first
            snake.sine = SINES[name]
            try:
                start = time.process_time()
                decoder.decode(windows)
                times[name]["batched"].append(time.process_time() - start)
                start = time.process_time()
                for window in windows:
                    decoder.decode([window])
                times[name]["one_by_one"].append(time.process_time() - start)
            finally:
                snake.sine = DEFAULT_SINE
    medians = {name: {kind: statistics.median(values) for kind, values in kinds.items()}
               for name, kinds in times.items()}
    result = {"machine": machine_info(), "source": source_state(), "rounds": args.rounds, "threads": args.threads,
              "windows": args.windows, "medians_cpu_s": medians, "times_cpu_s": times,
              "numpy_over_torch": {kind: medians["numpy"][kind] / medians["torch"][kind]
                                   for kind in ("batched", "one_by_one")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sine_ab.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Folded Snakes' sine: NumPy's vs torch's ({result['machine']['cpu']}, {args.threads} thread(s), "
             f"{args.rounds} alternating rounds)", "",
             f"| sine | {args.windows} windows batched (CPU s) | one by one (CPU s) | batched / one by one |",
             "|---|---:|---:|---:|"]
    lines += [f"| {name} | {m['batched']:.4f} | {m['one_by_one']:.4f} | {m['batched'] / m['one_by_one']:.3f} |"
              for name, m in medians.items()]
    ratio = result["numpy_over_torch"]
    lines += ["", f"NumPy's over torch's: batched {ratio['batched']:.3f}, one by one {ratio['one_by_one']:.3f}."]
    (out / "sine_ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

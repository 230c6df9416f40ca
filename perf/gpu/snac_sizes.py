"""What a SNAC decoder call of a batch size never seen before costs, on this device.

The served GPU sweep stalled every stream for seconds whenever the decoder's
round had a new number of windows. This times, for several batch sizes, the
first call and a second call of the same size:

* ``unpadded``: the decoder deciding exactly each call's windows (cuDNN as torch sets it);
* ``unpadded_no_cudnn``: the same with cuDNN off (torch's own convolution kernels);
* ``padded``: the serving decoder (``load_window_decoder``: calls padded to ``round_sizes``),
  after ``warm_up`` (timed), which decodes each padded size once.

    PYTHONPATH=src python perf/gpu/snac_sizes.py --out perf/results/gpu-snac-sizes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from orpheus_triton.arguments import counts
from orpheus_triton.constants import CODEBOOK_SIZE, WINDOW_TOKENS
from orpheus_triton.demo_models import write_random_snac
from orpheus_triton.frames import Window
from orpheus_triton.snac_codec import load_window_decoder, warm_up
from orpheus_triton.timing import synced_seconds


def first_and_second_calls(decoder, device: torch.device, sizes: list[int]) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        windows = [Window(tuple(rng.integers(1, CODEBOOK_SIZE, WINDOW_TOKENS).tolist()), i) for i in range(size)]
        first = synced_seconds(device, lambda windows=windows: decoder.decode(windows))
        second = synced_seconds(device, lambda windows=windows: decoder.decode(windows))
        rows.append({"windows": size, "first_ms": round(first * 1000, 1), "second_ms": round(second * 1000, 1)})
        print(f"[snac-sizes]   {size:4d} windows: first call {first * 1000:8.1f} ms, second {second * 1000:6.1f} ms",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=counts, default="3,5,7,12,24,40,100,200",
                        help="batch sizes, each new to the decoder")
    parser.add_argument("--variants", default="unpadded,unpadded_no_cudnn,padded")
    parser.add_argument("--out", default="perf/results/gpu-snac-sizes")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here", file=sys.stderr)
        return 2
    sizes = args.sizes
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
              "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        write_random_snac(Path(tmp))
        for variant in args.variants.split(","):
            print(f"[snac-sizes] {variant}", flush=True)
            torch.backends.cudnn.enabled = variant != "unpadded_no_cudnn"
            decoder = load_window_decoder(Path(tmp), device=device)
            entry = {}
            if variant == "padded":
                entry["warm_up_s"] = round(synced_seconds(device, lambda decoder=decoder: warm_up(decoder)), 2)
                entry["sizes"] = list(decoder.sizes)
                print(f"[snac-sizes]   warm_up of sizes {decoder.sizes}: {entry['warm_up_s']} s", flush=True)
            else:
                decoder.sizes = ()  # every call decodes exactly its windows
                entry["warm_up_s"] = round(synced_seconds(device, lambda decoder=decoder: warm_up(decoder)), 2)
            entry["calls"] = first_and_second_calls(decoder, device, sizes)
            result["variants"][variant] = entry
            del decoder
            if device.type == "cuda":
                torch.cuda.empty_cache()
    torch.backends.cudnn.enabled = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "snac_sizes.json").write_text(json.dumps(result, indent=1))
    print(f"[snac-sizes] wrote {out / 'snac_sizes.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""What the `llm` relay in front of TensorRT-LLM costs: CPU per token it forwards, and whether it keeps up.

TensorRT-LLM's model is stood in for by perf/relay_source, a Python model that
streams paced tokens, one per response and without end_id, as TensorRT-LLM
does. Client streams read either that model directly (a response per token)
or the relay (a response per SNAC frame, ended by end_id). The relay's CPU
time is read from its own process (/proc), so the figure is the relay's alone,
whatever else shares the machine; how many real-time streams the relay can
carry on one core follows from it.

    PYTHONPATH=src python perf/relay_bench.py --streams 16,64 --tokens 400 --out perf/results/relay
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import string
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from common import PERF, log, machine_info, serve_repository, source_state, tree_jiffies

from orpheus_triton.arguments import DefaultsHelpFormatter, counts, positive
from orpheus_triton.constants import ENGINE_MODEL, LLM_MODEL, REAL_TIME_TOKENS_PER_SECOND
from orpheus_triton.repository import RelaySettings, RepositorySettings, render_relay

SOURCE = PERF / "relay_source"
TICKS_PER_SECOND = 100  # /proc clock ticks (USER_HZ)


def render(out: Path, tokens_per_second: float, relay_instances: int = 1) -> Path:
    """The relay as `llm` in front of the stand-in engine model."""
    engine = out / ENGINE_MODEL
    shutil.copytree(SOURCE, engine, ignore=shutil.ignore_patterns("__pycache__"))
    config = engine / "config.pbtxt"
    config.write_text(string.Template(config.read_text()).substitute(tokens_per_second=tokens_per_second))
    settings = RepositorySettings(llm_dir="-", snac_dir="-", llm_max_batch_size=256)
    relay = RelaySettings(engine_seed_input="seed", engine_audio_guard=False, relay_instances=relay_instances)
    render_relay(settings, relay, out)
    return out


def relay_pids() -> list[int]:
    """The backend stub processes running the relay's model.py (one per instance)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"triton_python_backend_stub" in command and f"/{LLM_MODEL}/1/model.py".encode() in command:
                pids.append(int(entry.name))
    if not pids:
        raise RuntimeError("no backend stub runs the relay")
    return pids


def relay_ticks() -> int:
    return sum(tree_jiffies(pid) for pid in relay_pids())


def one_stream(url: str, model: str, tokens: int, out: list) -> None:
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    from orpheus_triton.client import infer_input  # noqa: PLC0415

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    inputs = [infer_input("input_ids", np.array([[1, 2, 3]], np.int32)),
              infer_input("input_lengths", np.array([[3]], np.int32)),
              infer_input("request_output_len", np.array([[tokens]], np.int32))]
    started = time.perf_counter()
    client.async_stream_infer(model, inputs, request_id=str(uuid.uuid4()), enable_empty_final_response=True)
    received = responses = 0
    while True:
        result, error = events.get(timeout=300)
        if error is not None:
            out.append({"error": str(error)})
            break
        ids = result.as_numpy("output_ids")
        if ids is not None and ids.size:
            received += ids.size
            responses += 1
        if result.get_response().parameters["triton_final_response"].bool_param:
            out.append({"tokens": received, "responses": responses, "seconds": time.perf_counter() - started})
            break
    client.stop_stream()
    client.close()


def measure(url: str, model: str, streams: int, tokens: int) -> dict:
    before = relay_ticks()
    results: list = []
    threads = [threading.Thread(target=one_stream, args=(url, model, tokens, results)) for _ in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    relay_seconds = (relay_ticks() - before) / TICKS_PER_SECOND
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise RuntimeError(f"{len(failed)} streams failed, first: {failed[0]}")
    total = sum(r["tokens"] for r in results)
    return {
        "read_from": model, "streams": streams, "tokens": total, "responses": sum(r["responses"] for r in results),
        "wall_seconds": round(wall, 2), "tokens_per_second": round(total / wall),
        "slowest_stream_tokens_per_second": round(min(r["tokens"] / r["seconds"] for r in results), 1),
        "relay_cpu_seconds": relay_seconds, "relay_cores": round(relay_seconds / wall, 3),
        "relay_cpu_us_per_token": round(relay_seconds / total * 1e6, 1) if model == LLM_MODEL else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--streams", type=counts, default="16,64", help="concurrent streams, comma-separated")
    parser.add_argument("--tokens", type=positive, default=400, help="tokens per stream")
    parser.add_argument("--rate", type=float, default=REAL_TIME_TOKENS_PER_SECOND,
                        help="tokens per second per stream from the stand-in engine (0: as fast as it can)")
    parser.add_argument("--relay-instances", type=positive, default=1)
    parser.add_argument("--out", default="perf/results/relay")
    args = parser.parse_args()
    levels = args.streams
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with serve_repository(render(Path(tempfile.mkdtemp(prefix="relay-bench-")), args.rate, args.relay_instances),
                          out / "raw" / "relay_server.log") as server:
        measure(server.url, LLM_MODEL, 2, 50)  # warm-up
        for streams in levels:
            for model in (LLM_MODEL, ENGINE_MODEL):
                row = measure(server.url, model, streams, args.tokens)
                log(json.dumps(row))
                rows.append(row)
    relayed = [r for r in rows if r["read_from"] == LLM_MODEL]
    per_token = max(r["relay_cpu_us_per_token"] for r in relayed)
    one_core = 1e6 / per_token / REAL_TIME_TOKENS_PER_SECOND
    result = {"machine": machine_info(), "rate_per_stream": args.rate, "tokens_per_stream": args.tokens,
              "relay_instances": args.relay_instances, "source": source_state(),
              "rows": rows, "relay_cpu_us_per_token_max": per_token,
              "real_time_streams_per_relay_core": round(one_core)}
    (out / "relay.json").write_text(json.dumps(result, indent=2))
    pace = f"{args.rate:.0f} tokens/s per stream" if args.rate else "as fast as the stand-in engine goes"
    lines = [
        f"# The llm relay in front of a token-by-token engine, on {result['machine']['cpu']} "
        f"({result['machine']['cores']} cores)", "",
        f"Stand-in engine: {pace}, {args.tokens} tokens per stream, one per response, no end_id. "
        f"Relay instances: {args.relay_instances}. Code: commit {result['source']['commit']}.", "",
        f"- relay CPU per token forwarded: at most **{per_token:.0f} us**, so one core carries about "
        f"**{one_core:.0f}** real-time streams ({REAL_TIME_TOKENS_PER_SECOND:.0f} tokens/s each)", "",
        "| read from | streams | tokens/s | slowest stream tokens/s | responses | relay cores | relay us/token |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['read_from']} | {r['streams']} | {r['tokens_per_second']} | "
          f"{r['slowest_stream_tokens_per_second']} | {r['responses']} | {r['relay_cores']} | "
          f"{r['relay_cpu_us_per_token'] if r['relay_cpu_us_per_token'] is not None else '-'} |" for r in rows],
    ]
    (out / "relay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

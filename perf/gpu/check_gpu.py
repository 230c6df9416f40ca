#!/usr/bin/env python3
"""Correctness of the GPU-only paths, before any benchmark: a minute or two on a lent GPU, a pass or fail each.

What the CPU test suite can only check against references or eagerly runs here
on the real device, with small random models:

* decode attention: does FlashAttention's varlen call (per-row key lengths) pass
  its check against the masked path with this torch build?
* CUDA graphs: does a replayed decode step give what the same step computes eagerly?
* the bucketed bf16 decode step against the fp32 CPU forward on the same weights;
* an engine run: streams to completion, every token in its frame slot;
* the engine's overlap option: the same tokens for every stream as without it;
* short prompts prefilled from CUDA graphs (scratch slots, then moved) against prefilling them eagerly:
  the same tokens for every stream, and what one prefill costs each way;
* an overlapped engine's steps under CUDA's sync debug mode: nothing waits for the GPU but reading the
  step before's tokens back;
* sampling: the same tokens on the device as on the CPU for the same logits;
* graph sampling (the engine's default on a GPU): a CUDA graph's tokens against sample()'s on the same inputs;
* the SNAC decoder's counter-based noise on the device: a stream alone and batched (and which call
  sizes run as CUDA graphs, each checked against the eager call when captured);
* the FP8 engine build's calibration set (prompts and the model's own audio) generated on the device;
* new shapes: a prefill of a shape not seen before and a SNAC call of a size not seen before take
  milliseconds on their first call, not the seconds of a kernel plan built per shape;
* one stream through tritonserver, both torch models on the device (the demo model set): its first
  audio, or the error with the server log's last lines.

    PYTHONPATH=src python perf/gpu/check_gpu.py --out perf/results/gpu-check

On a CPU (``--device cpu``) the same code runs with stand-ins (the bucketed step
eagerly, bf16 on the CPU against fp32), so that a test catches the script's own
faults before it spends GPU time; the FlashAttention check is not applicable there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

from orpheus_triton.calibration import write_calibration_set
from orpheus_triton.constants import (
    AUDIO_TOKEN_BASE,
    CODEBOOK_SIZE,
    END_OF_SPEECH,
    NO_END_ID,
    SAMPLE_RATE,
    START_OF_SPEECH,
    TOKENS_PER_FRAME,
)
from orpheus_triton.demo_models import write_random_llama, write_tokenizer
from orpheus_triton.engine import GenerationRequest, InflightEngine
from orpheus_triton.frames import StreamFramer, Window, audio_token_id, token_slot
from orpheus_triton.llama import load_llama, varlen_decode_works
from orpheus_triton.prompt import load_tokenizer
from orpheus_triton.sampling import GuardedSampler, LmHead, SamplingBatch, sample
from orpheus_triton.timing import synced_seconds

SHAPES = {
    "small": {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
              "intermediate_size": 1536},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128},
}
NOT_APPLICABLE = "n/a"


def check_decode_attention(device: torch.device, model) -> dict:
    if device.type != "cuda":
        return {"ok": NOT_APPLICABLE, "why": "FlashAttention varlen is CUDA-only"}
    config = model.config
    shapes = {"this model": (config.num_heads, config.num_kv_heads, config.head_dim), "Orpheus 3B": (24, 8, 128)}
    results = {name: varlen_decode_works(device, torch.bfloat16, *shape) for name, shape in shapes.items()}
    return {"ok": all(results.values()), "varlen_agrees": results}


def prefilled_engine(model, streams: int, max_streams: int = 8) -> InflightEngine:
    """An engine whose decode steps take the GPU path (bucketed; on a CPU eagerly), ``streams`` decoding."""
    engine = InflightEngine(model, max_streams=max_streams, max_seq_len=512, bucketed=True)
    for i in range(streams):
        prompt = [1000 + 37 * i + k for k in range(5 + 3 * i)]
        engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=200, emit=lambda t, f: None, seed=i,
                                        end_id=NO_END_ID))  # never ends early: every stream stays in the batch
    while len(engine.decoding) < streams:
        engine.step()
    return engine


def check_graphs(device: torch.device, model) -> dict:
    engine = prefilled_engine(model, streams=5)
    decoder = engine.decoder  # on a CPU without graphs: the replay is an eager run too
    started = time.perf_counter()
    captured = engine.capture_graphs()
    capture_seconds = time.perf_counter() - started
    tokens = torch.tensor([[s.generated[-1]] for s in engine.decoding], device=device)
    positions = torch.tensor([[s.length] for s in engine.decoding], device=device)
    context = max(s.length for s in engine.decoding) + 1
    with torch.inference_mode():
        replayed = decoder(tokens, positions, context).float().clone()
        rows, bucket = decoder.bucket(len(tokens), context)
        eager = decoder._forward(rows, bucket)[: len(tokens)].float()  # the same inputs, written again
    difference = (replayed - eager).abs().max().item()
    return {"ok": difference <= 1e-2 * max(1.0, eager.abs().max().item()), "graphs": decoder.use_graphs,
            "graphs_captured": captured,
            "capture_seconds": round(capture_seconds, 2), "max_abs_difference": difference}


def check_against_cpu(device: torch.device, checkpoint: Path) -> dict:
    """The bucketed bf16 decode step on the device (on a CPU: bf16 there) against the plain fp32 CPU forward."""
    hidden = []
    for where, dtype, bucketed in ((device, torch.bfloat16, True), (torch.device("cpu"), torch.float32, False)):
        model = load_llama(checkpoint, device=where, dtype=dtype)
        engine = prefilled_engine(model, streams=5)
        positions = torch.tensor([[s.length] for s in engine.decoding])  # the prompts' lengths, on both
        context = int(positions.max()) + 1
        tokens = torch.full_like(positions, AUDIO_TOKEN_BASE + 5)  # the same next token on both
        with torch.inference_mode():
            if bucketed:
                out = engine.decoder(tokens.to(where), positions.to(where), context)
            else:
                out = model(tokens, positions, first_slot=0, context_len=context, hidden_only=True)
        hidden.append(out.float().cpu())
        del engine, model
    a, b = hidden
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
    return {"ok": cosine > 0.99, "min_cosine_similarity": round(cosine, 5)}


def engine_outputs(model, **options) -> tuple[dict[int, list[int]], float]:
    """Eight streams (140 tokens at most, two joining late) through an engine with ``options``: each
    stream's tokens, and the seconds the run took."""
    engine = InflightEngine(model, max_streams=8, max_seq_len=512, **options)
    engine.capture_graphs()
    outputs: dict[int, list[int]] = {}
    started = time.perf_counter()
    for i in range(8):
        outputs[i] = []
        engine.submit(GenerationRequest(prompt=[1000 + k + 13 * i for k in range(12)], max_new_tokens=140,
                                        emit=lambda t, f, i=i: outputs[i].extend(t), seed=i))
        if i == 5:
            for _ in range(9):
                engine.step()
    engine.run_until_idle()
    return outputs, time.perf_counter() - started


def check_overlap(device: torch.device, model) -> dict:
    """The engine's overlap option (tokens read back from pinned memory a step late, the next forward fed
    from the device) against the engine without it (named: on a GPU it is the default): the same tokens for
    every stream."""
    plain, _ = engine_outputs(model, overlap=False)
    overlapped, _ = engine_outputs(model, overlap=True)
    same = sum(plain[i] == overlapped[i] for i in plain)
    return {"ok": same == len(plain), "same_streams": f"{same} of {len(plain)}",
            "tokens": sum(len(t) for t in overlapped.values())}


def arriving_outputs(model, prefill_graphs: bool = True) -> tuple[dict[int, list[int]], InflightEngine]:
    """Eight streams with prompts of 5 to 40 tokens arriving in twos and threes (each group prefilled
    together, rows of different lengths): each stream's tokens. Without ``prefill_graphs`` the same padded
    prefills run eagerly (the same kernels at the same shapes: a graph's replay must give their tokens)."""
    engine = InflightEngine(model, max_streams=8, max_seq_len=512, bucketed=True)
    if not prefill_graphs and engine.prefiller is not None:
        engine.prefiller.use_graphs = False
    engine.capture_graphs()
    outputs: dict[int, list[int]] = {}
    for i in range(8):
        outputs[i] = []
        engine.submit(GenerationRequest(prompt=[1000 + k + 13 * i for k in range(5 + 5 * i)], max_new_tokens=60,
                                        emit=lambda t, f, i=i: outputs[i].extend(t), seed=i))
        if i % 3 == 2:
            engine.step()
    engine.run_until_idle()
    return outputs, engine


def check_prefill_graphs(device: torch.device, model) -> dict:
    """Short prompts prefilled from captured graphs (into scratch slots, then moved into their decode slots)
    against the same padded prefills run eagerly: the same tokens for every stream, the graphs in use; and
    one prefill of two 40-token prompts timed each way (the host time a graph saves on every newcomer).
    The timing runs before the second engine exists: each engine allocates the model's KV cache anew, and a
    graph replayed after that would write into freed memory."""
    graphs, engine = arriving_outputs(model)
    prefiller = engine.prefiller
    in_use = prefiller is not None and prefiller.use_graphs and bool(prefiller.graphs)
    timed = {}
    shape = prefiller.bucket(2, 40) if prefiller is not None else None
    if shape is not None:  # None: the graphs were refused (the server log says why); the tokens still compared
        tokens = torch.randint(1000, 2000, (2, 40), device=device)
        last = torch.full((2,), 39, device=device)
        with torch.inference_mode():
            replayed = min(synced_seconds(device, lambda: prefiller(tokens, last)) for _ in range(5))
            eager_seconds = min(synced_seconds(device, lambda: prefiller._forward(*shape)) for _ in range(5))
        timed = {"prefill_2x40_ms": {"graph": round(1000 * replayed, 2),
                                     "eager_padded": round(1000 * eager_seconds, 2)}}
    engine = prefiller = None  # its graphs and their memory go before the next engine allocates its cache
    eager, _ = arriving_outputs(model, prefill_graphs=False)
    same = sum(graphs[i] == eager[i] for i in graphs)
    return {"ok": same == len(graphs) and in_use == (device.type == "cuda"),
            "same_streams": f"{same} of {len(graphs)}", "graphs_in_use": in_use, **timed}


SYNC_DEBUG_NOTICE = "Synchronization debug mode is a prototype feature"


def check_overlap_waits(device: torch.device, model) -> dict:
    """An overlapped engine's steps, newcomers arriving, under CUDA's sync debug mode: nothing in a step may
    wait for the GPU but reading the step before's tokens back (anything else holds the host until the
    queued work is done, and its work can no longer run under the GPU's)."""
    if device.type != "cuda":
        return {"ok": NOT_APPLICABLE}
    from orpheus_triton import engine as engine_module  # noqa: PLC0415

    engine = InflightEngine(model, max_streams=8, max_seq_len=512, overlap=True)
    engine.capture_graphs()
    plain_read = engine_module._Sampled.read

    def read_unwatched(self):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return plain_read(self)
        finally:
            torch.cuda.set_sync_debug_mode("warn")

    submitted = 0

    def arrive(count: int) -> None:
        nonlocal submitted
        for _ in range(count):
            engine.submit(GenerationRequest(prompt=[1000 + k + 13 * submitted for k in range(10 + submitted)],
                                            max_new_tokens=30, emit=lambda t, f: None, seed=submitted))
            submitted += 1

    arrive(3)
    for _ in range(3):  # past the first steps' one-time work
        engine.step()
    engine_module._Sampled.read = read_unwatched
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            for step in range(12):
                if step % 4 == 0:
                    arrive(2)
                engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        engine_module._Sampled.read = plain_read
    engine.run_until_idle()
    waits = sync_waits(caught)
    return {"ok": not waits, "waits_in_12_steps": len(waits), "first_waits": waits[:5]}


def sync_waits(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings of CUDA's sync debug mode that name an operation waiting for the GPU ("called a
    synchronizing CUDA operation"), as file:line: message. torch also warns once that the mode is a
    prototype (SYNC_DEBUG_NOTICE): no wait, though its text names synchronizing operations too (an H200
    run's one "wait" was that notice)."""
    return [f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}: {str(w.message)[:120]}" for w in caught
            if "synchroniz" in str(w.message).lower() and not str(w.message).startswith(SYNC_DEBUG_NOTICE)]


def misplaced_tokens(audio: list[int]) -> int:
    """How many of a stream's audio tokens are not in the frame slot of their position."""
    return sum(token_slot(t) != position % TOKENS_PER_FRAME for position, t in enumerate(audio))


def check_engine_run(device: torch.device, model) -> dict:
    outputs, seconds = engine_outputs(model)
    misplaced = 0
    for tokens in outputs.values():
        audio = [t for t in tokens if t != END_OF_SPEECH]
        misplaced += misplaced_tokens(audio)
    total = sum(len(t) for t in outputs.values())
    return {"ok": misplaced == 0 and all(t and t[-1] == END_OF_SPEECH for t in outputs.values()),
            "tokens": total, "tokens_per_second": round(total / seconds), "misplaced_tokens": misplaced}


def check_calibration(device: torch.device, checkpoint: Path) -> dict:
    """What ``build_trtllm.py --quantization fp8`` generates on the GPU before quantizing: up to 16
    calibration sequences (those with little audio left out), all of one length, every audio token in
    its frame slot."""
    write_tokenizer(checkpoint)
    with tempfile.TemporaryDirectory() as out:
        path = write_calibration_set(checkpoint, out, count=16, length=320, device=device.type, max_streams=8,
                                     log=lambda message: None)
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    tokenizer = load_tokenizer(checkpoint)
    misplaced, audio, lengths = 0, 0, set()
    for text in texts:
        ids = tokenizer.encode(text).ids
        lengths.add(len(ids))
        tokens = ids[ids.index(START_OF_SPEECH) + 1 :]
        audio += len(tokens)
        misplaced += misplaced_tokens(tokens)
    return {"ok": 0 < len(texts) <= 16 and len(lengths) == 1 and audio > 0 and misplaced == 0,
            "sequences": len(texts), "lengths": sorted(lengths), "audio_tokens": audio, "misplaced_tokens": misplaced}


def check_sampling(device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    batch, vocab = 256, AUDIO_TOKEN_BASE + TOKENS_PER_FRAME * CODEBOOK_SIZE + 8
    logits = torch.randn(batch, vocab, generator=gen) * 3
    params = {"temperature": torch.full((batch,), 0.6), "top_p": torch.full((batch,), 0.8),
              "top_k": torch.zeros(batch, dtype=torch.long), "repetition_penalty": torch.full((batch,), 1.1),
              "seed": torch.arange(batch) * 7919, "step": torch.arange(batch) % 50,
              "audio_guard": torch.arange(batch) % 4 != 0, "audio_position": torch.arange(batch) % 23}
    seen = torch.rand(batch, vocab, generator=gen) < 0.01
    picked = []
    for where in (torch.device("cpu"), device):
        moved = SamplingBatch(**{k: v.to(where) for k, v in params.items()})
        picked.append(sample(logits.to(where), moved, seen.to(where)).cpu())
    agree = (picked[0] == picked[1]).float().mean().item()
    return {"ok": agree >= 0.99, "same_token_share": round(agree, 4)}


def check_graph_sampling(device: torch.device, model) -> dict:
    """The engine's graph-sampling path (sampling.GuardedSampler, a CUDA graph per batch bucket on a
    GPU) against sample() on the same hidden states and settings: the same tokens, up to near-ties that the
    head's two ways of multiplying (all code blocks at once, or a block per slot) may round apart."""
    gen = torch.Generator().manual_seed(2)
    batch, weight = 48, model.lm_head.weight
    hidden = (torch.randn(batch, weight.shape[1], generator=gen) * 2).to(device=device, dtype=weight.dtype)
    seen = (torch.rand(batch + 1, weight.shape[0], generator=gen) < 0.01).to(device)
    host = {"temperature": [0.6 + (i % 5) * 0.2 for i in range(batch)], "top_p": [0.8] * batch,
            "repetition_penalty": [1.1] * batch, "top_k": [(i % 3) * 20 for i in range(batch)],
            "seed": [i * 7919 for i in range(batch)], "step": [i % 50 for i in range(batch)],
            "audio_position": [i % 23 for i in range(batch)], "rows": list(range(1, batch + 1))}
    reals = torch.tensor([host["temperature"], host["top_p"], host["repetition_penalty"]], device=device)
    whole = torch.tensor([host["top_k"], host["seed"], host["step"], [1] * batch, host["audio_position"],
                          host["rows"]], device=device)
    sampler = GuardedSampler(weight, seen, buckets=[8, 64], use_graphs=device.type == "cuda")
    graphed = [sampler(hidden, reals, whole).cpu() for _ in range(2)]  # the second call replays the graph
    params = SamplingBatch.from_packed(reals, whole)
    expected = sample(LmHead(hidden, weight), params, seen, seen_rows=whole[5]).cpu()
    agree = (graphed[1] == expected).float().mean().item()
    return {"ok": agree >= 0.95 and torch.equal(graphed[0], graphed[1]), "same_token_share": round(agree, 4),
            "graphs": len(sampler.graphs)}


def random_snac_decoder(device: torch.device):
    """The serving SNAC decoder on ``device`` with random SNAC 24 kHz weights (ImportError without snac)."""
    from orpheus_triton.demo_models import write_random_snac  # noqa: PLC0415
    from orpheus_triton.snac_codec import load_window_decoder  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        write_random_snac(Path(tmp))
        return load_window_decoder(Path(tmp), device=device)


def check_snac(device: torch.device, round_windows: int) -> dict:
    try:
        decoder = random_snac_decoder(device)
    except ImportError as error:  # the lent GPU machines have torch, not snac (perf/gpu/run_on_gpu.sh setup)
        return {"ok": NOT_APPLICABLE, "why": f"cannot import the SNAC decoder: {error}"}
    rng = np.random.default_rng(0)
    streams = []
    for _ in range(8):
        codes = rng.integers(1, CODEBOOK_SIZE, 6 * TOKENS_PER_FRAME).tolist()
        streams.append(StreamFramer().push([audio_token_id(code, i) for i, code in enumerate(codes)]))
    batched = decoder.decode([w for group in zip(*streams, strict=True) for w in group])
    worst = 0
    for index, windows in enumerate(streams):
        alone = np.concatenate(decoder.decode(windows)).astype(np.int32)
        together = np.concatenate(batched[index :: len(streams)]).astype(np.int32)
        worst = max(worst, int(np.abs(alone - together).max()))
    round_of = [Window(tuple(rng.integers(1, CODEBOOK_SIZE, 28).tolist()), i) for i in range(round_windows)]
    decoder.decode(round_of)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    decoder.decode(round_of)
    seconds = time.perf_counter() - started
    # Batched and alone may round differently (other kernels for other shapes): a few int16 steps.
    return {"ok": worst <= 64, "noise": decoder.noise, "max_difference_alone_vs_batched": worst,
            "round_windows": round_windows, "seconds_per_round": round(seconds, 4),
            # each checked against the eager call when captured (snac_codec.CallGraphs)
            "call_graphs": sorted(decoder.graphs.graphs) if decoder.graphs is not None else []}


NEW_SHAPE_LIMIT_S = 0.5  # what a first call of a new shape may cost beyond a second call: not seconds


def check_new_shapes(device: torch.device, model) -> dict:
    """A prefill of a shape never seen before and a SNAC call of a size never seen before, each timed on
    its first call and again: neither may take seconds (kernels that build a plan per shape did, on an
    H100, and every served stream waited for them)."""

    def twice(run) -> tuple[float, float]:
        return synced_seconds(device, run), synced_seconds(device, run)

    engine = InflightEngine(model, max_streams=8, max_seq_len=512)  # its KV cache; prefill as a burst does
    calls = {}
    with torch.inference_mode():
        for rows, width in ((3, 37), (5, 23), (2, 61), (6, 45)):
            tokens = torch.randint(1000, 2000, (rows, width), device=device)
            positions = torch.arange(width, device=device).expand(rows, width)
            calls[f"prefill {rows}x{width}"] = twice(lambda tokens=tokens, positions=positions: engine.model(
                tokens, positions, first_slot=0, last_only=False, hidden_only=True))
    try:
        decoder = random_snac_decoder(device)
    except ImportError as error:
        calls_skipped = f"SNAC: cannot import the decoder: {error}"
    else:
        from orpheus_triton.snac_codec import warm_up  # noqa: PLC0415

        calls_skipped = None
        warm_up(decoder)  # as the server's decoder does at load
        rng = np.random.default_rng(3)
        for size in (3, 6, 11, 20):
            windows = [Window(tuple(rng.integers(1, CODEBOOK_SIZE, 28).tolist()), i) for i in range(size)]
            calls[f"snac {size} windows"] = twice(lambda windows=windows: decoder.decode(windows))
    worst = max(first - second for first, second in calls.values())
    result = {"ok": worst < NEW_SHAPE_LIMIT_S, "worst_first_call_extra_ms": round(1000 * worst, 1),
              "first_and_second_ms": {name: [round(1000 * t, 1) for t in pair] for name, pair in calls.items()}}
    if calls_skipped:
        result["skipped"] = calls_skipped
    return result


def check_served_stream(device: torch.device, log_path: Path, max_tokens: int = 120) -> dict:
    """The whole pipeline through tritonserver with both torch models on ``device``: one stream of
    the demo model set, its first audio and length, or the error with the server log's last lines.
    The server's log goes to ``log_path`` and each stage says when it starts, so that a run its step's
    time limit ends here still shows how far it got."""
    from orpheus_triton.client import OrpheusClient  # noqa: PLC0415 (tritonclient: only this check)
    from orpheus_triton.demo_models import demo_model_set  # noqa: PLC0415
    from orpheus_triton.repository import RepositorySettings, render  # noqa: PLC0415
    from orpheus_triton.server import Ports, log_tail, start_server, stop_server, wait_until_ready  # noqa: PLC0415

    models = demo_model_set(log=lambda message: None)
    ports = Ports.free()
    with tempfile.TemporaryDirectory() as tmp:
        repository = render(RepositorySettings(llm_dir=str(models.llm), snac_dir=str(models.snac),
                                               device=device.type, max_streams=8, max_seq_len=1024),
                            Path(tmp) / "repository")
        with open(log_path, "w") as log_file:
            started = time.perf_counter()
            progress(f"served_stream: starting tritonserver (its log: {log_path})")
            process = start_server(repository, ports, log_file=log_file, extra=["--exit-timeout-secs=10"])
            try:
                wait_until_ready(process, f"localhost:{ports.grpc}", timeout=300)
                progress(f"served_stream: server ready after {time.perf_counter() - started:.1f} s; one stream")
                result = OrpheusClient(f"localhost:{ports.grpc}").synthesize(
                    "tara: The server streams this sentence.", max_tokens=max_tokens, seed=1, timeout=120)
                return {"ok": result.time_to_first_audio is not None,
                        "first_audio_ms": round(1000 * (result.time_to_first_audio or 0.0), 1),
                        "audio_seconds": round(len(result.audio) / SAMPLE_RATE, 3), "chunks": len(result.chunks)}
            except Exception as error:  # noqa: BLE001 (the point: say why, with the server's side of it)
                return {"ok": False, "error": f"{type(error).__name__}: {error}"[:1000],
                        "server_log": log_tail(log_path, 30)}
            finally:
                stop_server(process)


def progress(message: str) -> None:
    print(f"[check-gpu] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--snac-round", type=int, default=256, help="windows in the timed SNAC round")
    parser.add_argument("--out", default="perf/results/gpu-check")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here; --device cpu runs the checks that apply to a CPU", file=sys.stderr)
        return 2
    results: dict[str, dict] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write_summary() -> dict:
        """check_gpu.json with the checks so far: written after each, so a run cut short keeps what it did."""
        failed = [name for name, result in results.items() if result["ok"] is False]
        summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "shape": args.shape, "failed": failed, "checks": results}
        (out / "check_gpu.json").write_text(json.dumps(summary, indent=2))
        return summary

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "llm"
        write_random_llama(checkpoint, SHAPES[args.shape], seed=1)
        model = load_llama(checkpoint, device=device)
        checks = {
            "decode_attention": lambda: check_decode_attention(device, model),
            "cuda_graphs": lambda: check_graphs(device, model),
            "device_vs_cpu": lambda: check_against_cpu(device, checkpoint),
            "engine_run": lambda: check_engine_run(device, model),
            "overlap": lambda: check_overlap(device, model),
            "prefill_graphs": lambda: check_prefill_graphs(device, model),
            "overlap_waits": lambda: check_overlap_waits(device, model),
            "sampling": lambda: check_sampling(device),
            "graph_sampling": lambda: check_graph_sampling(device, model),
            "snac": lambda: check_snac(device, args.snac_round),
            "calibration": lambda: check_calibration(device, checkpoint),
            "new_shapes": lambda: check_new_shapes(device, model),
            "served_stream": lambda: check_served_stream(device, out / "served_stream_server.log"),
        }
        for name, check in checks.items():
            started = time.perf_counter()
            try:
                results[name] = check()
            except Exception as error:  # noqa: BLE001 (reported: the point is to see every check)
                results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                                 "trace": traceback.format_exc()[-2000:]}
            results[name]["seconds"] = round(time.perf_counter() - started, 2)
            progress(f"{name}: {json.dumps(results[name])[:400]}")
            write_summary()
    summary = write_summary()
    failed = summary["failed"]
    print(f"[check-gpu] {'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)} "
          f"({summary['device']}, torch {summary['torch']}); details in {out / 'check_gpu.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

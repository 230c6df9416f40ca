"""Side-by-side measurements, each reported as a ratio.

(a) serving cost: time to first audio through Triton (gRPC, ensemble, three
    Python-backend models) vs the same models called in-process (engine thread +
    framer + SNAC in the caller), one stream at a time, runs interleaved;
(b) SNAC batching: decoding 8 windows from 8 streams in one call vs one call per
    window, in CPU time of this process (time.process_time, all torch threads);
(c) in-flight batching: the torch engine generating 8 streams together vs the same
    8 requests one after another, in aggregate tokens per second.
"""

from __future__ import annotations

import io
import json
import queue
import random
import statistics
import time
from contextlib import redirect_stdout

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from orpheus_triton.constants import CODEBOOK_SIZE, NO_END_ID, WINDOW_TOKENS
from orpheus_triton.engine import GenerationRequest, InflightEngine
from orpheus_triton.frames import StreamFramer, Window
from orpheus_triton.llama import load_llama
from orpheus_triton.loadgen import StreamRecord, Utterance
from orpheus_triton.prompt import build_prompt, load_tokenizer
from orpheus_triton.serving import model_parameters
from orpheus_triton.snac_codec import WindowDecoder, load_window_decoder, warm_up
from orpheus_triton.triton_llm import build_engine, pick_device, set_cpu_threads

SERVING_TARGET = 1.25  # served TTFA / in-process TTFA at concurrency 1
SNAC_TARGET = 0.5  # batched CPU time / one-by-one CPU time, 8 windows


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def served_parameters(url: str, model: str) -> tuple[dict[str, str], int]:
    """A served model's config parameters and max_batch_size, as the server at ``url`` (gRPC) loaded them."""
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    client = grpcclient.InferenceServerClient(url)
    try:
        config = client.get_model_config(model, as_json=True)["config"]
    finally:
        client.close()
    return model_parameters({"model_config": json.dumps(config)}), int(config.get("max_batch_size", 0))


class InProcessPipeline:
    """The serving pipeline without Triton: engine loop thread -> framer -> SNAC, in this process.

    Built from the served models' own parameters (``served_parameters``): the same engine settings,
    and the same torch threads for each stage as the server's `llm` and `snac_decoder` processes
    (on a CPU 'auto' gives each half the cores). With torch's default instead (every core for both
    stages in one process) the in-process side oversubscribed the cores, 20-35% later first audio
    on 2 cores, and the comparison flattered the server.
    """

    def __init__(self, llm_params: dict[str, str], decoder_params: dict[str, str], max_windows: int):
        self._caller_threads = torch.get_num_threads()
        self.tokenizer = load_tokenizer(llm_params["llm_dir"])
        # Sets this thread's torch threads to the llm's count (the engine thread started below keeps it)
        # and captures the GPU's graphs before SNAC shares the GPU from another thread.
        self.engine = build_engine(llm_params)
        self.llm_threads = torch.get_num_threads()
        self.engine.start()
        device = pick_device(decoder_params.get("device", "auto"))
        self.decoder_threads = set_cpu_threads(decoder_params, device)  # SNAC runs in the calling thread
        self.decoder = load_window_decoder(decoder_params["snac_dir"], device=device,
                                           exact=decoder_params.get("exact") == "true", max_windows=max_windows)
        warm_up(self.decoder)
        # As the served decoder's lead_in and lead_out.
        self.lead_in = decoder_params.get("lead_in", "true") == "true"
        self.lead_out = decoder_params.get("lead_out", "true") == "true"

    def synthesize(self, utterance: Utterance, run_start: float = 0.0) -> StreamRecord:
        tokens: queue.Queue = queue.Queue()
        record = StreamRecord(utterance.label, utterance.voice, time.perf_counter() - run_start)
        sent = time.perf_counter()
        prompt = build_prompt(self.tokenizer, utterance.text, utterance.voice)
        self.engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=utterance.max_tokens,
                                             emit=lambda ids, done: tokens.put((ids, done)), seed=utterance.seed))
        framer, finished = StreamFramer(lead_in=self.lead_in, lead_out=self.lead_out), False
        while not finished:
            batch = [tokens.get(timeout=600)]
            while not tokens.empty():  # decode everything that is ready in one call, as the server does
                batch.append(tokens.get_nowait())
            windows = [w for ids, _ in batch for w in framer.push(ids)]
            finished = any(done for _, done in batch)
            windows += framer.finish() if finished else []
            for audio in self.decoder.decode(windows):
                record.arrivals.append(time.perf_counter() - sent)
                record.samples.append(len(audio))
        record.total = time.perf_counter() - sent
        return record

    def close(self) -> None:
        self.engine.stop()
        torch.set_num_threads(self._caller_threads)


def compare_serving(served, in_process, utterances: list[Utterance], repeats: int) -> dict:
    """TTFA at concurrency 1, served vs in-process. The two alternate, each side first in every other
    pair, so both see the same machine load and neither always runs right after the other. The target
    counts as met only when every stream of both sides gave audio: medians of the streams that did would
    hide the failures."""
    served_records, local_records = [], []
    for i in range(repeats):
        utterance = utterances[i % len(utterances)]
        sides = [(served, served_records), (in_process, local_records)]
        for run, records in sides if i % 2 == 0 else sides[::-1]:
            records.append(run(utterance, time.perf_counter()))

    def audio(records: list[StreamRecord]) -> list[StreamRecord]:
        return [r for r in records if r.error is None and r.ttfa is not None]

    def failures(records: list[StreamRecord]) -> list[str]:
        return [r.error or "no audio" for r in records if r.error is not None or r.ttfa is None]

    served_ok, local_ok = audio(served_records), audio(local_records)
    served_ttfa, local_ttfa = [r.ttfa for r in served_ok], [r.ttfa for r in local_ok]
    served_total, local_total = [r.total for r in served_ok], [r.total for r in local_ok]
    ratio = _median(served_ttfa) / _median(local_ttfa) if served_ttfa and local_ttfa else None
    errors, local_errors = failures(served_records), failures(local_records)
    return {
        "repeats": repeats,
        "errors": errors,
        "in_process_errors": local_errors,
        "served_ttfa": served_ttfa,
        "in_process_ttfa": local_ttfa,
        "served_ttfa_median": _median(served_ttfa),
        "in_process_ttfa_median": _median(local_ttfa),
        "served_total_median": _median(served_total),
        "in_process_total_median": _median(local_total),
        "ttfa_ratio": ratio,
        "total_ratio": (_median(served_total) / _median(local_total)) if served_total and local_total else None,
        "target": SERVING_TARGET,
        "target_met": ratio is not None and ratio <= SERVING_TARGET and not errors and not local_errors,
    }


def random_windows(count: int, seed: int = 0) -> list[Window]:
    """``count`` windows as from ``count`` different streams (random codes, different positions)."""
    rng = random.Random(seed)
    return [Window(tuple(rng.randrange(CODEBOOK_SIZE) for _ in range(WINDOW_TOKENS)), rng.randrange(200))
            for _ in range(count)]


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def _snac_ratio(decoder: WindowDecoder, windows: list[Window], repeats: int) -> dict:
    batched, single = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        batched.append(_timed(lambda: decoder.decode(windows)))
        single.append(_timed(lambda: [decoder.decode([w]) for w in windows]))
    out = {
        "batched_cpu_s": _median([c for c, _ in batched]),
        "one_by_one_cpu_s": _median([c for c, _ in single]),
        "batched_wall_s": _median([w for _, w in batched]),
        "one_by_one_wall_s": _median([w for _, w in single]),
    }
    out["cpu_ratio"] = out["batched_cpu_s"] / out["one_by_one_cpu_s"]
    out["wall_ratio"] = out["batched_wall_s"] / out["one_by_one_wall_s"]
    return out


def _op_times(fn) -> tuple[dict[str, tuple[int, float]], str]:
    """Self CPU ms and calls per torch operator while running ``fn``, and the profiler's table."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    averages = prof.key_averages()
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        print(averages.table(sort_by="self_cpu_time_total", row_limit=15))
    return {e.key: (e.count, e.self_cpu_time_total / 1000) for e in averages}, buffer.getvalue()


# The matrix products of a decode (dense convolutions, time-major): their names in the profiler.
PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::addmm_")


class ProductFlops(TorchDispatchMode):
    """Counts the floating-point operations of the matrix products run inside it (2 m k n each).

    torch's own FlopCounterMode leaves out ``addmm_``, the in-place form the span
    decoder accumulates its convolution taps with.
    """

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if f"aten::{func.overloadpacket.__name__}" in PRODUCT_OPS:
            first, second = args[-2], args[-1]  # mm(a, b); addmm(bias, a, b); addmm_(self, a, b)
            self.flops += 2 * first.shape[0] * first.shape[1] * second.shape[1]
        return func(*args, **(kwargs or {}))


def product_flops(fn) -> int:
    """Floating-point operations of the matrix products ``fn`` runs."""
    with ProductFlops() as counter:
        fn()
    return counter.flops


def _products(batched: dict, single: dict, batched_flops: int, single_flops: int) -> dict:
    """The matrix products' share of a batched decode and the rate they ran at, batched and one by one.

    Batching shares a window's fixed costs (calls, dispatch), not its arithmetic: where one window's
    products already run near the cores' peak, batching can only save the rest, and the ratio of (b)
    is bounded by how much of a decode the products are. (Batched, the products do slightly more
    arithmetic: a batch is one flat matrix, so the taps' sums that straddle two windows are computed
    too, then cut.)
    """
    def product_ms(ops: dict) -> float:
        return sum(ms for op, (_, ms) in ops.items() if op in PRODUCT_OPS)

    batched_ms, single_ms = product_ms(batched), product_ms(single)
    return {"batched_gflop": batched_flops / 1e9, "one_by_one_gflop": single_flops / 1e9,
            "batched_ms": batched_ms, "one_by_one_ms": single_ms,
            "share_of_batched": batched_ms / (sum(ms for _, ms in batched.values()) or 1.0),
            "batched_gflops": batched_flops / batched_ms / 1e6 if batched_ms else None,
            "one_by_one_gflops": single_flops / single_ms / 1e6 if single_ms else None}


def _profile(decoder: WindowDecoder, windows: list[Window], rows: int = 8) -> tuple[str, list[dict], dict]:
    """Where the CPU time goes, by torch operator: one batched decode vs the same windows one by one;
    and the matrix products' FLOPs and rates (``_products``)."""
    batched, batched_table = _op_times(lambda: decoder.decode(windows))
    single, single_table = _op_times(lambda: [decoder.decode([w]) for w in windows])
    total = sum(ms for _, ms in batched.values()) or 1.0
    top = sorted(batched, key=lambda op: batched[op][1], reverse=True)[:rows]
    table = [{"op": op, "calls": batched[op][0], "self_cpu_ms": batched[op][1], "share": batched[op][1] / total,
              "one_by_one_calls": single.get(op, (0, 0.0))[0], "one_by_one_ms": single.get(op, (0, 0.0))[1]}
             for op in top]
    text = f"batched ({len(windows)} windows, one call)\n{batched_table}\none by one\n{single_table}"
    flops = (product_flops(lambda: decoder.decode(windows)),
             product_flops(lambda: [decoder.decode([w]) for w in windows]))
    return text, table, _products(batched, single, *flops)


def compare_snac_batching(snac_dir, device: str = "auto", windows: int = 8, repeats: int = 5) -> dict:
    """8 windows of 8 streams in one SNAC call vs 8 calls, for the serving decoder and the exact one."""
    device = pick_device(device)
    batch = random_windows(windows)

    def ready(exact: bool) -> WindowDecoder:
        decoder = load_window_decoder(snac_dir, device=device, exact=exact)
        warm_up(decoder)
        decoder.decode(batch)
        return decoder

    decoder = ready(exact=False)
    result = {"windows": windows, "device": device, "repeats": repeats, "target": SNAC_TARGET,
              "mode": decoder.mode, "threads": torch.get_num_threads()}
    result.update(_snac_ratio(decoder, batch, repeats))
    # The target is the CPU's (CPU time, this process); on a GPU the CPU time is the launches' and the
    # decoder's cost is its wall time.
    result["target_measure"] = "cpu_ratio" if device == "cpu" else "wall_ratio"
    result["target_met"] = result[result["target_measure"]] <= SNAC_TARGET
    if device == "cpu" and result["threads"] > 1:
        # The server's snac_decoder runs one thread beside the LLM's ('auto' cpu_threads), and
        # a thread pool's busy-waiting weighs more on small calls: report that setting too.
        torch.set_num_threads(1)
        try:
            result["one_thread"] = _snac_ratio(decoder, batch, repeats)
        finally:
            torch.set_num_threads(result["threads"])
    profile_text, result["profile_top"], result["products"] = _profile(decoder, batch)
    # The exact decoder (whole windows, dense convolutions row by row): what sample-identical audio costs.
    result["exact"] = _snac_ratio(ready(exact=True), batch, repeats)
    return result | {"profile_table": profile_text}


def compare_engine_batching(llm_dir, device: str = "auto", streams: int = 8, max_new_tokens: int = 200,
                            repeats: int = 3) -> dict:
    """Aggregate tokens/s: ``streams`` requests generated together (in-flight batching) vs one at a time,
    ``repeats`` pairs of runs (medians; each pair's own speedup kept too: one timing of each side varied
    2.9-4.4x on a 2-core VM)."""
    device = pick_device(device)
    tokenizer = load_tokenizer(llm_dir)
    model = load_llama(llm_dir, device=device)
    engine = InflightEngine(model, max_streams=streams, max_seq_len=max_new_tokens + 256)
    engine.capture_graphs()  # GPU: every shape now, so neither run pays for a capture
    prompts = [build_prompt(tokenizer, "Benchmarking the in-flight batching engine.", "tara")] * streams

    def requests():
        # NO_END_ID is never sampled: every stream runs to max_new_tokens, so both runs make the same tokens.
        return [GenerationRequest(prompt=p, max_new_tokens=max_new_tokens, emit=lambda ids, done: None, seed=i,
                                  end_id=NO_END_ID) for i, p in enumerate(prompts)]

    def run(batched: bool) -> tuple[int, float]:
        before = engine.stats.tokens_generated
        started = time.perf_counter()
        if batched:
            for request in requests():
                engine.submit(request)
            engine.run_until_idle()
        else:
            for request in requests():
                engine.submit(request)
                engine.run_until_idle()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return engine.stats.tokens_generated - before, time.perf_counter() - started

    run(True)  # warm-up
    batched, single = [], []
    for i in range(repeats):  # each side first in every other pair, as comparison (a): neither always follows
        for batched_run in ((True, False) if i % 2 == 0 else (False, True)):
            (batched if batched_run else single).append(run(batched_run))
    rate = {"batched": _median([t / s for t, s in batched]), "one_at_a_time": _median([t / s for t, s in single])}
    return {
        "streams": streams, "max_new_tokens": max_new_tokens, "device": device, "repeats": repeats,
        "batched_tokens": batched[0][0], "batched_seconds": _median([s for _, s in batched]),
        "one_at_a_time_tokens": single[0][0], "one_at_a_time_seconds": _median([s for _, s in single]),
        "batched_tokens_per_s": rate["batched"], "one_at_a_time_tokens_per_s": rate["one_at_a_time"],
        "speedup": rate["batched"] / rate["one_at_a_time"],  # of the medians
        "speedups": [(tb / sb) / (ts / ss) for (tb, sb), (ts, ss) in zip(batched, single, strict=True)],
    }

"""One command for the whole benchmark: comparisons, server, TTS sweep, perf_analyzer, report.

    python perf/run_all.py                  # small CPU defaults, a few minutes on 2 cores
    python perf/run_all.py --shape orpheus-3b --concurrency 1,8,32,64,128,216,256 \\
        --max-streams 256 --max-seq-len 1400 --max-tokens 0        # a GPU run (see perf/gpu/README.md)

Order: (c) engine batching and (b) SNAC batching in-process on a quiet machine;
then a server on free local ports; (a) served vs in-process TTFA, interleaved;
the closed-loop concurrency sweep and Poisson runs; perf_analyzer if installed;
the server stops and perf/results/<date>_<machine>/ gets result.json, report.md
and the plots.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import comparisons
import run_perf_analyzer
from common import (
    PERF,
    SHAPES,
    load_average,
    local_server,
    log,
    machine_info,
    machine_name,
    model_set,
    other_load_monitor,
    run_folder,
    server_listener_monitor,
    server_processes,
    source_state,
    wait_quiet,
)
from stacks import py_spy, stack_monitor

from orpheus_triton.arguments import (
    DefaultsHelpFormatter,
    counts,
    max_tokens_or_zero,
    non_negative,
    positive,
    positive_seconds,
    rates,
)
from orpheus_triton.constants import CANCEL_CHECK_SECONDS, DECODER_MODEL, LLM_MODEL
from orpheus_triton.engine import overlap_for
from orpheus_triton.loadgen import (
    SweepSettings,
    Utterance,
    grpc_stream,
    load_runner,
    passing_above_capacity,
    realtime_capacity,
    sweep,
    text_labels,
    workload,
)
from orpheus_triton.mps import MpsUnavailable, control_program
from orpheus_triton.server import log_tail
from orpheus_triton.triton_calls import response_thread_setting
from orpheus_triton.triton_llm import pick_device

BAR_TTFA = 0.2  # the GPU bar to beat: first audio under 200 ms (perf/gpu/README.md)


def _cpu_threads(value: str) -> str:
    """A --*-cpu-threads value, checked here rather than in the server's log."""
    from orpheus_triton.repository import parse_cpu_threads  # noqa: PLC0415

    try:
        parse_cpu_threads(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def server_overrides(args: argparse.Namespace) -> dict:
    """The RepositorySettings fields this run's flags set beyond local_server's own arguments (the newcomer
    horizon only where given: else the server's default)."""
    overrides = {"llm_cpu_threads": args.llm_cpu_threads, "decoder_cpu_threads": args.decoder_cpu_threads,
                 "llm_response_thread": args.llm_response_thread,
                 "decoder_response_thread": args.decoder_response_thread,
                 "llm_cancel_check_seconds": args.llm_cancel_check_seconds, "max_callers": args.max_callers}
    if args.decoder_newcomer_horizon is not None:
        overrides["decoder_newcomer_horizon"] = args.decoder_newcomer_horizon
    return overrides


def release_memory() -> None:
    """Give back what the in-process models held, so the server process can have the GPU memory."""
    import gc  # noqa: PLC0415

    import torch  # noqa: PLC0415

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tritonserver_source() -> str:
    import shutil  # noqa: PLC0415

    found = shutil.which("tritonserver")
    return found if found else "the nvidia-pytriton wheel"


class Guard:
    """Runs a measurement, and runs it again (after waiting for quiet) while other work shared the CPU.

    On a shared machine another process's burst can double a level's TTFA; each
    result keeps ``cores_other`` (CPU that processes outside this benchmark used
    meanwhile) and ``attempts``, so the report shows what was measured under what.
    """

    def __init__(self, retries: int, threshold: float, wait_seconds: float):
        self.retries, self.threshold, self.wait_seconds = retries, threshold, wait_seconds

    def run(self, name: str, measure) -> dict:
        for attempt in range(1, self.retries + 2):
            finish = other_load_monitor()
            result = measure() | finish()
            result["attempts"] = attempt
            other = result.get("cores_other") or 0.0
            if other <= self.threshold or attempt > self.retries:
                return result
            log(f"    {name}: other processes used {other:.1f} cores meanwhile; measuring again when quiet")
            wait_quiet(self.wait_seconds)
        raise AssertionError("unreachable")


def compare(result: dict, name: str, measure) -> dict | None:
    """One comparison into ``result``; a failing one becomes a note, so the rest of the run still counts.

    The comparisons build their own engines and decoders beside the server's; on a
    new machine one of them failing (memory, a missing kernel) must not cost the
    load sweep, which is what a lent GPU's minutes are for.
    """
    try:
        measured = measure()
    except Exception as error:  # noqa: BLE001 (any failure: recorded with its type, the run goes on)
        note = f"comparison {name} failed: {type(error).__name__}: {error}"
        log(note)
        result["notes"].append(note)
        release_memory()
        return None
    result["comparisons"][name] = measured
    return measured


def perf_analyzer_sweep(result: dict, binary: str, server, folder: Path, args: argparse.Namespace) -> dict:
    """run_perf_analyzer's sweep; one that fails (an export it cannot read, a crashed perf_analyzer) is a
    note and a skipped section, so the load sweep measured before it is still written."""
    try:
        return run_perf_analyzer.run(binary, server, folder, args.pa_concurrency, args.pa_decoder_concurrency,
                                     PERF / "data" / "orpheus_short.json", args.pa_max_tokens,
                                     args.pa_request_count, 16, 300.0, ttfa_limit=args.ttfa_limit)
    except Exception as error:  # noqa: BLE001 (recorded with its type; the result is still written)
        note = f"perf_analyzer sweep failed: {type(error).__name__}: {error}"
        log(note)
        result["notes"].append(note)
        return {"skipped": note}


def compare_serving(url: str, args: argparse.Namespace, guard: Guard, stream, warm: Utterance,
                    utterances: list[Utterance]) -> dict:
    """Comparison (a): the served stream against an in-process pipeline on the same models, with the served
    `llm` and `snac_decoder`'s own parameters (engine settings, CPU threads), interleaved."""
    llm_params, _ = comparisons.served_parameters(url, LLM_MODEL)
    decoder_params, max_windows = comparisons.served_parameters(url, DECODER_MODEL)
    pipeline = comparisons.InProcessPipeline(llm_params, decoder_params, max_windows)
    try:
        pipeline.synthesize(warm)
        measured = guard.run("serving", lambda: comparisons.compare_serving(
            stream, pipeline.synthesize, utterances, args.serving_repeats))
        return measured | {"in_process_threads": {"llm": pipeline.llm_threads, "decoder": pipeline.decoder_threads}}
    finally:
        pipeline.close()
        release_memory()


def guarded_sweep(url: str, settings: SweepSettings, guard: Guard, metrics_url: str | None = None,
                  server_pid: int | None = None, stacks: dict | None = None) -> dict:
    """sweep(), one level at a time, each level under ``guard``, with the server's own figures for each
    level where ``metrics_url`` is given, and its processes' CPU with ``server_pid``
    (common.server_listener_monitor). ``stacks`` (with ``server_pid``): py-spy samples of the model stubs
    each level (stacks.stack_monitor's models, seconds, delay and folder)."""
    monitor = server_listener_monitor(metrics_url, server_pid)
    if stacks and server_pid is not None:
        monitor = both_monitors(monitor, stack_monitor(
            lambda: {label: pid for pid, label in server_processes(server_pid).items() if label in stacks["models"]},
            stacks["seconds"], stacks["delay"], stacks["folder"]))
    out = {"settings": asdict(settings), "closed_loop": {}, "poisson": {}, "records": {}}
    runs = [("closed_loop", c, replace(settings, concurrency=[c], poisson_rates=[])) for c in settings.concurrency]
    runs += [("poisson", r, replace(settings, concurrency=[], poisson_rates=[r])) for r in settings.poisson_rates]
    with load_runner(url, settings.processes, settings.stream_timeout) as runner:  # one for every level
        for kind, key, one in runs:
            parts = {}

            def measure(one=one, kind=kind, key=key, parts=parts):
                parts["result"] = sweep(url, one, log=lambda m: log("    " + m), monitor=monitor, runner=runner)
                return parts["result"][kind][key]

            out[kind][key] = guard.run(f"{kind} {key}", measure)
            out["records"].update(parts["result"]["records"])
    out["realtime_capacity"] = realtime_capacity(out["closed_loop"], settings.ttfa_limit)
    out["passing_above_capacity"] = passing_above_capacity(out["closed_loop"], settings.ttfa_limit)
    return out


def both_monitors(first, second):
    """One level monitor (loadgen.sweep's) that runs two: their figures together."""
    def start():
        finishes = first(), second()
        return lambda span=None: {key: value for finish in finishes for key, value in finish(span).items()}

    return start


def _round_records(records: dict) -> dict:
    for streams in records.values():
        for r in streams:
            r["arrivals"] = [round(t, 5) for t in r["arrivals"]]
            r["started"], r["total"] = round(r["started"], 5), round(r["total"], 5)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo", help="random-weight LLM shape")
    parser.add_argument("--models", help="a real model set directory instead (llm/ + snac/)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--max-streams", type=positive, default=16, help="engine slots (>= the largest concurrency)")
    parser.add_argument("--max-seq-len", type=positive, default=2048)
    parser.add_argument("--graph-sampling", action=argparse.BooleanOptionalAction, default=True,
                        help="the llm engine's graph sampling (GPU; InflightEngine graph_sampling; on by default)")
    parser.add_argument("--prefill-tokens", type=non_negative, default=0,
                        help="the server engine's prefill budget per step (0: its default for the device)")
    parser.add_argument("--no-lead-in", action="store_true",
                        help="streams start with frame 1's audio after 28 tokens, as upstream (decoder_lead_in off)")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                        help="the llm engine reads tokens back a step late (InflightEngine overlap; default: "
                             "the engine's, on a GPU)")
    for stage in ("llm", "decoder"):
        parser.add_argument(f"--{stage}-cpu-threads", default="auto", metavar="N", type=_cpu_threads,
                            help=f"torch threads of the server's {stage} process (default auto: half the cores on CPU)")
    parser.add_argument("--decoder-newcomer-horizon", type=float, metavar="S",
                        help="seconds of audio in hand above which a stream sits a decoder round out while a "
                             "newcomer waits for first audio (0: off; default: the server's, "
                             "NEWCOMER_ROUND_HORIZON)")
    parser.add_argument("--llm-response-thread", type=response_thread_setting, default="auto",
                        help="the llm adapter's response thread: auto (one on a GPU, none on a CPU), true, false, "
                             "or a number of threads, each stream's responses on one of them")
    parser.add_argument("--decoder-response-thread", type=response_thread_setting, default="auto",
                        help="the snac_decoder adapter's response thread(s), likewise (auto: two on a GPU)")
    parser.add_argument("--llm-cancel-check-seconds", type=float, metavar="S", default=CANCEL_CHECK_SECONDS,
                        help="with the response thread, how often Triton is asked about every stream's "
                             "cancellation (default CANCEL_CHECK_SECONDS, 0: at every engine step, within the "
                             "passes' duty)")
    parser.add_argument("--max-callers", type=non_negative, default=0, metavar="N",
                        help="the server takes at most N callers in flight, end to end (serve --max-callers; 0: no "
                             "bound, as serve's default); callers are counted either way, as serve counts them")
    parser.add_argument("--paced-llm", type=float, default=0.0, metavar="TOKENS_PER_S",
                        help="serve with the llm stage's engine replaced by a stand-in without a model that gives "
                             "every stream this many tokens a second (perf/paced_llm; with --skip-comparisons): "
                             "the pipeline's own ceiling, the engine's arithmetic left out (0: the real engine)")
    parser.add_argument("--mps", action="store_true",
                        help="the sweep's server under an NVIDIA MPS control daemon of its own (GPU; serve --mps): "
                             "the llm's and the SNAC decoder's kernels sharing the GPU at once")
    parser.add_argument("--silent-snac", action="store_true",
                        help="serve with the snac_decoder's SNAC replaced by a stand-in without a model that answers "
                             "every window with a frame of silence (perf/silent_snac; with --skip-comparisons): "
                             "with --paced-llm, what the pipeline's plumbing alone carries")
    parser.add_argument("--stack-seconds", type=float, default=0.0, metavar="S",
                        help="py-spy records the llm and snac_decoder stubs for S seconds in each level, from "
                             "--stack-delay on, and the report says where their threads were (0: off)")
    parser.add_argument("--stack-delay", type=float, default=None, metavar="S",
                        help="seconds into a level before py-spy starts (default: the ramp and 2 s more)")
    parser.add_argument("--concurrency", type=counts, default="1,2,3,4", help="closed-loop levels")
    parser.add_argument("--texts", type=text_labels, default="short,medium",
                        help="benchmark texts: short, medium, long")
    parser.add_argument("--max-tokens", type=max_tokens_or_zero, default=150,
                        help="cap every request (0: per-text defaults)")
    parser.add_argument("--ttfa-limit", type=positive_seconds, default=0.5,
                        help="p99 TTFA (s) a real-time level stays under")
    parser.add_argument("--streams-per-worker", type=positive, default=2,
                        help="closed loop: streams a level counts, per worker (filler streams before and "
                             "after them keep the load at the level's concurrency)")
    parser.add_argument("--loadgen-processes", type=positive, default=1,
                        help="load generator processes, a level's streams dealt out among them (hundreds of streams "
                             "on a GPU: one Python process's GIL would bound what is measured)")
    parser.add_argument("--ramp-seconds", type=float, default=0.0,
                        help="closed loop: start the workers' first streams over this long (0: all at once)")
    parser.add_argument("--min-streams", type=positive, default=4)
    parser.add_argument("--level-seconds", type=positive_seconds, default=120.0,
                        help="time bound per load level: its counted streams start within it, and it ends when they do")
    parser.add_argument("--poisson-rates", type=rates, default="0.25",
                        help="Poisson arrival rates (streams/s); empty: none")
    parser.add_argument("--poisson-streams", type=positive, default=6)
    parser.add_argument("--serving-repeats", type=positive, default=5, help="streams each for comparison (a)")
    parser.add_argument("--snac-repeats", type=positive, default=5)
    parser.add_argument("--engine-tokens", type=positive, default=200, help="tokens per stream for comparison (c)")
    parser.add_argument("--pa-concurrency", type=counts, default="1,2", help="perf_analyzer levels for `orpheus`")
    parser.add_argument("--pa-decoder-concurrency", type=counts, default="1,4,8")
    parser.add_argument("--pa-max-tokens", type=max_tokens_or_zero, default=100)
    parser.add_argument("--pa-request-count", type=positive, default=4)
    parser.add_argument("--no-perf-analyzer", action="store_true")
    parser.add_argument("--install-perf-analyzer", action="store_true", help="install it first if missing")
    parser.add_argument("--skip-comparisons", action="store_true")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="first wait up to this many seconds for other work to leave the CPU idle")
    parser.add_argument("--retry-busy", type=int, default=2,
                        help="measure a step again (up to N times) when other processes used the CPU meanwhile")
    parser.add_argument("--busy-threshold", type=float, default=0.3, help="cores of other work that count as busy")
    parser.add_argument("--machine", help="name for the run folder (default: GPU model or cpu-<N>core-<CPU family>)")
    parser.add_argument("--out", help="run folder (default perf/results/<date>_<machine>)")
    args = parser.parse_args(argv)
    if not 0 <= args.ramp_seconds < args.level_seconds:
        parser.error(f"--ramp-seconds {args.ramp_seconds} must be >= 0 and below --level-seconds {args.level_seconds}")
    if not args.llm_cancel_check_seconds >= 0:
        parser.error(f"--llm-cancel-check-seconds {args.llm_cancel_check_seconds}: want >= 0")
    if args.stack_seconds < 0 or (args.stack_delay is not None and args.stack_delay < 0):
        parser.error("--stack-seconds and --stack-delay: want >= 0")
    if args.stack_seconds and py_spy() is None:
        parser.error("--stack-seconds needs py-spy (pip install py-spy)")
    if args.paced_llm < 0 or (args.paced_llm and not args.skip_comparisons):
        parser.error("--paced-llm: want tokens a second > 0 (0: off), with --skip-comparisons (the comparisons "
                     "run the real models)")
    if args.silent_snac and not args.skip_comparisons:
        parser.error("--silent-snac: only with --skip-comparisons (the comparisons run the real models)")
    if args.mps:  # said now, not after the comparisons ran
        try:
            control_program()
        except MpsUnavailable as error:
            parser.error(f"--mps: {error}")

    if max(args.concurrency) > args.max_streams:  # allowed (queueing is worth measuring), but said
        log(f"note: --concurrency up to {max(args.concurrency)} with --max-streams {args.max_streams}: the streams "
            f"beyond {args.max_streams} wait for an engine slot, and their first audio counts that wait")
    busy_before = wait_quiet(args.wait_quiet) if args.wait_quiet else None
    started = time.perf_counter()
    folder = Path(args.out) if args.out else run_folder(args.machine)
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    models, description = model_set(args.shape, args.models)
    if args.paced_llm:
        description += (f"; the llm stage's engine a paced stand-in without a model ({args.paced_llm:g} tokens a "
                        "second a stream, perf/paced_llm)")
    if args.silent_snac:
        description += "; the SNAC decoder a stand-in without a model (silence, perf/silent_snac)"
    result = {
        "run": folder.name,
        "command": "python perf/run_all.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine_name": args.machine or machine_name(),
        "machine": machine_info(),
        "model_set": description,
        "tritonserver": tritonserver_source(),
        "source": source_state(),
        "server_settings": {"max_streams": args.max_streams, "max_seq_len": args.max_seq_len, "device": args.device,
                            "graph_sampling": args.graph_sampling,
                            "overlap": overlap_for(pick_device(args.device), args.overlap),  # as the engine takes it
                            "lead_in": not args.no_lead_in, "mps": args.mps,
                            "decoder_newcomer_horizon": args.decoder_newcomer_horizon, **server_overrides(args),
                            "prefill_tokens": args.prefill_tokens or "engine default"},
        "load_average_start": load_average(),
        "busy_cores_before": busy_before,
        "comparisons": {},
        "notes": [],
    }
    log(f"run folder {folder}; {description}")
    guard = Guard(args.retry_busy, args.busy_threshold, wait_seconds=max(args.wait_quiet, 120.0))

    if not args.skip_comparisons:
        log("(c) engine: 8 streams in-flight vs one at a time ...")
        engine = compare(result, "engine", lambda: guard.run("engine", lambda: comparisons.compare_engine_batching(
            models.llm, args.device, streams=8, max_new_tokens=args.engine_tokens)))
        if engine:
            log(f"    speedup {engine['speedup']:.2f}x")
        log("(b) SNAC: 8 windows batched vs one by one ...")
        snac = compare(result, "snac", lambda: guard.run("snac", lambda: comparisons.compare_snac_batching(
            models.snac, args.device, repeats=args.snac_repeats)))
        if snac:
            (folder / "raw" / "snac_profile.txt").write_text(snac.pop("profile_table"))
            log(f"    CPU time ratio {snac['cpu_ratio']:.2f} (target <= {snac['target']})")
        release_memory()

    labels = args.texts
    caps = {label: args.max_tokens for label in labels} if args.max_tokens else {}
    settings = SweepSettings(
        concurrency=args.concurrency, streams_per_worker=args.streams_per_worker,
        ramp_seconds=args.ramp_seconds,
        min_streams=args.min_streams, max_seconds_per_level=args.level_seconds,
        poisson_rates=args.poisson_rates, poisson_streams=args.poisson_streams,
        poisson_seconds=args.level_seconds, labels=labels, max_tokens=caps, ttfa_limit=args.ttfa_limit,
        processes=args.loadgen_processes,
    )
    with local_server(models, args.max_streams, folder / "raw" / "server.log", device=args.device,
                      max_seq_len=args.max_seq_len, graph_sampling=args.graph_sampling,
                      overlap=args.overlap, prefill_tokens=args.prefill_tokens,
                      lead_in=not args.no_lead_in, settings_overrides=server_overrides(args),
                      paced_llm=args.paced_llm, silent_snac=args.silent_snac, mps=args.mps) as server:
        stream = grpc_stream(server.url)
        warm = workload(labels, max_tokens=caps, count=1)[0]
        first = stream(warm, time.perf_counter())  # first request pays for lazy initialisation
        if first.error:  # every level would fail the same way: say why now, not after the whole sweep
            tail = "\n".join(log_tail(folder / "raw" / "server.log", 25))
            raise SystemExit(f"the first stream failed, so the benchmark stops: {first.error}\n"
                             f"last lines of the server log:\n{tail}")
        if not args.skip_comparisons:
            log("(a) TTFA at concurrency 1: served vs in-process, interleaved ...")
            utterances = [Utterance(u.label, u.text, u.voice, u.max_tokens, u.seed)
                          for u in workload(labels, max_tokens=caps, count=args.serving_repeats)]
            serving = compare(result, "serving", lambda: compare_serving(
                server.url, args, guard, stream, warm, utterances))
            if serving and serving["ttfa_ratio"] is not None:
                log(f"    ratio {serving['ttfa_ratio']:.2f} (target <= 1.25)")
            elif serving:  # kept with its errors: the report shows them
                log(f"    no ratio: of {serving['repeats']} streams each, {len(serving['served_ttfa'])} served and "
                    f"{len(serving['in_process_ttfa'])} in process gave audio ({(serving['errors'] or ['-'])[0]})")
        log(f"TTS sweep: closed loop {settings.concurrency}, Poisson {settings.poisson_rates} ...")
        stacks = {"models": ("llm", "snac_decoder"), "seconds": args.stack_seconds, "folder": folder / "raw",
                  "delay": args.ramp_seconds + 2.0 if args.stack_delay is None else args.stack_delay}
        result["tts"] = guarded_sweep(server.url, settings, guard, server.metrics_url,
                                      server.process.pid if server.process else None,
                                      stacks if args.stack_seconds else None)
        result["tts"]["records"] = _round_records(result["tts"]["records"])
        result["tts"]["realtime_capacity_by_limit"] = {
            str(limit): realtime_capacity(result["tts"]["closed_loop"], limit)
            for limit in sorted({BAR_TTFA, args.ttfa_limit})}
        if args.no_perf_analyzer:
            result["perf_analyzer"] = {"skipped": "--no-perf-analyzer"}
        else:
            binary = run_perf_analyzer.find_perf_analyzer(install=args.install_perf_analyzer)
            if binary:
                log(f"perf_analyzer sweep with {binary} ...")
                result["perf_analyzer"] = perf_analyzer_sweep(result, binary, server, folder, args)
            else:
                result["perf_analyzer"] = {"skipped": "perf_analyzer not found (perf/install_perf_analyzer.sh)"}
    result["load_average_end"] = load_average()
    result["seconds"] = time.perf_counter() - started
    (folder / "result.json").write_text(json.dumps(result, indent=1, default=str))
    from report import write_report  # noqa: PLC0415

    try:
        report = write_report(json.loads((folder / "result.json").read_text()), folder)
    except ImportError as error:  # matplotlib: the `perf` extra
        log(f"wrote {folder / 'result.json'}; no report ({error}): pip install 'orpheus-triton[perf]', then "
            f"python perf/report.py {folder / 'result.json'}")
    else:
        log(f"wrote {folder / 'result.json'} and {report}")
    log(f"real-time capacity: {result['tts']['realtime_capacity']} streams")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

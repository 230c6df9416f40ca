"""`orpheus-triton`: serve the model repository, synthesize speech, fetch weights."""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .arguments import check_grpc_url, max_tokens, non_negative, non_negative_seconds, positive
from .constants import (
    CANCEL_CHECK_SECONDS,
    DEFAULT_GRPC_PORT,
    DEFAULT_GRPC_URL,
    DEFAULT_HTTP_PORT,
    DEFAULT_MAX_TOKENS,
    DEFAULT_METRICS_PORT,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    DEFAULT_VOICE,
    ENSEMBLE_MODEL,
    FINISH_MAX_TOKENS,
    MAX_RESPONSE_THREADS,
    MAX_TEXT_CHARS,
    SAMPLE_RATE,
    VOICES,
)
from .interrupts import terminate_as_interrupt
from .prompt import Voices, check_text

if TYPE_CHECKING:  # demo_models imports torch: a second of start-up that `say` does without
    from collections.abc import Callable

    from .demo_models import ModelSet

# Names of formats `-o` does not write, refused instead of getting a WAV under their name.
COMPRESSED_AUDIO_SUFFIXES = (".mp3", ".ogg", ".oga", ".opus", ".flac", ".m4a", ".aac", ".webm", ".wma")
DEMO_MAX_TOKENS = 420  # 60 frames, about 5 s of audio
DEFAULT_TEXT = "Hello! This is Orpheus, speaking through Triton Inference Server. <laugh> Pretty neat, right?"


def _log(message: str) -> None:
    print(f"[orpheus-triton] {message}", file=sys.stderr, flush=True)


def _model_set(models: str | None) -> ModelSet:
    from .demo_models import ModelSet, demo_model_set  # noqa: PLC0415

    if models is None:
        _log("no --models given: serving the demo model set (random weights: the audio is noise)")
        return demo_model_set(log=_log)
    model_set = ModelSet(Path(models).expanduser().resolve())
    model_set.check()
    return model_set


def _check_device(name: str) -> None:
    """Refuse a device this machine cannot serve on before any model loads (the models would fail
    one by one, the reason buried in the server log)."""
    if name in ("auto", "cpu"):
        return
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    index = int(name[5:] or 0) if name.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) visible")


def _check_ports_free(ports) -> None:
    """Fail now, not after loading every model, when a port is taken (tritonserver binds 0.0.0.0) or
    given to two of the server's endpoints."""
    endpoints = (("gRPC", ports.grpc, "--grpc-port"), ("HTTP", ports.http, "--http-port"),
                 ("metrics", ports.metrics, "--metrics-port"))
    for index, (_, port, flag) in enumerate(endpoints):
        for _, other, other_flag in endpoints[index + 1:]:
            if port == other:
                raise RuntimeError(f"{flag} and {other_flag} are both {port}: each endpoint needs a port of its own")
    for label, port, flag in endpoints:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closing server's TIME_WAIT is fine
            try:
                probe.bind(("0.0.0.0", port))
            except OSError as error:
                raise RuntimeError(f"{label} port {port} is not free ({error.strerror}): another server is "
                                   f"running there; stop it or pick another with {flag}") from None


def _check_cache() -> None:
    """The cache folder (rendered repositories, the demo model set, tritonserver's backends) is made and
    checked writable before anything is put in it, so that a bad ORPHEUS_TRITON_CACHE is named as such."""
    from .demo_models import cache_folder  # noqa: PLC0415

    cache_folder()


def _render(args, model_set: ModelSet) -> Path:
    from .demo_models import cache_folder  # noqa: PLC0415
    from .repository import RepositorySettings, render, run_folder  # noqa: PLC0415

    settings = RepositorySettings(
        llm_dir=str(model_set.llm), snac_dir=str(model_set.snac), device=args.device,
        max_streams=args.max_streams, max_seq_len=args.max_seq_len, decoder_exact=args.decoder_exact,
        decoder_lead_in=not args.no_lead_in, decoder_lead_out=not args.no_lead_out,
        max_queue=args.max_queue, max_queue_seconds=args.max_queue_seconds, max_callers=args.max_callers,
        llm_graph_sampling=args.graph_sampling, prefill_chunk=args.prefill_tokens or 0,
        llm_overlap="auto" if args.overlap is None else args.overlap,
        llm_cancel_check_seconds=args.cancel_check_seconds,
        llm_response_thread=args.response_threads, decoder_response_thread=args.response_threads,
        llm_cpu_threads=args.llm_cpu_threads, decoder_cpu_threads=args.decoder_cpu_threads,
        voices=args.voices, default_voice=args.default_voice,
    )
    return render(settings, run_folder(cache_folder("repositories")))


def _check_max_seq_len(args, model_set: ModelSet) -> None:
    """Refuse a ``--max-seq-len`` too short for any request before the models load (the server would
    start and refuse every request)."""
    from .preprocess import check_max_seq_len  # noqa: PLC0415
    from .prompt import load_tokenizer  # noqa: PLC0415

    try:
        check_max_seq_len(load_tokenizer(model_set.llm), Voices.parse(args.voices, args.default_voice),
                          args.max_seq_len)
    except ValueError as error:
        raise ValueError(f"--max-seq-len {args.max_seq_len}: {error}") from None


def _check_mps(args) -> None:
    """``--mps`` shares a GPU: refused, before any model loads, for a server on the CPU."""
    if not args.mps:
        return
    if args.device == "cpu":
        raise ValueError("--mps shares a GPU between the server's processes: not with --device cpu")
    if args.device == "auto":
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise ValueError(f"--mps shares a GPU between the server's processes, and this torch "
                             f"({torch.__version__}) sees no CUDA GPU")
    from .mps import MpsUnavailable, control_program  # noqa: PLC0415

    try:
        control_program()
    except MpsUnavailable as error:
        raise ValueError(f"--mps: {error}") from None


def cmd_serve(args) -> int:
    from .mps import mps_if  # noqa: PLC0415
    from .server import Ports, http_ready, serve_until_stopped  # noqa: PLC0415

    ports = Ports(args.grpc_port, args.http_port, args.metrics_port)
    _check_ports_free(ports)
    _check_device(args.device)
    _check_mps(args)
    Voices.parse(args.voices, args.default_voice)  # a bad list is refused before any model loads
    _check_cache()
    # Until run_in_foreground takes the signals over (and after it), SIGTERM and SIGHUP end `serve` as
    # Ctrl-C does: the rendered repository and an MPS daemon go with it.
    with terminate_as_interrupt():
        repository = None
        try:
            model_set = _model_set(args.models)
            _check_max_seq_len(args, model_set)
            repository = _render(args, model_set)
            _log(f"model repository: {repository}")
            _log(f"gRPC on :{ports.grpc}, HTTP on :{ports.http}, metrics on :{ports.metrics}; Ctrl-C stops")
            with mps_if(args.mps, _log) as environment:
                return serve_until_stopped(repository, ports, args.exit_timeout, _log,
                                           ready=_announcing_ready(ports, http_ready), environment=environment)
        except KeyboardInterrupt:
            _log("interrupted")
            return 130
        finally:
            if repository is not None:
                from .repository import release_run_folder  # noqa: PLC0415

                release_run_folder(repository)


def _announcing_ready(ports, http_ready) -> Callable[[], bool]:
    """``run_in_foreground``'s readiness check, which says once that the server is ready and how to use it:
    after tritonserver's own start-up tables, the line a user waits for."""
    said = False

    def ready() -> bool:
        nonlocal said
        if not http_ready(ports.http):
            return False
        if not said:
            said = True
            _log(f"ready: every model loaded; gRPC on :{ports.grpc} (try `orpheus-triton say \"Hello\" "
                 f"--url localhost:{ports.grpc}`), HTTP on :{ports.http}, metrics on "
                 f"http://localhost:{ports.metrics}/metrics")
        return True

    return ready


def _synthesize(url: str, text: str | None, output: str, sentences: bool = False, cut_note: str | None = None,
                **options) -> None:
    """Stream ``text`` into ``output``: a WAV file, or with "-" raw PCM on stdout (the summary then goes
    to stderr, out of the audio's way). One request, or with ``sentences`` one per sentence; ``text``
    None: read it from stdin as it arrives, sentence by sentence. Audio the server cut at max_tokens is
    said in a note after the summary (``cut_note``: that note's text, where the caller knows better)."""
    from .client import END_EARLY_SECONDS, OrpheusClient, require_ready_server  # noqa: PLC0415
    from .wav import RawPcmWriter, StreamingWavWriter  # noqa: PLC0415

    to_stdout = output == "-"
    if to_stdout and sys.stdout.isatty():
        raise SystemExit("error: -o - writes raw PCM, which a terminal cannot show: pipe it into a player "
                         f"(| aplay -f S16_LE -r {SAMPLE_RATE} -c 1) or give -o FILE.wav")
    if not to_stdout:
        _check_writable(Path(output))
    require_ready_server(url, ENSEMBLE_MODEL)
    had_text = True
    with RawPcmWriter(sys.stdout.buffer) if to_stdout else StreamingWavWriter(output) as sink:
        if sentences or text is None:
            result, had_text = asyncio.run(_speak_sentences(url, _stdin_pieces() if text is None else text,
                                                            sink.write, **options))
        else:
            client = OrpheusClient(url, end_wait=END_EARLY_SECONDS)  # the process ends next: the end, whole
            result = client.synthesize(text, on_chunk=sink.write, **options)
            client.close()
    if not result.chunks and (sentences or text is None) and not had_text:
        raise SystemExit("error: no audio: the text had no sentence to say")
    if not result.chunks:
        raise SystemExit("error: the server finished the stream without audio (try a longer --max-tokens)")
    target = "raw PCM to stdout" if to_stdout else output
    summary = sys.stderr if to_stdout else sys.stdout
    print(
        f"wrote {target} ({result.audio_seconds:.2f} s of {SAMPLE_RATE} Hz audio in {len(result.chunks)} chunks)\n"
        f"time to first audio: {result.time_to_first_audio * 1000:.0f} ms\n"
        f"real-time factor:    {result.real_time_factor:.2f} (wall time / audio time; < 1 is faster than real time)",
        file=summary,
    )
    if result.finish_reason == FINISH_MAX_TOKENS:
        print(cut_note or _cut_note(options, offer_sentences=not sentences and text is not None), file=summary)


def _check_writable(path: Path) -> None:
    """Refuse an output the WAV cannot be written to before the server does any work for it (the file
    itself is created with the first chunk)."""
    if path.is_dir():
        raise SystemExit(f"error: -o {path} is a folder; give a file name, e.g. -o {path / 'out.wav'}")
    if path.suffix.lower() in COMPRESSED_AUDIO_SUFFIXES:
        raise SystemExit(f"error: -o {path}: the output is a WAV file (16-bit PCM), not {path.suffix}; name it "
                         f"{path.with_suffix('.wav')} and convert it afterwards (e.g. ffmpeg -i "
                         f"{path.with_suffix('.wav')} {path})")
    if not path.parent.is_dir():
        raise SystemExit(f"error: -o {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SystemExit(f"error: -o {path}: not writable here")


async def _speak_sentences(url: str, text, on_chunk, **options):
    """``AsyncOrpheusClient.stream_text`` into ``on_chunk``, timed as one ``SynthesisResult``, and whether
    the text had a sentence to say (without one no request goes out; with one, no audio is the server's)."""
    from .client import END_EARLY_SECONDS, AsyncOrpheusClient, Chunk, SynthesisResult  # noqa: PLC0415
    from .text_stream import has_words  # noqa: PLC0415

    result = SynthesisResult(request_id="one per sentence")
    had_text = isinstance(text, str) and has_words(text)  # some sentence has words iff the text has

    started = time.perf_counter()

    async def noting_text(pieces):
        nonlocal had_text, started
        async for piece in pieces:
            if not had_text and has_words(piece):
                # Timed from the first words: a wait for another program's text is not the server's.
                had_text, started = True, time.perf_counter()
            yield piece

    if not isinstance(text, str):
        text = noting_text(text)
    def noting_cuts(reason: str) -> None:  # one sentence cut at max_tokens is said as the reply's
        if reason == FINISH_MAX_TOKENS or result.finish_reason is None:
            result.finish_reason = reason

    async with AsyncOrpheusClient(url, end_wait=END_EARLY_SECONDS) as client:
        async for audio in client.stream_text(text, on_finish=noting_cuts, **options):
            result.chunks.append(Chunk(audio, time.perf_counter() - started))
            on_chunk(audio)
    result.total_seconds = time.perf_counter() - started
    return result, had_text


async def _stdin_pieces():
    """Standard input's text as it arrives (a pipe from another program), not only once it ends.

    Read on a daemon thread: a read blocked on a pipe that stays open must not keep the
    command from ending (on an error, a player that quit, Ctrl-C), as an executor thread would.
    """
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    fd = sys.stdin.fileno()

    def read() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        end: OSError | None = None
        try:
            while data := os.read(fd, 4096):
                loop.call_soon_threadsafe(pieces.put_nowait, decoder.decode(data))
            loop.call_soon_threadsafe(pieces.put_nowait, decoder.decode(b"", final=True))
        except OSError as error:  # stdin unreadable: said, not taken for the end of the text
            end = error
        except RuntimeError:  # the event loop is gone: nobody reads any more
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(pieces.put_nowait, end)  # None: the end of the text

    threading.Thread(target=read, name="stdin", daemon=True).start()
    while (piece := await pieces.get()) is not None:
        if isinstance(piece, OSError):
            raise RuntimeError(f"reading the text from stdin failed: {piece}")
        yield piece


def _cut_note(options: dict, offer_sentences: bool) -> str:
    """The note on audio the server cut at its max_tokens: where the cut came from, and what helps
    (``offer_sentences``: the command takes --sentences, and did not speak sentence by sentence)."""
    if asked := options.get("max_tokens"):
        cause, remedy = f"its --max-tokens ({asked} tokens)", "raise --max-tokens"
    else:  # the server's default, or what its --max-seq-len leaves after the prompt (more is refused)
        cause = (f"its max_tokens ({DEFAULT_MAX_TOKENS} tokens by default, fewer where the server's --max-seq-len "
                 "leaves fewer after the prompt)")
        remedy = "raise --max-tokens (up to what the server's --max-seq-len leaves)"
    return (f"note: the audio was cut at {cause} before the speech ended: the text's last words may be missing; "
            + remedy + (" or speak it sentence by sentence (--sentences)" if offer_sentences else ""))


def _options(args) -> dict:
    return {"voice": args.voice, "seed": args.seed, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "repetition_penalty": args.repetition_penalty}


# `say`'s exit status for a stream the server turned away for now (busy, or draining to stop): BSD's
# EX_TEMPFAIL, so that a script can tell "retry" from a request to fix.
RETRY_LATER_STATUS = 75


def cmd_say(args) -> int:
    from .client import ServerUnavailable, SynthesisError  # noqa: PLC0415

    try:
        text = None if args.text == "-" else args.text
        with terminate_as_interrupt():
            _synthesize(args.url, text, args.output, sentences=args.sentences, **_options(args))
    except BrokenPipeError:  # -o - into a player that quit: the client has cancelled the stream
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes it
        print("stopped: the reader of stdout went away", file=sys.stderr)
        return 1
    except ServerUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return RETRY_LATER_STATUS
    except SynthesisError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ConnectionError as error:
        print(f"error: could not synthesize: {error}", file=sys.stderr)
        return 1
    except TimeoutError as error:  # an OSError too, but the stream's, not the output's
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # writing the output failed mid-stream (a full disk): the stream was stopped
        print(f"error: writing {args.output} failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the client has cancelled the stream on its way out
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def cmd_demo(args) -> int:
    """Serve the repository on free local ports, synthesize one WAV through the ensemble, stop."""
    from .mps import mps_if  # noqa: PLC0415
    from .server import Ports, counted_callers, start_server, stop_server, wait_until_ready  # noqa: PLC0415

    if args.models is None and args.max_tokens is None:
        # Random weights never choose end-of-speech: cap the demo at ~5 s of audio.
        args.max_tokens = DEMO_MAX_TOKENS
    _check_device(args.device)
    _check_mps(args)
    Voices.parse(args.voices, args.default_voice)
    check_text(args.text)  # what would fail the request, said before a server starts for it
    if args.output != "-":
        _check_writable(Path(args.output))
    _check_cache()
    model_set = _model_set(args.models)
    _check_max_seq_len(args, model_set)
    repository = _render(args, model_set)
    ports = Ports.free()
    from .demo_models import cache_folder  # noqa: PLC0415

    log_path = cache_folder() / "demo-server.log"
    _log(f"starting tritonserver (log: {log_path}) ...")

    try:
        with (terminate_as_interrupt(), mps_if(args.mps, _log) as environment, counted_callers(_log) as callers,
              open(log_path, "w") as log_file):
            process = start_server(repository, ports, log_file=log_file, environment={**environment, **callers})
            try:
                wait_until_ready(process, f"localhost:{ports.grpc}")
                _log("server ready; synthesizing through the 'orpheus' ensemble")
                options = _options(args)
                # Random weights never choose end-of-speech: their cut is the demo's cap, not a missing word.
                cut_note = (_cut_note(options, offer_sentences=False) if args.models
                            else f"note: the audio stops at {args.max_tokens} tokens (the demo model's random weights "
                                 "never end their speech)")
                _synthesize(f"localhost:{ports.grpc}", args.text, args.output, cut_note=cut_note, **options)
            finally:
                stop_server(process, timeout=30)
    except KeyboardInterrupt:
        print("interrupted: the server was stopped", file=sys.stderr)
        return 130
    finally:  # also when no server started (an MPS daemon that did not)
        from .repository import release_run_folder  # noqa: PLC0415

        release_run_folder(repository)
    return 0


def cmd_download(args) -> int:
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415
    except ImportError:
        print("error: `pip install huggingface_hub` (or orpheus-triton[download]) first", file=sys.stderr)
        return 1
    from .demo_models import ModelSet  # noqa: PLC0415

    target = ModelSet(Path(args.dir).expanduser().resolve())
    _log(f"downloading {args.llm_repo} -> {target.llm}")
    snapshot_download(args.llm_repo, local_dir=target.llm, token=args.token,
                      allow_patterns=["*.json", "*.safetensors"])
    _log(f"downloading {args.snac_repo} -> {target.snac}")
    snapshot_download(args.snac_repo, local_dir=target.snac, token=args.token,
                      allow_patterns=["config.json", "pytorch_model.bin"])
    target.check()
    _log(f"done: orpheus-triton serve --models {target.root}")
    return 0


def _response_threads(value: str) -> str:
    """auto or a number of threads >= 0, checked before the server starts."""
    value = value.strip().lower()
    if value != "auto" and not (value.isdigit() and int(value) <= MAX_RESPONSE_THREADS):
        raise argparse.ArgumentTypeError(f"expected auto or a number of threads from 0 to {MAX_RESPONSE_THREADS}, "
                                         f"got {value!r}")
    return value


def _thread_count(value: str) -> str:
    """'auto' or a whole number >= 1, checked before the server starts (the models check it again)."""
    from .repository import parse_cpu_threads  # noqa: PLC0415

    try:
        parse_cpu_threads(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number >= 1, got {value!r}") from None
    return value


def _port(value: str) -> int:
    """A TCP port number, 1 to 65535."""
    if not (value.isdigit() and 1 <= int(value) <= 65535):
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value!r}")
    return int(value)


def _seed(value: str) -> int:
    """A seed: the UINT64 the server takes, 0 to 2**64 - 1."""
    if not (value.isdigit() and int(value) < 2**64):
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {2**64 - 1}, got {value!r}")
    return int(value)


def _grpc_url(value: str) -> str:
    """The server's gRPC endpoint, HOST:PORT (``arguments.check_grpc_url``)."""
    try:
        return check_grpc_url(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seconds(value: str) -> int:
    """A whole number of seconds >= 0 (tritonserver's --exit-timeout-secs takes no fractions)."""
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds >= 0, got {value!r}")
    return int(value)


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", help="model set directory with llm/ and snac/ (default: the demo set)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    parser.add_argument("--max-streams", type=positive, default=0, metavar="N",
                        help="concurrent streams the LLM engine batches; more wait in its queue (default: 16 on a "
                             "CPU, 64 on a GPU or as many as half its free memory holds, if fewer)")
    parser.add_argument("--max-seq-len", type=positive, default=2048, metavar="N",
                        help=f"prompt + generated tokens per stream (default 2048; a request naming no max_tokens "
                             f"gets {DEFAULT_MAX_TOKENS} or what this leaves after its prompt, if less)")
    parser.add_argument("--max-queue", type=non_negative, default=256, metavar="N",
                        help="requests that may wait for a stream slot; beyond them one is refused at once with "
                             "'server busy' (default 256; 0: refused whenever every slot is taken)")
    parser.add_argument("--max-queue-seconds", type=non_negative_seconds, default=0.0, metavar="S",
                        help="refuse a request still waiting for a stream slot after S seconds, so its caller can "
                             "try another server (default 0: requests wait as long as it takes)")
    parser.add_argument("--max-callers", type=non_negative, default=0, metavar="N",
                        help="callers in flight at most, each from its request to its last audio; one more is "
                             "refused at once with 'server busy'. Set it to the server's measured real-time "
                             "capacity: --max-streams and --max-queue count streams generating, and a stream's "
                             "audio may still be decoding, on a CPU seconds behind (default 0: no bound beyond "
                             "them)")
    parser.add_argument("--prefill-tokens", type=positive, metavar="N",
                        help="prompt tokens the LLM engine prefills per step at most: larger admits a burst of "
                             "callers in fewer steps, each step longer (default: 256 on CPU, 2048 on GPU)")
    parser.add_argument("--decoder-exact", action="store_true",
                        help="decode whole SNAC windows row by row: audio sample-identical to upstream Orpheus, "
                             "alone or batched, at 2.5-5x the decoder's CPU time (default: within one int16 step)")
    parser.add_argument("--no-lead-in", action="store_true",
                        help="start each stream with frame 1's audio, after 28 tokens, as upstream Orpheus does "
                             "(default: frame 0's audio first, after 21 tokens: a quarter fewer tokens to wait for)")
    parser.add_argument("--no-lead-out", action="store_true",
                        help="end each stream without its last two frames' audio, as upstream Orpheus does "
                             "(default: they come with the stream's end)")
    parser.add_argument("--graph-sampling", action=argparse.BooleanOptionalAction, default=True,
                        help="GPU: sample the guarded rows of a step from one CUDA graph per batch bucket "
                             "(fewer launches per step; on by default)")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                        help="read each step's tokens back after queueing the next, so the host's work overlaps "
                             "the GPU's (tokens arrive one step later; default: on a GPU, off on a CPU)")
    parser.add_argument("--mps", action="store_true",
                        help="GPU: run the server under an NVIDIA MPS control daemon of its own, so the LLM "
                             "stage's and the SNAC decoder's kernels share the GPU at once instead of taking turns "
                             "(needs nvidia-cuda-mps-control, from NVIDIA's driver)")
    parser.add_argument("--response-threads", type=_response_threads, default="auto", metavar="auto|N",
                        help="threads that send the LLM stage's and the SNAC decoder's responses to Triton, each "
                             "stream's on one of them (auto: on a GPU 1 for the LLM stage and 2 for the SNAC decoder; "
                             "0 on a CPU: sent where they are made)")
    parser.add_argument("--cancel-check-seconds", type=non_negative_seconds, default=CANCEL_CHECK_SECONDS,
                        metavar="S",
                        help="GPU: how often the LLM stage asks Triton whether its streams' clients cancelled them, "
                             "every stream a round trip to the server (0: at every engine step; the questions "
                             "take at most a tenth of a thread's time whatever S, so at hundreds of streams "
                             "passes come tens of milliseconds apart; default "
                             f"{CANCEL_CHECK_SECONDS:g}). Through the orpheus ensemble clients end streams with "
                             "`stop` instead (tritonserver does not pass their cancellation on)")
    parser.add_argument("--voices", default=",".join(VOICES), metavar="NAMES",
                        help="the voices (speaker names) the checkpoint was fine-tuned with, comma-separated, as "
                             "its model card lists them; 'none' for a single-speaker fine-tune, prompted with the "
                             f"text alone (default: Orpheus 3B English's {','.join(VOICES)})")
    parser.add_argument("--default-voice", default="", metavar="NAME",
                        help="the voice of requests that name none (default: the first of --voices)")
    for stage in ("llm", "decoder"):
        parser.add_argument(f"--{stage}-cpu-threads", default="auto", metavar="auto|N", type=_thread_count,
                            help=f"torch threads of the {stage} process (default auto: half the cores on CPU, "
                                 "torch's default on GPU)")


def _synthesis_options(parser: argparse.ArgumentParser, demo: bool = False) -> None:
    """The options of a request, for `say` and `demo` (``demo``: its own default max_tokens)."""
    parser.add_argument("-o", "--output", default="out.wav",
                        help=f"WAV file to write (default: out.wav), or - for raw PCM on stdout as it arrives "
                             f"(16-bit little-endian, {SAMPLE_RATE} Hz, mono: | aplay -f S16_LE -r {SAMPLE_RATE})")
    parser.add_argument("--voice", help=f"one of the server's voices (default: its default voice; Orpheus 3B English: "
                                         f"{', '.join(VOICES)}, default {DEFAULT_VOICE})")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="sampling seed: the same text, voice, options and seed give the same audio (default 0)")
    served = f"{DEFAULT_MAX_TOKENS}, about 14 s, or what the server's --max-seq-len leaves after the prompt"
    default = (f"{DEMO_MAX_TOKENS}, about 5 s, with the demo model set; with --models {served}" if demo
               else f"{served}; the demo model set never ends its speech by itself, so it takes all of them")
    parser.add_argument("--max-tokens", type=max_tokens, default=None, metavar="N",
                        help=f"audio tokens to generate at most, 7 per 85 ms (default {default})")
    parser.add_argument("--temperature", type=float, default=None, metavar="T",
                        help=f"sampling temperature (server default {DEFAULT_TEMPERATURE:g})")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help=f"nucleus sampling's probability mass, in (0, 1] (server default {DEFAULT_TOP_P:g})")
    parser.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                        help=f"in [1, 3]; Orpheus needs 1.1 or more for stable speech (server default "
                             f"{DEFAULT_REPETITION_PENALTY:g})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orpheus-triton", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run tritonserver in the foreground with the model repository",
        epilog="exit status: 0 stopped, every stream finished; 2 refused before the start (options, model set, "
               "ports); 3 tritonserver ended before its models were ready (its log says why: a model that failed "
               "to load); 1 a backend stub died while serving, or tritonserver failed; 128 + N stopped by signal N "
               "with streams in flight cut off (143: SIGTERM, 130: Ctrl-C)")
    _server_options(serve)
    serve.add_argument("--grpc-port", type=_port, default=DEFAULT_GRPC_PORT, metavar="PORT",
                       help=f"gRPC endpoint, the one clients stream from (default {DEFAULT_GRPC_PORT})")
    serve.add_argument("--http-port", type=_port, default=DEFAULT_HTTP_PORT, metavar="PORT",
                       help=f"HTTP endpoint: health, model metadata, generate_stream (default {DEFAULT_HTTP_PORT})")
    serve.add_argument("--metrics-port", type=_port, default=DEFAULT_METRICS_PORT, metavar="PORT",
                       help=f"Prometheus metrics at /metrics (default {DEFAULT_METRICS_PORT})")
    serve.add_argument("--exit-timeout", type=_seconds, default=10, metavar="SECONDS",
                       help="on Ctrl-C or SIGTERM, how long the streams in flight may take to finish, new ones "
                            "refused meanwhile, before the server stops (default 10; those still going are cut off)")
    serve.set_defaults(run=cmd_serve)

    say = commands.add_parser("say", help="synthesize TEXT via a running server, streaming into a WAV")
    say.add_argument("text", help="what to say; - reads it from stdin as it arrives (e.g. piped from an LLM) and "
                                  "speaks it sentence by sentence")
    say.add_argument("--url", type=_grpc_url, default=DEFAULT_GRPC_URL,
                     help=f"the server's gRPC endpoint HOST:PORT (default {DEFAULT_GRPC_URL}, serve's --grpc-port)")
    say.add_argument("--sentences", action="store_true",
                     help="one request per sentence, each starting once the one before has generated: text of "
                          f"any length (one request takes at most {MAX_TEXT_CHARS} characters and --max-tokens "
                          "of audio)")
    _synthesis_options(say)
    say.set_defaults(run=cmd_say)

    demo = commands.add_parser("demo", help="start a server, synthesize one WAV through it, stop")
    demo.add_argument("text", nargs="?", default=DEFAULT_TEXT, help=f"what to say (default: {DEFAULT_TEXT!r})")
    _server_options(demo)
    _synthesis_options(demo, demo=True)
    demo.set_defaults(run=cmd_demo)

    download = commands.add_parser("download", help="fetch Orpheus 3B and SNAC 24 kHz weights (Hugging Face hub)")
    download.add_argument("dir", help="model set directory to create (llm/ and snac/)")
    download.add_argument("--token", help="Hugging Face token (Orpheus is a gated model)")
    download.add_argument("--llm-repo", default="canopylabs/orpheus-3b-0.1-ft", metavar="REPO",
                          help="Hugging Face repository of the Orpheus checkpoint (default %(default)s; a "
                               "fine-tune of it works the same: serve it with its --voices)")
    download.add_argument("--snac-repo", default="hubertsiuzdak/snac_24khz", metavar="REPO",
                          help="Hugging Face repository of the SNAC codec (default %(default)s, the one Orpheus "
                               "speaks)")
    download.set_defaults(run=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, RuntimeError, TimeoutError) as error:  # setup problems: say what
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

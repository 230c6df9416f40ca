"""In-flight batching for the torch LLM stage.

One scheduler loop owns the model. Each iteration (a *step*):

1. drops streams whose client went away and admits queued requests into free
   slots;
2. prefills waiting prompts, at most ``prefill_chunk`` prompt tokens per step
   (``PREFILL_TOKENS_PER_STEP`` by device unless set), so a long prompt or a
   burst of callers never stalls running streams for more than one chunk:
   the short prompts that fit together in one forward straight into free decode
   slots (on a GPU, up to ``PREFILL_GRAPH_ROWS`` of them as a captured graph into
   scratch slots, then moved: ``llama.BucketedPrefill``), a long one chunk by chunk
   in the scratch slot, from which a finished prefill moves into the next decode slot;
3. runs ONE batched forward over every decoding stream (slots ``0..n-1``),
   samples a token per stream and hands it to the stream's callback.

A stream that finishes leaves at once: the last stream's cache moves into its
slot so the decoding slots stay contiguous (views, no gathers), and the freed
slot serves the next request at the following step.

With ``overlap`` (on a GPU by default), a step's sampled tokens are read back only after
the next step is queued: the next forward takes them from the device, and the
host's work of a step (reading tokens back, handing them out, preparing the
next inputs) runs while the GPU computes instead of between its steps. Tokens
then reach their callbacks one step later, and a stream that produced
end-of-speech runs one more step, whose token is dropped. Every stream gets the
tokens it gets without the option (sampling is per stream).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .constants import (
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    END_OF_SPEECH,
    FINISH_END_OF_SPEECH,
    FINISH_MAX_TOKENS,
    FINISH_STOPPED,
    NO_END_ID,
    SERVER_BUSY,
    TOKENS_PER_FRAME,
)
from .llama import BucketedDecoder, BucketedPrefill, Llama, available_memory, kv_cache_bytes
from .sampling import GuardedSampler, HostRows, LmHead, SamplingBatch, host_to_device, sample
from .threads import start_torch_thread

FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32: sampling settings go to the device as float32

log = logging.getLogger(__name__)

# Prompt tokens a step prefills at most, by device. The total prefill work of a burst of callers is the
# same whatever the budget; a small one spreads it over many steps, so the last caller of a burst waits
# for all of them before its first token. On a GPU a step of 2,048 prompt tokens costs tens of
# milliseconds, so a burst of 216 forty-token prompts is admitted in 5 steps instead of 36 (a step takes
# whole short prompts: 51 or 6; TensorRT-LLM's default budget, max_num_tokens, is 8,192). On a CPU,
# where prefill is compute-bound and a longer step holds up every running stream, it stays at 256.
# perf/engine_bench.py --burst measures both sides: the newcomers' first window and the running
# streams' longest wait.
PREFILL_TOKENS_PER_STEP = {"cpu": 256, "cuda": 2048}


# Prompts one captured prefill takes at most (llama.BucketedPrefill, GPU): each is a scratch slot of the KV
# cache. Steadily arriving callers come one or two a step; a larger group (a burst) is prefilled eagerly.
PREFILL_GRAPH_ROWS = 8


# The KV cache may take this share of the memory free when the engine starts; the rest is for the
# step's activations, CUDA graphs and sampling (and, on a GPU, whatever else shares it).
KV_CACHE_SHARE = 0.9


# Streams the engine batches where the settings name no number, by device. Every stream holds a slot
# from its first token to its last, so slots beyond what the device keeps above real time starve every
# stream in them, where a caller waiting in the queue for a slot only starts later. On a CPU 16; on a
# GPU 64, the largest level served through Triton with every stream above real time (first audio p99
# 218 ms; 128 starved 53 of 256 streams with overlap, 203 without; nothing between measured; an H200,
# perf/results/2026-11-27_h200); fewer where half the device's free memory holds fewer KV caches
# (default_max_streams).
MAX_STREAMS_BY_DEVICE = {"cpu": 16, "cuda": 64}

# The share of the free memory the KV caches of a default number of streams may take: the rest is for what
# comes after the engine reads it (CUDA graphs, a step's activations, and the SNAC decoder, which Triton
# may load onto the same GPU after). A number of streams that is set may take KV_CACHE_SHARE.
DEFAULT_STREAMS_MEMORY_SHARE = 0.5


def overlap_for(device: str | torch.device, overlap: bool | None = None) -> bool:
    """The engine's ``overlap`` on ``device``: as given, else on a GPU (InflightEngine's comment says why)."""
    return torch.device(device).type == "cuda" if overlap is None else overlap


def streams_that_fit(free: int | None, per_stream: int, scratch_slots: int = 1,
                     share: float = KV_CACHE_SHARE) -> int | None:
    """KV caches of ``per_stream`` bytes that ``share`` of ``free`` bytes holds beside ``scratch_slots``
    (those prompts are prefilled in); None where the free memory is unknown."""
    return None if free is None else int(share * free // per_stream) - scratch_slots


def default_max_streams(model: Llama, max_seq_len: int) -> int:
    """MAX_STREAMS_BY_DEVICE's number for the model's device, or as many as DEFAULT_STREAMS_MEMORY_SHARE of
    its free memory holds if fewer (at least 1: check_cache_fits then says what does not fit)."""
    device = model.embed_tokens.weight.device
    wanted = MAX_STREAMS_BY_DEVICE.get(device.type, MAX_STREAMS_BY_DEVICE["cpu"])
    scratch_slots = min(PREFILL_GRAPH_ROWS, wanted) if device.type == "cuda" else 1  # as InflightEngine has
    per_stream = kv_cache_bytes(model.config, 1, max_seq_len, model.embed_tokens.weight.dtype)
    fit = streams_that_fit(available_memory(device), per_stream, scratch_slots, DEFAULT_STREAMS_MEMORY_SHARE)
    if fit is None or fit >= wanted:
        return wanted
    log.info("max_streams: %d, as many KV caches of %d positions as %.0f%% of the free memory on %s holds "
             "(the default is %d; serve --max-streams sets it)", max(1, fit), max_seq_len,
             100 * DEFAULT_STREAMS_MEMORY_SHARE, device, wanted)
    return max(1, fit)


def check_cache_fits(model: Llama, max_streams: int, max_seq_len: int, device: torch.device,
                     scratch_slots: int = 1) -> None:
    """Refuse, with the numbers and what to change, a KV cache the device cannot hold, before
    allocating it: a server that cannot start should say why, not fail with out-of-memory."""
    dtype = model.embed_tokens.weight.dtype
    per_stream = kv_cache_bytes(model.config, 1, max_seq_len, dtype)
    need = per_stream * (max_streams + scratch_slots)  # + the slots prompts are prefilled in
    free = available_memory(device)
    gib = 2**30
    fit = streams_that_fit(free, per_stream, scratch_slots)  # of this length
    log.info("KV cache: %d streams x %d positions, %.2f GiB (%s free on %s%s)", max_streams, max_seq_len,
             need / gib, "?" if free is None else f"{free / gib:.1f} GiB", device,
             "" if fit is None else f": room for about {fit} streams of this length, serve --max-streams")
    if free is None or need <= KV_CACHE_SHARE * free:
        return
    advice = (f"lower max_streams (serve --max-streams; about {fit} fit at this length) or max_seq_len "
              "(--max-seq-len)" if (fit or 0) >= 1 else "lower max_seq_len (--max-seq-len): not one stream fits")
    raise ValueError(
        f"the KV cache for {max_streams} streams of {max_seq_len} positions needs {need / gib:.2f} GiB "
        f"({per_stream / 2**20:.1f} MiB a stream), more than {KV_CACHE_SHARE:.0%} of the {free / gib:.2f} GiB "
        f"free on {device}: {advice}")


class CapacityError(RuntimeError):
    """The engine cannot take this request (queue full or sequence too long)."""


@dataclass
class GenerationRequest:
    """What one stream asks for; ``emit(tokens, finish)`` receives its output as it is made: ``finish`` is
    None while the stream goes on, and with its last tokens why it ended (FINISH_END_OF_SPEECH, its end_id;
    FINISH_MAX_TOKENS; FINISH_STOPPED, a ``stop_stream``)."""

    prompt: list[int]
    max_new_tokens: int
    emit: Callable[[list[int], str | None], None]
    end_id: int = END_OF_SPEECH
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    seed: int = 0
    audio_guard: bool = True
    is_cancelled: Callable[[], bool] = lambda: False
    fail: Callable[[str], None] | None = None  # told why, if the engine has to drop the stream
    request_id: str = ""


@dataclass
class _Stream:
    request: GenerationRequest
    length: int = 0  # cached positions
    generated: list[int] = field(default_factory=list)  # tokens handed out
    # Tokens sampled, handed out or still on their way back from the device (overlap). Until a stream
    # ends every one is an audio token, so this is also its next token's audio position.
    issued: int = 0
    prefilled: int = 0  # prompt tokens already in the cache
    ended: bool = False  # finished, failed or cancelled: tokens still on their way are dropped
    stop_requested: bool = False  # a `stop` for its id came (stop_stream): it ends at the next step
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class _Sampled:
    """Tokens sampled for ``streams`` (one row each), on their way back from the device."""

    streams: list[_Stream]
    tokens: torch.Tensor  # [rows] where they were sampled
    host: torch.Tensor  # their copy in (pinned) host memory, made without waiting
    ready: torch.cuda.Event | None  # recorded after that copy (None on a CPU: copied already)

    @classmethod
    def copy_back(cls, streams: list[_Stream], tokens: torch.Tensor) -> _Sampled:
        if not tokens.is_cuda:
            return cls(streams, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(streams, tokens, host, ready)

    def read(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


@dataclass
class EngineStats:
    """Counters for metrics; read without the lock (single writer, word-sized values)."""

    active_streams: int = 0
    queued_requests: int = 0
    tokens_generated: int = 0
    steps: int = 0
    busy_seconds: float = 0.0  # the steps' time together
    # Time integrals, whose rates over a span are the mean number of streams holding a slot and of
    # requests waiting for one: with tokens per step (the streams decoding), where a server's streams are.
    stream_seconds: float = 0.0
    queued_seconds: float = 0.0
    last_step_seconds: float = 0.0
    last_batch_size: int = 0
    cancelled: int = 0
    timed_out: int = 0  # refused after waiting max_queue_seconds for a slot
    queue_full: int = 0  # refused at once: max_queue requests were already waiting (written by submit)
    capped: int = 0  # cut off at max_new_tokens before end of speech


class InflightEngine:
    def __init__(
        self,
        model: Llama,
        max_streams: int = 8,
        max_seq_len: int = 2048,
        max_queue: int = 256,
        prefill_chunk: int | None = None,
        cuda_graphs: bool | None = None,
        bucketed: bool | None = None,
        graph_sampling: bool = True,
        overlap: bool | None = None,
        max_queue_seconds: float = 0.0,
    ):
        if max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1 (prompt + generated tokens per stream), got {max_seq_len}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 (0: refuse a request no slot is free for), got {max_queue}")
        if not max_queue_seconds >= 0:
            raise ValueError(f"max_queue_seconds must be >= 0 (0: no limit), got {max_queue_seconds}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 prompt tokens per step, got {prefill_chunk}")
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.max_streams = max_streams
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        # A request still waiting for a slot after this long is refused (0: it waits as long as it takes):
        # a voice agent would rather try another server than have its caller wait in silence.
        self.max_queue_seconds = max_queue_seconds
        self.prefill_chunk = prefill_chunk if prefill_chunk is not None else PREFILL_TOKENS_PER_STEP.get(
            self.device.type, PREFILL_TOKENS_PER_STEP["cpu"])
        # On GPU, decode steps and short prompts' prefills run at bucketed shapes, replayed from CUDA
        # graphs unless cuda_graphs=False. On CPU padding would only add work: they run at their own shape
        # (bucketed=True forces the padded paths there, eagerly, to test them without a GPU).
        on_gpu = self.device.type == "cuda"
        use_buckets = on_gpu if bucketed is None else bucketed
        use_graphs = on_gpu and cuda_graphs is not False
        # Slots prompts are prefilled in, then moved: a long prompt's chunks go through the first, a
        # bucketed prefill's prompts through as many as it takes. Bucketed prefills only where they run as
        # CUDA graphs (padded, they compute more than an eager prefill at the prompts' own shape) or to
        # test them (bucketed on a CPU).
        self.scratch_slot = max_streams
        prefill_rows = min(PREFILL_GRAPH_ROWS, max_streams) if use_buckets and (use_graphs or not on_gpu) else 0
        scratch_slots = max(1, prefill_rows)
        check_cache_fits(model, max_streams, max_seq_len, self.device, scratch_slots)
        model.allocate_cache(max_streams + scratch_slots, max_seq_len)
        self.decoder = (BucketedDecoder(model, use_graphs=use_graphs, max_batch=max_streams)
                        if use_buckets else None)
        self.prefiller = (BucketedPrefill(model, self.scratch_slot, prefill_rows, self.prefill_chunk,
                                          use_graphs=use_graphs)
                          if prefill_rows else None)
        vocab = model.config.vocab_size
        # Tokens each slot has seen (prompt + output), for the repetition penalty. Marked through index_put_
        # with this device tensor: assigning a Python True at tensor indices first copies it to the GPU with a
        # blocking copy (torch 2.11), which waits for every kernel queued before it.
        self.seen = torch.zeros(max_streams + 1, vocab, dtype=torch.bool, device=self.device)
        self._true = torch.ones((), dtype=torch.bool, device=self.device)
        # graph_sampling: a batch's guarded rows sample at the decoder's bucketed shapes,
        # from one CUDA graph each (sampling.GuardedSampler) instead of a couple of hundred launches; on
        # the bucketed (GPU) path only. On by default: on an H100 steps 0.5-7% shorter at every batch
        # measured (perf/results/2026-11-26_h100), and served the engine thread's host work bounds, a
        # newcomer's first token sampled eagerly costing as many launches as a whole batch's.
        self.sampler = (GuardedSampler(model.lm_head.weight, self.seen, self.decoder.batch_buckets,
                                       self.decoder.use_graphs)
                        if graph_sampling and self.decoder is not None else None)
        # overlap: read a step's tokens back after queueing the next (module docstring). By default on a GPU:
        # on an H200 with nothing else in a step waiting for the GPU (check_gpu.py's overlap_waits), steps
        # 9-13% shorter at 128-256 streams in one A/B (two runs without it differed by up to 7%), and served
        # at 128 streams 53 of 256 streams starved instead of 203 (perf/results/2026-11-27_h200). On a CPU,
        # where the host's work is the step, it only delays every token by a step.
        self.overlap = overlap_for(self.device, overlap)
        self._in_flight: list[_Sampled] = []  # sampled by the previous step, read at the end of this one
        self._launched: list[_Sampled] = []  # sampled by this step
        self.decoding: list[_Stream] = []  # stream i lives in slot i
        self.prefilling: _Stream | None = None
        self.queue: collections.deque[_Stream] = collections.deque()
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.stats = EngineStats()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_step_end: float | None = None  # when the last step that left work behind ended

    # ---- public API ------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; raises CapacityError with a clear reason if it cannot be served."""
        if not request.prompt:
            raise ValueError("empty prompt")
        if len(request.prompt) + request.max_new_tokens > self.max_seq_len:
            raise CapacityError(
                f"prompt of {len(request.prompt)} tokens + max_tokens {request.max_new_tokens} exceeds the "
                f"engine's max_seq_len {self.max_seq_len}; shorten the text or lower max_tokens"
            )
        if request.max_new_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_new_tokens}")
        # Sampling runs in float32: an infinite temperature or penalty (or one float32 cannot hold) turns the
        # guard's -inf scores into NaN, which argmax then picks (end of speech in mid-frame).
        wrong = [f"{name} {value} ({expected})" for name, value, valid, expected in (
            ("temperature", request.temperature, 0 <= request.temperature <= FLOAT32_MAX, ">= 0, finite"),
            ("top_p", request.top_p, 0 < request.top_p <= 1, "in (0, 1]"),
            ("top_k", request.top_k, request.top_k >= 0, ">= 0"),
            ("repetition_penalty", request.repetition_penalty, 0 < request.repetition_penalty <= FLOAT32_MAX,
             "> 0, finite"),
        ) if not valid]
        if wrong:
            raise ValueError(f"sampling settings out of range: {', '.join(wrong)}")
        vocab = self.model.config.vocab_size
        if not 0 <= min(request.prompt) <= max(request.prompt) < vocab:  # one bad id would fail every stream's step
            bad = next(i for i, token in enumerate(request.prompt) if not 0 <= token < vocab)
            raise ValueError(f"prompt token {request.prompt[bad]} at position {bad} is not in the vocabulary "
                             f"(ids 0 to {vocab - 1})")
        if request.audio_guard and request.end_id not in (END_OF_SPEECH, NO_END_ID):
            # The guard offers end-of-speech at frame boundaries; another end id would leave it in the stream
            # as an audio position and shift every later frame.
            raise ValueError(f"end_id {request.end_id} with the audio-token guard on: the guard ends a stream with "
                             f"end-of-speech ({END_OF_SPEECH}); send that end_id, or turn the guard off")
        with self.lock:
            # The queue holds requests the engine thread has not taken yet, free slots or not: only those
            # beyond the free slots wait for one (a burst into an idle engine was refused at max_queue).
            in_use = self._slots_in_use()
            waiting = len(self.queue) - max(0, self.max_streams - in_use)
            if waiting >= self.max_queue:
                self.stats.queue_full += 1
                raise CapacityError(
                    f"{SERVER_BUSY}: {waiting} requests already waiting for a stream slot (max_queue "
                    f"{self.max_queue}; {in_use} of {self.max_streams} slots in use); retry later"
                )
            self.queue.append(_Stream(request))
            self.stats.queued_requests = len(self.queue)
        self.wakeup.set()

    def start(self) -> None:
        self._thread = start_torch_thread(self._loop, "inflight-engine")

    def capture_graphs(self) -> int:
        """Capture the CUDA graphs of every shape now (GPU; 0 elsewhere): decode steps, short prompts'
        prefills and sampling, so no stream waits for a capture while serving. Returns how many were captured."""
        graphs = self.decoder.capture_all() if self.decoder is not None else 0
        graphs += self.prefiller.capture_all() if self.prefiller is not None else 0
        return graphs + (self.sampler.capture_all() if self.sampler is not None else 0)

    def stop(self) -> None:
        self._stopping = True
        self.wakeup.set()
        if self._thread:
            self._thread.join(timeout=10)

    def idle(self) -> bool:
        return not (self.decoding or self.prefilling or self.queue or self._in_flight)

    def _slots_in_use(self) -> int:
        """Stream slots held: the streams decoding and the one prefilling."""
        return len(self.decoding) + (self.prefilling is not None)

    def run_until_idle(self) -> None:
        """Step until every request is done (for tests and in-process benchmarks)."""
        while not self.idle():
            self.step()

    # ---- the loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a new thread's current device is cuda:0
        while not self._stopping:
            if self.idle():
                self.wakeup.wait(timeout=0.5)
                self.wakeup.clear()
                continue
            try:
                self.step()
            except Exception:  # keep serving others; fail the streams of this step
                log.exception("engine step failed")
                self._fail_all("internal error in the LLM engine step; see server log")

    @torch.inference_mode()
    def step(self) -> None:
        started = time.perf_counter()
        held, queued = self.stats.active_streams, self.stats.queued_requests  # as the last step left them
        self._drop_cancelled()
        self._refuse_overdue()
        self._retire_complete()
        self._prefill()
        if self.decoding:
            self._decode()
        # overlap: the previous step's tokens, now that this step is queued behind them
        previous, self._in_flight, self._launched = self._in_flight, self._launched, []
        for sampled in previous:
            self._emit(sampled.streams, sampled.read())
        ended = time.perf_counter()
        self.stats.steps += 1
        self.stats.last_step_seconds = ended - started
        self.stats.busy_seconds += self.stats.last_step_seconds
        # What the last step left held and queued stayed so until this one ended (the time between
        # two steps counts too: a loop held up between steps still holds its streams).
        since = started if self._last_step_end is None else self._last_step_end
        self.stats.stream_seconds += held * (ended - since)
        self.stats.queued_seconds += queued * (ended - since)
        self.stats.active_streams = self._slots_in_use()
        self.stats.queued_requests = len(self.queue)
        self._last_step_end = None if self.idle() else ended

    def stop_stream(self, request_id: str) -> bool:
        """Ask for the stream with this id to end at the next step (TensorRT-LLM's `stop` input).

        Like TensorRT-LLM's, a stopped stream finishes normally: its final output is
        end_id, so the stages after it (and an ensemble around it) complete too. A
        cancelled one (``is_cancelled``) is failed instead: nobody listens any more.
        Returns whether such a stream was queued or running.
        """
        # The streams themselves are marked: a later stream with this id is not stopped. Under the lock,
        # where the engine thread moves streams between the queue, ``prefilling`` and ``decoding``: a stream
        # between two of them (popped from the queue, not yet decoding) was found nowhere and ran on.
        with self.lock:
            prefilling = self.prefilling
            streams = [s for s in [*self.queue, *self.decoding, *([prefilling] if prefilling else [])]
                       if s.request.request_id == request_id]
            if request_id:
                for stream in streams:
                    stream.stop_requested = True
        self.wakeup.set()
        return bool(streams)

    def _drop_cancelled(self) -> None:
        def cancelled(stream: _Stream) -> bool:
            if stream.stop_requested:
                return True
            try:
                return stream.request.is_cancelled()
            except Exception:  # noqa: BLE001 (one request that cannot be asked must not fail every step)
                # Triton could not say: the request is gone, nobody listens any more (as CancellationWatch).
                log.warning("could not ask whether request %r was cancelled; dropping it",
                            stream.request.request_id, exc_info=True)
                return True

        dropped = []
        for index in reversed(range(len(self.decoding))):
            if cancelled(self.decoding[index]):
                dropped.append(self.decoding[index])
                self._leave(index)
        if self.prefilling and cancelled(self.prefilling):
            dropped.append(self.prefilling)
            with self.lock:
                self.prefilling = None
        with self.lock:
            # Asked once per queued stream: a client may cancel between two questions, and a stream that
            # left the queue without being counted as dropped would never hear its end.
            verdicts = [(stream, cancelled(stream)) for stream in self.queue]
            if any(verdict for _, verdict in verdicts):
                dropped += [stream for stream, verdict in verdicts if verdict]
                self.queue = collections.deque(stream for stream, verdict in verdicts if not verdict)
        self.stats.cancelled += len(dropped)
        for stream in dropped:
            stream.ended = True
        stopped = [s for s in dropped if s.stop_requested]
        for stream in stopped:
            try:
                stream.request.emit([stream.request.end_id], FINISH_STOPPED)
            except Exception:
                log.exception("could not end stopped request %r", stream.request.request_id)
        self._notify([s for s in dropped if s not in stopped], "request cancelled by the client")

    def _refuse_overdue(self) -> None:
        """Refuse the queued requests that have waited max_queue_seconds for a slot."""
        if not self.max_queue_seconds:
            return
        deadline = time.monotonic() - self.max_queue_seconds
        with self.lock:
            overdue = [s for s in self.queue if s.queued_at < deadline]
            if overdue:
                self.queue = collections.deque(s for s in self.queue if s.queued_at >= deadline)
        if not overdue:
            return
        self.stats.timed_out += len(overdue)
        for stream in overdue:
            stream.ended = True
        self._notify(overdue, f"{SERVER_BUSY}: no stream slot came free within {self.max_queue_seconds:g} s "
                              f"(max_queue_seconds; {self._slots_in_use()} of {self.max_streams} stream slots in "
                              "use); retry later")

    def _prefill(self) -> None:
        """Spend the step's prefill budget: first on the prompt being prefilled chunk by chunk, if any, then on
        whole prompts in one batched forward (``_prefill_together``), then on starting the next prompt that
        is longer than a whole budget, chunk by chunk in the scratch slot.

        A prompt that fits a budget whole never goes through the scratch slot: when it does not fit what is
        left of this step's, it waits for the next step's batched forward: through the scratch slot it would
        cost a forward of its own, and in a burst of callers so would every prompt after it, a step of
        hundreds of milliseconds on a GPU.
        """
        budget = self.prefill_chunk
        if self.prefilling is not None:
            budget -= self._prefill_chunk_of(self.prefilling, budget)
            if self.prefilling is not None:
                return  # the rest of its prompt next step
        budget -= self._prefill_together(budget)
        if budget <= 0 or len(self.decoding) >= self.max_streams:
            return
        with self.lock:
            if not self.queue or len(self.queue[0].request.prompt) <= self.prefill_chunk:
                return
            self.prefilling = self.queue.popleft()
        self._mark_prompt(self.scratch_slot, host_to_device(torch.tensor(self.prefilling.request.prompt), self.device))
        self._prefill_chunk_of(self.prefilling, budget)

    def _prefill_chunk_of(self, stream: _Stream, budget: int) -> int:
        """Prefill up to ``budget`` more tokens of ``stream``'s prompt in the scratch slot; once the prompt is
        done, move the stream into the next decode slot and sample its first token. Returns the tokens used."""
        prompt = stream.request.prompt
        chunk = prompt[stream.prefilled : stream.prefilled + budget]
        tokens = host_to_device(torch.tensor([chunk]), self.device)
        end = stream.prefilled + len(chunk)
        positions = torch.arange(stream.prefilled, end, device=self.device)[None]
        hidden = self.model(tokens, positions, first_slot=self.scratch_slot, context_len=end, hidden_only=True)
        stream.prefilled += len(chunk)
        stream.length = stream.prefilled
        if stream.prefilled < len(prompt):
            return len(chunk)
        slot = len(self.decoding)
        self.model.copy_slot(self.scratch_slot, slot, stream.length)
        self.seen[slot] = self.seen[self.scratch_slot]
        with self.lock:
            self.decoding.append(stream)
            self.prefilling = None
        self._sample_and_emit([slot], hidden)
        return len(chunk)

    def _prefill_together(self, budget: int) -> int:
        """Prefill the queued prompts that fit ``budget`` whole in one forward: on a GPU, up to
        PREFILL_GRAPH_ROWS of them from a captured graph into the scratch slots, then moved into free decode
        slots in one copy (``llama.BucketedPrefill``); otherwise straight into free decode slots.

        When requests arrive together (a burst of callers), one padded forward over
        all their prompts costs far less than one forward each. Padding
        positions write cache entries past a row's prompt, which its mask hides until
        its own tokens overwrite them.
        Returns the prompt tokens used.
        """
        if self.prefilling is not None:
            return 0
        free = self.max_streams - len(self.decoding)
        with self.lock:
            group: list[_Stream] = []
            used = 0
            for stream in self.queue:
                size = len(stream.request.prompt)
                if len(group) == free or used + size > budget:
                    break
                group.append(stream)
                used += size
            if not group:
                return 0
            for _ in group:
                self.queue.popleft()
            # Decoding from here on, so that a forward that fails fails them too (the loop's _fail_all): out
            # of the queue and nowhere else, they would never hear their end (nor be found by a stop).
            first = len(self.decoding)
            self.decoding.extend(group)
        # Built on the host and copied over once, without waiting for the GPU's queued work (as every
        # input of a step: a blocking copy or a read of a device value here held the host until the
        # previous step's forward was done, so the prefill's kernel launches could not overlap it).
        # A row's padding repeats its first token, so that marking the rows' tokens as seen marks only theirs.
        prompts = [stream.request.prompt for stream in group]
        width = max(map(len, prompts))
        rows = host_to_device(torch.tensor([[*p, *[p[0]] * (width - len(p)), len(p) - 1] for p in prompts]),
                              self.device)
        tokens, last_positions = rows[:, :width], rows[:, width]
        slots = torch.arange(first, first + len(group), device=self.device)
        self.seen.index_fill_(0, slots, False)
        self.seen.index_put_((slots[:, None], tokens), self._true)
        for stream, prompt in zip(group, prompts, strict=True):
            stream.prefilled = stream.length = len(prompt)
        if self.prefiller is not None and self.prefiller.bucket(len(group), width) is not None:
            # One captured graph into the scratch slots, then one copy into the decode slots.
            last = self.prefiller(tokens, last_positions)
            self.model.copy_slot(self.scratch_slot, first, width, count=len(group))
        else:
            positions = torch.arange(width, device=self.device).expand(len(group), width)
            hidden = self.model(tokens, positions, first_slot=first, context_len=width, last_only=False,
                                hidden_only=True)
            last = hidden[slots - first, last_positions]
        self._sample_and_emit(list(range(first, first + len(group))), last)
        return used

    def _mark_prompt(self, slot: int, prompt: torch.Tensor) -> None:
        """A new stream in ``slot`` has seen exactly its prompt (for the repetition penalty)."""
        self.seen[slot] = False
        self.seen[slot].index_put_((prompt,), self._true)

    def _retire_complete(self) -> None:
        """overlap: streams whose last token is sampled leave before the next forward (they are handed
        it when it is read back). Without overlap they left when it was handed out."""
        if not self.overlap:
            return
        for slot in reversed(range(len(self.decoding))):
            stream = self.decoding[slot]
            if stream.issued >= stream.request.max_new_tokens:
                self._leave(slot)

    def _last_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each decoding stream's latest token and position, [B, 1] each, on the device."""
        # Where a stream's latest token is still on the device (overlap): its row in `on_device`.
        on_device, rows, offset = [], {}, 0
        for sampled in self._in_flight + self._launched:  # later records hold later tokens
            rows.update({id(stream): offset + row for row, stream in enumerate(sampled.streams)})
            on_device.append(sampled.tokens)
            offset += len(sampled.streams)
        where = [rows.get(id(s), -1) for s in self.decoding]
        # Built on the host and copied over once (on GPU each tensor from a list is a copy of its own).
        host = host_to_device(torch.tensor([[[s.generated[-1] if row < 0 else 0] for s, row in
                                             zip(self.decoding, where, strict=True)],
                                            [[s.length] for s in self.decoding],
                                            [[row] for row in where]]), self.device)
        last, positions, row = host
        if on_device:
            from_device = torch.cat(on_device)[row.clamp(min=0)]
            last = torch.where(row >= 0, from_device, last)
        return last, positions

    def _decode(self) -> None:
        batch = len(self.decoding)
        last, positions = self._last_tokens()
        context = max(s.length for s in self.decoding) + 1
        if self.decoder is not None:
            hidden = self.decoder(last, positions, context)
        else:
            hidden = self.model(last, positions, first_slot=0, context_len=context, hidden_only=True)
        for stream in self.decoding:
            stream.length += 1
        self.stats.last_batch_size = batch
        self._sample_and_emit(list(range(batch)), hidden)

    def _sample_and_emit(self, slots: list[int], hidden: torch.Tensor) -> None:
        streams = [self.decoding[s] for s in slots]
        tokens = self._sample(slots, streams, hidden)
        if self.overlap:  # a copy: the graph sampler's output buffer is overwritten by its next replay
            self._launched.append(_Sampled.copy_back(streams, tokens.clone()))
        else:
            self._emit(streams, tokens.tolist())

    def _sample(self, slots: list[int], streams: list[_Stream], hidden: torch.Tensor) -> torch.Tensor:
        """A token for each of ``streams`` (in ``slots``), left on the device; counted as issued."""
        # Every row's settings in two host tensors (one per dtype, a setting per row), each copied to
        # the device once and without waiting for the forward queued before (sampling.host_to_device).
        requests = [s.request for s in streams]
        issued = [s.issued for s in streams]  # each stream's draw step, and its audio position
        # The rows' grouping settings stay on the host too (sampling.HostRows).
        host = HostRows(guarded=[r.audio_guard for r in requests],
                        slots=[n % TOKENS_PER_FRAME for n in issued], top_k=[r.top_k for r in requests])
        reals = host_to_device(torch.tensor([[r.temperature for r in requests], [r.top_p for r in requests],
                                             [r.repetition_penalty for r in requests]], dtype=torch.float32),
                               self.device)
        whole = host_to_device(torch.tensor([
            host.top_k,
            [(r.seed + 2**63) % 2**64 - 2**63 for r in requests],  # UINT64 seeds as the same 64 bits in int64
            issued,  # step
            host.guarded,
            issued,  # audio position
            slots,
        ], dtype=torch.int64), self.device)
        slot_index = whole[5]
        if self.sampler is not None and any(host.guarded):
            tokens = self._sample_guarded_first(hidden, reals, whole, host)
        else:
            tokens = sample(LmHead(hidden, self.model.lm_head.weight), SamplingBatch.from_packed(reals, whole),
                            self.seen, seen_rows=slot_index, host=host)
        self.seen.index_put_((slot_index, tokens), self._true)
        for stream in streams:
            stream.issued += 1
        return tokens

    def _sample_guarded_first(self, hidden: torch.Tensor, reals: torch.Tensor, whole: torch.Tensor,
                              host: HostRows) -> torch.Tensor:
        """The guarded rows from the graph sampler, the rest (audio guard off) through ``sample``: one stream
        with the guard off would otherwise send every row of the batch the eager way (a couple of hundred
        launches a step for all of them)."""
        sampler = self.sampler
        assert sampler is not None  # called only where graph sampling is on
        if all(host.guarded):
            return sampler(hidden, reals, whole)
        guarded = [row for row, on in enumerate(host.guarded) if on]
        others = [row for row, on in enumerate(host.guarded) if not on]
        order = host_to_device(torch.tensor(guarded + others), self.device)
        first, rest = order[: len(guarded)], order[len(guarded) :]
        from_graph = sampler(hidden[first], reals[:, first], whole[:, first])
        tokens = torch.empty(len(host.guarded), dtype=from_graph.dtype, device=self.device)
        tokens[first] = from_graph
        unguarded = HostRows(guarded=[False] * len(others), slots=[host.slots[row] for row in others],
                             top_k=[host.top_k[row] for row in others])
        tokens[rest] = sample(LmHead(hidden[rest], self.model.lm_head.weight),
                              SamplingBatch.from_packed(reals[:, rest], whole[:, rest]), self.seen,
                              seen_rows=whole[5][rest], host=unguarded)
        return tokens

    def _emit(self, streams: list[_Stream], tokens: list[int]) -> None:
        """Hand each stream its token; streams that finish leave."""
        finished = []
        for stream, token in zip(streams, tokens, strict=True):
            if stream.ended:  # overlap: a token sampled after the stream ended
                continue
            stream.generated.append(token)
            ended = token == stream.request.end_id
            done = ended or len(stream.generated) >= stream.request.max_new_tokens
            self.stats.tokens_generated += 1
            # A stream always ends with end_id, even when cut at max_new_tokens:
            # downstream stages use it to know the stream is complete.
            out = [token] if ended or not done else [token, stream.request.end_id]
            finish = None if not done else FINISH_END_OF_SPEECH if ended else FINISH_MAX_TOKENS
            try:
                stream.request.emit(out, finish)
            except Exception:
                log.exception("emit failed for request %r; dropping it", stream.request.request_id)
                self._notify([stream], "could not deliver generated tokens; see server log")
                done = True
            if done:
                stream.ended = True
                finished.append(stream)
                if finish == FINISH_MAX_TOKENS:
                    self.stats.capped += 1
        if not finished:
            return
        slots = {id(stream): slot for slot, stream in enumerate(self.decoding)}
        # overlap: a stream cut at max_new_tokens left when its last token was sampled
        for slot in sorted((slots[id(s)] for s in finished if id(s) in slots), reverse=True):
            self._leave(slot)

    def _leave(self, slot: int) -> None:
        """Free ``slot`` now; the last decoding stream moves in to keep slots contiguous."""
        last = len(self.decoding) - 1
        if slot != last:
            moved = self.decoding[last]
            self.model.copy_slot(last, slot, moved.length)
            self.seen[slot] = self.seen[last]
        with self.lock:  # the moved stream stays findable by stop_stream throughout
            if slot != last:
                self.decoding[slot] = self.decoding[last]
            self.decoding.pop()

    def _fail_all(self, message: str) -> None:
        streams = self.decoding + ([self.prefilling] if self.prefilling else [])
        streams += [s for sampled in self._in_flight + self._launched for s in sampled.streams
                    if not s.ended and s not in streams]
        with self.lock:
            self.decoding, self.prefilling = [], None
        self._in_flight, self._launched = [], []
        for stream in streams:
            stream.ended = True
        # The stats as they are now: the failed step did not get to say so (a stale count of active streams
        # would stay on the metrics while the engine idles, and then count as held through the idle time).
        self.stats.active_streams = 0
        with self.lock:
            self.stats.queued_requests = len(self.queue)
        self._last_step_end = None
        self._notify(streams, message)

    @staticmethod
    def _notify(streams: list[_Stream], message: str) -> None:
        for stream in streams:
            try:
                if stream.request.fail:
                    stream.request.fail(message)
            except Exception:
                log.exception("could not notify request %r", stream.request.request_id)

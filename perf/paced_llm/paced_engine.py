"""A stand-in for the torch engine without a model: the serving pipeline with an engine that costs nothing.

perf/run_all.py --paced-llm N appends this file to the rendered repository's llm/1/model.py
(perf/common.use_paced_llm), whose ``build_engine`` it then replaces: the real adapter
(orpheus_triton.llm_streams, serving's response and cancellation threads, EngineMetrics) in
front of ``PacedEngine``, one loop thread that gives every running stream an audio token a
step, N steps a second, in the slot layout the audio-token guard keeps (so the decoder
decodes them as it would real ones). A served sweep then measures everything but the
engine's arithmetic: preprocessing, the ensemble, the adapters' threads and round trips, the
SNAC decoder and the load generator, at stream counts a CPU's engine never reaches.
(No ``from __future__`` import: this text follows another module's.)
"""

import collections
import random
import threading
import time

import torch

from orpheus_triton.constants import CODEBOOK_SIZE, FINISH_MAX_TOKENS, FINISH_STOPPED
from orpheus_triton.engine import MAX_STREAMS_BY_DEVICE, CapacityError, EngineStats, GenerationRequest
from orpheus_triton.frames import audio_token_id


class PacedEngine:
    """InflightEngine's interface (submit, stop_stream, start, stop, stats, device) without a model: each
    step (``tokens_per_second`` a second, a stream's pace) hands every running stream one audio token; a
    newcomer joins at the next step; a stream ends at max_new_tokens with end_id, or when stopped or
    cancelled, as InflightEngine's do. ``device`` is the one the real engine would take here, so that
    the adapter's ``response_thread`` auto setting chooses as it would."""

    def __init__(self, tokens_per_second: float, max_streams: int, max_queue: int):
        if not tokens_per_second > 0:
            raise ValueError(f"paced_tokens_per_second must be > 0, got {tokens_per_second}")
        self.interval = 1.0 / tokens_per_second
        self.max_streams, self.max_queue = max_streams, max_queue
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.stats = EngineStats()
        self.lock = threading.Lock()
        self.queue: collections.deque = collections.deque()  # GenerationRequests waiting for a slot
        self.running: list[list] = []  # [request, tokens generated]
        self._stop_requested: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inflight-engine", daemon=True)

    def submit(self, request: GenerationRequest) -> None:
        with self.lock:  # (a max_tokens below 1 was refused with the request: serving.generation_settings)
            if len(self.queue) >= self.max_queue:
                raise CapacityError(f"server busy: {len(self.queue)} requests already queued "
                                    f"(max_queue {self.max_queue}); retry later")
            self.queue.append(request)

    def stop_stream(self, request_id: str) -> bool:
        with self.lock:
            known = any(r.request_id == request_id for r in [*self.queue, *(s[0] for s in self.running)])
            if known:
                self._stop_requested.add(request_id)
        return known

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        next_step = time.perf_counter()
        while not self._done.is_set():
            next_step += self.interval
            time.sleep(max(0.0, next_step - time.perf_counter()))
            next_step = max(next_step, time.perf_counter() - self.interval)  # behind: no burst of catch-up steps
            started = time.perf_counter()
            self._step()
            ended = time.perf_counter()
            self.stats.steps += 1
            self.stats.busy_seconds += ended - started
            self.stats.last_step_seconds = ended - started
            self.stats.last_batch_size = len(self.running)
            self.stats.stream_seconds += len(self.running) * self.interval
            self.stats.queued_seconds += len(self.queue) * self.interval

    def _step(self) -> None:
        with self.lock:
            stopped, self._stop_requested = self._stop_requested, set()
            while self.queue and len(self.running) < self.max_streams:
                self.running.append([self.queue.popleft(), 0])
            self.stats.queued_requests = len(self.queue)
        still = []
        for stream in self.running:
            request, made = stream
            if request.request_id in stopped or request.is_cancelled():
                self.stats.cancelled += 1
                if request.request_id in stopped:
                    request.emit([request.end_id], FINISH_STOPPED)
                elif request.fail:
                    request.fail("request cancelled by the client")
                continue
            token = audio_token_id(random.randrange(CODEBOOK_SIZE), made)
            stream[1] = made = made + 1
            self.stats.tokens_generated += 1
            done = made >= request.max_new_tokens
            request.emit([token, request.end_id] if done else [token], FINISH_MAX_TOKENS if done else None)
            if done:
                self.stats.capped += 1
            else:
                still.append(stream)
        self.running = still
        self.stats.active_streams = len(self.running)


def build_paced_engine(params: dict[str, str]) -> PacedEngine:
    """``triton_llm.build_engine``'s stand-in: the pace from the model's ``paced_tokens_per_second``; its
    streams as a GPU's engine takes them by default where the configuration leaves them to the device ("0")."""
    max_streams = int(params.get("max_streams", 0)) or MAX_STREAMS_BY_DEVICE["cuda"]
    return PacedEngine(float(params["paced_tokens_per_second"]), max_streams, int(params.get("max_queue", 256)))

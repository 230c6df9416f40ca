"""Triton adapter for the batched SNAC decoder (orpheus_triton.serving + orpheus_triton.snac_codec).

Each request is one LLM response (a few token ids) of one stream. ``execute``
only frames the tokens into windows and queues them (decode_rounds.DecodeScheduler);
a worker thread decodes round after round, each round the oldest waiting
request of every stream in one SNAC call, composed when the decoder is free,
and answers each request as its round finishes: on a GPU through a response
thread of its own (triton_calls.ResponseQueue, the ``response_thread`` parameter;
a number there: that many threads, each stream's answers on one of them),
so that the next round decodes while this one's responses, a round trip to
the server each, go out.
"""

import json
import time
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from orpheus_triton import constants as c
from orpheus_triton.callers import CallerLeases
from orpheus_triton.decode_rounds import (
    DecodeItem,
    DecodeScheduler,
    StreamDecoderState,
    request_size_refusal,
    split_cancelled,
)
from orpheus_triton.metrics import DecoderMetrics
from orpheus_triton.serving import (
    StreamIdError,
    finish_reason_of,
    finish_reason_tensor,
    is_stop_request,
    log_to_triton,
    model_parameters,
    request_start_of,
    require_stream_id,
    send_error,
    stream_idle_seconds,
)
from orpheus_triton.snac_codec import load_window_decoder, warm_up
from orpheus_triton.threads import start_torch_thread
from orpheus_triton.triton_calls import response_queue, response_threads
from orpheus_triton.triton_llm import pick_device, set_cpu_threads

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        log_to_triton(pb_utils)
        params = model_parameters(args)
        device = pick_device(params.get("device", "auto"))
        set_cpu_threads(params, device)
        max_windows = json.loads(args["model_config"])["max_batch_size"]
        self.decoder = load_window_decoder(params["snac_dir"], device=device, exact=params.get("exact") == "true",
                                           max_windows=max_windows)
        warm_up(self.decoder)
        idle = stream_idle_seconds(params)
        self.state = StreamDecoderState(idle_seconds=idle, lead_in=params.get("lead_in", "true") == "true",
                                        lead_out=params.get("lead_out", "true") == "true")
        self.scheduler = DecodeScheduler(max_windows=max_windows, idle_seconds=idle,
                                         defer_horizon=float(params.get("newcomer_horizon", c.NEWCOMER_ROUND_HORIZON)))
        # Callers in flight (where the server counts them): their leases are kept alive as their audio leaves (the
        # llm stage keeps them while it generates), and end before a stream's last audio (or the error that ends
        # it) is sent. Not
        # at a refusal or a stop: a request with a caller's id need not be that caller's (a client of the
        # decoder alone), and a stopped stream's end still comes (its last request, answered without audio).
        self.callers = CallerLeases.from_environment()
        self.metrics = DecoderMetrics(pb_utils, callers=self.callers.count if self.callers else None)  # own thread
        # Responses leave inline in the worker, or (GPU by default: two) from the response thread(s).
        threads = response_threads(params, device.split(":")[0], on_gpu=c.DECODER_GPU_RESPONSE_THREADS)
        self.responses = response_queue(self._undeliverable, threads)
        self.worker = start_torch_thread(self._decode_rounds, "snac-decoder")

    def execute(self, requests):
        chunks = []
        for request in requests:
            sender = request.get_response_sender()
            try:
                stream_id = require_stream_id(request.request_id())
            except StreamIdError as error:
                send_error(pb_utils, sender, "decoder", error)
                continue
            stop = pb_utils.get_input_tensor_by_name(request, c.DECODER_STOP)  # optional
            if stop is not None and is_stop_request({c.DECODER_STOP: stop.as_numpy()}.get, c.DECODER_STOP):
                if self.scheduler.drop(stream_id, *self.state.open_stream(stream_id)):
                    self.metrics.record_stopped()
                sender.send(flags=FINAL)
                continue
            outputs = request.requested_output_names()
            if outputs and c.DECODER_AUDIO not in outputs:  # unasked, it would be dropped inside send()
                send_error(pb_utils, sender, "decoder", f"every answer carries {c.DECODER_AUDIO!r}: ask for it too "
                                                        "(or name no outputs)")
                continue
            tokens = pb_utils.get_input_tensor_by_name(request, c.DECODER_TOKENS).as_numpy()
            if tokens.size != tokens.shape[-1]:  # several rows would be framed as one stream
                send_error(pb_utils, sender, "decoder", f"{c.DECODER_TOKENS} has shape {list(tokens.shape)}: send "
                                                        "one stream's tokens per request (one row)")
                continue
            if (refusal := request_size_refusal(tokens.size, self.scheduler.max_windows)) is not None:
                send_error(pb_utils, sender, "decoder", refusal)
                continue
            start = pb_utils.get_input_tensor_by_name(request, c.REQUEST_START)  # optional
            start = None if start is None else request_start_of(start.as_numpy(), None)
            finish = None  # why the stream ended (on its last request), said with its last answer where asked for
            if not outputs or c.DECODER_FINISH_REASON in outputs:
                finish = pb_utils.get_input_tensor_by_name(request, c.DECODER_FINISH_REASON)  # optional
                finish = None if finish is None else finish_reason_of(finish.as_numpy())
            chunks.append((stream_id, tokens, sender, start, finish))
        try:
            items = self.state.items_for(chunks)
        except Exception as error:  # noqa: BLE001 (every stream of the batch must hear why it ends)
            for _, _, sender, *_ in chunks:
                send_error(pb_utils, sender, "decoder", error)
            return None
        self.metrics.record_dropped_tokens(sum(item.dropped_tokens for item in items))
        self.scheduler.add(items)
        return None

    def finalize(self):
        self.scheduler.close()
        self.worker.join(timeout=30)
        self.responses.close()
        if not self.worker.is_alive():
            self.metrics.stop()  # releases them: not at the interpreter's teardown, where the stub would crash

    def _decode_rounds(self):
        # With a response thread, the next round is composed once the sends are at most a round behind:
        # were they slower than SNAC, an unbounded backlog would delay every stream's audio more and more.
        while True:
            self.responses.wait_for_room(self.scheduler.max_windows)
            if (work := self.scheduler.next_round()) is None:
                return
            answer, decode = work
            decode, cancelled = split_cancelled(decode, lambda item: item.reply.is_cancelled())
            # A cancelled request's stream has what it queued answered without audio and its frames forgotten;
            # what comes later under the id is its caller's next stream.
            for item in cancelled:
                self.state.forget(item.stream_id)
                if self.scheduler.drop(item.stream_id, still_open=False):
                    self.metrics.record_stopped()
            for item in [*answer, *cancelled]:
                self._respond(item, None)
            if decode:
                self._decode(decode)
            self.metrics.record_queued(self.scheduler.queued_windows())
            self.metrics.record_streams(len(self.state.streams))

    def _respond(self, item: DecodeItem, pcm, error=None):
        self.responses.put(item.stream_id, lambda: self._answer(item, pcm, error), last=item.last)

    @staticmethod
    def _undeliverable(stream_id: str, error: Exception):
        pb_utils.Logger.log_error(f"orpheus decoder: answering stream {stream_id!r} failed: {error}")

    def _decode(self, items: list[DecodeItem]):
        started = time.perf_counter()
        try:
            self._decode_round(items, started)
        finally:  # the whole round (SNAC, then answering or queueing every answer, failed rounds too) is busy
            self.metrics.record_busy(time.perf_counter() - started)

    def _decode_round(self, items: list[DecodeItem], started: float):
        windows = [w for item in items for w in item.windows]
        try:  # every request of the round is answered, whatever fails: the worker must outlive a bad round
            audio = self.decoder.decode(windows)
            if len(audio) != len(windows):
                raise RuntimeError(f"SNAC returned {len(audio)} chunks for {len(windows)} windows")
            chunks = iter(audio)
            answers = [np.concatenate([next(chunks) for _ in item.windows]) for item in items]
        except Exception as error:  # noqa: BLE001
            # The streams hear the error; the server log keeps the trace (a failing round is a fault, not input).
            pb_utils.Logger.log_error(f"orpheus decoder: a round of {len(windows)} windows failed:\n"
                                      + traceback.format_exc())
            for item in items:
                self._respond(item, None, error)
            return
        self.metrics.record_call(len(windows), time.perf_counter() - started)
        for item, pcm in zip(items, answers, strict=True):
            self._respond(item, pcm)

    def _answer(self, item: DecodeItem, pcm, error=None):
        handed_over = time.time()  # first audio "sent" is when Triton takes it, not when the send has returned
        if self.callers is not None:  # before the last audio goes out: its caller may send the id again at once
            (self.callers.end if item.last or error is not None else self.callers.touch)(item.stream_id)
        try:
            outputs = [] if pcm is None else [pb_utils.Tensor(c.DECODER_AUDIO, pcm[None, :])]
            if item.finish_reason is not None:
                outputs.append(pb_utils.Tensor(c.DECODER_FINISH_REASON, finish_reason_tensor(item.finish_reason)))
            if error is not None:
                send_error(pb_utils, item.reply, "decoder", error)
            elif not outputs:
                item.reply.send(flags=FINAL)
            else:
                item.reply.send(pb_utils.InferenceResponse(outputs), flags=FINAL)
        except Exception as failure:  # noqa: BLE001 (e.g. a cancelled request: the others go on)
            pb_utils.Logger.log_error(f"orpheus decoder: answering stream {item.stream_id!r} failed: {failure}")
        try:  # bookkeeping: its failure is not the stream's (the response queue would drop the stream's later answers)
            delivery = self.scheduler.delivered(item, 0.0 if pcm is None else pcm.size / c.SAMPLE_RATE)
            self.metrics.record_delivery(delivery, item.request_start, handed_over)
        except Exception:  # noqa: BLE001
            pb_utils.Logger.log_error("orpheus decoder: recording a delivery failed:\n" + traceback.format_exc())

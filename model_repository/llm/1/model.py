"""Triton adapter for the torch in-flight batching engine (orpheus_triton.engine).

execute() only parses requests and hands them to the engine. The engine's loop
thread queues a response per frame of generated tokens (the final one with the
FINAL flag), which a sender thread sends; another thread asks Triton which
requests were cancelled. Neither round trip to the server holds up a step.
"""

import contextlib
import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from orpheus_triton import constants as c
from orpheus_triton.engine import CapacityError, GenerationRequest
from orpheus_triton.serving import (
    ActiveStreams,
    CancellationWatch,
    FrameChunker,
    ResponseQueue,
    StreamIdError,
    generation_settings,
    is_stop_request,
    model_parameters,
    response_thread,
    send_error,
)
from orpheus_triton.triton_llm import EngineMetrics, build_engine

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
log = logging.getLogger(__name__)


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.engine = build_engine(params)
        self.tokens_per_response = int(params.get("tokens_per_response", c.TOKENS_PER_FRAME))
        self.active = ActiveStreams(hold_seconds=float(params.get("stream_idle_seconds", c.STREAM_STATE_SECONDS)))
        threaded = response_thread(params, self.engine.device.type)
        self.responses = ResponseQueue(on_error=self._undeliverable, threaded=threaded)
        self.cancellations = CancellationWatch(run=(lambda call: self.responses.put(None, call)) if threaded else None)
        self.metrics = EngineMetrics(pb_utils, self.engine, self.active)
        self.engine.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            request_id = request.request_id()
            def get(name, request=request):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            if is_stop_request(get):
                # The stream ends normally, but its client may have cancelled the ensemble,
                # which then never passes the end to the decoder: the id stays retired.
                if self.engine.stop_stream(request_id):
                    self.active.release(request_id, completed=False)
                sender.send(flags=FINAL)
                continue
            try:
                settings = generation_settings(get)
                self.active.claim(request_id)
            except (ValueError, StreamIdError) as error:
                send_error(pb_utils, sender, "llm", error)
                continue
            try:
                self.engine.submit(
                    GenerationRequest(
                        **settings, emit=self._emitter(sender, request_id), fail=self._failer(sender, request_id),
                        is_cancelled=self.cancellations.watch(request_id, request.is_cancelled),
                        request_id=request_id,
                    )
                )
            except (CapacityError, ValueError) as error:
                self.cancellations.forget(request_id)
                self.active.release(request_id)
                # On the response thread, which may be asking about this request right now.
                self.responses.put(request_id, lambda s=sender, e=error: send_error(pb_utils, s, "llm", e), last=True)
        return None

    def _emitter(self, sender, request_id):
        chunks = FrameChunker(self.tokens_per_response)

        def emit(tokens, finished):
            ready = chunks.add(tokens, finished)
            if ready is None:
                return
            sent = chunks.sent

            def send():
                response = pb_utils.InferenceResponse([
                    pb_utils.Tensor(c.LLM_OUTPUT_IDS, np.array([[ready]], dtype=np.int32)),
                    pb_utils.Tensor(c.LLM_SEQUENCE_LENGTH, np.array([sent], dtype=np.int32)),
                ])
                sender.send(response, flags=FINAL if finished else 0)

            if finished:
                # Before the put: the client may reuse the id as soon as the final response is out.
                # A new stream's responses come from this (the engine) thread, after this put.
                self.cancellations.forget(request_id)
                self.active.release(request_id)
            self.responses.put(request_id, send, last=finished)

        return emit

    def _failer(self, sender, request_id):
        def fail(message):
            def send():
                # A cancelled request's sender is already closed by Triton: nothing more to say.
                with contextlib.suppress(Exception):
                    send_error(pb_utils, sender, "llm", message)

            self.cancellations.forget(request_id)
            self.responses.put(request_id, send, last=True)
            self.active.release(request_id, completed=False)

        return fail

    def _undeliverable(self, request_id, error):
        log.warning("could not deliver tokens of request %r (%s); dropping the stream", request_id, error)
        self.active.release(request_id, completed=False)  # its end_id will not reach the decoder either
        self.engine.stop_stream(request_id)

    def finalize(self):
        self.metrics.stop()
        self.engine.stop()
        self.responses.close()
